"""(IA)³ (Liu et al. 2022): learned vectors rescale keys, values and the FFN activation
(METHODS.md §5.2): softmax(Q(l_k⊙Kᵀ)/√d)(l_v⊙V) and (l_ff ⊙ γ(W₁x))W₂.

On k and v the vector scales the projection's output; on the FFN output projection it scales the
input (the activation γ(W₁x)). Vectors start at 1, an exact zero-start. Merge: rows (output scaling,
bias included) or columns (input scaling) of W are multiplied by l.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import MethodConfig
from ..registry import register
from ..slot import Adapter, linear_dims


class IA3Layer(Adapter):
    mergeable = True

    def __init__(self, size: int, on_input: bool):
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(size))
        self.on_input = on_input

    def forward(self, slot, base_fn, x):
        if self.on_input:
            return base_fn(x * self.ia3_l)
        return base_fn(x) * self.ia3_l

    def merge(self, slot) -> None:
        w, l = slot.weight_oi(), self.ia3_l.detach()
        if self.on_input:
            w.mul_(l[None, :].to(w.dtype))
        else:
            w.mul_(l[:, None].to(w.dtype))
            if slot.bias is not None:
                slot.bias.mul_(l.to(slot.bias.dtype))

    def to_peft_tensors(self):  # peft stores (out, 1) for output scaling and (1, in) for input scaling
        return {"ia3_l": self.ia3_l[None, :] if self.on_input else self.ia3_l[:, None]}

    def from_peft_tensors(self, t):
        return {"ia3_l": t["ia3_l"].reshape(-1)}

    def unmerge(self, slot) -> None:
        w, l = slot.weight_oi(), self.ia3_l.detach()
        if self.on_input:
            w.div_(l[None, :].to(w.dtype))
        else:
            w.div_(l[:, None].to(w.dtype))
            if slot.bias is not None:
                slot.bias.div_(l.to(slot.bias.dtype))


@register
@dataclass
class IA3Config(MethodConfig):
    """(IA)³. ``feedforward`` lists the roles/name suffixes whose *input* is scaled."""

    method = "ia3"
    default_roles = ("k", "v", "ffn_out")
    peft_type = "IA3"

    feedforward: list[str] | None = None

    def _is_ff(self, target) -> bool:
        ff = self.feedforward if self.feedforward is not None else ["ffn_out"]
        return target.role in ff or any(target.name == s or target.name.endswith("." + s) for s in ff)

    def make_adapter(self, target, ctx):
        d_in, d_out = linear_dims(target.module)
        ff = self._is_ff(target)
        return IA3Layer(d_in if ff else d_out, on_input=ff)

    def to_peft_fields(self, adapters):
        return {"feedforward_modules": sorted(n for n, a in adapters.items() if a.on_input)}

    @classmethod
    def from_peft_fields(cls, d, resolve):
        if d.get("peft_type") != "IA3":
            return None
        return {"feedforward": resolve(d.get("feedforward_modules") or [])}

    def formula_count(self, ctx) -> int:
        return sum(linear_dims(t.module)[0] if self._is_ff(t) else linear_dims(t.module)[1] for t in ctx.targets)
