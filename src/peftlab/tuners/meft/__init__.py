"""MEFT (Liao, Tan, Monz; NeurIPS 2023): a pretrained model made reversible with adapters, so that
backward recomputes activations instead of storing them (METHODS.md §2).

=========  =============================  =============================  ====  ====  =======
variant    F                              G                              λ     β     swap
=========  =============================  =============================  ====  ====  =======
MEFT1      block ℓ with FFN-parallel a    standalone adapter             0.1   1     yes
MEFT2      standalone adapter             block ℓ with FFN-parallel a    1     0.1   yes
MEFT3      attention sub-block + adapter  FFN sub-block + parallel a     0.1   0.1   no
=========  =============================  =============================  ====  ====  =======

y¹ = λ·x¹ + F(x²), y² = β·x² + G(y¹); input x¹ = x² = h₀ (embedding output); output (x¹ + x²)/2.
Two adapters per block, W ~ N(0, 0.02²), biases 0 (no zero init: MEFT starts *close to* the base
model, not at it). The bottom ``reversible_layers`` blocks (default: all) run through the reversible
autograd function; the rest use ordinary autograd (hybrid depth, the paper's Fig. 7 first setting).

How it attaches: every block of the stack gets a :class:`~.reversible.MEFTLayer` (its adapters); block
0's runs the whole two-stream stack and the others pass their input through. Supported: BERT-family
encoders and LLaMA-family decoders (see :mod:`.blocks`); other architectures are refused at attach.
Not mergeable (MEFT changes the computation graph, not the weights). λ and β default to the values of
the reference script ``bert_glue.sh`` [C]; the paper only says "small but non-zero" [U].
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.activations import ACT2FN

from ...config import FRACTION, SIZE, MethodConfig, Range
from ...core import shared_modules
from ...errors import ConfigError, UnsupportedArchitectureError
from ...families import family_of, find_blocks, model_type
from ...registry import register
from ...slot import Slot, resolve
from .blocks import BLOCK_KINDS, MEFTAdapter
from .reversible import MEFTLayer, MEFTStack, ReversibleInstabilityError

__all__ = ["MEFTConfig", "MEFTLayer", "MEFTStack", "ReversibleInstabilityError"]

DEFAULT_FACTORS = {1: (0.1, 1.0), 2: (1.0, 0.1), 3: (0.1, 0.1)}


@register
@dataclass
class MEFTConfig(MethodConfig):
    """MEFT1/2/3. ``lam``/``beta`` None = the variant's defaults (table above).

    Attributes:
        variant: 1, 2 or 3.
        r: adapter bottleneck (reference: 8).
        reversible_layers: bottom blocks run reversibly (None = all; 0 = same model, ordinary autograd).
        adapter_dropout: None = the backbone's ``hidden_dropout_prob`` (0 where it has none).
        layernorm_in_adapter: LayerNorm at the standalone adapter's input (reference flag, default off).
        reconstruction_tol: relative (max-abs) error of the rebuilt embedding output above which a warning
            is given. Measured on MiniLM: errors up to 2.4e-2 left every gradient tensor at cosine ≥ 0.99998
            with ordinary autograd; fully reversible MEFT3 (error ~60) at 0.29.
        check_reconstruction: save h₀ and measure the reconstruction error in every backward.
        stream_dtype: dtype of the two streams inside the reversible part, "float64" (default, our
            choice [I]: see :mod:`.reversible`) or "float32" (the reference code's precision).
    """

    method = "meft"
    accepts = ("any",)
    limits = MethodConfig.limits | {"r": SIZE, "reversible_layers": Range(0), "adapter_dropout": FRACTION,
                                    "init_std": Range(0), "reconstruction_tol": Range(0, lo_open=True)}
    variant: int = 1
    r: int = 8
    lam: float | None = None
    beta: float | None = None
    reversible_layers: int | None = None
    adapter_dropout: float | None = None
    layernorm_in_adapter: bool = False
    init_std: float = 0.02
    reconstruction_tol: float = 0.1
    check_reconstruction: bool = True
    stream_dtype: str = "float64"

    def validate(self) -> None:
        super().validate()
        if self.variant not in DEFAULT_FACTORS:
            raise ConfigError(f"MEFTConfig.variant: must be 1, 2 or 3, got {self.variant!r}")
        if self.stream_dtype not in ("float32", "float64"):
            raise ConfigError(f"MEFTConfig.stream_dtype: must be 'float32' or 'float64', got {self.stream_dtype!r}")
        for name in ("lam", "beta"):
            if getattr(self, name) == 0:
                raise ConfigError(f"MEFTConfig.{name}: must be non-zero (the inverse divides by it)")
        if self.targets is not None or self.layers is not None or self.target_regex or self.target_classes:
            raise ConfigError("MEFTConfig.targets: MEFT converts the whole block stack: targets/layers/target_regex/target_classes "
                             "do not apply (choose the reversible depth with reversible_layers)")

    @property
    def factors(self) -> tuple[float, float]:
        lam0, beta0 = DEFAULT_FACTORS[self.variant]
        return (lam0 if self.lam is None else self.lam), (beta0 if self.beta is None else self.beta)

    def check_model(self, model) -> None:
        fam = family_of(model)
        kind = BLOCK_KINDS.get(fam.name) if fam is not None else None
        mt = model_type(model)
        if kind is None or mt not in kind.model_types:
            supported = sorted(t for k in BLOCK_KINDS.values() for t in k.model_types)
            raise UnsupportedArchitectureError(
                f"MEFT supports BERT-family encoders and LLaMA-family decoders ({', '.join(supported)}); "
                f"got model_type {mt!r}")
        cfg = model.config
        if getattr(cfg, "is_decoder", False) and fam.name == "bert" or getattr(cfg, "add_cross_attention", False):
            raise UnsupportedArchitectureError("MEFT: BERT-family models used as decoders / with cross-attention "
                                               "are not supported")
        blocks = find_blocks(model)
        if not blocks:
            raise UnsupportedArchitectureError("MEFT: no transformer block stack found")
        if self.reversible_layers is not None and self.reversible_layers > len(blocks):
            raise ConfigError(f"MEFTConfig.reversible_layers={self.reversible_layers} but the model has {len(blocks)} blocks")
        if any(isinstance(m, MEFTStack) for m in shared_modules(model).values()):
            raise UnsupportedArchitectureError("a MEFT adapter is already attached; delete it first")
        for _, name, blk in blocks:
            base = blk.base if isinstance(blk, Slot) else blk
            for path in kind.needs:
                try:
                    resolve(base, path)
                except (AttributeError, KeyError) as e:
                    raise UnsupportedArchitectureError(f"MEFT: block {name} has no {path!r}") from e
            for path in kind.bypassed:
                if isinstance(resolve(base, path), Slot):
                    raise UnsupportedArchitectureError(
                        f"MEFT calls the parts of {name}.{path} itself, so another adapter wrapping that module "
                        "would be skipped; attach MEFT to a model without it")
            if isinstance(blk, Slot):
                raise UnsupportedArchitectureError(f"MEFT: block {name} is already wrapped by another adapter")

    def default_targets(self, model) -> list[str]:
        return [n for _, n, _ in find_blocks(model)]

    def build_shared(self, ctx):
        blocks = find_blocks(ctx.model)
        lam, beta = self.factors
        kind = BLOCK_KINDS[ctx.family.name]
        return MEFTStack(self.variant, lam, beta, self.reversible_layers, kind, [b for _, _, b in blocks],
                         [n for _, n, _ in blocks], self.reconstruction_tol, self.check_reconstruction, self.stream_dtype)

    def make_adapter(self, target, ctx) -> MEFTLayer:
        mc, shared = ctx.model.config, ctx.shared
        d = ctx.hidden_size
        act = ACT2FN[getattr(mc, "hidden_act", "gelu")]
        p = self.adapter_dropout
        if p is None:
            p = float(getattr(mc, "hidden_dropout_prob", 0.0) or 0.0)
        mk = lambda ln=False: MEFTAdapter(d, self.r, act, p, ln, self.init_std)  # noqa: E731
        side = mk(self.layernorm_in_adapter) if self.variant in (1, 2) else None
        attn = mk() if self.variant == 3 else None
        layer = MEFTLayer(shared.names.index(target.name), mk(), side, attn)
        shared.layers.append(layer)
        shared.layers.sort(key=lambda m: m.index)
        return layer

    def formula_count(self, ctx) -> int | None:
        targets = ctx.targets
        first = targets[0].module
        d = next(m for m in first.modules() if isinstance(m, nn.Linear)).in_features
        per = 2 * (2 * d * self.r + d + self.r) + (2 * d if self.layernorm_in_adapter and self.variant != 3 else 0)
        return per * len(targets)
