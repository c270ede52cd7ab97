"""AdaLoRA (Zhang et al. 2023): ΔW = P Λ Q with an importance-driven rank budget (eqs. 3-12).

Per layer P ∈ ℝ^{d_out×r} (``lora_B``), Λ = diag(λ) (``lora_E``), Q ∈ ℝ^{r×d_in} (``lora_A``) and
h = W₀x + (α/r)·P (Λ ⊙ m) Q x, m the 0/1 rank mask (a saved buffer; peft's names, λ = 0 and P, Q ~
N(0, 0.02²) at init: an exact zero start).

* Importance (eqs. 8-10): I = |w ∇w|, Ī ← β₁Ī + (1−β₁)I, Ū ← β₂Ū + (1−β₂)|I − Ī|, s = Ī·Ū per entry;
  triplet score S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij) (eq. 11).
* Budget (eq. 12, cubic): b(t) = b(0) for t ≤ t_init; b(T) + (b(0) − b(T))(1 − (t − t_init)/(T − t_init
  − t_final))³ in between; b(T) after T − t_final, with b(0) = r·L and b(T) = target_r·L.
* Every ΔT steps (and once at T − t_final) the mask keeps exactly the b(t) highest-scoring triplets
  over all layers (top-k, so the ranks sum to the budget); after that the ranks stay fixed.
  This runs in ``before_optimizer_step`` (gradients present); ``peftlab.before_optimizer_step`` calls it.
* Orthogonality regulariser (eq. 4), added to the loss by ``training_loss``:
  γ Σ_layers ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F.

Departures: peft's regulariser is the mean of unsquared Frobenius norms (we follow the paper's
squared sum), and peft zeroes λ in place where we keep a mask (same forward; masked λ get no
gradient). peft export writes the pruned tensors and ``rank_pattern`` as peft does, so peft loads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..config import MethodConfig
from ..core import part_adapters
from ..errors import ConfigError
from ..registry import register
from ..slot import adapter_key, linear_dims
from .checks import check_number
from .delta import DeltaAdapter


def budget_at(step: int, total: int, b0: int, bt: int, t_init: int, t_final: int) -> int:
    """Eq. 12: total rank budget at ``step`` (cubic from b0 to bt between t_init and total − t_final)."""
    if step <= t_init:
        return b0
    if step > total - t_final:
        return bt
    frac = 1 - (step - t_init) / max(total - t_final - t_init, 1)
    return int(bt + (b0 - bt) * frac**3)


class AdaLoRALayer(DeltaAdapter):
    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float, mask: list[bool] | None = None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(r, d_in) * 0.02)
        self.lora_B = nn.Parameter(torch.randn(d_out, r) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r))
        self.register_buffer("rank_mask", torch.ones(r) if mask is None else torch.tensor(mask, dtype=torch.float32))
        self.scale = float(alpha) / (r + 1e-5)  # peft: lora_alpha / (ranknum + 1e-5), ranknum = r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.ema: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # training state of the allocator

    def update(self, x):
        h = F.linear(self.dropout(x), self.lora_A) * (self.lora_E * self.rank_mask)
        return F.linear(h, self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r)·P diag(λ ⊙ m) Q, (out, in) layout."""
        return (self.lora_B * (self.lora_E * self.rank_mask)) @ self.lora_A * self.scale

    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        for n, p in (("A", self.lora_A), ("B", self.lora_B), ("E", self.lora_E)):
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            avg, unc = (t.to(p.device) for t in self.ema.get(n, (torch.zeros_like(p), torch.zeros_like(p))))
            avg = beta1 * avg + (1 - beta1) * ipt
            self.ema[n] = (avg, beta2 * unc + (1 - beta2) * (ipt - avg).abs())

    @torch.no_grad()
    def scores(self) -> torch.Tensor:
        """Eq. 11 per triplet: s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)."""
        s = {n: avg * unc for n, (avg, unc) in self.ema.items()}
        zero = torch.zeros_like(self.lora_E)
        sa = s["A"].mean(1) if "A" in s else zero
        sb = s["B"].mean(0) if "B" in s else zero
        return s.get("E", zero) + sa + sb

    def to_peft_tensors(self):
        keep = self.rank_mask.bool()
        return {"lora_A": self.lora_A[keep], "lora_B": self.lora_B[:, keep], "lora_E": self.lora_E[keep][:, None]}

    def from_peft_tensors(self, t):
        keep = self.rank_mask.bool()
        a, b, e = self.lora_A.detach().clone(), self.lora_B.detach().clone(), torch.zeros_like(self.lora_E)
        a[keep], b[:, keep], e[keep] = t["lora_A"], t["lora_B"], t["lora_E"].reshape(-1)
        return {"lora_A": a, "lora_B": b, "lora_E": e}


