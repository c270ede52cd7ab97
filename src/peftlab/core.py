"""Attach, activate, disable, delete, merge and unload adapters on an ordinary HF model.

The user's model object is modified in place and returned: selected modules are replaced by
:class:`~peftlab.slot.Slot` wrappers, bookkeeping lives in ``model.peftlab_state`` (a plain object),
and modules shared by all adapters of one config live in ``model.peftlab_shared`` (a ModuleDict).
Nothing here knows any method by name.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import MethodConfig
from .errors import AdapterExistsError, AdapterNotFoundError, PeftlabError
from .slot import Slot, owner, parent_of, resolve, walk
from .targets import select

HEAD_NAMES = ("classifier", "score", "qa_outputs")
_STATE_ATTR = "peftlab_state"
_SHARED_ATTR = "peftlab_shared"


@dataclass
class PeftState:
    configs: dict[str, MethodConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    heads: dict[str, list[str]] = field(default_factory=dict)  # adapter name -> head module names


def state(model: nn.Module, create: bool = False) -> PeftState:
    st = model.__dict__.get(_STATE_ATTR)
    if st is None:
        if not create:
            raise PeftlabError("no peftlab adapter is attached to this model")
        st = PeftState()
        model.__dict__[_STATE_ATTR] = st
    return st


def has_adapters(model: nn.Module) -> bool:
    st = model.__dict__.get(_STATE_ATTR)
    return bool(st and st.configs)


def slots(model: nn.Module) -> list[tuple[str, Slot]]:
    return [(n, m) for n, m in walk(model) if isinstance(m, Slot)]


def shared_modules(model: nn.Module) -> nn.ModuleDict:
    md = model._modules.get(_SHARED_ATTR)
    if md is None:
        md = nn.ModuleDict()
        model.add_module(_SHARED_ATTR, md)
    return md


def shared_key(name: str, part: int) -> str:
    return f"{name}__{part}"


def _ensure_slot(model: nn.Module, name: str) -> Slot:
    mod = resolve(model, name)
    if isinstance(mod, Slot):
        return mod
    parent, child = parent_of(model, name)
    slot = Slot(mod)
    setattr(parent, child, slot)
    return slot


def _unwrap(model: nn.Module, name: str) -> None:
    parent, child = parent_of(model, name)
    setattr(parent, child, parent._modules[child].base)


def head_modules(model: nn.Module, config: MethodConfig) -> list[str]:
    """Module names made trainable and saved with the adapter (the task head by default)."""
    names = [n for n, _ in walk(model) if n]
    if config.modules_to_save is not None:
        out = [n for n in names if any(n == s or n.endswith("." + s) for s in config.modules_to_save)]
        missing = [s for s in config.modules_to_save if not any(n == s or n.endswith("." + s) for n in names)]
        if missing:
            raise PeftlabError(f"modules_to_save: no module named {missing}")
        return out
    return [n for n in names if n in HEAD_NAMES]


def _adapter_params(model: nn.Module, name: str):
    for _, slot in slots(model):
        for k in slot.keys_of(name):
            yield from slot.adapters[k].parameters()
    sh = model._modules.get(_SHARED_ATTR)
    if sh is not None:
        for k, m in sh.items():
            if k.rsplit("__", 1)[0] == name:
                yield from m.parameters()


def _update_trainable(model: nn.Module) -> None:
    """Base frozen; adapter params of active adapters (and their heads) trainable."""
    st = state(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for n in st.active:
        for p in _adapter_params(model, n):
            p.requires_grad_(True)
        for h in st.heads.get(n, []):
            for p in resolve(model, h).parameters():
                p.requires_grad_(True)


def attach(model: nn.Module, config: MethodConfig, name: str = "default") -> nn.Module:
    """Inject the method described by ``config`` into ``model`` under ``name``; returns ``model``.

    On any error the model is left exactly as it was.
    """
    if not isinstance(config, MethodConfig):
        raise TypeError(f"expected a method config (e.g. LoRAConfig), got {type(config).__name__}")
    if not name or "__" in name or "." in name or "::" in name:
        raise ValueError(f"invalid adapter name {name!r} (no '.', '::' or '__')")
    st = state(model, create=True)
    if name in st.configs:
        raise AdapterExistsError(f"an adapter named {name!r} is already attached; delete it or pick another name")
    touched: list[str] = []
    try:
        config.check_model(model)  # composites plan their parts here
        for pi, part in enumerate(config.parts()):
            if part is not config:
                part.check_model(model)
            targets = select(model, part)
            sh = part.build_shared(model)
            if sh is not None:
                sh.train(model.training)  # new modules follow the model's train/eval mode (dropout)
                shared_modules(model)[shared_key(name, pi)] = sh
            key = name if pi == 0 else f"{name}__{pi}"
            for t in targets:
                slot = _ensure_slot(model, t.name)
                touched.append(t.name)
                slot.add(key, part.make_adapter(t, sh).train(model.training))
        st.heads[name] = head_modules(model, config)
    except BaseException:
        _remove_from_slots(model, name, touched)
        _drop_shared(model, name)
        st.heads.pop(name, None)
        if not st.configs:
            _drop_state(model)
        raise
    st.configs[name] = config
    st.active.append(name)
    _update_trainable(model)
    return model


def _remove_from_slots(model, name, names) -> None:
    for n in dict.fromkeys(names):
        slot = resolve(model, n)
        if isinstance(slot, Slot) and slot.keys_of(name):
            slot.remove(name)
            if not slot.adapters:
                _unwrap(model, n)


def _drop_shared(model, name: str) -> None:
    sh = model._modules.get(_SHARED_ATTR)
    if sh is None:
        return
    for k in [k for k in sh if k.rsplit("__", 1)[0] == name]:
        del sh[k]
    if not len(sh):
        del model._modules[_SHARED_ATTR]


def _drop_state(model) -> None:
    model.__dict__.pop(_STATE_ATTR, None)
    if _SHARED_ATTR in model._modules and not len(model._modules[_SHARED_ATTR]):
        del model._modules[_SHARED_ATTR]


def adapter_names(model: nn.Module) -> list[str]:
    return list(state(model).configs) if has_adapters(model) else []


def get_adapter_config(model: nn.Module, name: str = "default") -> MethodConfig:
    st = state(model)
    if name not in st.configs:
        raise AdapterNotFoundError(f"no adapter named {name!r}; attached: {list(st.configs)}")
    return st.configs[name]


def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Make exactly ``names`` active (composed in the given order); others stay attached but idle."""
    names = [names] if isinstance(names, str) else list(names)
    st = state(model)
    missing = [n for n in names if n not in st.configs]
    if missing:
        raise AdapterNotFoundError(f"no adapter named {missing}; attached: {list(st.configs)}")
    for _, slot in slots(model):
        if {owner(k) for k in slot.merged} - set(names):
            raise PeftlabError("unmerge before changing the active adapters")
    st.active = names
    for _, slot in slots(model):
        slot.set_active(names)
    _update_trainable(model)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Temporarily run the base model: every adapter is bypassed (merged ones are unmerged)."""
    ss = slots(model)
    merged = [s for _, s in ss if s.merged]
    for s in merged:
        s.unmerge()
    for _, s in ss:
        s.disabled = True
        s.refresh()
    try:
        yield model
    finally:
        for _, s in ss:
            s.disabled = False
            s.refresh()
        for s in merged:
            s.merge()


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` entirely (unmerging it first if needed)."""
    st = state(model)
    if name not in st.configs:
        raise AdapterNotFoundError(f"no adapter named {name!r}; attached: {list(st.configs)}")
    for _, slot in slots(model):
        if any(owner(k) == name for k in slot.merged):
            slot.unmerge()
    _remove_from_slots(model, name, [n for n, s in slots(model) if s.keys_of(name)])
    _drop_shared(model, name)
    del st.configs[name]
    st.active = [a for a in st.active if a != name]
    st.heads.pop(name, None)
    if not st.configs:
        _drop_state(model)
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        _update_trainable(model)


