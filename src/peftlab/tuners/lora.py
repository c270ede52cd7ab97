"""LoRA (Hu et al. 2022): h = W₀x + (α/r)·B A x  (METHODS.md §5.2).

A ~ Kaiming-uniform(a=√5), B = 0, so the model starts exactly at W₀. ``use_rslora`` scales by
α/√r instead (Kalajdzievski 2023). Merge: W₀ + (α/r)·B A.

Speed: on the common case (an nn.Linear / Conv1D base, no dropout, no autocast, no hooks on the
base, LoRA innermost in its slot) base and update run as one autograd function, :class:`_LinearLoRA`, whose
hand-written backward folds the update's input gradient into the base's (``gx = g W₀ + s·(g B) A``,
one in-place ``addmm``) and saves only x and the rank-r activation A x. Otherwise the update is
added to ``base_fn(x)`` with one ``addmm`` (no separate scale and add kernels).

``gate=True`` (UniPELT, Mao et al. 2022): h = W₀x + G_L(x)·(α/r)·B A x with G_L = σ(W_G x + b_G) one
scalar per position (:class:`peftlab.slot.Gate`); a gated LoRA is not mergeable and has no peft equivalent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from ..config import FRACTION, POSITIVE, SIZE, MethodConfig, check_size
from ..errors import ConfigError, PeftlabError
from ..registry import register
from ..slot import add_gate, gate_of, linear_dims
from .checks import refuse_peft_options
from .delta import DeltaAdapter


class LoRALayer(DeltaAdapter):  # merge/unmerge: W ± ΔW

    def __init__(self, d_in: int, d_out: int, r: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """(α/r)·B A x, shaped like the layer output."""
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def forward(self, slot, base_fn, x):
        if _fusable(self, slot, base_fn, x):
            return _LinearLoRA.apply(x, slot.weight_oi(), slot.bias, self.lora_A, self.lora_B, self.scale)
        y = base_fn(x)
        h = F.linear(self.dropout(x), self.lora_A)
        gate = gate_of(self)
        if gate is not None:
            return y + gate(x) * F.linear(h, self.lora_B) * self.scale
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.t(), alpha=self.scale)
        return out.view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r)·B A in (out, in) layout."""
        return (self.lora_B @ self.lora_A) * self.scale

    def to_peft_tensors(self):
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def from_peft_tensors(self, t):
        return {"lora_A": t["lora_A.weight"], "lora_B": t["lora_B.weight"]}


def _fusable(lora: LoRALayer, slot, base_fn, x: torch.Tensor) -> bool:
    """Whether the fused function computes exactly what ``base_fn(x) + update(x)`` would.

    Static facts only (types, flags, hooks), so ``torch.compile`` turns this into guards, not graph breaks.
    """
    base = slot.base  # exact types: quantized nn.Linear subclasses keep the generic path
    plain = type(base) is nn.Linear or type(base).__name__ == "Conv1D"
    if base_fn is not base or not plain or type(lora.dropout) is not nn.Identity or gate_of(lora) is not None:
        return False
    if base._forward_hooks or base._forward_pre_hooks or torch.is_autocast_enabled(x.device.type):
        return False
    return base.weight.dtype == x.dtype == lora.lora_A.dtype


class _LinearLoRA(torch.autograd.Function):
    """y = x W₀ᵀ + b + s·(x Aᵀ) Bᵀ with W₀ in (out, in) layout; backward:
    g_h = s·g B,  g_x = g W₀ + g_h A (one in-place addmm),  g_B = s·gᵀ(x Aᵀ),  g_A = g_hᵀ x,
    and g_W₀ = gᵀ x, g_b = Σ g only when the base itself trains (BitFit beside LoRA, full fine-tuning)."""

    @staticmethod
    def forward(ctx, x, w, b, lora_a, lora_b, scale):
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ lora_a.t()
        y = torch.addmm(b, x2, w.t()) if b is not None else x2 @ w.t()
        y.addmm_(h, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x2, h, w, lora_a, lora_b)
        ctx.scale, ctx.x_shape = scale, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x2, h, w, lora_a, lora_b = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gh = (g2 @ lora_b).mul_(ctx.scale)
        gx = (g2 @ w).addmm_(gh, lora_a).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        ga = gh.t() @ x2 if ctx.needs_input_grad[3] else None
        gb = (g2.t() @ h).mul_(ctx.scale) if ctx.needs_input_grad[4] else None
        gw = g2.t() @ x2 if ctx.needs_input_grad[1] else None
        gbias = g2.sum(0) if ctx.needs_input_grad[2] else None
        return gx, gw, gbias, ga, gb, None


