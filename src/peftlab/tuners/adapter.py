"""Serial bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) — METHODS.md §1.3, §5.2.

a(h) = W_up f(W_down h + b_d) + b_u, applied as h ← h + a(h) on the output of a sub-block's output
projection, i.e. before the residual add (and before the LayerNorm in post-LN models):

- ``placement="houlsby"``: after the attention output projection and after the FFN (and after the
  cross-attention output projection in encoder-decoders) — two (three) adapters per block;
- ``placement="pfeiffer"``: after the FFN only.

Attachment is on the projection linears (roles ``o`` / ``cross_o`` / ``ffn_out``). In BERT-style
blocks the projection's dropout therefore acts on h + a(h) rather than before the adapter as in
adapter-transformers; identical in evaluation, a negligible difference in training.

Init: ``"zero"`` (default; Kaiming-uniform W_down, zero W_up and biases, an exact zero-start) or
``"bert"`` (adapter-transformers / the S4 code: N(0, 0.02²) for both weights, zero biases; close to
but not exactly the base model). Width: ``bottleneck`` m, or d / ``reduction_factor``; per-layer
overrides in ``layer_bottleneck`` {layer index: m}. Parameters per adapter: 2dm + m + d.
Not mergeable (the update is non-linear). ``gate=True`` (UniPELT, Mao et al. 2022):
h ← h + G_A(h)·a(h), G_A = σ(W_G h + b_G) one scalar per position (:class:`peftlab.slot.Gate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..config import POSITIVE, SIZE, MethodConfig
from ..errors import ConfigError
from ..registry import register
from ..slot import Adapter, add_gate, gate_of, linear_dims

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


class Bottleneck(nn.Module):
    """W_up f(W_down h + b_d) + b_u."""

    def __init__(self, d: int, m: int, activation: str = "relu", init: str = "zero"):
        super().__init__()
        self.down = nn.Linear(d, m)
        self.up = nn.Linear(m, d)
        self.act = activation
        if init == "bert":
            for lin in (self.down, self.up):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
        else:
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(ACTIVATIONS[self.act](self.down(h)))


class SerialAdapter(Adapter):
    def __init__(self, d: int, m: int, activation: str, init: str):
        super().__init__()
        self.adapter = Bottleneck(d, m, activation, init)

    def forward(self, slot, base_fn, x):
        h = base_fn(x)
        gate = gate_of(self)
        if gate is not None:
            return h + gate(h) * self.adapter(h)
        return h + self.adapter(h)


def bottleneck_for(cfg, d: int, layer: int | None) -> int:
    if cfg.layer_bottleneck and layer is not None and str(layer) in cfg.layer_bottleneck:
        return int(cfg.layer_bottleneck[str(layer)])
    if cfg.bottleneck is not None:
        return cfg.bottleneck
    return max(1, int(d // cfg.reduction_factor))


BOTTLENECK_LIMITS = MethodConfig.limits | {"bottleneck": SIZE, "layer_bottleneck": SIZE, "reduction_factor": POSITIVE}


def check_bottleneck_fields(cfg) -> None:
    if cfg.activation not in ACTIVATIONS:
        raise ConfigError(f"{type(cfg).__name__}.activation: must be one of {sorted(ACTIVATIONS)}, got {cfg.activation!r}")
    if cfg.layer_bottleneck:  # JSON turns int keys into strings: normalise
        cfg.layer_bottleneck = {str(k): v for k, v in cfg.layer_bottleneck.items()}


@register
@dataclass
class AdapterConfig(MethodConfig):
    """Serial bottleneck adapter; ``placement`` houlsby (attention + FFN) or pfeiffer (FFN only)."""

    method = "adapter"
    default_roles = ("o", "cross_o", "ffn_out")
    limits = BOTTLENECK_LIMITS
    inits: ClassVar[tuple[str, ...]] = ("zero", "bert")

    placement: str = "houlsby"
    bottleneck: int | None = None
    reduction_factor: float = 16.0
    activation: str = "relu"
    init: str = "zero"
    layer_bottleneck: dict[str, int] | None = None
    gate: bool = False  # UniPELT's learned gate on the adapter's output

    def validate(self) -> None:
        super().validate()
        if self.placement not in ("houlsby", "pfeiffer"):
            raise ConfigError(f"AdapterConfig.placement: must be houlsby or pfeiffer, got {self.placement!r}")
        if self.init not in self.inits:
            raise ConfigError(f"{type(self).__name__}.init: must be one of {self.inits}, got {self.init!r}")
        check_bottleneck_fields(self)

    def default_targets(self, model):
        return ["ffn_out"] if self.placement == "pfeiffer" else list(self.default_roles)

    def make_adapter(self, target, ctx):
        _, d_out = linear_dims(target.module)
        adapter = SerialAdapter(d_out, bottleneck_for(self, d_out, target.layer), self.activation, self.init)
        return add_gate(adapter, d_out) if self.gate else adapter

    def formula_count(self, ctx) -> int:
        total = 0
        for t in ctx.targets:
            d = linear_dims(t.module)[1]
            m = bottleneck_for(self, d, t.layer)
            total += 2 * d * m + m + d + (d + 1 if self.gate else 0)
        return total
