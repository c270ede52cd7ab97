"""SSF (Lian et al., NeurIPS 2022): scale and shift the output of each targeted operation,

    y' = γ ⊙ y + β,   γ = 1, β = 0 at start (an exact zero-start)                           (Eq. 2)

after every linear of the blocks (q, k, v, o, FFN in/out, gate) and every LayerNorm with an affine bias
(the paper's MSA / MLP / LN operations). Merge (Eq. 4-5): into the preceding linear, W' = diag(γ) W,
b' = γ ⊙ b + β (a linear without a bias gets one, as BitFit's merge does); into a LayerNorm,
w' = γ ⊙ w, b' = γ ⊙ b + β. Unmerge divides by γ (exact up to rounding while γ stays away from 0).
Norms without a bias (RMSNorm, T5's LayerNorm) are skipped, since β could not be merged there.
Parameters: 2 · (output size) per target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import MethodConfig
from ..registry import register
from ..slot import Adapter
from .bitfit import BitFitConfig, _out_size


class ScaleShift(Adapter):
    mergeable = True

    def __init__(self, size: int):
        super().__init__()
        self.ssf_scale = nn.Parameter(torch.ones(size))
        self.ssf_shift = nn.Parameter(torch.zeros(size))
        self._added_bias = False

    def forward(self, slot, base_fn, x):
        return torch.addcmul(self.ssf_shift, base_fn(x), self.ssf_scale)

    def _weight(self, slot) -> torch.Tensor:
        """The base weight with its output dimension first (a view: in-place edits reach the base)."""
        base = slot.base
        return base.weight if getattr(base, "normalized_shape", None) is not None else slot.weight_oi()

    def merge(self, slot) -> None:
        base, g, b = slot.base, self.ssf_scale.detach(), self.ssf_shift.detach()
        w = self._weight(slot)
        w.mul_(g.view(-1, *[1] * (w.dim() - 1)).to(w.dtype))
        if getattr(base, "bias", None) is None:
            base.bias = nn.Parameter(b.clone().to(w.dtype), requires_grad=False)
            self._added_bias = True
        else:
            base.bias.mul_(g.to(base.bias.dtype)).add_(b.to(base.bias.dtype))

    def unmerge(self, slot) -> None:
        base, g, b = slot.base, self.ssf_scale.detach(), self.ssf_shift.detach()
        w = self._weight(slot)
        w.div_(g.view(-1, *[1] * (w.dim() - 1)).to(w.dtype))
        if self._added_bias:
            base.register_parameter("bias", None)
            self._added_bias = False
        else:
            base.bias.sub_(b.to(base.bias.dtype)).div_(g.to(base.bias.dtype))


@register
@dataclass
class SSFConfig(MethodConfig):
    """Scale-and-shift features: y' = γ ⊙ y + β after each targeted linear / LayerNorm."""

    method = "ssf"
    default_roles = BitFitConfig.default_roles  # every linear and norm of the blocks
    accepts = ("linear", "norm")

    def keep(self, target) -> bool:
        if target.kind == "norm":
            return getattr(target.module, "bias", None) is not None and getattr(target.module, "weight", None) is not None
        return True

    def make_adapter(self, target, ctx):
        return ScaleShift(_out_size(target.module))

    def formula_count(self, ctx) -> int:
        return sum(2 * _out_size(t.module) for t in ctx.targets)
