"""LoKr (Edalati et al. 2022, KronA; LyCORIS): ΔW = (α/r)·C ⊗ (B A)  (survey §3.1, low-rank).

d_out = a·b and d_in = c·d are split by :func:`factorization` (the divisor pair nearest √dim, or
``decompose_factor``); C ∈ ℝ^{a×c} (``lokr_w1``, or ``lokr_w1_a @ lokr_w1_b`` with ``decompose_both``) and
the second factor ∈ ℝ^{b×d} is low-rank B A (``lokr_w2_a @ lokr_w2_b``), or a full matrix ``lokr_w2`` when
r ≥ max(b, d)/2 (the same rule as peft, so adapters convert both ways). Init as peft: C (or its left
factor) = 0, the rest Kaiming-uniform(a=√5): an exact zero start. Scale α/r.

The update never builds ΔW: with x viewed as X ∈ ℝ^{c×d} (row-major), (C ⊗ W₂) vec(X) = vec(C X W₂ᵀ),
two small batched matmuls. Departures: peft's ``rank_dropout``/``module_dropout`` and the Conv variants
are omitted; GPT-2 Conv1D layers are served but cannot be exported to peft (peft's LoKr refuses them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import MethodConfig
from ..registry import register
from ..slot import linear_dims
from .checks import check_number
from .delta import DeltaAdapter, refuse_conv1d_for_peft
from .loha import is_conv1d, peft_lycoris_fields


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dim: ``factor`` and dim/factor when factor divides dim, else the largest divisor
    m ≤ √dim (and ≤ factor when factor > 0) with n = dim/m (peft's rule, so shapes agree)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0 and d <= limit)
    return m, dim // m


def _param(*shape, zero=False) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape))
    nn.init.zeros_(p) if zero else nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    return p


class LoKrLayer(DeltaAdapter):
    def __init__(self, d_in: int, d_out: int, r: int, scale: float, decompose_both: bool, factor: int,
                 fan_in_fan_out: bool = False):
        super().__init__()
        (a, b), (c, d) = factorization(d_out, factor), factorization(d_in, factor)
        self.shape = (a, b, c, d)
        if decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a, self.lokr_w1_b = _param(a, r, zero=True), _param(r, c)
        else:
            self.lokr_w1 = _param(a, c, zero=True)
        if r < max(b, d) / 2:
            self.lokr_w2_a, self.lokr_w2_b = _param(b, r), _param(r, d)
        else:
            self.lokr_w2 = _param(b, d)
        self.scale = float(scale)
        self.fan_in_fan_out = fan_in_fan_out

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r)·w1 ⊗ w2, (out, in) layout."""
        w1, w2 = self.factors()
        return torch.kron(w1, w2) * self.scale

    def update(self, x):
        a, b, c, d = self.shape
        w1, w2 = self.factors()
        y = w1.to(x.dtype) @ x.reshape(*x.shape[:-1], c, d) @ w2.to(x.dtype).t()
        return y.reshape(*x.shape[:-1], a * b) * self.scale

    def to_peft_tensors(self):
        return dict(self.named_parameters())

    def from_peft_tensors(self, t):
        return {k: t[k] for k, _ in self.named_parameters()}


@register
@dataclass
class LoKrConfig(MethodConfig):
    """Low-rank Kronecker product. ``alpha`` defaults to ``r`` (scale 1) when None; ``decompose_factor``
    -1 = factors nearest √dim; ``decompose_both`` also factorises C as a rank-r product."""

    method = "lokr"
    default_roles = ("q", "v")
    peft_type = "LOKR"

    r: int = 8
    alpha: float | None = None
    decompose_both: bool = False
    decompose_factor: int = -1

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        check_number(name, "r", self.r, lo=1, integer=True)
        if self.alpha is not None:
            check_number(name, "alpha", self.alpha, lo=0, lo_open=True)
        check_number(name, "decompose_factor", self.decompose_factor, lo=-1, integer=True)
        if self.decompose_factor == 0:
            raise ValueError(f"{name}.decompose_factor must be -1 or >= 1, got 0")

    @property
    def scale(self) -> float:
        return (self.r if self.alpha is None else self.alpha) / self.r

    def make_adapter(self, target, ctx):
        d_in, d_out = linear_dims(target.module)
        return LoKrLayer(d_in, d_out, self.r, self.scale, self.decompose_both, self.decompose_factor,
                         is_conv1d(target.module))

    def formula_count(self, ctx) -> int:
        targets = ctx.targets
        total = 0
        for t in targets:
            d_in, d_out = linear_dims(t.module)
            (a, b), (c, d) = factorization(d_out, self.decompose_factor), factorization(d_in, self.decompose_factor)
            total += self.r * (a + c) if self.decompose_both and self.r < max(a, c) / 2 else a * c
            total += self.r * (b + d) if self.r < max(b, d) / 2 else b * d
        return total

    def to_peft_fields(self, adapters):
        refuse_conv1d_for_peft("LoKr", adapters)
        return {"r": self.r, "alpha": self.r if self.alpha is None else self.alpha, "rank_dropout": 0.0,
                "module_dropout": 0.0, "init_weights": True, "use_effective_conv2d": False, "fan_in_fan_out": None,
                "decompose_both": self.decompose_both, "decompose_factor": self.decompose_factor}

    @classmethod
    def from_peft_fields(cls, d, resolve):
        if d.get("peft_type") != "LOKR":
            return None
        peft_lycoris_fields(d, "LoKr")
        return {"r": d["r"], "alpha": d.get("alpha", 8), "decompose_both": bool(d.get("decompose_both", False)),
                "decompose_factor": d.get("decompose_factor", -1)}
