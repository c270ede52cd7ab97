"""What the sparsity methods share (PST, magnitude pruning, movement pruning — METHODS.md §4): the cubic
sparsity schedule with warm-up and cool-down (``sparsity_at``), the exact top-k mask (``top_mask``), the
masked-linear adapter (``SparseLinear``: current sparsity as a saved buffer, merge/unmerge with an exact
copy) and the config base (``SparsityConfig``: schedule fields, ``on_train_step`` sets the sparsity,
``checkpoint_eligible`` only at the final sparsity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ...config import FRACTION, MethodConfig
from ...core import part_adapters
from ...errors import ConfigError
from ...slot import Adapter


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


@dataclass
class SparsityConfig(MethodConfig):
    """Fields and hooks shared by the sparsity methods: PST's cubic schedule and checkpoint rule."""

    default_roles = ("q", "k", "v", "o", "ffn_in", "ffn_out", "ffn_gate", "cross_q", "cross_k", "cross_v", "cross_o")

    limits = MethodConfig.limits | {k: FRACTION for k in ("initial_sparsity", "final_sparsity", "warmup", "cooldown")}

    initial_sparsity: float = 0.0
    final_sparsity: float = 0.9
    warmup: float = 0.1  # fraction of steps at the initial sparsity
    cooldown: float = 0.3  # fraction of steps at the final sparsity

    def validate(self) -> None:
        super().validate()
        if self.warmup + self.cooldown >= 1:
            raise ConfigError(f"{type(self).__name__}.warmup: warmup + cooldown must be < 1")

    def set_sparsity(self, model, key: str, s: float) -> None:
        """Set the current sparsity of every layer of adapter key ``key`` (an adapter name for a simple config)."""
        for _, layer in part_adapters(model, key):
            if isinstance(layer, SparseLinear):
                layer.sparsity.fill_(s)

    def on_train_step(self, model, key, step, total_steps):
        s = sparsity_at(step, total_steps, self.initial_sparsity, self.final_sparsity, self.warmup, self.cooldown)
        self.set_sparsity(model, key, s)

    def checkpoint_eligible(self, model, key, step, total_steps):
        return step > total_steps - self.cooldown * total_steps or self.cooldown == 0 and step >= total_steps
