"""GOFT / GOFT* / qGOFT (Ma et al., ICML 2024): (quasi-)orthogonal fine-tuning with parallel Givens rotations.

y = W Rᵀ x + b with R = P_L ⋯ P_2 P_1 (· diag(s) for GOFT*) acting on the *input* dimension
(paper Eq. 4; product order as in the authors' v1 code, since the paper's Π_r P_r leaves it open).
Level r (Eq. 3) uses stride s = 2^(r−1) and rotates the disjoint pairs (2s·k, 2s·k + s),
k < c_r = ⌊n_r/2⌋, n_1 = d, n_{r+1} = ⌈n_r/2⌉ (odd leftovers carry to the next level): d − 1 angles
in ⌈log₂ d⌉ levels, stored level 1 first.

- GOFT: θ = π·tanh(φ), φ = 0 at start (the v1 code's parameterisation; the paper only says θ is
  zero-initialised), so R = I exactly. cos/sin are computed in fp32.
- GOFT* (``scale=True``): a learned diagonal scale s (init 1) applied after the rotations. NB: the
  official code's default (``strict_oft=True, no_scaling=False``) is GOFT*, not GOFT; the paper's
  GOFT parameter counts are without the scale, which is our default.
- qGOFT (``method: qgoft``): every 2×2 block is a free matrix M = [α β] initialised to I, with the
  soft-orthogonality regulariser λ Σ ⟨α, β⟩² (Eq. 6) returned by ``training_loss`` so training loops
  add it automatically (the official code lacks it).

Two exact ways to apply it, both with elementwise level ops (v' = a⊙v + b⊙v[p]) and never a dense
d×d R in training: ``apply="activation"`` rotates each token's input, O(d) per token per level, as the
issue describes; ``apply="weight"`` (default, "auto") applies the same levels to the rows of W
(W Rᵀ = W diag(s) P_1ᵀ ⋯ P_Lᵀ, O(d_out·d) per level, independent of the number of tokens) and then
runs one matmul — measured faster on MiniLM (docs/goft.md). Both paths go through one autograd
function (``_LevelsOnRows``): level r only rotates 2·c_r columns, so only those are touched (fewer than
2d columns over all levels instead of L·d), and backward recomputes them from its input, so nothing per
level is saved (``recompute=False`` keeps them instead). ``rotate`` is the plain full-width version of
the same levels, used to densify R (``dense``, the orthogonality check) and as the tests' reference. Merge
(W' = W Rᵀ through the weight path, in fp32), unmerge from the kept original (qGOFT's R may be
ill-conditioned), the orthogonality check and the regulariser hook are the orthogonal family's shared code
(:mod:`peftlab.tuners.orthogonal`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import MethodConfig, Range
from ..families import family_of
from ..registry import register
from ..slot import linear_dims
from .orthogonal import OrthogonalAdapter, OrthogonalConfig, check_apply


def givens_pairs(d: int) -> list[tuple[list[int], list[int]]]:
    """Per level r = 1..⌈log₂ d⌉: the (i, j) pairs (2s·k, 2s·k + s), s = 2^(r−1) (paper Eq. 3)."""
    levels, n, s = [], d, 1
    while n > 1:
        c = n // 2
        i = [2 * s * k for k in range(c)]
        levels.append((i, [x + s for x in i]))
        n, s = (n + 1) // 2, 2 * s
    return levels


class GivensRotation(OrthogonalAdapter):
    """Applies x ↦ Rᵀ x (then the base linear): levels P_Lᵀ first, P_1ᵀ last, then diag(s). Forward, merge,
    unmerge and the orthogonality check are the family's (:class:`peftlab.tuners.orthogonal.OrthogonalAdapter`)."""

    def __init__(self, d: int, quasi: bool = False, scale: bool = False, recompute: bool = True, apply: str = "auto"):
        super().__init__()
        self.d, self.quasi, self.recompute, self.apply = d, quasi, recompute, apply
        levels = givens_pairs(d)
        self.n_angles = sum(len(i) for i, _ in levels)
        if quasi:
            self.blocks = nn.Parameter(torch.eye(2).repeat(self.n_angles, 1, 1))  # M_i = [α_i β_i] = I
        else:
            self.phi = nn.Parameter(torch.zeros(self.n_angles))
        self.scale = nn.Parameter(torch.ones(d)) if scale else None
        self.sizes = [len(i) for i, _ in levels]
        for r, (i, j) in enumerate(levels):
            ij = torch.tensor(i + j)
            partner = torch.arange(d)
            partner[torch.tensor(i)] = torch.tensor(j)
            partner[torch.tensor(j)] = torch.tensor(i)
            self.register_buffer(f"ij{r}", ij, persistent=False)
            self.register_buffer(f"i{r}", torch.tensor(i), persistent=False)
            self.register_buffer(f"j{r}", torch.tensor(j), persistent=False)
            self.register_buffer(f"partner{r}", partner, persistent=False)

    def block_entries(self) -> tuple[torch.Tensor, ...]:
        """(M00, M01, M10, M11) of every 2×2 block, fp32; for GOFT M = [[cos, −sin], [sin, cos]]."""
        if self.quasi:
            m = self.blocks.float()
            return m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1]
        theta = math.pi * torch.tanh(self.phi.float())
        c, s = torch.cos(theta), torch.sin(theta)
        return c, -s, s, c

    def level_coefficients(self, dtype, transpose: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per level, vectors (a, b) with (P_rᵀ x)_k = a_k x_k + b_k x_{partner(k)} (P_r x if not transpose)."""
        m00, m01, m10, m11 = self.block_entries()
        out, start = [], 0
        ones, zeros = torch.ones(self.d, device=m00.device), torch.zeros(self.d, device=m00.device)
        for r, n in enumerate(self.sizes):
            sl = slice(start, start + n)
            ij = getattr(self, f"ij{r}")
            a = ones.index_copy(0, ij, torch.cat([m00[sl], m11[sl]]))
            b = zeros.index_copy(0, ij, torch.cat([m10[sl], m01[sl]] if transpose else [m01[sl], m10[sl]]))
            out.append((a.to(dtype), b.to(dtype)))
            start += n
        return out

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rᵀ x for the last dimension of x, with full-width level ops (densify / reference; training uses
        ``rotate_rows`` and ``rotate_weight``)."""
        coef = self.level_coefficients(x.dtype)
        for r in reversed(range(len(self.sizes))):
            a, b = coef[r]
            x = torch.addcmul(x * a, x.index_select(-1, getattr(self, f"partner{r}")), b)
        if self.scale is not None:
            x = x * self.scale.to(x.dtype)
        return x

    def rotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W Rᵀ = W diag(s) P_1ᵀ ⋯ P_Lᵀ, computed on the rows of W (cost independent of the tokens)."""
        if self.scale is not None:
            w = w * self.scale.to(w.dtype)
        m = torch.stack(self.block_entries())
        return _LevelsOnRows.apply(w, m, tuple(self.sizes), False, self.recompute, *self._idx())

    def _idx(self) -> list[torch.Tensor]:
        return [getattr(self, f"{c}{r}") for r in range(len(self.sizes)) for c in "ij"]

    def rotate_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rᵀ x for every row x of a 2-D x (= X R): levels P_Lᵀ first, touching only the rotated columns."""
        m00, m01, m10, m11 = self.block_entries()
        m = torch.stack([m00, m10, m01, m11])  # transposed blocks, levels in reverse: X P_L ⋯ P_1 = X R
        x = _LevelsOnRows.apply(x, m, tuple(self.sizes), True, self.recompute, *self._idx())
        return x * self.scale.to(x.dtype) if self.scale is not None else x

    rotated_weight = rotate_weight

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotate_rows(x.reshape(-1, self.d)).reshape(x.shape)

    def dense(self) -> torch.Tensor:
        """R as a dense d×d matrix (rows of rotate(I) are the rows of R)."""
        eye = torch.eye(self.d, device=self.block_entries()[0].device)
        return self.rotate(eye)

    def orthogonality_penalty(self) -> torch.Tensor:
        """Σ_i ⟨α_i, β_i⟩² over this layer's 2×2 blocks (zero for exact rotations)."""
        m00, m01, m10, m11 = self.block_entries()
        return (m00 * m01 + m10 * m11).pow(2).sum()

@register
@dataclass
class GOFTConfig(OrthogonalConfig):
    """Givens orthogonal fine-tuning; ``scale=True`` is GOFT* (learned diagonal scale)."""

    method = "goft"
    default_roles = ("q", "k", "v", "o", "ffn_in", "ffn_out", "cross_q", "cross_k", "cross_v", "cross_o", "ffn_gate")

    scale: bool = False
    recompute: bool = True  # recompute the rotation in backward instead of storing per-level intermediates
    apply: str = "auto"  # "auto"/"weight": rotate W's rows then one matmul; "activation": per-token level ops

    def validate(self) -> None:
        super().validate()
        check_apply(self)

    _quasi = False

    def default_targets(self, model):
        """Paper: all linear layers of each block for encoders; q/k/v/o for decoder LLMs."""
        fam = family_of(model)
        if fam is not None and fam.kind == "decoder":
            return ["q", "k", "v", "o"]
        return list(self.default_roles)

    def make_adapter(self, target, ctx):
        d_in, _ = linear_dims(target.module)
        return GivensRotation(d_in, quasi=self._quasi, scale=self.scale, recompute=self.recompute, apply=self.apply)

    def formula_count(self, ctx) -> int:
        per = 4 if self._quasi else 1
        return sum(per * (linear_dims(t.module)[0] - 1) + (linear_dims(t.module)[0] if self.scale else 0) for t in ctx.targets)


@register
@dataclass
class QGOFTConfig(GOFTConfig):
    """Quasi-Givens OFT: free 2×2 blocks + the soft-orthogonality regulariser λ Σ⟨α, β⟩²."""

    method = "qgoft"
    limits = MethodConfig.limits | {"reg_lambda": Range(0)}
    reg_lambda: float = 0.01

    _quasi = True  # the family's training_loss adds reg_lambda · Σ orthogonality_penalty()


def _transposed_copy(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of xᵀ, always a copy (``.contiguous()`` would alias a transposed GPT-2 Conv1D
    weight, and the levels update it in place)."""
    return x.t().clone(memory_format=torch.contiguous_format)


class _LevelsOnRows(torch.autograd.Function):
    """Rows of X ↦ X P_1ᵀ ⋯ P_Lᵀ (or, ``reverse``, X P_Lᵀ ⋯ P_1ᵀ), touching only each level's 2·c_r rotated
    columns (Σ_r 2c_r < 2d in all, where a dense per-level op would touch L·d): per pair
    new_i = M00 x_i + M01 x_j, new_j = M10 x_i + M11 x_j. Works on Xᵀ so a column of X is a contiguous
    row. Nothing per level is saved: backward recomputes the touched columns from X, then returns the
    blocks' gradients as sums over X's rows (and X's gradient only if X needs one)."""

    @staticmethod
    def _order(sizes, reverse):
        starts = [sum(sizes[:r]) for r in range(len(sizes))]
        order = list(zip(range(len(sizes)), starts, sizes))
        return order[::-1] if reverse else order

    @staticmethod
    def _levels(xt, m, order, idx, keep: bool):
        """Levels on Xᵀ (d, rows) in place; with ``keep`` the per-level inputs (x_i, x_j) are returned."""
        kept = []
        for r, start, n in order:
            i, j = idx[2 * r], idx[2 * r + 1]
            a00, a01, a10, a11 = (c[start:start + n, None].to(xt.dtype) for c in m)
            xi, xj = xt.index_select(0, i), xt.index_select(0, j)
            xt.index_copy_(0, i, a00 * xi + a01 * xj)
            xt.index_copy_(0, j, a10 * xi + a11 * xj)
            if keep:
                kept.append((xi, xj))
        return xt, kept

    @staticmethod
    def forward(ctx, x, m, sizes, reverse, recompute, *idx):  # m: (4, n_angles) = M00, M01, M10, M11
        ctx.order = _LevelsOnRows._order(sizes, reverse)
        ctx.save_for_backward(x, m, *idx)
        out, kept = _LevelsOnRows._levels(_transposed_copy(x), m, ctx.order, idx, keep=not recompute)
        ctx.kept = None if recompute else kept
        return out.t()

    @staticmethod
    def backward(ctx, g):
        x, m, *idx = ctx.saved_tensors
        kept = ctx.kept or _LevelsOnRows._levels(_transposed_copy(x), m, ctx.order, idx, keep=True)[1]
        gt = _transposed_copy(g)
        grads = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
        for step in reversed(range(len(ctx.order))):
            r, start, n = ctx.order[step]
            i, j = idx[2 * r], idx[2 * r + 1]
            (xi, xj), gi, gj = kept[step], gt.index_select(0, i), gt.index_select(0, j)
            for k, (a, b) in enumerate(((gi, xi), (gi, xj), (gj, xi), (gj, xj))):  # ∂/∂M00, M01, M10, M11
                grads[k, start:start + n] = (a * b).sum(1, dtype=torch.float32)
            if step > 0 or ctx.needs_input_grad[0]:
                a00, a01, a10, a11 = (c[start:start + n, None].to(gt.dtype) for c in m)
                gt.index_copy_(0, i, a00 * gi + a10 * gj)
                gt.index_copy_(0, j, a01 * gi + a11 * gj)
        return (gt.t() if ctx.needs_input_grad[0] else None), grads.to(m.dtype), None, None, None, *([None] * len(idx))
