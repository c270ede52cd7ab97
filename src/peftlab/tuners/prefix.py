"""Prefix tuning (Li & Liang 2021) — METHODS.md §1.3, §5.2.

Each targeted self-attention module gets learned key/value prefixes P_K, P_V ∈ R^{l×d_kv}, prepended
to its keys and values: head_i = softmax(q_i [P_K^i; K_i]ᵀ/√d_h + [0; mask]) [P_V^i; V_i] — the mask
gains l always-visible columns. Reparameterisation (default, [C]): a learned E ∈ R^{l×d} →
Linear(d, 512) → tanh → Linear(512, 2·d_kv) per layer (one shared MLP emits all targeted layers'
prefixes); ``reparameterize=False`` trains the prefixes directly ("flat"); ``materialize(model)``
replaces the MLP by the prefixes it produces.

Mechanism: a slot on each attention module hands it a cache *view* whose ``update()`` returns
[prefix; keys] (wrapping the model's real cache during generation, so the cache itself only holds
real tokens), and left-pads the attention mask (an explicit causal mask is built when the model
relies on ``is_causal``). Hence per-layer lengths, layer subsets and several prefix parts on one
model are natural. Deviation from Hugging Face peft (documented): peft feeds the prefix as
``past_key_values``, which *shifts the positions* of real tokens by l; here positions are unchanged,
so outputs differ from peft's on position-aware models; ``mode="past"`` reproduces peft's formulation
instead (prefixes for every layer handed to the model as ``past_key_values`` on the input stack; one
length for all layers; encoders and decoders), with equal outputs to peft. Supported: BERT/RoBERTa, GPT-2, LLaMA, OPT,
BART (encoder and decoder self-attention). Cross-attention, T5 (shared relative position bias),
DeBERTa-v2 and ViT attention do not use cache updates and are refused at attach time.

``gate=True`` (UniPELT, Mao et al. 2022, §3): P_K, P_V are multiplied by G_P = σ(W_G x̄ + b_G) computed from
the attention input x. Departure: x̄ is x averaged over the positions (padding included), so the gate is
one scalar per sequence, which keeps the prefix a per-row key/value block (the paper leaves the pooling
unstated; during cached generation it reads the positions of the current step). ``mode="attention"`` only.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..compose import ComposeConfig
from ..config import SIZE, MethodConfig
from ..core import adapter_parts, replace_shared, set_active, shared_modules, state
from ..errors import ConfigError, UnsupportedArchitectureError
from ..families import family_of
from ..registry import register
from ..slot import Adapter, adapter_key, add_gate, cache_arg, gate_of
from ..targets import select

SUPPORTED = ("bert", "gpt2", "llama", "opt", "bart")


def kv_geometry(attn: nn.Module, config) -> tuple[int, int]:
    """(number of key/value heads, head dim) of an attention module."""
    head_dim = getattr(attn, "head_dim", None) or getattr(attn, "attention_head_size", None)
    heads = (getattr(config, "num_key_value_heads", None) or getattr(attn, "num_heads", None)
             or getattr(attn, "num_attention_heads", None) or getattr(config, "num_attention_heads", None))
    if hasattr(attn, "k_proj"):
        out = attn.k_proj.weight.shape[0]
        heads = out // head_dim
    return int(heads), int(head_dim)


class PrefixCacheView:
    """Looks like a transformers Cache to one attention layer: update() prepends the prefix."""

    def __init__(self, inner, pk: torch.Tensor, pv: torch.Tensor):
        self.inner, self.pk, self.pv = inner, pk, pv

    def update(self, key, value, layer_idx, *args, **kwargs):
        if self.inner is not None:
            key, value = self.inner.update(key, value, layer_idx, *args, **kwargs)
        b = key.shape[0]
        pk = self.pk.to(key.dtype).expand(b, -1, -1, -1)  # (h, l, d), or (b, h, l, d) per row
        pv = self.pv.to(value.dtype).expand(b, -1, -1, -1)
        return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _extend_mask(mask, l: int, q_len: int, past: int, causal: bool, device):
    if mask is None:
        if not causal or q_len == 1:
            return None
        k_len = past + q_len
        real = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=past)
        return torch.cat([torch.ones(q_len, l, dtype=torch.bool, device=device), real], dim=1)[None, None]
    pad_shape = (*mask.shape[:-1], l)
    fill = torch.ones(pad_shape, dtype=torch.bool, device=mask.device) if mask.dtype == torch.bool else \
        torch.zeros(pad_shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([fill, mask], dim=-1)


class PrefixAttention(Adapter):
    """Slot adapter on one attention module; the prefixes come from the shared PrefixEncoder."""

    def __init__(self, key: str, causal: bool, signature: inspect.Signature):
        super().__init__()
        self.key, self.causal, self.signature = key, causal, signature
        self.cache_key = cache_arg(signature)

    def forward(self, slot, base_fn, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        a = bound.arguments
        extra = a.pop("kwargs", {}) if "kwargs" in a else {}
        hs = a.get("hidden_states")
        pk, pv = self.shared.prefix(self.key)
        gate = gate_of(self)
        if gate is not None:  # one scalar per sequence: (b, 1, 1, 1) x (h, l, d) -> per-row prefixes
            g = gate(hs.mean(dim=1))[:, :, None, None]
            pk, pv = g * pk, g * pv
        inner = a.get(self.cache_key)
        if inner is not None and type(inner).__name__ == "EncoderDecoderCache":
            inner = inner.self_attention_cache
        past = inner.get_seq_length(getattr(slot.base, "layer_idx", 0) or 0) if inner is not None else 0
        a[self.cache_key] = PrefixCacheView(inner, pk, pv)
        a["attention_mask"] = _extend_mask(a.get("attention_mask"), pk.shape[-2], hs.shape[1], past, self.causal, hs.device)
        return base_fn(**a, **extra)


class PrefixPast(Adapter):
    """``mode="past"`` (Hugging Face peft's formulation): on the input stack, the prefixes of every layer
    are handed to the model as ``past_key_values`` (so real tokens' positions start at l)."""

    def __init__(self, order: list[str], signature: inspect.Signature):
        super().__init__()
        self.order, self.signature = order, signature
        self.cache_key = cache_arg(signature)

    def forward(self, slot, base_fn, *args, **kwargs):
        from transformers import DynamicCache

        a = self.signature.bind(*args, **kwargs).arguments
        extra = a.pop("kwargs", {}) if "kwargs" in a else {}
        ref = a.get("input_ids") if a.get("input_ids") is not None else a.get("inputs_embeds")
        b = ref.shape[0]
        past = a.get(self.cache_key)
        n = self.shared.shapes[self.order[0]][0]
        mask = a.get("attention_mask")
        if mask is not None:
            a["attention_mask"] = torch.cat([mask.new_ones(b, n), mask], dim=1)
        if past is None or past.get_seq_length() == 0:
            cache = past if past is not None else DynamicCache()
            for i, key in enumerate(self.order):
                pk, pv = self.shared.prefix(key)
                cache.update(pk.unsqueeze(0).expand(b, -1, -1, -1), pv.unsqueeze(0).expand(b, -1, -1, -1), i)
            a[self.cache_key] = cache
            for k in ("position_ids", "cache_position"):
                if a.get(k) is not None:
                    a[k] = a[k] + n
        else:
            for k in ("position_ids", "cache_position"):
                if a.get(k) is not None:
                    a[k] = a[k] + n
        return base_fn(**a, **extra)


class PrefixEncoder(nn.Module):
    """Produces every targeted layer's (P_K, P_V), reparameterised by an MLP or stored flat."""

    def __init__(self, layers: dict[str, tuple[int, int, int]], d_model: int, reparameterize: bool, hidden: int):
        super().__init__()
        self.shapes = layers  # key -> (length, heads, head_dim)
        self.reparameterize = reparameterize
        if reparameterize:
            lmax = max(s[0] for s in layers.values())
            self.embedding = nn.Parameter(torch.randn(lmax, d_model) * 0.02)
            self.mlp_in = nn.Linear(d_model, hidden)
            self.heads = nn.ModuleDict({k: nn.Linear(hidden, 2 * h * hd) for k, (_, h, hd) in layers.items()})
        else:
            self.prefixes = nn.ParameterDict({k: nn.Parameter(torch.randn(2, h, n, hd) * 0.02) for k, (n, h, hd) in layers.items()})

    def prefix(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        n, h, hd = self.shapes[key]
        if self.reparameterize:
            z = torch.tanh(self.mlp_in(self.embedding[:n]))
            kv = self.heads[key](z).view(n, 2, h, hd).permute(1, 2, 0, 3)
            return kv[0], kv[1]
        p = self.prefixes[key]
        return p[0], p[1]

    @torch.no_grad()
    def materialized(self) -> PrefixEncoder:
        flat = PrefixEncoder(self.shapes, 1, reparameterize=False, hidden=1)
        for k in self.shapes:
            pk, pv = self.prefix(k)
            flat.prefixes[k].copy_(torch.stack([pk, pv]))
        return flat


def _key(name: str) -> str:
    return name.replace(".", "-")


@register
@dataclass
class PrefixConfig(MethodConfig):
    """Prefix tuning: learned key/value prefixes at each targeted self-attention (``layer_lengths`` per layer)."""

    method = "prefix"
    default_roles = ("attn",)
    accepts = ("module",)
    limits = MethodConfig.limits | {"num_virtual_tokens": SIZE, "encoder_hidden": SIZE, "layer_lengths": SIZE}

    num_virtual_tokens: int = 30
    reparameterize: bool = True
    encoder_hidden: int = 512
    layer_lengths: dict[str, int] | None = None  # {layer index: prefix length} overrides
    mode: str = "attention"  # "attention" (per layer, positions unchanged) | "past" (peft-compatible)
    gate: bool = False  # UniPELT's learned gate on the prefixes (mode="attention")

    def validate(self) -> None:
        super().validate()
        if self.mode not in ("attention", "past"):
            raise ConfigError(f"PrefixConfig.mode: must be attention or past, got {self.mode!r}")
        if self.mode == "past" and (self.layers is not None or self.layer_lengths):
            raise ConfigError("PrefixConfig.mode: 'past' prefixes every layer with one length (no layers / layer_lengths)")
        if self.mode == "past" and self.gate:
            raise ConfigError("PrefixConfig.gate: only mode='attention' prefixes take a gate")
        if self.layer_lengths:  # JSON turns int keys into strings: normalise
            self.layer_lengths = {str(k): v for k, v in self.layer_lengths.items()}

    def target_kinds(self) -> tuple[str, ...]:
        return ("any",) if self.mode == "past" else self.accepts

    def check_model(self, model) -> None:
        fam = family_of(model)
        if fam is None or fam.name not in SUPPORTED:
            raise UnsupportedArchitectureError(
                f"prefix tuning is not supported on {getattr(model.config, 'model_type', '?')}: supported families "
                f"{SUPPORTED} (T5 shares one relative position bias across layers; DeBERTa-v2 and ViT attention do "
                f"not take a key/value cache)")
        if self.targets and any(t.startswith("cross") for t in self.targets):
            raise UnsupportedArchitectureError("prefix tuning of cross-attention is not supported")
        if self.mode == "past" and (fam.kind == "encoder-decoder" or not fam.input_stack):
            raise UnsupportedArchitectureError(f"mode='past' supports encoders and decoders, not {fam.name}")

    def default_targets(self, model):
        if self.mode == "past":
            return list(family_of(model).input_stack)
        return list(self.default_roles)

    def keep(self, target) -> bool:
        return self.mode != "past" or (target.layer is None and hasattr(target.module, "get_input_embeddings"))

    def _attention_targets(self, model):
        if self.mode == "attention":
            return select(model, self)
        return select(model, PrefixConfig(num_virtual_tokens=self.num_virtual_tokens))

    def _length(self, layer) -> int:
        if self.layer_lengths and layer is not None and str(layer) in self.layer_lengths:
            return self.layer_lengths[str(layer)]
        return self.num_virtual_tokens

    def build_shared(self, ctx):
        shapes = {}
        for t in self._attention_targets(ctx.model):
            h, hd = kv_geometry(t.module, ctx.model.config)
            shapes[_key(t.name)] = (self._length(t.layer), h, hd)
        return PrefixEncoder(shapes, ctx.hidden_size, self.reparameterize, self.encoder_hidden)

    def make_adapter(self, target, ctx):
        sig = inspect.signature(target.module.forward)
        if self.mode == "past":
            return PrefixPast(list(ctx.shared.shapes), sig)
        adapter = PrefixAttention(_key(target.name), bool(getattr(target.module, "is_causal", False)), sig)
        return add_gate(adapter, ctx.hidden_size) if self.gate else adapter


def materialize(model: nn.Module, name: str = "default") -> None:
    """Replace the reparameterisation MLP of adapter ``name`` by the prefixes it produces; the adapter's
    prefix parts become ``reparameterize=False`` (so it saves and reloads as flat prefixes)."""
    st = state(model)
    parts, changed = [], False
    for label, part in adapter_parts(model, name):
        if isinstance(part, PrefixConfig) and part.reparameterize:
            key = adapter_key(name, label)
            replace_shared(model, key, shared_modules(model)[key].materialized())
            part, changed = dataclasses.replace(part, reparameterize=False), True
        parts.append((label, part))
    st.parts[name] = parts
    cfg = st.configs[name]
    if isinstance(cfg, PrefixConfig):
        st.configs[name] = parts[0][1]
    elif changed and parts[0][0] is not None:  # a composite (compose, MAM, UniPELT): its now flat parts, same labels
        st.configs[name] = ComposeConfig(parts=[p for _, p in parts], modules_to_save=cfg.modules_to_save)
    set_active(model, list(st.active))  # the new prefixes train like the MLP did
