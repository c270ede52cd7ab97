"""Parallel adapter (He et al., ICLR 2022): h ← h + s·W_up ReLU(W_down x), computed from the
sub-layer's *input* x in parallel to the sub-layer (METHODS.md §5.2; defaults [C] s = 4,
Kaiming-uniform W_down, zero W_up and biases, so the model starts exactly at the base).

Where it attaches (families.py roles), at the FFN by default (``placement="attn"``: the attention
sub-layer where the family exposes it):
- modules that map the sub-layer input to its output: LLaMA/GPT-2/ViT ``mlp``, T5 ``DenseReluDense``
  → y = f(x) + s·a(x);
- BERT-style residual sub-blocks ``output(h, input_tensor)`` / ``attention.output(h, input_tensor)``
  that compute LN(dense(h) + input_tensor): the adapter adds s·a(input_tensor) inside the residual,
  i.e. LN(dense(h) + s·a(x) + x).
OPT and BART compute their FFN inline in the decoder layer (no sub-module sees both its input and
output), so they are refused at attach time with an explanation. Not mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig
from ..errors import ConfigError, UnsupportedArchitectureError
from ..families import family_of
from ..registry import register
from ..slot import Adapter
from .adapter import BOTTLENECK_LIMITS, Bottleneck, bottleneck_for, check_bottleneck_fields


class ParallelAdapter(Adapter):
    def __init__(self, d: int, m: int, scaling: float, activation: str, init: str):
        super().__init__()
        self.adapter = Bottleneck(d, m, activation, init)
        self.scaling = float(scaling)

    def forward(self, slot, base_fn, hidden_states, *args, **kwargs):
        if args:  # BERT-style f(h, input_tensor): the sub-layer input is input_tensor
            x = args[0]
            return base_fn(hidden_states, x + self.scaling * self.adapter(x), *args[1:], **kwargs)
        if "input_tensor" in kwargs:
            x = kwargs["input_tensor"]
            return base_fn(hidden_states, **{**kwargs, "input_tensor": x + self.scaling * self.adapter(x)})
        return base_fn(hidden_states, **kwargs) + self.scaling * self.adapter(hidden_states)


@register
@dataclass
class ParallelAdapterConfig(MethodConfig):
    """Parallel adapter at the FFN (default) or the attention sub-layer, scaled by ``scaling``."""

    method = "parallel_adapter"
    accepts = ("module",)
    limits = BOTTLENECK_LIMITS

    placement: str = "ffn"
    bottleneck: int | None = None
    reduction_factor: float = 2.0  # [C] r = 512 at d = 1024
    scaling: float = 4.0
    activation: str = "relu"
    init: str = "zero"
    layer_bottleneck: dict[str, int] | None = None

    def validate(self) -> None:
        super().validate()
        if self.placement not in ("ffn", "attn"):
            raise ConfigError(f"ParallelAdapterConfig.placement: must be ffn or attn, got {self.placement!r}")
        check_bottleneck_fields(self)

    def default_targets(self, model):
        fam = family_of(model)
        if fam is None:
            return []
        wanted = ("attn_residual",) if self.placement == "attn" else ("ffn_residual", "ffn")
        return [r for r in wanted if r in fam.roles]

    def check_model(self, model) -> None:
        fam = family_of(model)
        if fam is None or not self.default_targets(model):
            name = fam.name if fam else getattr(model.config, "model_type", "?")
            raise UnsupportedArchitectureError(
                f"parallel_adapter (placement={self.placement}) is not supported on {name}: its blocks have no "
                f"sub-module that sees both the {self.placement} sub-layer's input and output "
                f"(OPT/BART compute the FFN inline in the layer). Use the serial 'adapter' or LoRA instead."
            )

    def make_adapter(self, target, ctx):
        d = ctx.hidden_size
        return ParallelAdapter(d, bottleneck_for(self, d, target.layer), self.scaling, self.activation, self.init)

    def formula_count(self, ctx) -> int:
        d = ctx.hidden_size
        return sum(2 * d * bottleneck_for(self, d, t.layer) + bottleneck_for(self, d, t.layer) + d for t in ctx.targets)
