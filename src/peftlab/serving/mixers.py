"""Per-adapter-class forwards for mixed batches (one adapter per batch row), used by
:func:`peftlab.serving.batch.batch_adapters`.

A registry keyed by adapter class (``register_kind``) says how a class takes part:

- ``"lora"`` (LoRA, rsLoRA, DoRA): one batched computation over stacked weights, the torch form of
  vLLM's bgmv / Punica's gather-matmul. For the n adapters on a slot, A is stacked to
  (n+1, r_max, in) and s·B to (n+1, out, r_max), zero-padded to the largest rank, with index 0 all
  zeros (rows of the base model or of adapters absent from this slot). With a per-row index i_b:
  ``y_b = W₀x_b + b + B_{i_b}(A_{i_b} x_b)`` computed with ``index_select`` + two ``torch.bmm`` — no
  Python loop over adapters. DoRA rows also get the per-row vector g = m/‖W₀ + sBA‖_c (LoRA rows
  g = 1): ``y_b = g_{i_b} ⊙ (W₀x_b + Δ_b) + b`` (DoRA eq. 5 with the base output reused, as in
  :mod:`peftlab.tuners.dora`).
- ``"ia3"``: stacked scaling vectors (ones for rows without (IA)³): ``base(x ⊙ l_in) ⊙ l_out``.
- ``"prompt"`` / ``"prefix"``: the per-row soft prompt / key-value prefix is gathered from a stack and
  handed to the method's own forward; every row must then use one with the same length (different
  lengths would change the sequence length per row; padding would shift positions, so they are refused).
- ``"rowwise"`` (bottleneck adapters, BitFit, and any mix of kinds on one module): rows are grouped by
  adapter and each group runs the slot's ordinary forward on its rows (a loop over the *distinct*
  adapters present, not over rows).

Stacks are built under ``torch.no_grad`` (inference) and cached per slot; the cache is rebuilt when an
adapter on the slot is added, removed or edited in place (tensor version counters) or the base weight
changes.
"""

from __future__ import annotations

import threading
import weakref
from functools import partial

import torch
from torch import nn

from ..slot import gate_of

_KINDS: dict[type, str] = {}
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
BUILDS = {"count": 0}  # number of stack (re)builds, for tests and the benchmark


def register_kind(cls: type, kind: str) -> type:
    """Declare how adapters of ``cls`` (and subclasses) take part in mixed batches."""
    if kind not in ("lora", "ia3", "prompt", "prefix", "rowwise"):
        raise ValueError(f"unknown mixed-batch kind {kind!r}")
    _KINDS[cls] = kind
    return cls


def kind_of(adapter: nn.Module) -> str | None:
    if gate_of(adapter) is not None:  # a gated (UniPELT) part: its own forward, on its rows
        return "rowwise"
    for c in type(adapter).__mro__:
        if c in _KINDS:
            return _KINDS[c]
    return None


def _register_builtins() -> None:
    from ..tuners.adapter import SerialAdapter
    from ..tuners.bitfit import BiasOffset
    from ..tuners.ia3 import IA3Layer
    from ..tuners.lora import LoRALayer
    from ..tuners.parallel_adapter import ParallelAdapter
    from ..tuners.prefix import PrefixAttention
    from ..tuners.prompt import SoftPrompt

    for cls, kind in ((LoRALayer, "lora"), (IA3Layer, "ia3"), (SoftPrompt, "prompt"), (PrefixAttention, "prefix"),
                      (SerialAdapter, "rowwise"), (ParallelAdapter, "rowwise"), (BiasOffset, "rowwise")):
        _KINDS.setdefault(cls, kind)


# ------------------------------------------------------------------ stack cache
def _version(t: torch.Tensor):
    """In-place edits bump a tensor's version counter (inference tensors have none: they are immutable)."""
    return id(t) if t.is_inference() else t._version


def _token(slot, keys) -> tuple:
    ads = [slot.adapters[k] for k in keys]
    vers = tuple((k, id(a), tuple(_version(t) for t in [*a.parameters(), *a.buffers()])) for k, a in zip(keys, ads))
    w = getattr(slot.base, "weight", None)
    return vers, (id(w), _version(w)) if isinstance(w, torch.Tensor) else None


def stacks(slot, kind: str, build) -> tuple[dict[str, int], dict]:
    """(key -> stack index, tensors) for the ``kind`` adapters on ``slot``; cached until they change."""
    keys = [k for k in slot.adapters if kind_of(slot.adapters[k]) == kind]
    tok = _token(slot, keys)
    per_slot = _CACHE.setdefault(slot, {})
    hit = per_slot.get(kind)
    if hit is not None and hit[0] == tok:
        return hit[1], hit[2]
    with torch.no_grad():
        index, tensors = build(slot, keys)
    BUILDS["count"] += 1
    per_slot[kind] = (tok, index, tensors, [slot.adapters[k] for k in keys])  # refs keep ids unique
    return index, tensors


