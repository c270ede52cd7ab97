"""Movement pruning (Sanh et al., NeurIPS 2020), hard top-k variant: the baseline PST is compared against.

Per linear layer (W ∈ R^{n×k}): the weights are fine-tuned through a full-size delta (W' = W + Δ, so the
frozen base stays intact and the adapter can be saved, merged and disabled like any other), and a
full-size learned score matrix S decides what to keep:
    M = TopMask(S, s_t)      y = (M ⊙ W') x + b      ∂ℒ/∂S := ∂ℒ/∂(M⊙W') ⊙ W'   (straight-through)
so S accumulates −W'·∂ℒ/∂W' summed over steps ("movement"): weights moving away from zero are kept.
S starts at 0 (the paper's constant init); with the schedule's warm-up at sparsity 0 the scores have
moved before the first weight is pruned. Sparsity follows PST's cubic schedule (same hooks, same
checkpoint rule), so the comparison differs only in the importance criterion. Trainable count per
layer: 2·n·k (Δ and S). With Adam the scores' scale does not matter to a top-k mask, so unlike the
reference code no separate score learning rate is needed (tested: scores at lr ×333, Sanh et al.'s
1e-2 / 3e-5, give the identical mask and run — tests/test_pst.py).

Known limit (measured, docs/methods.md, benchmarks/movement_diagnosis.py): the ranking ignores magnitude.
After a dense epoch, the 10% lowest scores share 11.6% with magnitude's 10% (random: 10%), and raw eq.-6
scores prune the largest weights. So pruning removes weights the pretrained function needs. In 1- and
3-epoch runs (also with Sanh et al.'s proportions, and at 4× the weights' learning rate) SST-2 stays at the
constant prediction, while PST and magnitude pruning learn. Sanh et al. train 10 epochs on ≥ 20k steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...registry import register
from ...slot import linear_dims
from .base import SparseLinear, SparsityConfig, top_mask


class MovementLayer(SparseLinear):
    def __init__(self, n: int, k: int):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(n, k))
        self.scores = nn.Parameter(torch.zeros(n, k))

    def masked_weight(self, w):
        wt = w.float() + self.delta
        s = self.scores
        m = top_mask(s, float(self.sparsity)) + (s - s.detach())  # value: exactly the hard mask; ∂M/∂S = 1
        return m * wt


@register
@dataclass
class MovementPruneConfig(SparsityConfig):
    """Baseline: hard movement pruning (learned scores, top-k) with PST's cubic schedule, full-size update."""

    method = "movement_prune"

    def make_adapter(self, target, ctx):
        k, n = linear_dims(target.module)
        return MovementLayer(n, k)

    def formula_count(self, ctx) -> int:
        return sum(2 * n * k for n, k in (linear_dims(t.module) for t in ctx.targets))
