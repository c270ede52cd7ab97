"""What the orthogonal family (GOFT/qGOFT, OFT, BOFT) has in common.

Every member multiplies a linear layer's input by an orthogonal R (optionally followed by a per-output
scale s): y = diag(s) W Rᵀ x + b — in peft's (in, out) orientation of the weight, Wᵀ ↦ R Wᵀ. So:

- :class:`OrthogonalAdapter`: the forward ("weight" path: one matmul with the rotated weight W Rᵀ when
  the adapter sits directly on the base layer; "activation" path: rotate the input, then the inner
  forward), merge W ↦ diag(s) W Rᵀ with the exact original kept for unmerge, the exact orthogonality
  check :meth:`OrthogonalAdapter.orthogonality_error` (max |RᵀR − I| of the dense R, in float64) and two
  training hooks a member may fill in: a soft-orthogonality penalty (qGOFT) and a projection onto a
  constraint set after each optimizer step (COFT).
- :class:`OrthogonalConfig`: the configs' side of those hooks — ``training_loss`` = λ Σ penalties over the
  part's adapters, ``on_train_step`` projects every adapter.
- Block-diagonal and butterfly rotations (OFT, BOFT): :func:`cayley` (exact, a solve on the small blocks,
  or peft's Neumann series), :func:`rows_times` (x ↦ x P·BD·Pᵀ on the rows of x with reshaped batched
  matmuls — never a dense d×d) and :class:`_ButterflyLinear`, the training forward of both.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..config import MethodConfig
from ..core import part_adapters
from ..errors import ConfigError
from ..slot import Adapter

APPLY = ("auto", "weight", "activation")


def check_apply(config: MethodConfig) -> None:
    if config.apply not in APPLY:
        raise ConfigError(f"{type(config).__name__}.apply: must be auto, weight or activation, got {config.apply!r}")


def orthogonality_error(r: torch.Tensor) -> float:
    """max |RᵀR − I| over a matrix or a batch of them (float64): the exact orthogonality check."""
    r = r.detach().double()
    eye = torch.eye(r.shape[-1], dtype=torch.float64, device=r.device)
    return (r.transpose(-1, -2) @ r - eye).abs().max().item()


class OrthogonalAdapter(Adapter):
    """Base of the orthogonal adapters. Subclasses implement :meth:`rotated_weight` (diag(s) W Rᵀ for an
    (out, in) W, differentiable), :meth:`rotate_input` (x ↦ x R on the last dimension) and :meth:`dense`
    (R, d×d); they may override :meth:`linear` (the weight path's training forward), :meth:`output_scale`,
    :meth:`orthogonality_penalty` and :meth:`project_`."""

    mergeable = True
    apply = "auto"

    def __init__(self):
        super().__init__()
        self._weight_copy: torch.Tensor | None = None

    # ---- to implement
    def rotated_weight(self, w: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dense(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- optional
    def output_scale(self) -> torch.Tensor | None:
        """The per-output scale s (BOFT), or None."""
        return None

    def orthogonality_penalty(self) -> torch.Tensor | None:
        """A soft-orthogonality term for the training loss (qGOFT), or None."""
        return None

    def project_(self) -> None:
        """Project the parameters onto the method's constraint set in place (COFT); nothing by default."""

    def linear(self, slot, x: torch.Tensor) -> torch.Tensor:
        """The weight path: one matmul with the rotated weight."""
        return F.linear(x, self.rotated_weight(slot.weight_oi()), slot.bias)

    # ---- shared
    def forward(self, slot, base_fn, x):
        # "weight": only possible when this adapter sits directly on the base layer; "activation": rotate
        # the input and run the inner forward (any stack of adapters), then scale its output around the bias
        if self.apply != "activation" and base_fn is slot.base:
            return self.linear(slot, x)
        y = base_fn(self.rotate_input(x))
        s = self.output_scale()
        if s is None:
            return y
        b = slot.bias
        return y * s.to(y.dtype) if b is None else (y - b) * s.to(y.dtype) + b

    def orthogonality_error(self) -> float:
        """max |RᵀR − I| of this adapter's R (exact, float64)."""
        return orthogonality_error(self.dense())

    def merge(self, slot) -> None:
        """W ↦ diag(s) W Rᵀ (fp32); the exact original is kept for :meth:`unmerge`."""
        w = slot.weight_oi()
        self._weight_copy = w.detach().clone()
        w.copy_(self.rotated_weight(w.float()).to(w.dtype))

    def unmerge(self, slot) -> None:
        slot.weight_oi().copy_(self._weight_copy)
        self._weight_copy = None


class OrthogonalConfig(MethodConfig):
    """Config side of the shared hooks. A subclass with a ``reg_lambda`` field gets the regulariser
    λ Σ penalty in the training loss; every adapter is projected after each optimizer step."""

    def training_loss(self, model, key):
        lam = getattr(self, "reg_lambda", 0.0)
        terms = [a.orthogonality_penalty() for _, a in part_adapters(model, key) if isinstance(a, OrthogonalAdapter)]
        terms = [t for t in terms if t is not None]
        return lam * torch.stack(terms).sum() if terms and lam else None

    def on_train_step(self, model, key, step, total_steps):
        with torch.no_grad():
            for _, a in part_adapters(model, key):
                if isinstance(a, OrthogonalAdapter):
                    a.project_()


# ---------------------------------------------------------------- block-diagonal / butterfly rotations
def cayley(skew: torch.Tensor, neumann_terms: int = 0) -> torch.Tensor:
    """Per block, R = (I − S)(I + S)⁻¹ (exact: a solve on the small blocks, fp32), or with
    ``neumann_terms`` = n > 0 peft's truncated series I + 2S + 2S² + … + 2S^(n−2) + S^(n−1)."""
    s = skew.float()
    eye = torch.eye(s.shape[-1], device=s.device).expand_as(s)
    if neumann_terms <= 0:
        return torch.linalg.solve(eye + s, eye - s, left=False)
    r, power = eye, None
    for k in range(1, neumann_terms):
        power = s if power is None else power @ s
        r = r + (power if k == neumann_terms - 1 else 2 * power)
    return r


def adjust_to_divisor(n: int, want: int) -> int:
    """The divisor of n nearest ``want`` (ties: the smaller; ``want`` ≥ n gives n), as peft adjusts OFT."""
    if want >= n:
        return n
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    return min(divisors, key=lambda k: (abs(k - want), k))


def rows_times(x: torch.Tensor, blocks: torch.Tensor, perm: torch.Tensor | None = None,
               inv: torch.Tensor | None = None) -> torch.Tensor:
    """x ↦ x P·BD·Pᵀ on the last dimension (BD block-diagonal with ``blocks`` (k, b, b); P the permutation
    matrix with P[i, perm[i]] = 1, so x P = x[..., inv] and y Pᵀ = y[..., perm]; None = identity)."""
    k, b, _ = blocks.shape
    if inv is not None:
        x = x.index_select(-1, inv)
    lead = x.shape[:-1]
    y = torch.bmm(x.reshape(-1, k, b).transpose(0, 1), blocks.to(x.dtype))  # (k, rows, b)
    y = y.transpose(0, 1).reshape(*lead, k * b)
    return y if perm is None else y.index_select(-1, perm)


def butterfly_rows(x: torch.Tensor, blocks: torch.Tensor, perms: torch.Tensor | None, invs: torch.Tensor | None,
                   transpose: bool = False) -> torch.Tensor:
    """x ↦ x M_{m−1} ⋯ M_0 with M_i = P_i BD_i P_iᵀ (``blocks`` (m, k, b, b)); ``transpose``: x ↦ x M_0ᵀ ⋯ M_{m−1}ᵀ."""
    for bl, perm, inv in _factors(blocks, perms, invs, transpose):
        x = rows_times(x, bl, perm, inv)
    return x


def _factors(blocks, perms, invs, weight_side: bool) -> list[tuple]:
    """The chain of row ops (blocks (k, b, b), perm, inv) in the order they are applied: on x (x ↦ x R) factors
    m−1 … 0; on W's rows (W ↦ W Rᵀ) factors 0 … m−1 with transposed blocks."""
    m = blocks.shape[0]
    idx = range(m) if weight_side else reversed(range(m))
    return [(blocks[i].transpose(-1, -2) if weight_side else blocks[i], None if perms is None else perms[i],
             None if invs is None else invs[i]) for i in idx]


def _chain_backward(z: torch.Tensor, h: torch.Tensor, chain: list[tuple], input_grad: bool):
    """Backward of z ↦ rows_times(…rows_times(z, chain[0])…, chain[-1]) for 2-D z and output gradient h:
    (gradients of the chain's blocks, in chain order; z's gradient or None). The factors' inputs are recomputed
    from z; a factor's block gradients are (z_j P)ᵀ(h_j P) per block, and h goes back through P BDᵀ Pᵀ."""
    zs = [z]
    for bl, perm, inv in chain[:-1]:
        zs.append(rows_times(zs[-1], bl.to(z.dtype), perm, inv))
    grads = [None] * len(chain)
    for j in reversed(range(len(chain))):
        bl, perm, inv = chain[j]
        k, b, _ = bl.shape
        hv = h if inv is None else h.index_select(-1, inv)  # gradient of z P BD
        zp = zs[j] if inv is None else zs[j].index_select(-1, inv)
        zt, ht = zp.reshape(-1, k, b).transpose(0, 1), hv.reshape(-1, k, b).transpose(0, 1)
        grads[j] = torch.bmm(zt.transpose(1, 2), ht)
        if j > 0 or input_grad:
            hu = torch.bmm(ht, bl.transpose(1, 2).to(ht.dtype)).transpose(0, 1).reshape(h.shape)
            h = hu if perm is None else hu.index_select(-1, perm)
    return grads, (h if input_grad else None)


class _ButterflyLinear(torch.autograd.Function):
    """y = ((x R) Wᵀ)·s + b with R = M_{m−1} ⋯ M_0 (block-diagonal factors, OFT is m = 1, P = I).

    Forward: one matmul with the rotated weight W Rᵀ, built on W's rows (cost independent of the tokens).
    Nothing the size of W is saved; backward takes one of two exact ways (``via_weight``; the layers use the
    activation way, see :meth:`BlockRotation.grad_via_weight`):

    - activation way: g_R = (g·s) W is the gradient of x R; the blocks' gradients are (z_i P_i)ᵀ(g_i P_i) per
      block (z_i: the input of factor i, recomputed from x) and x's gradient goes back through the factors —
      cheap matmuls on k blocks, but ~10 passes over the tokens×d_in activations per factor;
    - weight way: the weight gradient Gᵀx (one tokens×d_out×d_in matmul), x's gradient (g·s) W Rᵀ, then the
      blocks' gradients from the rotation of W's rows (recomputed; cost independent of the tokens).

    Saved: x (and, for a scale on the activation way, the unscaled output, as peft's autograd does)."""

    @staticmethod
    def forward(ctx, x, w, bias, s, blocks, perms, invs, via_weight):
        wr = butterfly_rows(w, blocks, perms, invs, transpose=True)
        u = F.linear(x, wr)
        keep_u = s is not None and ctx.needs_input_grad[3] and not via_weight
        ctx.save_for_backward(x, w, s, blocks, perms, invs, u if keep_u else None)
        ctx.via_weight = via_weight
        y = u if s is None else u * s.to(u.dtype)
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, g):
        x, w, s, blocks, perms, invs, u = ctx.saved_tensors
        gx = gb = gs = gblocks = None
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        gsc = g2 if s is None else g2 * s.to(g.dtype)  # gradient of the unscaled output
        if ctx.via_weight:
            wr = butterfly_rows(w, blocks.to(w.dtype), perms, invs, transpose=True)
            gtx = g2.t() @ x2.to(g2.dtype)  # (out, in)
            if s is not None and ctx.needs_input_grad[3]:
                gs = (wr.to(gtx.dtype) * gtx).sum(1, dtype=torch.float32).to(s.dtype).reshape(s.shape)
            gwr = gtx if s is None else gtx * s.to(gtx.dtype)[:, None]
            if ctx.needs_input_grad[4]:
                grads, _ = _chain_backward(w.to(gwr.dtype), gwr, _factors(blocks, perms, invs, True), False)
                gblocks = torch.stack([gr.transpose(-1, -2) for gr in grads]).to(blocks.dtype)
            if ctx.needs_input_grad[0]:
                gx = (gsc @ wr.to(gsc.dtype)).reshape(x.shape)
        else:
            if s is not None and ctx.needs_input_grad[3]:
                gs = (g2 * u.reshape(g2.shape)).sum(0, dtype=torch.float32).to(s.dtype).reshape(s.shape)
            h = gsc @ w.to(gsc.dtype)  # gradient of x R
            grads, gin = _chain_backward(x2, h, _factors(blocks, perms, invs, False), ctx.needs_input_grad[0])
            if ctx.needs_input_grad[4]:
                gblocks = torch.stack(grads[::-1]).to(blocks.dtype)
            if gin is not None:
                gx = gin.reshape(x.shape)
        return gx, None, gb, gs, gblocks, None, None, None


