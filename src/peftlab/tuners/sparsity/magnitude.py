"""Magnitude pruning (the baseline PST is compared against, METHODS.md §4): magnitude pruning of
W + ΔW with PST's cubic schedule, ΔW = (α/r)·B A (a LoRA update; A Kaiming-uniform, B = 0) or a
full-size delta (``update="full"``, i.e. full fine-tuning). No learned importance: M = TopMask(|W + ΔW|, s_t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...config import POSITIVE, SIZE, check_size
from ...errors import ConfigError
from ...registry import register
from ...slot import linear_dims
from .base import SparseLinear, SparsityConfig, top_mask


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


@register
@dataclass
class MagnitudePruneConfig(SparsityConfig):
    """Baseline: magnitude pruning with PST's cubic schedule; ``update`` lora or full (full fine-tuning)."""

    method = "magnitude_prune"
    limits = SparsityConfig.limits | {"r": SIZE, "alpha": POSITIVE}

    update: str = "lora"
    r: int = 8
    alpha: float = 8.0

    def validate(self) -> None:
        super().validate()
        if self.update not in ("lora", "full"):
            raise ConfigError(f"MagnitudePruneConfig.update: must be lora or full, got {self.update!r}")

    def make_adapter(self, target, ctx):
        k, n = linear_dims(target.module)
        if self.update == "lora":
            check_size(self, "r", self.r, min(n, k), f"the smaller dimension of {target.name}")
        return MagnitudeLayer(n, k, self.update, self.r, self.alpha)

    def formula_count(self, ctx) -> int:
        if self.update == "full":
            return sum(math.prod(linear_dims(t.module)) for t in ctx.targets)
        return sum(self.r * sum(linear_dims(t.module)) for t in ctx.targets)
