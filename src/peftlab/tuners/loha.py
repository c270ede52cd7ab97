"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): ΔW = (α/r)·(B₁A₁) ⊙ (B₂A₂)  (survey §3.1, low-rank).

Two rank-r products combined by a Hadamard (element-wise) product, so rank(ΔW) ≤ r² for 2r(d_in+d_out)
parameters. Names and init follow peft's ``LoHaConfig`` (so adapters convert both ways):
``hada_w1_a`` = B₁ (d_out×r), ``hada_w1_b`` = A₁ (r×d_in), likewise ``hada_w2_*``; B₁, A₁, B₂ are
Kaiming-uniform(a=√5) and A₂ = 0 (exact zero start), scale α/r.

Departures (documented): peft's ``rank_dropout`` / ``module_dropout`` (training-time regularisers of the
LyCORIS code, not in the paper) and the Conv2d/CP-decomposition variant are omitted. We also serve
GPT-2's Conv1D layers, which peft's LoHa refuses; such adapters cannot be exported to peft.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import MethodConfig
from ..registry import register
from ..slot import linear_dims
from .checks import check_number, refuse_peft_options
from .delta import DeltaAdapter, refuse_conv1d_for_peft


def is_conv1d(module: nn.Module) -> bool:
    return type(getattr(module, "base", module)).__name__ == "Conv1D"


class LoHaLayer(DeltaAdapter):
    def __init__(self, d_in: int, d_out: int, r: int, scale: float, fan_in_fan_out: bool = False):
        super().__init__()
        self.hada_w1_a = nn.Parameter(torch.empty(d_out, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, d_in))
        self.hada_w2_a = nn.Parameter(torch.empty(d_out, r))
        self.hada_w2_b = nn.Parameter(torch.zeros(r, d_in))
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        self.scale = float(scale)
        self.fan_in_fan_out = fan_in_fan_out

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r)·(w1_a w1_b) ⊙ (w2_a w2_b), (out, in) layout."""
        return _Hadamard.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale)

    def to_peft_tensors(self):
        return {k: getattr(self, k) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}

    def from_peft_tensors(self, t):
        return {k: t[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}


class _Hadamard(torch.autograd.Function):
    """ΔW = s·(B₁A₁) ⊙ (B₂A₂) saving only the four factors; backward recomputes the products:
    g₁ = s·g ⊙ (B₂A₂) gives ∂B₁ = g₁A₁ᵀ, ∂A₁ = B₁ᵀg₁ (and symmetrically for B₂, A₂)."""

    @staticmethod
    def forward(ctx, b1, a1, b2, a2, scale):
        ctx.save_for_backward(b1, a1, b2, a2)
        ctx.scale = scale
        return (b1 @ a1) * (b2 @ a2) * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        b1, a1, b2, a2 = ctx.saved_tensors
        g1 = g * (b2 @ a2) * ctx.scale
        g2 = g * (b1 @ a1) * ctx.scale
        return g1 @ a1.t(), b1.t() @ g1, g2 @ a2.t(), b2.t() @ g2, None


def peft_lycoris_fields(d: dict, peft_type: str) -> None:
    """Refuse peft LoHa/LoKr options peftlab does not implement (one line naming the option)."""
    refuse_peft_options(d, peft_type, (("rank_pattern", {}), ("alpha_pattern", {}), ("rank_dropout", 0.0),
                                       ("module_dropout", 0.0), ("use_effective_conv2d", False)))


@register
@dataclass
class LoHaConfig(MethodConfig):
    """Low-rank Hadamard product. ``alpha`` defaults to ``r`` (scale 1) when None."""

    method = "loha"
    default_roles = ("q", "v")
    peft_type = "LOHA"

    r: int = 8
    alpha: float | None = None

    def validate(self) -> None:
        super().validate()
        check_number(type(self).__name__, "r", self.r, lo=1, integer=True)
        if self.alpha is not None:
            check_number(type(self).__name__, "alpha", self.alpha, lo=0, lo_open=True)

    @property
    def scale(self) -> float:
        return (self.r if self.alpha is None else self.alpha) / self.r

    def make_adapter(self, target, ctx):
        d_in, d_out = linear_dims(target.module)
        return LoHaLayer(d_in, d_out, self.r, self.scale, is_conv1d(target.module))

    def formula_count(self, ctx) -> int:
        targets = ctx.targets
        return sum(2 * self.r * sum(linear_dims(t.module)) for t in targets)

    def to_peft_fields(self, adapters):
        refuse_conv1d_for_peft("LoHa", adapters)
        return {"r": self.r, "alpha": self.r if self.alpha is None else self.alpha, "rank_dropout": 0.0,
                "module_dropout": 0.0, "init_weights": True, "use_effective_conv2d": False, "fan_in_fan_out": None}

    @classmethod
    def from_peft_fields(cls, d, resolve):
        if d.get("peft_type") != "LOHA":
            return None
        peft_lycoris_fields(d, "LoHa")
        return {"r": d["r"], "alpha": d.get("alpha", 8)}