@register
@dataclass
class LoRAConfig(MethodConfig):
    """Low-rank adaptation. ``alpha`` defaults to ``r`` (scale 1) when None."""

    method = "lora"
    default_roles = ("q", "v")
    peft_type = "LORA"

    limits = MethodConfig.limits | {"r": SIZE, "alpha": POSITIVE, "dropout": FRACTION}

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    # "default": A Kaiming-uniform, B = 0; "gaussian": A ~ N(0, 1/r²); "pissa"/"olora": from W (lora_init.py)
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    gate: bool = False  # UniPELT's learned gate on the update

    def validate(self) -> None:
        super().validate()
        if self.init not in ("default", "gaussian", "pissa", "olora"):
            raise ConfigError(f"{type(self).__name__}.init must be default, gaussian, pissa or olora, got {self.init!r}")
        if self.init != "default" and type(self).make_adapter is not LoRAConfig.make_adapter:
            raise ConfigError(f"{type(self).__name__}.init={self.init!r}: only LoRA (and LoRA+) take an init option")
        if self.gate and (self.init in ("pissa", "olora") or type(self).make_adapter is not LoRAConfig.make_adapter):
            raise ConfigError(f"{type(self).__name__}.gate: only plain LoRA (init='default' or 'gaussian') takes a gate")

    @property
    def scale(self) -> float:
        alpha = self.r if self.alpha is None else self.alpha
        return alpha / math.sqrt(self.r) if self.use_rslora else alpha / self.r

    def make_adapter(self, target, ctx):
        d_in, d_out = linear_dims(target.module)
        check_size(self, "r", self.r, min(d_in, d_out), f"the smaller dimension of {target.name}")
        if self.init in ("pissa", "olora"):
            from .lora_init import ResidualInitLoRALayer

            return ResidualInitLoRALayer.from_weight(target.module, self.r, self.scale, self.dropout, self.init)
        layer = LoRALayer(d_in, d_out, self.r, self.scale, self.dropout)
        if self.init == "gaussian":
            nn.init.normal_(layer.lora_A, std=1 / self.r)
        return add_gate(layer, d_in) if self.gate else layer

    def formula_count(self, ctx) -> int:
        gate = sum(linear_dims(t.module)[0] + 1 for t in ctx.targets) if self.gate else 0
        return sum(self.r * sum(linear_dims(t.module)) for t in ctx.targets) + gate

    def to_peft_fields(self, adapters):
        if self.gate:
            raise PeftlabError("a gated LoRA (gate=True) has no equivalent in peft's format")
        r, alpha = self.r, self.r if self.alpha is None else self.alpha
        if self.init in ("pissa", "olora"):  # written as the converted plain delta s(BA − B₀A₀): rank 2r, same scale
            r, alpha = 2 * r, alpha * (math.sqrt(2) if self.use_rslora else 2)
        return {"r": r, "lora_alpha": alpha, "lora_dropout": self.dropout, "use_rslora": self.use_rslora,
                "use_dora": self.method == "dora"}

    @classmethod
    def from_peft_fields(cls, d, resolve):
        if d.get("peft_type") != "LORA" or bool(d.get("use_dora")) != (cls.method == "dora"):
            return None
        refuse_peft_options(d, "LoRA", (("bias", "none"), ("rank_pattern", {}), ("alpha_pattern", {})))
        init = {True: "default", False: "default", None: "default", "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
        if d.get("init_lora_weights", True) not in init:
            raise ValueError(f"peft LoRA option init_lora_weights={d.get('init_lora_weights')!r} is not supported by peftlab")
        return {"r": d["r"], "alpha": d.get("lora_alpha", d["r"]), "dropout": d.get("lora_dropout", 0.0),
                "use_rslora": bool(d.get("use_rslora", False)), "init": init[d.get("init_lora_weights", True)]}
