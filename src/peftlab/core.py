"""Attach, activate, disable, delete, merge and unload adapters on an ordinary HF model.

The user's model object is modified in place and returned: selected modules are replaced by
:class:`~peftlab.slot.Slot` wrappers, bookkeeping lives in ``model.peftlab_state`` (a plain object),
and modules shared by all adapters of one config (part) live in ``model.peftlab_shared`` (a ModuleDict)
under the part's adapter key. ``attach`` is a transaction: on any exception the model is exactly as
before (modules, state dict, ``requires_grad`` flags). Nothing here knows any method by name.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import MethodConfig
from .context import context_for
from .errors import AdapterExistsError, AdapterNotFoundError, ConfigError, NotMergeableError, PeftlabError
from .slot import Slot, bind_shared, display_key, parent_of, resolve, split_key, walk

HEAD_NAMES = ("classifier", "score", "qa_outputs")
_STATE_ATTR = "peftlab_state"
_SHARED_ATTR = "peftlab_shared"


@dataclass
class PeftState:
    configs: dict[str, MethodConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    heads: dict[str, list[str]] = field(default_factory=dict)  # adapter name -> head module names
    # adapter name -> its expansion [(part label or None, simple config)], computed once at attach
    parts: dict[str, list[tuple[str | None, MethodConfig]]] = field(default_factory=dict)
    # adapter name -> {head module: {state-dict key: tensor before load replaced it}} (restored by delete)
    head_backup: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)


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


# ---------------------------------------------------------------- shared state: one accessor
def shared_modules(model: nn.Module, create: bool = False) -> nn.ModuleDict:
    """``model.peftlab_shared``: adapter key -> shared module (an empty ModuleDict if there is none)."""
    md = model._modules.get(_SHARED_ATTR)
    if md is None:
        md = nn.ModuleDict()
        if create:
            model.add_module(_SHARED_ATTR, md)
    return md


def part_adapters(model: nn.Module, key: str) -> list[tuple[str, nn.Module]]:
    """(module name, adapter) of every slot adapter stored under adapter key ``key``."""
    return [(n, s.adapters[key]) for n, s in slots(model) if key in s.adapters]


def replace_shared(model: nn.Module, key: str, module: nn.Module) -> None:
    """Swap the shared module of adapter key ``key`` and rebind its adapters to the new one."""
    shared_modules(model)[key] = module
    for _, a in part_adapters(model, key):
        bind_shared(a, module)


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
    wanted = config.head_selection()
    if wanted is not None:
        out = [n for n in names if any(n == s or n.endswith("." + s) for s in wanted)]
        missing = [s for s in wanted if not any(n == s or n.endswith("." + s) for n in names)]
        if missing:
            raise ConfigError(f"modules_to_save: no module named {missing}")
        return out
    return [n for n in names if n in HEAD_NAMES]


def adapter_parameters(model: nn.Module, name: str):
    """Parameters owned by adapter ``name`` (all parts; slot adapters and shared modules)."""
    for _, slot in slots(model):
        for k in slot.keys_of(name):
            yield from slot.adapters[k].parameters()
    for k, m in shared_modules(model).items():
        if split_key(k)[0] == name:
            yield from m.parameters()


def _update_trainable(model: nn.Module) -> None:
    """Base frozen; adapter params of active adapters (and their heads) trainable."""
    st = state(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for n in st.active:
        for p in adapter_parameters(model, n):
            p.requires_grad_(True)
        for h in st.heads.get(n, []):
            for p in resolve(model, h).parameters():
                p.requires_grad_(True)


def check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "__" in name or "." in name or "::" in name:
        raise ConfigError(f"invalid adapter name {name!r} (a non-empty string without '.', '::' or '__')")


@contextlib.contextmanager
def transaction(model: nn.Module, name: str):
    """Everything inside either completes or leaves the model as it was: adapter ``name``'s modules are
    removed from every slot, slots left empty are unwrapped, shared modules and bookkeeping dropped and
    the ``requires_grad`` flags restored. Yields the model's PeftState."""
    had_state = _STATE_ATTR in model.__dict__
    flags = [(p, p.requires_grad) for p in model.parameters()]
    st = state(model, create=True)
    before = (dict(st.configs), list(st.active), dict(st.heads), dict(st.parts), dict(st.head_backup))
    try:
        yield st
    except BaseException:
        _purge(model, name)
        st.configs, st.active, st.heads, st.parts, st.head_backup = before
        if not had_state:
            _drop_state(model)
        with torch.no_grad():
            for p, g in flags:
                p.requires_grad_(g)
        raise


