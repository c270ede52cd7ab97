"""LoRA-FA (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation"): LoRA with A frozen.

h = W₀x + (α/r)·B A x with A fixed at its random (Kaiming-uniform) init and only B trained (B = 0 at
start, an exact zero start). Since neither W₀ nor A needs a gradient, the layer input x is not kept for
backward: only the rank-r activation A x is (for B's gradient), the memory point of the paper.
A is a persistent buffer, so it is saved with the adapter and merge/export are plain LoRA's.

Departure: peft ships LoRA-FA only as an optimizer (``create_lorafa_optimizer``) that also projects B's
gradient with (A Aᵀ)⁻¹; that projection is an optimizer choice, not part of the adapter, and is not
done here. On disk the adapter is a plain peft LoRA (A, B), so export/import go through peft's LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..registry import register
from ..slot import linear_dims
from .lora import LoRAConfig, LoRALayer


class LoRAFALayer(LoRALayer):
    def __init__(self, d_in: int, d_out: int, r: int, scale: float, dropout: float = 0.0):
        super().__init__(d_in, d_out, r, scale, dropout)
        a = self.lora_A.data
        del self.lora_A
        self.register_buffer("lora_A", a)

    def forward(self, slot, base_fn, x):
        y = base_fn(x)
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # A frozen: autograd keeps A, not x
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.t(), alpha=self.scale)
        return out.view(y.shape)


@register
@dataclass
class LoRAFAConfig(LoRAConfig):
    """LoRA with frozen A (same fields as LoRAConfig)."""

    method = "lora_fa"

    def make_adapter(self, target, ctx):
        d_in, d_out = linear_dims(target.module)
        return LoRAFALayer(d_in, d_out, self.r, self.scale, self.dropout)

    def formula_count(self, ctx) -> int:
        targets = ctx.targets
        return sum(self.r * linear_dims(t.module)[1] for t in targets)

    @classmethod
    def from_peft_fields(cls, d, resolve):
        return None  # a peft LoRA file imports as plain LoRA
