"""OFT (Qiu et al., NeurIPS 2023): orthogonal fine-tuning with a block-diagonal R, and COFT.

y = W Rᵀ x + b — in peft's (in, out) orientation, Wᵀ ↦ R Wᵀ (paper Eq. 2: W = R W⁰) — with
R = diag(R_1, …, R_k) of k = d_in / b blocks (paper Eq. 4, the block-diagonal structure of §3.3), each
from the Cayley transform of a skew-symmetric Q_i (paper Eq. 3). We store, as peft does, the b(b−1)/2
upper-triangular entries of each Q_i (``oft_R.weight`` in peft's files), and follow peft's sign:
R_i = (I − Q_i)(I + Q_i)⁻¹, the paper's (I + Q)(I − Q)⁻¹ at −Q (the same set of rotations). Q = 0 at start,
so R = I exactly.

- ``block_share``: one Q shared by all blocks (paper §3.3, parameter sharing).
- ``coft`` (COFT, paper Eq. 5, ‖R − I‖ ≤ ε): as the authors' code and peft, each block's Q_i is projected
  onto the ball ‖Q_i‖_F ≤ ε/√n (n stored blocks). Peft writes the projection into the parameter in every
  forward; we use the projected value in the forward (gradient passed straight through, which is what
  peft's no-grad projection amounts to) and write it into the parameter after each optimizer step
  (``on_train_step``), so stored adapters hold projected values as peft's do.
- ``use_cayley_neumann`` (peft's option, not in the paper): R_i ≈ I + 2Q + 2Q² + … + Q^(n−1), peft's
  truncated series. NB it approximates (I + Q)(I − Q)⁻¹, i.e. the *transpose* of the exact R (peft's
  convention, kept for parity). Off by default (the paper's exact transform; peft's default is on).
- Block size: ``block_size`` b (default 32, peft's) or ``r`` blocks, adjusted per layer to the divisor of
  d_in nearest to it, as peft does.

Fast forward (``apply="weight"``, the default): W Rᵀ is built on W's rows by a reshaped batched matmul
(k blocks of b×b, never a dense d×d R), the Cayley transform is a solve on the small blocks, and one
matmul gives y; backward goes the activation way (:class:`peftlab.tuners.orthogonal._ButterflyLinear`),
saving only x. ``apply="activation"`` rotates x then calls the inner forward (also what happens when
OFT is stacked on another adapter of the same layer).

Departures: peft's ``module_dropout`` (multiplicative block dropout, not in the paper), Conv2d and
Embedding targets are omitted; GPT-2's Conv1D layers are served but cannot be exported to peft (peft's
OFT only wraps nn.Linear).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import POSITIVE, SIZE, Range
from ..errors import ConfigError
from ..registry import register
from ..slot import linear_dims
from .checks import refuse_peft_options
from .delta import refuse_conv1d_for_peft
from .loha import is_conv1d
from .orthogonal import BlockRotation, OrthogonalConfig, adjust_to_divisor, cayley, check_apply


def oft_block(d_in: int, block_size: int, r: int) -> tuple[int, int]:
    """(block size, number of blocks) for a layer of input width ``d_in`` (peft's adjustment rule)."""
    if r:
        k = adjust_to_divisor(d_in, r)
        return d_in // k, k
    b = adjust_to_divisor(d_in, block_size)
    return b, d_in // b


class OFTRotation(BlockRotation):
    perms = invs = None
    m = 1

    def __init__(self, d: int, block_size: int, block_share: bool = False, coft: bool = False, eps: float = 6e-5,
                 neumann_terms: int = 0, apply: str = "auto", fan_in_fan_out: bool = False):
        super().__init__()
        self.b, self.k = block_size, d // block_size
        self.block_share, self.coft, self.eps, self.neumann_terms = block_share, coft, eps, neumann_terms
        self.apply, self.fan_in_fan_out = apply, fan_in_fan_out
        n = 1 if block_share else self.k
        self.skew = nn.Parameter(torch.zeros(n, self.b * (self.b - 1) // 2))  # Q = 0: R = I
        rows, cols = torch.triu_indices(self.b, self.b, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def skew_matrices(self, vec: torch.Tensor) -> torch.Tensor:
        q = vec.new_zeros(vec.shape[0], self.b, self.b)
        q[:, self.rows, self.cols] = vec
        return q - q.transpose(1, 2)

    def projected(self) -> torch.Tensor:
        """COFT: each block's Q scaled onto ‖Q‖_F ≤ ε/√n (n stored blocks); unchanged inside the ball."""
        vec = self.skew
        radius = self.eps / math.sqrt(vec.shape[0])
        norm = torch.linalg.matrix_norm(self.skew_matrices(vec))
        factor = torch.where(norm <= radius, torch.ones_like(norm), radius / norm.clamp_min(1e-30))
        return vec * factor[:, None]

    def blocks(self) -> torch.Tensor:
        vec = self.skew
        if self.coft:  # projected value, gradient straight through (peft projects under no_grad)
            vec = vec + (self.projected() - vec).detach()
        r = cayley(self.skew_matrices(vec), self.neumann_terms)
        return r.expand(self.k, self.b, self.b)[None] if self.block_share else r[None]

    def project_(self) -> None:
        if self.coft:
            self.skew.copy_(self.projected())

    def to_peft_tensors(self):
        return {"oft_R.weight": self.skew}

    def from_peft_tensors(self, t):
        return {"skew": t["oft_R.weight"]}


@register
@dataclass
class OFTConfig(OrthogonalConfig):
    """Orthogonal fine-tuning: block-diagonal Cayley rotations of each target's input; ``coft`` constrains
    ‖Q‖ ≤ ε (COFT); ``block_share`` shares one block."""

    method = "oft"
    default_roles = ("q", "v")
    peft_type = "OFT"
    limits = OrthogonalConfig.limits | {"block_size": Range(0), "r": Range(0), "eps": POSITIVE,
                                        "num_cayley_neumann_terms": SIZE}

    block_size: int = 0  # 0 and r = 0: 32, peft's default
    r: int = 0
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5
    apply: str = "auto"  # "auto"/"weight": rotate W's rows then one matmul; "activation": rotate x

    def validate(self) -> None:
        super().validate()
        check_apply(self)
        if self.block_size and self.r:
            raise ConfigError(f"OFTConfig: set block_size ({self.block_size}) or r ({self.r}), not both")

    @property
    def size(self) -> int:
        """The block size asked for (0 when ``r`` is set)."""
        return 0 if self.r else self.block_size or 32

    def make_adapter(self, target, ctx):
        d_in, _ = linear_dims(target.module)
        b, _ = oft_block(d_in, self.size, self.r)
        return OFTRotation(d_in, b, self.block_share, self.coft, self.eps,
                           self.num_cayley_neumann_terms if self.use_cayley_neumann else 0, self.apply,
                           is_conv1d(target.module))

    def formula_count(self, ctx) -> int:
        total = 0
        for t in ctx.targets:
            b, k = oft_block(linear_dims(t.module)[0], self.size, self.r)
            total += (1 if self.block_share else k) * b * (b - 1) // 2
        return total

    def to_peft_fields(self, adapters):
        refuse_conv1d_for_peft("OFT", adapters)
        return {"r": self.r, "oft_block_size": self.size, "module_dropout": 0.0, "coft": self.coft,
                "eps": self.eps, "block_share": self.block_share, "use_cayley_neumann": self.use_cayley_neumann,
                "num_cayley_neumann_terms": self.num_cayley_neumann_terms, "init_weights": True, "bias": "none"}

    @classmethod
    def from_peft_fields(cls, d, resolve):
        if d.get("peft_type") != "OFT":
            return None
        refuse_peft_options(d, "OFT", (("module_dropout", 0.0), ("bias", "none")))
        if "oft_block_size" not in d:
            raise ValueError("peft OFT adapter from before peft 0.14 (no oft_block_size) is not supported")
        r = d.get("r", 0)
        return {"block_size": 0 if r else d["oft_block_size"], "r": r, "coft": bool(d.get("coft", False)),
                "eps": d.get("eps", 6e-5), "block_share": bool(d.get("block_share", False)),
                "use_cayley_neumann": bool(d.get("use_cayley_neumann", True)),
                "num_cayley_neumann_terms": d.get("num_cayley_neumann_terms", 5)}
