"""The reversible stack (METHODS.md §2.2, §2.4): two streams, a custom autograd function, hybrid depth.

Layer n maps (x¹, x²) to y¹ = λ·x¹ + F(x²), y² = β·x² + G(y¹), then swaps the pair for MEFT1/2.
The bottom ``k`` layers run inside :class:`_ReversibleStack`, which keeps no activations: backward
walks the layers top-down and rebuilds each layer's input from its output,
x² = (y² − G(y¹))/β, x¹ = (y¹ − F(x²))/λ, recomputing F and G with autograd to get their gradients.

Departures from the reference code, all [I] in METHODS.md:
- trainable parameters are *inputs* of the autograd function and their gradients are *returned*
  (not accumulated as a side effect), so backward always fires even when no input requires grad
  (pitfall 1), and DDP sees ordinary gradients (no ``find_unused_parameters`` needed, pitfall 4);
- dropout is replayed by saving and restoring the CPU/CUDA RNG *state* around each F and G, not by
  reseeding the global generator (pitfall 2);
- the reversible part (forward, recomputation, inversion) runs with autocast off (pitfall 5), F and G in
  the model's dtype and the two streams in fp64 by default (``stream_dtype``): a stored stream rounded
  to fp32 carries ~1e-7 relative error that every inversion multiplies by about 1/λ·1/β, so MEFT3
  (λ = β = 0.1, ×100 per block) loses the gradient after 3–4 fp32 blocks; fp64 streams keep F and G's
  inputs bit-exact in almost every element and cost only elementwise work and 2 saved tensors;
- the embedding output h₀ is saved (one B×T×d tensor) so that backward measures how well the
  inversion reconstructed it: ``last_reconstruction_error`` (relative, max-abs); non-finite values raise
  :class:`ReversibleInstabilityError`, errors above ``reconstruction_tol`` warn once.
Training needs no KV cache: inside the reversible part the cache is not used; eval and generation take
the ordinary (cached) path through the same two-stream computation.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ...errors import PeftlabError
from ...slot import CACHE_ARGS, Adapter
from .blocks import BlockKind


class ReversibleInstabilityError(PeftlabError, FloatingPointError):
    """The reversible backward could not reconstruct the layer inputs (NaN/inf)."""


class MEFTLayer(Adapter):
    """The adapters of one block. Block 0's instance drives the whole stack; the others pass through."""

    def __init__(self, index: int, ffn: nn.Module, side: nn.Module | None, attn: nn.Module | None):
        super().__init__()
        self.index = index
        self.ffn = ffn  # FFN-parallel adapter (every variant)
        self.side = side  # standalone adapter: G of MEFT1, F of MEFT2
        self.attn = attn  # attention adapter: MEFT3

    def forward(self, slot, base_fn, hidden_states, *args, **kwargs):
        if self.index == 0:
            return self.shared.run(hidden_states, args, kwargs)  # the MEFTStack (core-bound)
        return hidden_states  # block 0 already ran this block inside the reversible stack