def _lora_build(slot, keys):
    from ..tuners.dora import DoRALayer

    ads = [slot.adapters[k] for k in keys]
    w = slot.weight_oi()
    d_out, d_in = w.shape
    r = max(a.lora_A.shape[0] for a in ads)
    A = w.new_zeros(len(ads) + 1, r, d_in)
    B = w.new_zeros(len(ads) + 1, d_out, r)
    for i, a in enumerate(ads, 1):
        A[i, : a.lora_A.shape[0]] = a.lora_A
        B[i, :, : a.lora_A.shape[0]] = a.lora_B * a.scale
    g = None
    if any(isinstance(a, DoRALayer) for a in ads):
        g = w.new_ones(len(ads) + 1, d_out)
        for i, a in enumerate(ads, 1):
            if isinstance(a, DoRALayer):
                g[i] = a.magnitude / a._weight_norm(w)
    return {k: i for i, k in enumerate(keys, 1)}, {"A": A, "B": B, "g": g}


def _ia3_build(slot, keys):
    ads = [slot.adapters[k] for k in keys]
    w = slot.weight_oi()
    d_out, d_in = w.shape
    vin = w.new_ones(len(ads) + 1, d_in) if any(a.on_input for a in ads) else None
    vout = w.new_ones(len(ads) + 1, d_out) if not all(a.on_input for a in ads) else None
    for i, a in enumerate(ads, 1):
        (vin if a.on_input else vout)[i] = a.ia3_l
    return {k: i for i, k in enumerate(keys, 1)}, {"in": vin, "out": vout}


def _by_length(keys, tensors: dict):
    """Stacks grouped by prompt/prefix length: key -> (length, position), {length: {name: stack}}."""
    index, groups = {}, {}
    for k in keys:
        first = next(iter(tensors[k].values()))
        g = groups.setdefault(int(first.shape[-2]), [])
        index[k] = (int(first.shape[-2]), len(g))
        g.append(tensors[k])
    return index, {n: {f: torch.stack([t[f] for t in g]) for f in g[0]} for n, g in groups.items()}


def _prompt_build(slot, keys):
    return _by_length(keys, {k: {"P": slot.adapters[k].prompt} for k in keys})


def _prefix_build(slot, keys):
    prefixes = {k: slot.adapters[k].shared.prefix(slot.adapters[k].key) for k in keys}
    return _by_length(keys, {k: {"K": pk, "V": pv} for k, (pk, pv) in prefixes.items()})


# ------------------------------------------------------------------ row selections
# A row-wise slot runs its inner modules on a subset of the rows; slots nested inside it (a LoRA on the
# dense layer of a module that carries a parallel adapter) read that subset from this stack.
_LOCAL = threading.local()


def _selection() -> torch.Tensor | None:
    stack = getattr(_LOCAL, "rows", None)
    return stack[-1] if stack else None


def _select(idx: torch.Tensor) -> torch.Tensor:
    sel = _selection()
    return idx if sel is None else idx.index_select(0, sel.to(idx.device))


def _restrict(groups):
    """The groups relative to the current sub-batch: [(item, full rows, rows within the sub-batch)]."""
    sel = _selection()
    if sel is None:
        return [(item, rows, rows) for item, rows in groups]
    pos = {int(r): j for j, r in enumerate(sel.tolist())}
    out = []
    for item, rows in groups:
        keep = [r for r in rows.tolist() if r in pos]
        if keep:
            out.append((item, torch.tensor(keep), torch.tensor([pos[r] for r in keep])))
    return out


def _run_on(full_rows: torch.Tensor, fn, *args, **kwargs):
    stack = _LOCAL.__dict__.setdefault("rows", [])
    stack.append(full_rows)
    try:
        return fn(*args, **kwargs)
    finally:
        stack.pop()


