"""Compacter (Mahabadi et al., NeurIPS 2021): bottleneck adapters whose down/up projections are
parameterised hypercomplex multiplication (PHM) layers, with slow weights shared by every layer.

    W = Σ_{i=1..n} A_i ⊗ B_i,   A_i ∈ R^{n×n} (shared),   B_i ∈ R^{(k/n)×(d/n)}           (Eq. 3-4)
    Compacter: B_i = s_i t_iᵀ, s_i ∈ R^{(k/n)×r}, t_i ∈ R^{r×(d/n)} (rank r, the paper's r = 1)  (Eq. 5)
    PHM-Adapter (``factorized=False``): B_i full.
    a(h) = W_up f(W_down h + b_d) + b_u,   h ← h + a(h)                                    (serial adapter)

The n³ slow weights A (one set shared by every adapter of the config and by both projections, as
adapter-transformers' ``shared_phm_rule``) live in the core's shared module (``build_shared``); each
slot adapter reads them as ``self.shared.rule``. Placement: ``houlsby`` (after attention and FFN:
Compacter) or ``pfeiffer`` (after the FFN only: Compacter++). Defaults as adapter-transformers'
``CompacterConfig``: n = 4, r = 1, reduction factor 32, GELU, A ~ N(0, 0.0001²) per entry,
Glorot-uniform factors. Departure: ``init="zero"`` (default) zeroes the up projection's s_i so the model
starts exactly at the base (``init="glorot"``: adapters' init, all factors Glorot-uniform). d and an
explicit bottleneck m must be divisible by n; m from ``reduction_factor`` is rounded down to a multiple
of n (at least n). Parameters per adapter: (d/n + m/n)·r·n·2 + m + d (factorized), plus n³
shared. Not mergeable (the update is non-linear).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import SIZE, Range
from ..errors import ConfigError
from ..registry import register
from ..slot import Adapter, linear_dims
from .adapter import ACTIVATIONS, AdapterConfig, bottleneck_for


class PHMRule(nn.Module):
    """The shared slow weights A ∈ R^{n×n×n}."""

    def __init__(self, n: int, std: float):
        super().__init__()
        self.rule = nn.Parameter(torch.randn(n, n, n) * std)


def _glorot(shape: tuple[int, ...]) -> torch.Tensor:
    t = torch.empty(shape)
    for i in range(shape[0]):
        nn.init.xavier_uniform_(t[i])
    return t


class PHMWeights(nn.Module):
    """The per-layer B_i of one PHM projection (d_in → d_out), factorised as s_i t_iᵀ or full."""

    def __init__(self, n: int, d_in: int, d_out: int, rank: int | None, zero: bool):
        super().__init__()
        a, b = d_in // n, d_out // n
        if rank is None:
            self.w = nn.Parameter(torch.zeros(n, a, b) if zero else _glorot((n, a, b)))
        else:
            self.left = nn.Parameter(torch.zeros(n, a, rank) if zero else _glorot((n, a, rank)))
            self.right = nn.Parameter(_glorot((n, rank, b)))
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.factorized = rank is not None

    def matrix(self, rule: torch.Tensor) -> torch.Tensor:
        """H = Σ_i A_i ⊗ B_i in (d_in, d_out) layout."""
        b = self.left @ self.right if self.factorized else self.w  # (n, d_in/n, d_out/n)
        n, p, q = b.shape
        return torch.einsum("ixy,iab->xayb", rule, b).reshape(n * p, n * q)

    def forward(self, x: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.matrix(rule)).view(*x.shape[:-1], -1)


class CompacterAdapter(Adapter):
    def __init__(self, d: int, m: int, n: int, rank: int | None, activation: str, zero: bool):
        super().__init__()
        self.down = PHMWeights(n, d, m, rank, zero=False)
        self.up = PHMWeights(n, m, d, rank, zero=zero)
        self.act = activation

    def forward(self, slot, base_fn, x):
        h = base_fn(x)
        rule = self.shared.rule
        return h + self.up(ACTIVATIONS[self.act](self.down(h, rule)), rule)


@register
@dataclass
class CompacterConfig(AdapterConfig):
    """Compacter (PHM adapters with shared slow weights); ``placement="pfeiffer"`` is Compacter++."""

    method = "compacter"
    limits = AdapterConfig.limits | {"phm_dim": SIZE, "phm_rank": SIZE, "phm_init_range": Range(0)}
    inits = ("zero", "glorot")

    reduction_factor: float = 32.0
    activation: str = "gelu"
    phm_dim: int = 4
    phm_rank: int = 1
    factorized: bool = True  # False: PHM-Adapter (full B_i)
    phm_init_range: float = 0.0001

    def validate(self) -> None:
        super().validate()
        if self.gate:
            raise ConfigError("CompacterConfig.gate: Compacter adapters take no gate")

    def _sizes(self, target) -> tuple[int, int]:
        d = linear_dims(target.module)[1]
        m = bottleneck_for(self, d, target.layer)
        explicit = self.bottleneck is not None or str(target.layer) in (self.layer_bottleneck or {})
        if not explicit:  # d / reduction_factor, rounded down to a multiple of n (at least n)
            m = max(self.phm_dim, m // self.phm_dim * self.phm_dim)
        for what, v in (("the hidden size", d), ("the bottleneck", m)):
            if v % self.phm_dim:
                raise ConfigError(f"CompacterConfig.phm_dim={self.phm_dim} must divide {what} ({v}) at {target.name}")
        return d, m

    def build_shared(self, ctx):
        return PHMRule(self.phm_dim, self.phm_init_range)

    def make_adapter(self, target, ctx):
        d, m = self._sizes(target)
        return CompacterAdapter(d, m, self.phm_dim, self.phm_rank if self.factorized else None, self.activation,
                                zero=self.init == "zero")

    def formula_count(self, ctx) -> int:
        total = self.phm_dim ** 3  # the shared A
        for t in ctx.targets:
            d, m = self._sizes(t)
            b = 2 * (d + m) * self.phm_rank if self.factorized else 2 * d * m // self.phm_dim  # both projections' B_i
            total += b + m + d
        return total
