"""LN tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention", as Hugging Face peft's ``LN_TUNING``):
train only the normalisation layers (LayerNorm γ, β; RMSNorm γ) — a selective method whose mask is
"every parameter of every targeted norm".

Each targeted norm gets a trainable copy of itself (``ln_tuning_layer``, initialised to the pretrained
γ, β), which replaces the norm's forward while the adapter is live: y = norm'(x) with the copy's
parameters, so the model starts exactly at the base model and ``disabled`` uses the untouched original.
Merge copies the trained parameters into the base norm (the original values are kept for unmerge).
Default targets: every LayerNorm / RMSNorm of the model (embedding norm, block norms and the final
norm), which is what peft's per-architecture defaults select where it has them (LLaMA, GPT-2).
Trainable count: the parameters of the targeted norms (2d per LayerNorm, d per RMSNorm).
peft format: keys ``<module>.ln_tuning_layers.<param>``, both ways.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..config import MethodConfig
from ..registry import register
from ..slot import Adapter
from ..targets import iter_candidates

PEFT_KEY = "ln_tuning_layers"


class NormCopy(Adapter):
    mergeable = True

    def __init__(self, base: nn.Module):
        super().__init__()
        self.ln_tuning_layer = copy.deepcopy(base)
        self._original: dict[str, torch.Tensor] | None = None

    def forward(self, slot, base_fn, x, *args, **kwargs):
        return self.ln_tuning_layer(x, *args, **kwargs)

    def merge(self, slot) -> None:
        own = slot.base.state_dict()
        self._original = {k: v.detach().clone() for k, v in own.items()}
        for k, v in self.ln_tuning_layer.state_dict().items():
            own[k].copy_(v)

    def unmerge(self, slot) -> None:
        own = slot.base.state_dict()
        for k, v in self._original.items():
            own[k].copy_(v)
        self._original = None

    def to_peft_tensors(self):
        return {f"{PEFT_KEY}.{k}": v for k, v in self.ln_tuning_layer.state_dict().items()}

    def from_peft_tensors(self, tensors):
        return {f"ln_tuning_layer.{k}": tensors[f"{PEFT_KEY}.{k}"] for k in self.ln_tuning_layer.state_dict()}


@register
@dataclass
class LNTuningConfig(MethodConfig):
    """Train only LayerNorm / RMSNorm parameters (default: every norm of the model)."""

    method = "ln_tuning"
    peft_type = "LN_TUNING"
    accepts = ("norm",)

    def default_targets(self, model: nn.Module) -> list[str]:
        return [t.name for t, _ in iter_candidates(model) if t.kind == "norm"]

    def make_adapter(self, target, ctx):
        return NormCopy(target.module)

    def formula_count(self, ctx) -> int:
        return sum(p.numel() for t in ctx.targets for p in t.module.parameters())

    def to_peft_fields(self, adapters):
        return {"fan_in_fan_out": None}

    @classmethod
    def from_peft_fields(cls, d, resolve):
        return {} if d.get("peft_type") == "LN_TUNING" else None
