"""LoRA+ (Hayou, Ghosh & Yu 2024): LoRA whose B matrices learn λ times faster than A (η_B = λ·η_A).

The adapter is plain LoRA (same init, forward, merge, peft export); the method is the optimizer
setting, requested through :meth:`optimizer_options` and applied by :func:`peftlab.param_groups`.
λ = ``lr_ratio`` (the paper recommends 2⁴ = 16 as a default). Like peft's
``create_loraplus_optimizer`` (whose group learning rates we match), the adapter's 1-D trainable
parameters (the task head's bias) also take λ·η; its weight decay: biases and LayerNorm none.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core import part_adapters, state
from ..registry import register
from ..slot import resolve, split_key
from .checks import check_number
from .lora import LoRAConfig


@register
@dataclass
class LoRAPlusConfig(LoRAConfig):
    """LoRA with B's learning rate ``lr_ratio`` × A's (use :func:`peftlab.param_groups`)."""

    method = "lora_plus"

    lr_ratio: float = 16.0

    def validate(self) -> None:
        super().validate()
        check_number(type(self).__name__, "lr_ratio", self.lr_ratio, lo=0, lo_open=True)

    def optimizer_options(self, model, key):
        wish = {"lr_scale": self.lr_ratio}
        out = {a.lora_B: wish for _, a in part_adapters(model, key)}
        for h in state(model).heads.get(split_key(key)[0], []):
            out.update({p: wish for p in resolve(model, h).parameters() if p.ndim == 1})
        return out

    @classmethod
    def from_peft_fields(cls, d, resolve):
        return None  # a peft LoRA file imports as plain LoRA
