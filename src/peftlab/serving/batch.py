"""Mixed-adapter batches: every batch row runs with its own adapter (issue 21).

    with peftlab.batch_adapters(model, ["sst2", None, "mnli", "sst2"]):
        logits = model(**batch).logits          # row 1 is the base model
        ids = model.generate(**prompts)         # causal LMs: the KV cache works as usual

Inside the block each slot's forward is replaced by a per-row forward chosen by the classes of the
adapters the rows use (see :mod:`peftlab.serving.mixers`): the LoRA family (LoRA, rsLoRA, DoRA) and (IA)³
as one batched computation over stacked, cached weights; prompt and prefix tuning by gathering a per-row
prompt/prefix (every row must then use one of the same length); bottleneck adapters, BitFit and mixes
of kinds on one module by running each distinct adapter on its rows. A method that cannot take part is
refused before anything changes, with an error naming it. Each row equals the row run alone with only
its adapter active (``set_active([name])``; ``None``: ``disabled``). Adapters active outside the block are
ignored inside it. Merged adapters must be unmerged first.

Task heads: by default every row uses the model's current head modules (as a single-adapter run on
this model would). ``heads={name: {param_name: tensor}}`` (full model parameter names, e.g.
``classifier.weight``; key ``None`` for base rows) gives rows their own head — how the server keeps
the head each adapter was trained with.

Inference only: the stacked weights are detached (no gradient reaches the adapters) and dropout in
the adapters is not applied. The block swaps the slots' forwards on the model object, so one thread at a
time may use a model inside it (the server runs every model call on one thread).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from ..core import has_adapters, slots, state
from ..errors import AdapterNotFoundError, PeftlabError
from ..slot import display_key, resolve
from . import mixers


class NotBatchableError(PeftlabError, ValueError):
    """An adapter's method cannot take part in a mixed-adapter batch."""


def _groups(chains: list[tuple]) -> list[tuple[tuple, torch.Tensor]]:
    rows: dict[tuple, list[int]] = {}
    for i, c in enumerate(chains):
        rows.setdefault(c, []).append(i)
    return [(c, torch.tensor(r, dtype=torch.long)) for c, r in rows.items()]


def _refuse(path: str, slot, keys, why: str):
    bad = ", ".join(f"{display_key(k)!r} ({type(slot.adapters[k]).__name__})" for k in keys)
    return NotBatchableError(f"{path}: adapter {bad} cannot take part in a mixed-adapter batch: {why}")


def _plan_slot(path: str, slot, names: list[str | None]):
    """The per-row forward of one slot (a callable), or None when no row uses an adapter on it."""
    chains = [tuple(slot.keys_of(n)) if n is not None else () for n in names]
    used = sorted({k for c in chains for k in c})
    if not used:
        return None
    kinds = {k: mixers.kind_of(slot.adapters[k]) for k in used}
    unknown = [k for k in used if kinds[k] is None]
    if unknown:
        return _refuse(path, slot, unknown, "no mixed-batch rule is registered for this method "
                       "(peftlab.serving.mixers.register_kind)")
    kset, single = set(kinds.values()), all(len(c) <= 1 for c in chains)
    device = slot.weight.device if isinstance(getattr(slot.base, "weight", None), torch.Tensor) else None
    if kset & {"prompt", "prefix"}:
        kind = next(iter(kset & {"prompt", "prefix"}))
        if kset != {kind} or not all(len(c) == 1 for c in chains):
            return _refuse(path, slot, used, f"every row of a batch with {kind} tuning must use a {kind} adapter "
                           "(base rows and other methods change the sequence length differently)")
        if len({getattr(slot.adapters[k], "strip", None) for k in used}) > 1:
            return _refuse(path, slot, used, "prompt adapters that differ in strip_outputs")
        index, by_len = mixers.stacks(slot, kind, mixers.BUILDERS[kind])
        lengths = sorted({index[k][0] for k in used})
        if len(lengths) > 1:
            return _refuse(path, slot, used, f"{kind} adapters of different lengths {lengths} in one batch")
        t = by_len[lengths[0]]
        idx = torch.tensor([index[c[0]][1] for c in chains], dtype=torch.long, device=next(iter(t.values())).device)
        fwd = mixers.prompt_forward if kind == "prompt" else mixers.prefix_forward

        def run(*args, **kwargs):
            return fwd(slot, idx, t, slot.adapters[used[0]], *args, **kwargs)
        return run
    if single and len(kset) == 1 and next(iter(kset)) in mixers.FORWARDS:
        kind = next(iter(kset))
        index, t = mixers.stacks(slot, kind, mixers.BUILDERS[kind])
        idx = torch.tensor([index[c[0]] if c else 0 for c in chains], dtype=torch.long, device=device)
        fwd = mixers.FORWARDS[kind]
        return lambda x: fwd(slot, idx, t, x)
    groups = _groups(chains)
    return lambda *a, **kw: mixers.rowwise_forward(slot, groups, *a, **kw)


def _plan_heads(model: nn.Module, names: list[str | None], heads: dict) -> list[tuple[nn.Module, list]]:
    """[(head module, [(its parameters for a group of rows or None, rows)])] for the outermost head modules."""
    prefixes = sorted({k.rsplit(".", 1)[0] for sd in heads.values() for k in sd})
    plans = []
    for m in [m for m in prefixes if not any(m.startswith(o + ".") for o in prefixes)]:
        rel = {n: {k[len(m) + 1:]: v for k, v in sd.items() if k.startswith(m + ".")} for n, sd in heads.items()}
        chains = [(n, True) if rel.get(n) else (None, False) for n in names]  # (name, has its own head)
        plans.append((resolve(model, m), [(rel[c[0]] if c[1] else None, r) for c, r in _groups(chains)]))
    return plans


@contextlib.contextmanager
def batch_adapters(model: nn.Module, names: Sequence[str | None], heads: dict | None = None):
    """Run row ``i`` of every forward inside the block with adapter ``names[i]`` (``None``: the base model)."""
    names = list(names)
    known = set(state(model).configs) if has_adapters(model) else set()
    missing = sorted({n for n in names if n is not None and n not in known})
    if missing:
        raise AdapterNotFoundError(f"batch_adapters: no adapter named {missing}; attached: {sorted(known)}")
    mixers._register_builtins()
    plans = []
    for path, slot in slots(model):
        if slot.merged:
            raise PeftlabError(f"{path}: adapters {slot.merged} are merged; unmerge before batch_adapters")
        if "forward" in slot.__dict__:
            raise PeftlabError("batch_adapters blocks cannot be nested")
        fn = _plan_slot(path, slot, names)
        if isinstance(fn, Exception):
            raise fn
        plans.append((slot, fn if fn is not None else slot.base))
    head_plans = _plan_heads(model, names, heads) if heads else []
    try:
        for slot, fn in plans:
            slot.__dict__["forward"] = fn
        for module, groups in head_plans:
            module.__dict__["forward"] = lambda x, *a, _m=module, _g=groups, **kw: mixers.head_forward(_m, _g, x, *a, **kw)
        yield model
    finally:
        for slot, _ in plans:
            slot.__dict__.pop("forward", None)
        for module, _ in head_plans:
            module.__dict__.pop("forward", None)
