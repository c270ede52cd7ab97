"""Prompt tuning (Lester et al. 2021) — METHODS.md §5.2: X' = [P; E(x)], P ∈ R^{p×d} at the input only.

A slot on the model's input stack (``Family.input_stack``: e.g. ``bert``, ``model``, ``transformer``,
the encoder of BART/T5) prepends the soft prompt to the input embeddings and ones to the attention
mask (zeros to token_type_ids). For causal and encoder-decoder models the prompt positions are removed
from the stack's outputs (``strip_outputs``), so logits, labels and the decoder's cross-attention
mask keep the caller's length; during generation the cache holds the prompt and later steps only get
their mask/positions shifted by p. Encoder classifiers keep the full sequence (the pooler reads
position 0, the first virtual token — as in Hugging Face peft).
Init: ``"vocab"`` (embeddings of random vocabulary tokens, seeded; default), ``"token_ids"``
(``init_token_ids``, e.g. a tokenised text or the class labels) or ``"random"`` (N(0, 0.02²)).
Deviation from peft for encoder-decoders: peft lets the decoder cross-attend to the prompt positions;
here they are stripped from the encoder output. ViT (no token embeddings) is refused.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..config import SIZE, MethodConfig, Range
from ..errors import ConfigError, UnsupportedArchitectureError
from ..families import family_of
from ..registry import register
from ..slot import Adapter, cache_arg


class SoftPrompt(Adapter):
    """Prepends ``self.prompt`` (p, d) to the input embeddings. ``prompt=None``: a subclass computes it
    (P-tuning's prompt encoder) and defines ``prompt`` as a property."""

    def __init__(self, prompt: torch.Tensor | None, strip: bool, signature: inspect.Signature):
        super().__init__()
        if prompt is not None:
            self.prompt = nn.Parameter(prompt)
        self.strip, self.signature = strip, signature
        self.cache_key = cache_arg(signature)

    def forward(self, slot, base_fn, *args, **kwargs):
        a = self.signature.bind(*args, **kwargs).arguments
        extra = a.pop("kwargs", {}) if "kwargs" in a else {}
        prompt = self.prompt  # read once: a subclass may compute it (P-tuning's encoder)
        p = prompt.shape[-2]  # (p, d), or (b, p, d) per row in mixed batches (serving)
        past = a.get(self.cache_key)
        past_len = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        mask = a.get("attention_mask")
        ref = a.get("input_ids") if a.get("input_ids") is not None else a.get("inputs_embeds")
        b = ref.shape[0]
        if mask is not None:
            a["attention_mask"] = torch.cat([mask.new_ones(b, p), mask], dim=1)
        if past_len == 0:  # a fresh sequence: prepend the prompt
            emb = a.get("inputs_embeds")
            if emb is None:
                emb = slot.base.get_input_embeddings()(a.pop("input_ids"))
            a["input_ids"] = None
            a["inputs_embeds"] = torch.cat([prompt.to(emb.dtype).expand(b, -1, -1), emb], dim=1)
            if a.get("token_type_ids") is not None:
                tt = a["token_type_ids"]
                a["token_type_ids"] = torch.cat([tt.new_zeros(b, p), tt], dim=1)
            for k in ("position_ids", "cache_position"):
                if a.get(k) is not None:
                    a[k] = None  # recomputed by the model for the longer sequence
            out = base_fn(**a, **extra)
            return self._strip(out, p) if self.strip else out
        for k in ("position_ids", "cache_position"):  # later generation steps: the cache holds the prompt
            if a.get(k) is not None:
                a[k] = a[k] + p
        return base_fn(**a, **extra)

    @staticmethod
    def _strip(out, p: int):
        if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None:
            out.last_hidden_state = out.last_hidden_state[:, p:]
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(h[:, p:] for h in out.hidden_states)
        return out


@dataclass
class InputPromptConfig(MethodConfig):
    """What every soft prompt on the input stack shares (prompt tuning, P-tuning): the targets, the
    architecture check and whether the prompt positions are stripped from the outputs."""

    accepts = ("any",)

    strip_outputs: bool | None = None  # None: strip for decoders and encoder-decoders

    def default_targets(self, model):
        fam = family_of(model)
        return list(fam.input_stack) if fam else []

    def check_model(self, model) -> None:
        fam = family_of(model)
        if fam is None or not fam.input_stack:
            raise UnsupportedArchitectureError(
                f"{self.method}: soft prompts need token embeddings; {getattr(model.config, 'model_type', '?')} is not supported")

    def keep(self, target) -> bool:
        return hasattr(target.module, "get_input_embeddings") and target.layer is None

    def strips(self, ctx) -> bool:
        kind = ctx.family.kind if ctx.family else None
        return self.strip_outputs if self.strip_outputs is not None else kind in ("decoder", "encoder-decoder")


@register
@dataclass
class PromptTuningConfig(InputPromptConfig):
    """Soft prompt of ``num_virtual_tokens`` vectors prepended to the input embeddings."""

    method = "prompt"
    limits = MethodConfig.limits | {"num_virtual_tokens": SIZE, "init_token_ids": Range(0)}

    num_virtual_tokens: int = 20
    init: str = "vocab"
    init_token_ids: list[int] | None = None
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.init not in ("vocab", "token_ids", "random"):
            raise ConfigError(f"PromptTuningConfig.init: must be vocab, token_ids or random, got {self.init!r}")
        if self.init == "token_ids" and not self.init_token_ids:
            raise ConfigError("PromptTuningConfig.init_token_ids: init='token_ids' needs init_token_ids")

    def make_adapter(self, target, ctx):
        emb = target.module.get_input_embeddings().weight.detach()
        if self.init == "token_ids" and max(self.init_token_ids) >= emb.shape[0]:
            raise ConfigError(f"PromptTuningConfig.init_token_ids: ids must be < the vocabulary size {emb.shape[0]}")
        g = torch.Generator().manual_seed(self.seed)
        n = self.num_virtual_tokens
        if self.init == "random":
            prompt = torch.randn(n, emb.shape[1], generator=g) * 0.02
        else:
            ids = torch.tensor(self.init_token_ids) if self.init == "token_ids" else torch.randint(0, emb.shape[0], (n,), generator=g)
            ids = ids.repeat((n + len(ids) - 1) // len(ids))[:n]
            prompt = emb[ids].clone().float()
        return SoftPrompt(prompt, self.strips(ctx), inspect.signature(target.module.forward))

    def formula_count(self, ctx) -> int:
        return sum(self.num_virtual_tokens * t.module.get_input_embeddings().weight.shape[1] for t in ctx.targets)