def butterfly_linear(x, w, bias, s, blocks, perms=None, invs=None, via_weight: bool = False):
    """((x R) Wᵀ)·s + b for R = M_{m−1} ⋯ M_0; see :class:`_ButterflyLinear` (``w`` must not need a gradient)."""
    return _ButterflyLinear.apply(x, w, bias, s, blocks, perms, invs, via_weight)


class BlockRotation(OrthogonalAdapter):
    """Base of OFT and BOFT: R = M_{m−1} ⋯ M_0, M_i = P_i BD_i P_iᵀ. Subclasses give :meth:`blocks`
    ((m, k, b, b), fp32), set ``m``, ``k``, ``b`` and ``perms``/``invs`` buffers ((m, d) long) or leave them None."""

    perms: torch.Tensor | None
    invs: torch.Tensor | None

    def blocks(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def rotated_weight(self, w):
        wr = butterfly_rows(w, self.blocks().to(w.dtype), self.perms, self.invs, transpose=True)
        s = self.output_scale()
        return wr if s is None else wr * s.to(w.dtype)[:, None]

    def rotate_input(self, x):
        return butterfly_rows(x, self.blocks(), self.perms, self.invs)

    def dense(self):
        bl = self.blocks()
        return butterfly_rows(torch.eye(bl.shape[1] * bl.shape[2], device=bl.device), bl, self.perms, self.invs)

    def linear(self, slot, x):
        w = slot.weight_oi()
        if w.requires_grad:  # a trainable base weight: plain autograd through the rotated weight
            return F.linear(x, self.rotated_weight(w), slot.bias)
        return butterfly_linear(x, w, slot.bias, self.output_scale(), self.blocks(), self.perms, self.invs,
                                self.grad_via_weight(w.shape[0]))

    def grad_via_weight(self, d_out: int) -> bool:
        """Backward the weight way? No: in the MiniLM step benchmark (all linear layers, batch 32, seq 128) the
        activation way was measured 0.78x peft's OFT step, and the weight way for the d_out = 384 layers (a
        per-layer rule of thumb from single-layer timings) about 2x slower — so the activation way everywhere;
        the weight way stays available (``butterfly_linear(..., via_weight=True)``, tested)."""
        return False
