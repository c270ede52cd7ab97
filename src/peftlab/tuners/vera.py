"""VeRA (Kopiczko et al. 2024, eq. 1): h = W₀x + Λ_b B Λ_d A x  (METHODS.md §5.2).

A ∈ ℝ^{r×d_in}, B ∈ ℝ^{d_out×r} are frozen random matrices shared by every adapted layer; each layer
trains only the vectors d ∈ ℝ^r (Λ_d = diag d, init ``d_initial`` = 0.1) and b ∈ ℝ^{d_out} (init 0: an
exact zero start). A and B are Kaiming-uniform, drawn from a CPU ``torch.Generator`` seeded with
``projection_prng_key`` (A first, then B, as peft does), so they can be regenerated instead of stored:
``save_projection=False`` keeps them out of the saved file, and load regenerates them from the seed.

Layers of different shapes (peft issue #1816): A and B are allocated once at the largest (d_out, d_in)
of the targets, and each layer uses the top-left slice A[:, :d_in], B[:d_out, :] (static shapes, no
data-dependent branching). Trainable per layer: r + d_out. Merge: W₀ + (b ⊙ B)(d ⊙ A).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..config import MethodConfig
from ..registry import register
from ..slot import linear_dims
from .checks import check_number
from .delta import DeltaAdapter


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(−√(6/fan_in), √(6/fan_in)) with fan_in = shape[1] (Kaiming uniform, gain √2), from ``generator``."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAShared(nn.Module):
    """The frozen projections A (r × max d_in) and B (max d_out × r), regenerated from the seed."""

    def __init__(self, r: int, d_in: int, d_out: int, seed: int, save: bool):
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(seed)
        a = kaiming_uniform((r, d_in), g)
        b = kaiming_uniform((d_out, r), g)
        self.register_buffer("vera_A", a, persistent=save)
        self.register_buffer("vera_B", b, persistent=save)
        self.save = save

    def to_peft_tensors(self):  # peft keys "base_model.vera_A" / "base_model.vera_B"
        return {"vera_A": self.vera_A, "vera_B": self.vera_B} if self.save else {}

    def from_peft_tensors(self, t):
        return {k: t[k] for k in ("vera_A", "vera_B") if k in t and self.save}


class VeRALayer(DeltaAdapter):
    def __init__(self, d_in: int, d_out: int, r: int, d_initial: float, dropout: float):
        super().__init__()
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial)))
        self.vera_lambda_b = nn.Parameter(torch.zeros(d_out))
        self.d_in, self.d_out = d_in, d_out
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        sh = self.shared  # bound by the core (a reference; it lives in model.peftlab_shared)
        return sh.vera_A[:, : self.d_in], sh.vera_B[: self.d_out, :]

    def update(self, x):
        a, b = self.projections()
        h = F.linear(self.dropout(x), a.to(x.dtype)) * self.vera_lambda_d
        return F.linear(h, b.to(x.dtype)) * self.vera_lambda_b

    def delta_weight(self) -> torch.Tensor:
        """ΔW = Λ_b B Λ_d A, (out, in) layout."""
        a, b = self.projections()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)

    def to_peft_tensors(self):
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    def from_peft_tensors(self, t):
        return {"vera_lambda_b": t["vera_lambda_b"], "vera_lambda_d": t["vera_lambda_d"]}


@register
@dataclass
class VeRAConfig(MethodConfig):
    """Vector-based random matrix adaptation (shared frozen A, B; trained d, b per layer)."""

    method = "vera"
    default_roles = ("q", "v")
    peft_type = "VERA"

    r: int = 256
    d_initial: float = 0.1
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        check_number(name, "r", self.r, lo=1, integer=True)
        check_number(name, "d_initial", self.d_initial)
        check_number(name, "projection_prng_key", self.projection_prng_key, lo=0, integer=True)
        check_number(name, "dropout", self.dropout, lo=0, hi=1, hi_open=True)

    def build_shared(self, ctx):
        dims = [linear_dims(t.module) for t in ctx.targets]
        return VeRAShared(self.r, max(d[0] for d in dims), max(d[1] for d in dims), self.projection_prng_key,
                          self.save_projection)

    def make_adapter(self, target, ctx):
        d_in, d_out = linear_dims(target.module)
        return VeRALayer(d_in, d_out, self.r, self.d_initial, self.dropout)

    def formula_count(self, ctx) -> int:
        targets = ctx.targets
        return sum(self.r + linear_dims(t.module)[1] for t in targets)

    def to_peft_fields(self, adapters):
        return {"r": self.r, "d_initial": self.d_initial, "projection_prng_key": self.projection_prng_key,
                "save_projection": self.save_projection, "vera_dropout": self.dropout}

    @classmethod
    def from_peft_fields(cls, d, resolve):
        if d.get("peft_type") != "VERA":
            return None
        return {"r": d["r"], "d_initial": d.get("d_initial", 0.1), "projection_prng_key": d.get("projection_prng_key", 0),
                "save_projection": bool(d.get("save_projection", True)), "dropout": d.get("vera_dropout", 0.0)}
