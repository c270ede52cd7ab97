"""What the unstructured selective methods share (FishMask, diff pruning; METHODS.md §1.3: θ ← θ − η·m⊙∇θ):
a sparse update δ of a linear weight held as sorted flat indices (into the (out, in) weight) + values.

``SparseDelta`` is the adapter: y = (W + δ) x + b with δ = scatter(values at indices) (one matmul, the
weight rewritten as PST does), merge W ← W + δ. Its file holds only the entries: ``indices`` (int32) and
``values`` (+ a ``ready`` flag), so an adapter of 0.5% of the entries costs ≈ 1% of the dense fp32 size.
``resize`` changes the number of entries in place (the ``values`` Parameter object stays the same, so an
optimizer built before — whose state is created lazily at its first step — still trains it).
``global_top_k`` picks the k best entries over all of an adapter's layers at once (the papers' global
budget).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import IncompatibleAdapterError
from ..slot import Adapter


def scatter_delta(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Dense δ (out, in) with ``values`` at the flat ``indices`` (differentiable in ``values``)."""
    flat = values.new_zeros(shape[0] * shape[1])
    return flat.index_put((indices,), values).view(shape)


def global_top_k(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Sorted flat indices, per tensor, of the k largest entries over all ``scores`` together."""
    sizes = [s.numel() for s in scores]
    flat = torch.cat([s.detach().flatten().float() for s in scores])
    top = torch.topk(flat, k, sorted=False).indices
    out, start = [], 0
    for n in sizes:
        mine = top[(top >= start) & (top < start + n)] - start
        out.append(torch.sort(mine).values)
        start += n
    return out


def check_entries(idx: torch.Tensor, val: torch.Tensor, numel: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A file's (indices, values) of a sparse update, checked (IncompatibleAdapterError naming ``where``)."""
    if idx.ndim != 1 or val.shape != idx.shape or idx.dtype not in (torch.int32, torch.int64):
        raise IncompatibleAdapterError(f"{where}: indices/values must be 1-D int / float of one length "
                                       f"(got {tuple(idx.shape)} {idx.dtype}, {tuple(val.shape)})")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel or not bool((idx[1:] > idx[:-1]).all())):
        raise IncompatibleAdapterError(f"{where}::indices: must be strictly increasing within [0, {numel})")
    return idx.long(), val


class SparseDelta(Adapter):
    """W + δ with δ non-zero only at ``indices``; ``values`` trainable."""

    mergeable = True

    def __init__(self, shape: tuple[int, int], indices: torch.Tensor):
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        self.register_buffer("indices", indices.long())
        self.values = nn.Parameter(torch.zeros(indices.numel()))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))  # True once the real mask is set

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def delta_weight(self) -> torch.Tensor:
        return scatter_delta(self.indices, self.values, self.shape)

    @torch.no_grad()
    def sparse_delta(self) -> torch.Tensor:
        """The trained δ (out, in), for the sparse export."""
        return self.delta_weight()

    def forward(self, slot, base_fn, x):
        w = slot.weight_oi()
        return F.linear(x, w + self.delta_weight().to(w.dtype), slot.bias)

    def merge(self, slot) -> None:
        w = slot.weight_oi()
        w.add_(self.delta_weight().detach().to(w.dtype))

    def unmerge(self, slot) -> None:
        w = slot.weight_oi()
        w.sub_(self.delta_weight().detach().to(w.dtype))

    @torch.no_grad()
    def resize(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """New entries in place (same Parameter object); values default to 0."""
        self.indices = indices.long().to(self.indices.device)
        new = torch.zeros(indices.numel(), dtype=self.values.dtype, device=self.values.device)
        if values is not None:
            new.copy_(values)
        self.values.data = new
        self.values.grad = None

    def state_tensors(self):
        return {"indices": self.indices.to(torch.int32), "values": self.values, "ready": self.ready}

    def load_state_tensors(self, tensors, where):
        if set(tensors) != {"indices", "values", "ready"}:
            raise IncompatibleAdapterError(f"{where}: expected tensors indices, values, ready; got {sorted(tensors)}")
        idx, val = check_entries(tensors["indices"], tensors["values"], self.numel, where)
        self.resize(idx, val.to(self.values.dtype))
        self.ready.fill_(bool(tensors["ready"]))