@register
@dataclass
class AdaLoRAConfig(MethodConfig):
    """Adaptive budget LoRA. ``r``: initial rank per layer; ``target_r``: average final rank;
    ``tinit``/``tfinal``/``delta_t``: schedule (steps); ``orth_reg_weight`` = γ; ``total_steps`` (None =
    the training loop's); ``rank_pattern``: per-module masks (set by import; None = all ranks live)."""

    method = "adalora"
    default_roles = ("q", "v")
    peft_type = "ADALORA"

    r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_steps: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        check_number(name, "r", self.r, lo=1, integer=True)
        check_number(name, "target_r", self.target_r, lo=1, hi=self.r, integer=True)
        check_number(name, "alpha", self.alpha, lo=0, lo_open=True)
        check_number(name, "dropout", self.dropout, lo=0, hi=1, hi_open=True)
        for f in ("tinit", "tfinal"):
            check_number(name, f, getattr(self, f), lo=0, integer=True)
        check_number(name, "delta_t", self.delta_t, lo=1, integer=True)
        for f in ("beta1", "beta2"):
            check_number(name, f, getattr(self, f), lo=0, hi=1, lo_open=True, hi_open=True)
        check_number(name, "orth_reg_weight", self.orth_reg_weight, lo=0)
        if self.total_steps is not None:
            check_number(name, "total_steps", self.total_steps, lo=1, integer=True)
            if self.tinit + self.tfinal >= self.total_steps:
                raise ConfigError(f"{name}: tinit + tfinal must be < total_steps ({self.total_steps})")

    def make_adapter(self, target, ctx):
        d_in, d_out = linear_dims(target.module)
        mask = (self.rank_pattern or {}).get(target.name)
        if mask is not None and len(mask) != self.r:
            raise ConfigError(f"AdaLoRAConfig.rank_pattern[{target.name!r}] has {len(mask)} entries, r is {self.r}")
        return AdaLoRALayer(d_in, d_out, self.r, self.alpha, self.dropout, mask)

    def adapters_of(self, model, key) -> list[tuple[str, AdaLoRALayer]]:
        return part_adapters(model, key)

    def training_loss(self, model, key):
        if self.orth_reg_weight == 0:
            return None
        total = 0.0
        for _, a in self.adapters_of(model, key):
            eye = torch.eye(a.lora_E.shape[0], device=a.lora_A.device, dtype=a.lora_A.dtype)
            total = total + (a.lora_B.t() @ a.lora_B - eye).pow(2).sum() + (a.lora_A @ a.lora_A.t() - eye).pow(2).sum()
        return self.orth_reg_weight * total

    @torch.no_grad()
    def before_optimizer_step(self, model, key, step, total_steps):
        total = self.total_steps or total_steps
        layers = [a for _, a in self.adapters_of(model, key)]
        end = total - self.tfinal
        if step > end:
            return  # ranks fixed
        for a in layers:
            a.update_importance(self.beta1, self.beta2)
        if step <= self.tinit or (step < end and step % self.delta_t):
            return
        budget = budget_at(step, total, self.r * len(layers), self.target_r * len(layers), self.tinit, self.tfinal)
        scores = torch.cat([a.scores() for a in layers])
        keep = torch.zeros_like(scores)
        keep[torch.topk(scores, budget).indices] = 1
        for a, m in zip(layers, keep.split(self.r)):
            a.rank_mask.copy_(m)

    def ranks(self, model, name: str = "default") -> dict[str, int]:
        """Current rank of every adapted module of adapter ``name``."""
        return {p: int(a.rank_mask.sum()) for p, a in self.adapters_of(model, adapter_key(name))}

    def formula_count(self, ctx) -> int:
        targets = ctx.targets
        return sum(self.r * (sum(linear_dims(t.module)) + 1) for t in targets)

    def to_peft_fields(self, adapters):
        pattern = {f"{p}.lora_E": a.rank_mask.bool().tolist() for p, a in adapters.items()}
        live = any(not all(v) for v in pattern.values())
        return {"init_r": self.r, "target_r": self.target_r, "r": self.r, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "tinit": self.tinit, "tfinal": self.tfinal, "deltaT": self.delta_t,
                "beta1": self.beta1, "beta2": self.beta2, "orth_reg_weight": self.orth_reg_weight,
                "total_step": self.total_steps or self.tinit + self.tfinal + 1, "rank_pattern": pattern if live else None}

    @classmethod
    def from_peft_fields(cls, d, resolve):
        if d.get("peft_type") != "ADALORA":
            return None
        pattern = {k.rsplit(".lora_E", 1)[0]: list(v) for k, v in (d.get("rank_pattern") or {}).items()}
        return {"r": d["init_r"], "target_r": d["target_r"], "alpha": d.get("lora_alpha", 8.0),
                "dropout": d.get("lora_dropout", 0.0), "tinit": d.get("tinit", 0), "tfinal": d.get("tfinal", 0),
                "delta_t": d.get("deltaT", 1), "beta1": d.get("beta1", 0.85), "beta2": d.get("beta2", 0.85),
                "orth_reg_weight": d.get("orth_reg_weight", 0.5), "total_steps": d.get("total_step"),
                "rank_pattern": pattern or None}