class MEFTStack(nn.Module):
    """Holds the variant's constants and references to the blocks and their :class:`MEFTLayer`s.

    It owns no parameters (the adapters live in the blocks' slots) and is stored in
    ``model.peftlab_shared`` so that deleting the adapter removes it.
    """

    def __init__(self, variant: int, lam: float, beta: float, reversible_layers: int | None, kind: BlockKind,
                 blocks: list[nn.Module], names: list[str], reconstruction_tol: float, check_reconstruction: bool,
                 stream_dtype: str = "float64"):
        super().__init__()
        self.variant, self.lam, self.beta = variant, float(lam), float(beta)
        self.swap = variant in (1, 2)
        self.kind = kind
        self.__dict__["blocks"] = list(blocks)  # base blocks, not registered here
        self.names = list(names)
        self.layers: list[MEFTLayer] = []  # plain list: registered in the slots
        self.k = len(blocks) if reversible_layers is None else int(reversible_layers)
        self.reconstruction_tol = reconstruction_tol
        self.check_reconstruction = check_reconstruction
        self.stream_dtype = stream_dtype
        self.last_reconstruction_error: float | None = None
        self.record: dict | None = None  # tests: {"forward": [...], "backward": [...]} layer inputs
        self._sig = inspect.signature(blocks[0].forward)
        self._warned = False

    # ---------------------------------------------------------------- one layer
    def F(self, i: int, x: torch.Tensor, kw: dict) -> torch.Tensor:
        blk, ad, kd = self.blocks[i], self.layers[i], self.kind
        if self.variant == 1:
            return kd.ffn(blk, kd.attn(blk, x, None, kw), ad.ffn)
        if self.variant == 2:
            return ad.side(x)
        return kd.attn(blk, x, ad.attn, kw)

    def G(self, i: int, y: torch.Tensor, kw: dict) -> torch.Tensor:
        blk, ad, kd = self.blocks[i], self.layers[i], self.kind
        if self.variant == 1:
            return ad.side(y)
        if self.variant == 2:
            return kd.ffn(blk, kd.attn(blk, y, None, kw), ad.ffn)
        return kd.ffn(blk, y, ad.ffn)

    def step(self, i: int, x1: torch.Tensor, x2: torch.Tensor, kw: dict):
        y1 = self.lam * x1 + self.F(i, x2, kw)
        y2 = self.beta * x2 + self.G(i, y1, kw)
        return (y2, y1) if self.swap else (y1, y2)

    # ---------------------------------------------------------------- the stack
    def call_kwargs(self, args: tuple, kwargs: dict) -> dict:
        """Block 0's call arguments (minus the hidden states), as keywords for the attention module."""
        b = self._sig.bind_partial(None, *args, **kwargs).arguments
        first = next(iter(self._sig.parameters))
        kw = {}
        for k, v in b.items():
            if k == first or k.startswith("encoder_"):
                continue
            if self._sig.parameters[k].kind is inspect.Parameter.VAR_KEYWORD:
                kw.update(v)
            else:
                kw[k] = v
        return kw

    def run(self, h0: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        kw = self.call_kwargs(args, kwargs)
        n = len(self.blocks)
        k = min(self.k, n) if (torch.is_grad_enabled() and self.layers[0].training) else 0
        if k:
            rev_kw = dict(kw)
            for key, off in {**dict.fromkeys(CACHE_ARGS), "use_cache": False}.items():
                if key in rev_kw:
                    rev_kw[key] = off
            x1, x2 = reversible_apply(self, k, h0, rev_kw)
            x1, x2 = x1.to(h0.dtype), x2.to(h0.dtype)
        else:
            x1 = x2 = h0
        for i in range(k, n):
            x1, x2 = self.step(i, x1, x2, kw)
        return (x1 + x2) / 2

    def params_of(self, i: int) -> list[nn.Parameter]:
        seen, out = set(), []
        for m in (self.blocks[i], self.layers[i]):
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out


@contextlib.contextmanager
def _no_autocast(device: torch.device):
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _state_dtype(stack: MEFTStack, dtype: torch.dtype) -> torch.dtype:
    """The two streams' dtype: ``stream_dtype`` ("float64" default, or "float32"); fp64 models stay fp64."""
    return torch.float64 if dtype == torch.float64 or stack.stream_dtype == "float64" else torch.float32


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def _replay(state, device: torch.device):
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def reversible_apply(stack: MEFTStack, k: int, h0: torch.Tensor, kw: dict):
    leaves, spec = tree_flatten(kw)
    t_idx = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    kw_tensors = [leaves[i] for i in t_idx]
    per_layer = [stack.params_of(i) for i in range(k)]
    flat: list[nn.Parameter] = []
    index: dict[int, int] = {}
    for ps in per_layer:
        for p in ps:
            if id(p) not in index:
                index[id(p)] = len(flat)
                flat.append(p)
    meta = (stack, k, leaves, spec, t_idx, [[index[id(p)] for p in ps] for ps in per_layer], len(kw_tensors))
    return _ReversibleStack.apply(meta, h0, *kw_tensors, *flat)


def _kw_from(meta, tensors) -> dict:
    _, _, leaves, spec, t_idx, _, _ = meta
    leaves = list(leaves)
    for i, t in zip(t_idx, tensors):
        leaves[i] = t
    return tree_unflatten(leaves, spec)


class _ReversibleStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, meta, h0, *tensors):
        stack, k, n_kw = meta[0], meta[1], meta[6]
        kw = _kw_from(meta, tensors[:n_kw])
        dev, pdt = h0.device, h0.dtype
        rng = []
        with torch.no_grad(), _no_autocast(dev):
            x1 = x2 = h0.to(_state_dtype(stack, pdt))
            for i in range(k):
                if stack.record is not None:
                    stack.record["forward"].append((x1.clone(), x2.clone()))
                sf = _rng_state(dev)
                y1 = stack.lam * x1 + stack.F(i, x2.to(pdt), kw).to(x1.dtype)
                sg = _rng_state(dev)
                y2 = stack.beta * x2 + stack.G(i, y1.to(pdt), kw).to(x1.dtype)
                x1, x2 = (y2, y1) if stack.swap else (y1, y2)
                rng.append((sf, sg))
        ctx.meta, ctx.rng, ctx.pdt = meta, rng, pdt
        ctx.params = tensors[n_kw:]  # parameters (not activations): kept by reference
        check = stack.check_reconstruction
        ctx.check = check
        ctx.save_for_backward(x1, x2, *tensors[:n_kw], *([h0] if check else []))
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        meta = ctx.meta
        stack, k, groups, n_kw = meta[0], meta[1], meta[5], meta[6]
        saved = ctx.saved_tensors
        y1, y2 = saved[0], saved[1]
        kw = _kw_from(meta, saved[2 : 2 + n_kw])
        flat_grads: list[torch.Tensor | None] = [None] * len(ctx.params)
        dev, pdt = y1.device, ctx.pdt
        sdt = y1.dtype
        dy1 = torch.zeros_like(y1) if dy1 is None else dy1.to(sdt)
        dy2 = torch.zeros_like(y2) if dy2 is None else dy2.to(sdt)
        ps_all = ctx.params
        rec = []
        with _no_autocast(dev):
            for i in reversed(range(k)):
                if stack.swap:
                    y1, y2, dy1, dy2 = y2, y1, dy2, dy1
                ps = [ps_all[j] for j in groups[i]]
                with torch.enable_grad(), _replay(ctx.rng[i][1], dev):
                    y1_ = y1.detach().to(pdt).requires_grad_()
                    g = stack.G(i, y1_, kw).to(sdt)
                gr = torch.autograd.grad(g, [y1_, *ps], dy2, allow_unused=True)
                _accumulate(flat_grads, groups[i], gr[1:])
                with torch.no_grad():
                    x2 = (y2 - g.detach()) / stack.beta
                    d1 = dy1 + gr[0].to(sdt)
                with torch.enable_grad(), _replay(ctx.rng[i][0], dev):
                    x2_ = x2.to(pdt).requires_grad_()
                    f = stack.F(i, x2_, kw).to(sdt)
                gr = torch.autograd.grad(f, [x2_, *ps], d1, allow_unused=True)
                _accumulate(flat_grads, groups[i], gr[1:])
                with torch.no_grad():
                    x1 = (y1 - f.detach()) / stack.lam
                    dy1, dy2 = stack.lam * d1, stack.beta * dy2 + gr[0].to(sdt)
                y1, y2 = x1, x2
                if stack.record is not None:
                    rec.append((x1.clone(), x2.clone()))
            inputs = (y1, y2)
        if stack.record is not None:
            stack.record["backward"] = rec[::-1]
        _check(stack, inputs, saved[2 + n_kw] if ctx.check else None, dy1, dy2)
        dh0 = (dy1 + dy2).to(pdt)
        return (None, dh0, *([None] * n_kw), *flat_grads)