# ------------------------------------------------------------------ forwards
def _check_rows(idx: torch.Tensor, n: int) -> None:
    from ..errors import PeftlabError

    if idx.shape[0] != n:
        raise PeftlabError(f"batch_adapters: {idx.shape[0]} adapter names for a batch of {n} rows")


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(b, d) -> (b, 1, ..., 1, d) to broadcast against ``like``."""
    return v.view(v.shape[0], *([1] * (like.dim() - 2)), v.shape[-1])


def lora_forward(slot, idx: torch.Tensor, t: dict, x: torch.Tensor) -> torch.Tensor:
    idx = _select(idx)
    _check_rows(idx, x.shape[0])
    y = slot.base(x)
    xs = x.reshape(x.shape[0], -1, x.shape[-1])
    h = torch.bmm(xs, t["A"].index_select(0, idx).to(x.dtype).transpose(1, 2))
    delta = torch.bmm(h, t["B"].index_select(0, idx).to(x.dtype).transpose(1, 2)).view(y.shape)
    if t["g"] is None:
        return y + delta
    g = _bcast(t["g"].index_select(0, idx).to(y.dtype), y)
    bias = slot.bias
    if bias is None:
        return g * (y + delta)
    return g * (y - bias + delta) + bias


def ia3_forward(slot, idx: torch.Tensor, t: dict, x: torch.Tensor) -> torch.Tensor:
    idx = _select(idx)
    _check_rows(idx, x.shape[0])
    if t["in"] is not None:
        x = x * _bcast(t["in"].index_select(0, idx).to(x.dtype), x)
    y = slot.base(x)
    if t["out"] is not None:
        y = y * _bcast(t["out"].index_select(0, idx).to(y.dtype), y)
    return y


class _RowPrompt:
    """Stands in for a SoftPrompt whose prompt is per row, (b, p, d); runs SoftPrompt's own forward."""

    def __init__(self, template, prompt: torch.Tensor):
        self.signature, self.cache_key, self.strip = template.signature, template.cache_key, template.strip
        self.prompt = prompt
        self._strip = template._strip


def prompt_forward(slot, idx, t: dict, template, *args, **kwargs):
    from ..tuners.prompt import SoftPrompt

    proxy = _RowPrompt(template, t["P"].index_select(0, _select(idx)))
    return SoftPrompt.forward(proxy, slot, slot.base, *args, **kwargs)


class _RowPrefixes:
    def __init__(self, pk: torch.Tensor, pv: torch.Tensor):
        self.pk, self.pv = pk, pv

    def prefix(self, key):
        return self.pk, self.pv


class _RowPrefix:
    """Stands in for a PrefixAttention whose prefixes are per row, (b, heads, l, head_dim)."""

    def __init__(self, template, pk, pv):
        self._modules = {}  # no gate: gated adapters are batched row-wise (rowwise_forward), never through here
        self.shared = _RowPrefixes(pk, pv)
        self.key, self.causal, self.signature, self.cache_key = (
            template.key, template.causal, template.signature, template.cache_key)


def prefix_forward(slot, idx, t: dict, template, *args, **kwargs):
    from ..tuners.prefix import PrefixAttention

    idx = _select(idx)
    proxy = _RowPrefix(template, t["K"].index_select(0, idx), t["V"].index_select(0, idx))
    return PrefixAttention.forward(proxy, slot, slot.base, *args, **kwargs)


def rowwise_forward(slot, groups, *args, **kwargs):
    """groups: [(keys, rows)] — each distinct chain of adapter keys runs the slot's own composition on its rows."""
    first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    n = first.shape[0]
    groups = _restrict(groups)
    _check_rows(torch.empty(sum(int(r.numel()) for _, _, r in groups)), n)

    def pick(v, rows):
        return v.index_select(0, rows) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v

    out = None
    for keys, full, rows in groups:
        fn = slot.base
        for k in keys:
            fn = partial(slot.adapters[k], slot, fn)
        rows = rows.to(first.device)
        y = _run_on(full, fn, *(pick(a, rows) for a in args), **{k: pick(v, rows) for k, v in kwargs.items()})
        if out is None:
            out = y.new_empty((n, *y.shape[1:]))
        out.index_copy_(0, rows, y)
    return out


def head_forward(module: nn.Module, groups, x: torch.Tensor, *args, **kwargs):
    """Task heads per row: each distinct head (a state dict relative to ``module``, or None = the module's
    own) on its rows. The per-row override is lifted while the module runs (it would recurse)."""
    from torch.func import functional_call

    override = module.__dict__.pop("forward")
    try:
        out = None
        for params, full, rows in _restrict(groups):
            rows = rows.to(x.device)
            xi = x.index_select(0, rows)
            y = _run_on(full, module, xi, *args, **kwargs) if params is None else \
                _run_on(full, functional_call, module, params, (xi, *args), kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out.index_copy_(0, rows, y)
        return out
    finally:
        module.__dict__["forward"] = override


BUILDERS = {"lora": _lora_build, "ia3": _ia3_build, "prompt": _prompt_build, "prefix": _prefix_build}
FORWARDS = {"lora": lora_forward, "ia3": ia3_forward}