def attach(model: nn.Module, config: MethodConfig, name: str = "default") -> nn.Module:
    """Inject the method described by ``config`` into ``model`` under ``name``; returns ``model``.

    ``config`` is not modified (it can be attached to other models too). On any error the model is left
    exactly as it was.
    """
    if not isinstance(config, MethodConfig):
        raise ConfigError(f"expected a method config (e.g. LoRAConfig), got {type(config).__name__}")
    check_name(name)
    if has_adapters(model) and name in state(model).configs:
        raise AdapterExistsError(f"an adapter named {name!r} is already attached; delete it or pick another name")
    with transaction(model, name) as st:
        config.check_model(model)
        parts = config.expand(model)
        for label, part in parts:
            if part is not config:
                part.check_model(model)
            ctx = context_for(model, part, name, label)
            sh = part.build_shared(ctx)
            if sh is not None:
                sh.train(model.training)  # new modules follow the model's train/eval mode (dropout)
                shared_modules(model, create=True)[ctx.key] = sh
            ctx = ctx.with_shared(sh)
            for t in ctx.targets:
                adapter = part.make_adapter(t, ctx).train(model.training)
                bind_shared(adapter, sh)
                _ensure_slot(model, t.name).add(ctx.key, adapter)
        st.heads[name] = head_modules(model, config)
        st.configs[name] = config
        st.parts[name] = parts
        st.active.append(name)
        _update_trainable(model)
    return model


def _purge(model: nn.Module, name: str) -> None:
    """Remove every module of adapter ``name`` (no merged check: used on partial attachments)."""
    for n, slot in reversed(slots(model)):
        keys = slot.keys_of(name)
        for k in keys:
            del slot.adapters[k]
        slot.active = [a for a in slot.active if a not in keys]
        slot.merged = [a for a in slot.merged if a not in keys]
        slot.refresh()
        if not slot.adapters:
            _unwrap(model, n)
    sh = model._modules.get(_SHARED_ATTR)
    if sh is not None:
        for k in [k for k in sh if split_key(k)[0] == name]:
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


def adapter_parts(model: nn.Module, name: str = "default") -> list[tuple[str | None, MethodConfig]]:
    """The expansion of adapter ``name``: [(part label or None, simple config)] (cached at attach)."""
    get_adapter_config(model, name)
    return list(state(model).parts[name])


def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Make exactly ``names`` active (composed in the given order); others stay attached but idle."""
    names = [names] if isinstance(names, str) else list(names)
    st = state(model)
    missing = [n for n in names if n not in st.configs]
    if missing:
        raise AdapterNotFoundError(f"no adapter named {missing}; attached: {list(st.configs)}")
    for _, slot in slots(model):
        if {split_key(k)[0] for k in slot.merged} - set(names):
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
    """Remove adapter ``name`` entirely (unmerging it first if needed); head tensors that ``load``
    replaced get their previous values back."""
    st = state(model)
    if name not in st.configs:
        raise AdapterNotFoundError(f"no adapter named {name!r}; attached: {list(st.configs)}")
    for _, slot in slots(model):
        if any(split_key(k)[0] == name for k in slot.merged):
            slot.unmerge()
    _purge(model, name)
    restore_heads(model, st.head_backup.pop(name, {}))
    del st.configs[name]
    del st.parts[name]
    st.active = [a for a in st.active if a != name]
    st.heads.pop(name, None)
    if not st.configs:
        _drop_state(model)
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())  # quantized bases hold integer storage
    else:
        _update_trainable(model)


def restore_heads(model: nn.Module, backup: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy back ``{head module name: {state-dict key: tensor}}``."""
    with torch.no_grad():
        for h, params in backup.items():
            own = resolve(model, h).state_dict()
            for k, v in params.items():
                own[k].copy_(v)


def merge(model: nn.Module) -> list[str]:
    """Fold every active adapter into the base weights. Raises (changing nothing) if one can't be."""
    ss = slots(model)
    for n, s in ss:
        for a in s.active:
            if a not in s.merged and not getattr(s.adapters[a], "mergeable", False):
                raise NotMergeableError(
                    f"{n}: adapter {display_key(a)!r} ({type(s.adapters[a]).__name__}) cannot be merged into the weights"
                )
    done = []
    for _, s in ss:
        done += s.merge()
    return sorted({split_key(k)[0] for k in done})


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
        p.requires_grad_(p.is_floating_point())
    return model


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