def _accumulate(flat: list, idx: list[int], grads) -> None:
    for j, g in zip(idx, grads):
        if g is not None:
            flat[j] = g if flat[j] is None else flat[j] + g


def _check(stack: MEFTStack, inputs, h0, dy1, dy2) -> None:
    x1, x2 = inputs
    if not (torch.isfinite(dy1).all() and torch.isfinite(dy2).all() and torch.isfinite(x1).all()
            and torch.isfinite(x2).all()):
        raise ReversibleInstabilityError(
            f"MEFT{stack.variant}: the reversible backward produced NaN/inf while reconstructing layer inputs "
            f"(λ={stack.lam}, β={stack.beta}, {stack.k} reversible layers). Each inversion divides by λ or β, "
            "so errors grow with depth: lower `reversible_layers`, keep the model in fp32, or lower the learning rate.")
    if h0 is None:
        return
    h = h0.to(x1.dtype)
    scale = h.abs().max().clamp_min(1e-12)
    err = (torch.maximum((x1 - h).abs().max(), (x2 - h).abs().max()) / scale).item()
    stack.last_reconstruction_error = err
    if err > stack.reconstruction_tol and not stack._warned:
        stack._warned = True
        warnings.warn(
            f"MEFT{stack.variant}: reversible reconstruction error {err:.2e} exceeds {stack.reconstruction_tol:g} "
            f"({stack.k} reversible layers, λ={stack.lam}, β={stack.beta}); gradients are inaccurate. "
            "Lower `reversible_layers` (hybrid depth), keep stream_dtype='float64', or use MEFT1/2 (one division per block).", RuntimeWarning, stacklevel=2)