def merge(model: nn.Module) -> list[str]:
    """Fold every active adapter into the base weights. Raises (changing nothing) if one can't be."""
    from .errors import NotMergeableError

    ss = slots(model)
    for n, s in ss:
        for a in s.active:
            if a not in s.merged and not getattr(s.adapters[a], "mergeable", False):
                raise NotMergeableError(
                    f"{n}: adapter {a!r} ({type(s.adapters[a]).__name__}) cannot be merged into the weights"
                )
    done = []
    for _, s in ss:
        done += s.merge()
    return sorted(set(done))


def unmerge(model: nn.Module) -> None:
    for _, s in slots(model):
        s.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove peftlab from the model (merging the active adapters first if ``merge``)."""
    if merge:
        globals()["merge"](model)
    for n, _ in reversed(slots(model)):
        _unwrap(model, n)
    if _SHARED_ATTR in model._modules:
        del model._modules[_SHARED_ATTR]
    model.__dict__.pop(_STATE_ATTR, None)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def on_train_step(model: nn.Module, step: int, total_steps: int) -> None:
    """Training loops call this after every optimizer step; methods with schedules react to it."""
    for n, part in _active_parts(model):
        part.on_train_step(model, n, step, total_steps)


def _active_parts(model: nn.Module):
    """(adapter name, simple config) of every active adapter, in order."""
    if has_adapters(model):
        st = state(model)
        for n in st.active:
            for part in st.configs[n].parts():
                yield n, part


def before_optimizer_step(model: nn.Module, step: int, total_steps: int) -> None:
    """Training loops call this after backward and before ``optimizer.step()`` (gradients are present)."""
    for n, part in _active_parts(model):
        part.before_optimizer_step(model, n, step, total_steps)


def checkpoint_eligible(model: nn.Module, step: int, total_steps: int) -> bool:
    """False while some active method forbids best-checkpoint selection (e.g. before final sparsity)."""
    if not has_adapters(model):
        return True
    st = state(model)
    return all(
        part.checkpoint_eligible(model, n, step, total_steps) for n in st.active for part in st.configs[n].parts()
    )


def training_loss(model: nn.Module):
    """Sum of the extra loss terms (regularizers) of the active adapters, or None."""
    if not has_adapters(model):
        return None
    st = state(model)
    total = None
    for n in st.active:
        for part in st.configs[n].parts():
            term = part.training_loss(model, n)
            if term is not None:
                total = term if total is None else total + term
    return total
