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
``faithful_head=True`` reproduces that. The ``magnitude_prune`` method is the baseline:
magnitude pruning of W + ΔW with the same schedule, ΔW a LoRA update or a full-size delta (full FT),
in magnitude.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import SIZE, check_size
from ...registry import register
from ...slot import linear_dims
from .base import SparseLinear, SparsityConfig, top_mask


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


@register
@dataclass
class PSTConfig(SparsityConfig):
    """Parameter-efficient sparsity training: low-rank update + low-rank/structured learned importance."""

    method = "pst"
    limits = SparsityConfig.limits | {"r1": SIZE, "r2": SIZE}

    r1: int = 8
    r2: int = 8
    beta: float = 1.0
    alpha1: float = 1.0
    alpha2: float = 1.0
    faithful_head: bool = False  # True: freeze the task head as the official script (effectively) does

    def head_selection(self):
        return [] if self.faithful_head else self.modules_to_save

    def make_adapter(self, target, ctx):
        k, n = linear_dims(target.module)
        for f in ("r1", "r2"):
            check_size(self, f, getattr(self, f), min(n, k), f"the smaller dimension of {target.name}")
        return PSTLayer(n, k, self.r1, self.r2, self.beta, self.alpha1, self.alpha2)

    def formula_count(self, ctx) -> int:
        return sum((self.r1 + self.r2 + 1) * sum(linear_dims(t.module)) for t in ctx.targets)
