"""PST — parameter-efficient sparsity training (Li et al., IJCAI 2022), METHODS.md §4.

Per linear layer (W ∈ R^{n×k}, frozen):
    W̃ = W + β·U V                                   (low-rank update, U ∈ R^{n×r₁}, V ∈ R^{r₁×k})
    S = |W̃| + α₁·A B + α₂·(R 1ᵀ + 1 Cᵀ)             (data-free magnitude + learned low-rank and
                                                      structured data-driven importance)
    M = TopMask(S, s_t)  (zero the ⌊s_t·n·k⌋ smallest scores of this layer)
    y = (M ⊙ W̃) x + b
with a straight-through gradient ∂ℒ/∂S := ∂ℒ/∂M = ∂ℒ/∂(M⊙W̃) ⊙ W̃. Init as the official code: U ~ N(0,1),
V = 0, A ~ N(0,1), B = 0, R = C = 0, so W̃ = W, S = |W| and with s = 0 the model is exactly the base.
The mask uses ``topk`` on the flattened fp32 scores (no full sort), so exactly ⌊s·n·k⌋ entries are
zero (ties broken deterministically by topk's index order).

Sparsity follows the cubic schedule with warm-up and cool-down (``sparsity_at``), stepped by training
loops through ``on_train_step``; best-checkpoint selection is allowed only at the final sparsity
(``checkpoint_eligible``). Trainable count per layer: (r₁ + r₂ + 1)(n + k).

Deviation (documented): the task head is trained by default; the official NLU script builds its
optimiser from the PST parameters only, so its randomly initialised classifier never trains —
``faithful_head=True`` reproduces that. The ``magnitude_prune`` method (same file) is the baseline:
magnitude pruning of W + ΔW with the same schedule, ΔW a LoRA update or a full-size delta (full FT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..config import MethodConfig
from ..registry import register
from ..slot import Adapter, linear_dims


def sparsity_at(step: int, total: int, initial: float, final: float, warmup: float, cooldown: float) -> float:
    """Cubic schedule (Zhu & Gupta 2018) with warm-up/cool-down fractions (PST code ``utils.py``)."""
    tw, tc = warmup * total, cooldown * total
    if step <= tw:
        return initial
    if step > total - tc:
        return final
    frac = (step - tw) / max(total - tw - tc, 1e-12)
    return final + (initial - final) * (1 - frac) ** 3


def top_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """0/1 mask zeroing exactly ⌊sparsity·numel⌋ lowest scores."""
    n_zero = int(math.floor(sparsity * scores.numel() + 1e-9))
    mask = torch.ones(scores.numel(), dtype=scores.dtype, device=scores.device)
    if n_zero > 0:
        idx = torch.topk(scores.detach().flatten().float(), n_zero, largest=False, sorted=False).indices
        mask[idx] = 0
    return mask.view_as(scores)


class SparseLinear(Adapter):
    """Shared machinery: current sparsity, masked weight, merge/unmerge with an exact copy."""

    mergeable = True

    def __init__(self):
        super().__init__()
        self.register_buffer("sparsity", torch.zeros(()))  # saved, so a reload reproduces the mask
        self._weight_copy = None

    def masked_weight(self, w: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, slot, base_fn, x):
        return F.linear(x, self.masked_weight(slot.weight_oi()).to(x.dtype), slot.bias)

    @torch.no_grad()
    def mask(self, w: torch.Tensor) -> torch.Tensor:
        return (self.masked_weight(w) != 0).to(w.dtype)

    def merge(self, slot) -> None:
        w = slot.weight_oi()
        self._weight_copy = w.detach().clone()
        w.copy_(self.masked_weight(w).to(w.dtype))

    def unmerge(self, slot) -> None:
        slot.weight_oi().copy_(self._weight_copy)
        self._weight_copy = None


class PSTLayer(SparseLinear):
    def __init__(self, n: int, k: int, r1: int, r2: int, beta: float, alpha1: float, alpha2: float):
        super().__init__()
        self.U = nn.Parameter(torch.randn(n, r1))
        self.V = nn.Parameter(torch.zeros(r1, k))
        self.A = nn.Parameter(torch.randn(n, r2))
        self.B = nn.Parameter(torch.zeros(r2, k))
        self.R = nn.Parameter(torch.zeros(n))
        self.C = nn.Parameter(torch.zeros(k))
        self.beta, self.alpha1, self.alpha2 = beta, alpha1, alpha2

    def masked_weight(self, w):
        wt = w.float() + self.beta * (self.U @ self.V)
        s = wt.abs() + self.alpha1 * (self.A @ self.B) + self.alpha2 * (self.R[:, None] + self.C[None, :])
        hard = top_mask(s, float(self.sparsity))
        m = hard + (s - s.detach())  # straight-through: value exactly the hard mask, ∂M/∂S = 1
        return m * wt


class MagnitudeLayer(SparseLinear):
    """Baseline: magnitude pruning of W + ΔW (ΔW = (α/r)·B A, or a full-size delta); no learned scores."""

    def __init__(self, n: int, k: int, update: str, r: int, alpha: float):
        super().__init__()
        self.update = update
        if update == "lora":
            self.lora_A = nn.Parameter(torch.empty(r, k))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B = nn.Parameter(torch.zeros(n, r))
            self.scale = alpha / r
        else:
            self.delta = nn.Parameter(torch.zeros(n, k))

    def masked_weight(self, w):
        dw = (self.lora_B @ self.lora_A) * self.scale if self.update == "lora" else self.delta
        wt = w.float() + dw
        return top_mask(wt.abs(), float(self.sparsity)) * wt


@dataclass
class _SparsityConfig(MethodConfig):
    default_roles = ("q", "k", "v", "o", "ffn_in", "ffn_out", "ffn_gate", "cross_q", "cross_k", "cross_v", "cross_o")

    initial_sparsity: float = 0.0
    final_sparsity: float = 0.9
    warmup: float = 0.1  # fraction of steps at the initial sparsity
    cooldown: float = 0.3  # fraction of steps at the final sparsity

    def validate(self) -> None:
        super().validate()
        for name in ("initial_sparsity", "final_sparsity", "warmup", "cooldown"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if self.warmup + self.cooldown >= 1:
            raise ValueError("warmup + cooldown must be < 1")

    def _layers(self, model, name):
        from ..core import slots

        return [s.adapters[k] for _, s in slots(model) for k in s.keys_of(name) if isinstance(s.adapters[k], SparseLinear)]

    def set_sparsity(self, model, name: str, s: float) -> None:
        for layer in self._layers(model, name):
            layer.sparsity.fill_(s)

    def on_train_step(self, model, name, step, total_steps):
        s = sparsity_at(step, total_steps, self.initial_sparsity, self.final_sparsity, self.warmup, self.cooldown)
        self.set_sparsity(model, name, s)

    def checkpoint_eligible(self, model, name, step, total_steps):
        return step > total_steps - self.cooldown * total_steps or self.cooldown == 0 and step >= total_steps


@register
@dataclass
class PSTConfig(_SparsityConfig):
    """Parameter-efficient sparsity training: low-rank update + low-rank/structured learned importance."""

    method = "pst"

    r1: int = 8
    r2: int = 8
    beta: float = 1.0
    alpha1: float = 1.0
    alpha2: float = 1.0
    faithful_head: bool = False  # True: freeze the task head as the official script (effectively) does

    def validate(self) -> None:
        super().validate()
        if self.faithful_head:
            self.modules_to_save = []

    def make_adapter(self, target, shared):
        k, n = linear_dims(target.module)
        return PSTLayer(n, k, self.r1, self.r2, self.beta, self.alpha1, self.alpha2)

    def formula_count(self, targets) -> int:
        return sum((self.r1 + self.r2 + 1) * sum(linear_dims(t.module)) for t in targets)


@register
@dataclass
class MagnitudePruneConfig(_SparsityConfig):
    """Baseline: magnitude pruning with PST's cubic schedule; ``update`` lora or full (full fine-tuning)."""

    method = "magnitude_prune"

    update: str = "lora"
    r: int = 8
    alpha: float = 8.0

    def validate(self) -> None:
        super().validate()
        if self.update not in ("lora", "full"):
            raise ValueError(f"update must be lora or full, got {self.update!r}")

    def make_adapter(self, target, shared):
        k, n = linear_dims(target.module)
        return MagnitudeLayer(n, k, self.update, self.r, self.alpha)

    def formula_count(self, targets) -> int:
        if self.update == "full":
            return sum(math.prod(linear_dims(t.module)) for t in targets)
        return sum(self.r * sum(linear_dims(t.module)) for t in targets)
