"""DoRA (Liu et al. 2024): W' = m ⊙ (W₀ + sBA) / ‖W₀ + sBA‖_c  (METHODS.md §5.2).

‖·‖_c is the L2 norm of each output row (the paper's column norm in its layout); m is initialised
to ‖W₀‖_c so the model starts at W₀. As in the paper (§4.3), the norm is detached during backprop.
Computed as y = (m/‖W'‖)·(W₀x + sBAx) + b, reusing the base output (no dense W' in the forward
graph). The norm is taken in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import check_size
from ..registry import register
from ..slot import linear_dims, linear_weight_oi
from .lora import LoRAConfig, LoRALayer


class DoRALayer(LoRALayer):
    def __init__(self, weight_oi: torch.Tensor, r: int, scale: float, dropout: float = 0.0):
        d_out, d_in = weight_oi.shape
        super().__init__(d_in, d_out, r, scale, dropout)
        self.magnitude = nn.Parameter(weight_oi.detach().float().norm(dim=1).to(weight_oi.dtype))
        self.register_buffer("_merge_scale", torch.ones(d_out, dtype=weight_oi.dtype), persistent=False)

    def _weight_norm(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            full = w.float() + self.delta_weight().float()
            return full.norm(dim=1).to(w.dtype)

    def forward(self, slot, base_fn, x):
        y = base_fn(x)
        b = slot.bias
        mag = self.magnitude / self._weight_norm(slot.weight_oi())
        wx = y if b is None else y - b
        out = mag * (wx + self.update(x))
        return out if b is None else out + b

    def merge(self, slot) -> None:
        w = slot.weight_oi()
        mag = self.magnitude / self._weight_norm(w)
        self._merge_scale.copy_(mag)
        w.copy_((w + self.delta_weight().to(w.dtype)) * mag[:, None])

    def unmerge(self, slot) -> None:
        w = slot.weight_oi()
        w.copy_(w / self._merge_scale[:, None] - self.delta_weight().to(w.dtype))

    def to_peft_tensors(self):
        return {**super().to_peft_tensors(), "lora_magnitude_vector": self.magnitude}

    def from_peft_tensors(self, t):
        return {**super().from_peft_tensors(t), "magnitude": t["lora_magnitude_vector"]}


@register
@dataclass
class DoRAConfig(LoRAConfig):
    """Weight-decomposed LoRA; same fields as LoRAConfig."""

    method = "dora"

    def make_adapter(self, target, ctx):
        mod = target.module
        check_size(self, "r", self.r, min(linear_dims(mod)), f"the smaller dimension of {target.name}")
        return DoRALayer(linear_weight_oi(mod), self.r, self.scale, self.dropout)

    def formula_count(self, ctx) -> int:
        return sum(self.r * sum(linear_dims(t.module)) + linear_dims(t.module)[1] for t in ctx.targets)
