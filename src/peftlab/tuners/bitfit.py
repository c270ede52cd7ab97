"""BitFit (Ben Zaken et al. 2022): train only the bias terms (METHODS.md §1.3, §5.2).

Implemented as a trainable bias *offset* δ added to the module output (y = f(x) + δ, δ = 0 at start),
which has exactly BitFit's gradients while keeping the pretrained bias for ``disabled`` and
``unmerge``. Default targets: q, k, v, o, FFN-in, FFN-out biases and the LayerNorm β's — 7d + d_ff
per BERT block. Linears without a bias (T5, LLaMA) get a zero-initialised one, as METHODS.md §1.3
prescribes; norms without a bias (RMSNorm) are skipped. Merge adds δ into the bias (where the
base module has one, else a new bias parameter is created; a merged T5/LLaMA then has biases its HF
class does not load, so keep BitFit unmerged there if you save with ``save_pretrained``). One deviation: weight decay, if used, acts on δ rather than on the bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import MethodConfig
from ..registry import register
from ..slot import Adapter, linear_dims


class BiasOffset(Adapter):
    mergeable = True

    def __init__(self, size: int):
        super().__init__()
        self.bitfit_bias = nn.Parameter(torch.zeros(size))
        self._added_bias = False

    def forward(self, slot, base_fn, x):
        return base_fn(x) + self.bitfit_bias

    def merge(self, slot) -> None:
        base, delta = slot.base, self.bitfit_bias.detach()
        if getattr(base, "bias", None) is None:  # T5/LLaMA linears: merging creates the bias
            base.bias = nn.Parameter(delta.clone().to(base.weight.dtype), requires_grad=False)
            self._added_bias = True
        else:
            base.bias.add_(delta.to(base.bias.dtype))

    def unmerge(self, slot) -> None:
        base = slot.base
        if self._added_bias:
            base.register_parameter("bias", None)
            self._added_bias = False
        else:
            base.bias.sub_(self.bitfit_bias.detach().to(base.bias.dtype))


def _out_size(module: nn.Module) -> int:
    if hasattr(module, "normalized_shape"):
        return int(torch.Size(module.normalized_shape).numel())
    return linear_dims(module)[1]


@register
@dataclass
class BitFitConfig(MethodConfig):
    """Bias-only tuning (as trainable bias offsets); default: every bias of every block."""

    method = "bitfit"
    default_roles = (
        "q", "k", "v", "o", "cross_q", "cross_k", "cross_v", "cross_o",
        "ffn_gate", "ffn_in", "ffn_out", "attn_norm", "cross_norm", "ffn_norm",
    )
    accepts = ("linear", "norm")

    def keep(self, target) -> bool:
        if target.kind == "norm":
            return getattr(target.module, "bias", None) is not None
        return True

    def make_adapter(self, target, ctx):
        return BiasOffset(_out_size(target.module))

    def formula_count(self, ctx) -> int:
        return sum(_out_size(t.module) for t in ctx.targets)
