"""BOFT (Liu et al., ICLR 2024): orthogonal fine-tuning with a butterfly product of block-orthogonal factors.

y = diag(s) W Rᵀ x + b (bias not scaled) — in peft's (in, out) orientation, Wᵀ ↦ R Wᵀ — with the
butterfly orthogonal R = B̃_m ⋯ B̃_1 (paper Eq. 6; B̃_i = P_i BD_i P_iᵀ, a block-diagonal BD_i of k = d/b
orthogonal b×b blocks conjugated by the block-butterfly permutation P_i of §4.2) and a learned per-output
scale s (init 1, the magnitude vector peft trains with BOFT). Each block is the Cayley transform
(I − S)(I + S)⁻¹ of S = (A − Aᵀ)/2 (paper §3.1, peft's sign and storage: full b×b matrices A, zero at
start, so R = I). m = 1 is OFT with b×b blocks (and s). Tensor names and layout are peft's (``boft_R``
(m, k, b, b), ``boft_s`` (d_out, 1) in peft's files), and factor i uses peft's permutation
(k / 2^i groups; within each group the half-blocks at even positions first, then the odd ones; P_0 = I).

Fast forward (``apply="weight"``, the default): the factors are applied to W's rows (per factor a gather,
a reshaped batched matmul of k b×b blocks and a gather — no dense d×d matrix, where peft builds R densely
and multiplies every token by it), then one matmul; backward goes the activation way, recomputing the
factors' inputs from x (:class:`peftlab.tuners.orthogonal._ButterflyLinear`). ``apply="activation"``
rotates x factor by factor and calls the inner forward.

Departures: peft's ``boft_dropout`` (multiplicative block dropout) and Conv2d targets are omitted; GPT-2's
Conv1D layers are served but cannot be exported to peft (peft's BOFT only wraps nn.Linear). NB peft runs
m > 1 only with its CUDA extension: without it, it silently sets m = 1 (so a peft BOFT config with m > 1
built on a CPU-only machine is an OFT-like m = 1 adapter; an exported m > 1 adapter then fails to load
there, and peft's m > 1 adapters load here exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import SIZE, Range
from ..errors import ConfigError
from ..registry import register
from ..slot import linear_dims
from .checks import refuse_peft_options
from .delta import refuse_conv1d_for_peft
from .loha import is_conv1d
from .orthogonal import BlockRotation, OrthogonalConfig, cayley, check_apply


def butterfly_perm(d: int, groups: int, half: int) -> list[int]:
    """Block-butterfly permutation: d indices in ``groups`` groups; within a group, its chunks of ``half``
    indices at even positions first, then those at odd positions."""
    size = d // groups
    chunks = size // half
    order = list(range(0, chunks, 2)) + list(range(1, chunks, 2))
    return [g * size + c * half + j for g in range(groups) for c in order for j in range(half)]


def boft_shape(config: BOFTConfig, d_in: int, where: str) -> tuple[int, int]:
    """(block size b, blocks k) for a layer of input width ``d_in``; ConfigError naming the field and layer."""
    f, name = config.n_butterfly_factor - 1, "BOFTConfig"
    if config.block_num:
        k = config.block_num
        if d_in % k or (f and (f > int(math.log2(k)) or k % 2**f)):
            raise ConfigError(f"{name}.block_num={k} does not fit {where} (in_features {d_in}, "
                              f"n_butterfly_factor {f + 1}): in_features % block_num and block_num % 2^(m−1) must be 0")
        b = d_in // k
    else:
        b = config.block_size
        if d_in % (b * 2**f):
            raise ConfigError(f"{name}.block_size={b} does not fit {where} (in_features {d_in}, n_butterfly_factor "
                              f"{f + 1}): in_features must be a multiple of block_size·2^(m−1) = {b * 2**f}")
        k = d_in // b
    if f and (k % 2 or b % 2):
        raise ConfigError(f"{name}: with n_butterfly_factor > 1, block size ({b}) and block count ({k}) at {where} must be even")
    return b, k


class ButterflyRotation(BlockRotation):
    def __init__(self, d_in: int, d_out: int, b: int, m: int, apply: str = "auto", fan_in_fan_out: bool = False):
        super().__init__()
        self.b, self.k, self.m, self.apply, self.fan_in_fan_out = b, d_in // b, m, apply, fan_in_fan_out
        self.boft_R = nn.Parameter(torch.zeros(m, self.k, b, b))
        self.boft_s = nn.Parameter(torch.ones(d_out))
        if m > 1:
            perms = torch.tensor([butterfly_perm(d_in, self.k // 2**i, b // 2) for i in range(m)])
            self.register_buffer("perms", perms, persistent=False)
            self.register_buffer("invs", perms.argsort(dim=1), persistent=False)
        else:
            self.perms = self.invs = None

    def blocks(self) -> torch.Tensor:
        a = self.boft_R.float()
        return cayley(0.5 * (a - a.transpose(-1, -2)))

    def output_scale(self) -> torch.Tensor:
        return self.boft_s

    def to_peft_tensors(self):
        return {"boft_R": self.boft_R, "boft_s": self.boft_s[:, None]}

    def from_peft_tensors(self, t):
        return {"boft_R": t["boft_R"], "boft_s": t["boft_s"].reshape(-1)}


@register
@dataclass
class BOFTConfig(OrthogonalConfig):
    """Butterfly orthogonal fine-tuning: ``n_butterfly_factor`` (m) block-diagonal factors of ``block_size`` b
    (or ``block_num`` k blocks), and a learned output scale."""

    method = "boft"
    default_roles = ("q", "v")
    peft_type = "BOFT"
    limits = OrthogonalConfig.limits | {"block_size": Range(0), "block_num": Range(0), "n_butterfly_factor": SIZE}

    block_size: int = 8
    block_num: int = 0
    n_butterfly_factor: int = 2
    apply: str = "auto"  # "auto"/"weight": rotate W's rows then one matmul; "activation": rotate x

    def validate(self) -> None:
        super().validate()
        check_apply(self)
        if (self.block_size == 0) == (self.block_num == 0):
            raise ConfigError(f"BOFTConfig: set exactly one of block_size ({self.block_size}) and block_num ({self.block_num})")

    def make_adapter(self, target, ctx):
        d_in, d_out = linear_dims(target.module)
        b, _ = boft_shape(self, d_in, target.name)
        return ButterflyRotation(d_in, d_out, b, self.n_butterfly_factor, self.apply, is_conv1d(target.module))

    def formula_count(self, ctx) -> int:
        """m·k·b² stored block entries (peft's storage; m·k·b(b−1)/2 of them free) + d_out scales per target."""
        total = 0
        for t in ctx.targets:
            d_in, d_out = linear_dims(t.module)
            b, k = boft_shape(self, d_in, t.name)
            total += self.n_butterfly_factor * k * b * b + d_out
        return total

    def to_peft_fields(self, adapters):
        refuse_conv1d_for_peft("BOFT", adapters)
        return {"boft_block_size": self.block_size, "boft_block_num": self.block_num,
                "boft_n_butterfly_factor": self.n_butterfly_factor, "boft_dropout": 0.0, "init_weights": True,
                "bias": "none"}

    @classmethod
    def from_peft_fields(cls, d, resolve):
        if d.get("peft_type") != "BOFT":
            return None
        refuse_peft_options(d, "BOFT", (("boft_dropout", 0.0), ("bias", "none")))
        return {"block_size": d.get("boft_block_size", 4), "block_num": d.get("boft_block_num", 0),
                "n_butterfly_factor": d.get("boft_n_butterfly_factor", 1)}
