"""The generic attachment point: a :class:`Slot` wraps one module and holds named adapters.

``Slot.forward`` composes the live adapters around the base module's forward::

    y = a_n(slot, a_{n-1}(slot, ... a_1(slot, base) ...))(x)

Each adapter receives ``base_fn`` (the inner composition) and decides how to use it: LoRA adds to
``base_fn(x)``, (IA)³ scales it, GOFT rotates ``x`` before calling it, PST ignores it and uses the
slot's weight. The set of live adapters is a tuple recomputed only when the state changes, so the
forward has no data-dependent Python branching (``torch.compile(fullgraph=True)`` friendly).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from . import quant
from .errors import AdapterExistsError, IncompatibleAdapterError, NotMergeableError


class Adapter(nn.Module):
    """Base class of everything that lives in a slot.

    Subclasses implement ``forward(slot, base_fn, *args, **kwargs)``. Mergeable adapters set
    ``mergeable = True`` and implement :meth:`merge` / :meth:`unmerge`, which edit the slot's base
    weights in place (under ``torch.no_grad``).
    """

    mergeable = False

    def forward(self, slot: Slot, base_fn, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def merge(self, slot: Slot) -> None:
        raise NotMergeableError(f"{type(self).__name__} cannot be merged into the base weights")

    def unmerge(self, slot: Slot) -> None:
        raise NotMergeableError(f"{type(self).__name__} cannot be unmerged")

    # peft on-disk format (only for methods with a peft equivalent): our state dict <-> peft's keys
    def to_peft_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no peft equivalent")

    def from_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no peft equivalent")

    # what the adapter file holds for this adapter (peftlab.state): by default its state dict; a selective
    # method stores only its trained entries (flat indices + values) and rebuilds itself from them on load
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Take ``tensors`` (what :meth:`state_tensors` wrote); IncompatibleAdapterError naming ``where``."""
        load_exact(self, tensors, where)

    @property
    def shared(self) -> nn.Module | None:
        """The module shared by all adapters of this config part (``build_shared``), bound by the core.
        A reference, not a submodule: the shared module is registered once, in ``model.peftlab_shared``."""
        return self.__dict__.get("_peftlab_shared")


def load_exact(module: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``tensors`` into ``module``'s state dict: the same keys and shapes, else IncompatibleAdapterError."""
    own = module.state_dict()
    if set(own) != set(tensors):
        miss, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise IncompatibleAdapterError(f"{where}: adapter tensors do not match: missing {miss[:5]}, unexpected {extra[:5]}")
    for k, v in tensors.items():
        if own[k].shape != v.shape:
            raise IncompatibleAdapterError(f"{where}::{k}: shape {tuple(v.shape)} != {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


def state_tensors(adapter: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds for ``adapter`` (its :meth:`Adapter.state_tensors`, or its state dict)."""
    return adapter.state_tensors() if isinstance(adapter, Adapter) else adapter.state_dict()


def load_state_tensors(adapter: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    if isinstance(adapter, Adapter):
        adapter.load_state_tensors(tensors, where)
    else:
        load_exact(adapter, tensors, where)


def bind_shared(adapter: nn.Module, shared: nn.Module | None) -> None:
    """Give ``adapter`` its (non-owning) reference to the shared module; only the core calls this."""
    adapter.__dict__["_peftlab_shared"] = shared


class Gate(nn.Module):
    """A learned gate on an adapter's contribution (UniPELT, Mao et al. 2022, §3):
    G = σ(W_G x + b_G), one scalar per position of the input x it reads."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(x))


def add_gate(adapter: nn.Module, d: int) -> nn.Module:
    """Give ``adapter`` a :class:`Gate` reading a d-dimensional input (its own submodule, saved with it).
    Only adapters that read ``gate_of(self)`` in their forward honour it; a gated adapter is not mergeable
    (its update depends on the input)."""
    adapter.gate = Gate(d)
    adapter.mergeable = False
    return adapter


def gate_of(adapter: nn.Module) -> nn.Module | None:
    """The adapter's gate, or None (a static module lookup: no graph break under torch.compile)."""
    return adapter._modules.get("gate")


# ---------------------------------------------------------------- adapter keys
# A slot (and ``model.peftlab_shared``) stores adapter ``name``'s modules under the key ``name``, or
# ``name__<part>`` for the labelled parts of a composite config (ModuleDict keys cannot contain '.').
# Users see ``name.<part>``. Adapter names never contain "__" or ".", so the key parses back uniquely.
PART_SEP = "__"


def adapter_key(name: str, part: str | None = None) -> str:
    """The one writer of adapter keys."""
    return name if part is None else f"{name}{PART_SEP}{part}"


def split_key(key: str) -> tuple[str, str | None]:
    """The one parser of adapter keys: (adapter name, part label or None)."""
    name, _, part = key.partition(PART_SEP)
    return name, part or None


def display_key(key: str) -> str:
    """``default`` / ``default.lora``: how reports and errors name an adapter key."""
    name, part = split_key(key)
    return name if part is None else f"{name}.{part}"


class Slot(nn.Module):
    """Wraps ``base`` (an nn.Linear, GPT-2 Conv1D, LayerNorm, attention module, ...)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self._live: tuple[str, ...] = ()
        self.training = self.adapters.training = base.training

    def __getattr__(self, name: str):
        """Transparent to attribute reads: HF code may read ``self.q_proj.in_features`` etc."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base")
            if base is None:
                raise
            return getattr(base, name)

    # ---- linear helpers (valid when the base is nn.Linear or transformers' Conv1D)
    @property
    def fan_in_fan_out(self) -> bool:
        return type(self.base).__name__ == "Conv1D"

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as stored (Conv1D: (in, out))."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def weight_oi(self) -> torch.Tensor:
        """The base weight in (out, in) layout; a view, so in-place edits reach the base. A quantized base
        gives its dequantized weight instead (a frozen copy: merges go through :meth:`merge`)."""
        return linear_weight_oi(self.base)

    @property
    def in_features(self) -> int:
        return linear_dims(self.base)[0]

    @property
    def out_features(self) -> int:
        return linear_dims(self.base)[1]

    # ---- adapter management
    def keys_of(self, name: str) -> list[str]:
        """Keys of adapter ``name`` here (all its parts)."""
        return [k for k in self.adapters if split_key(k)[0] == name]

    def add(self, key: str, adapter: nn.Module, active: bool = True) -> None:
        if key in self.adapters:
            raise AdapterExistsError(f"adapter {display_key(key)!r} already exists on this module")
        self.adapters[key] = adapter
        if active:
            self.active.append(key)
        self.refresh()

    def remove(self, name: str) -> None:
        keys = self.keys_of(name)
        if any(k in self.merged for k in keys):
            raise NotMergeableError(f"adapter {name!r} is merged; unmerge before deleting it")
        for k in keys:
            del self.adapters[k]
        self.active = [a for a in self.active if a not in keys]
        self.refresh()

    def set_active(self, names) -> None:
        self.active = [k for n in names for k in self.keys_of(n)]
        self.refresh()

    def refresh(self) -> None:
        live = () if self.disabled else tuple(n for n in self.active if n not in self.merged)
        self._live = live

    # ---- merge
    def merge(self) -> list[str]:
        todo = [n for n in self.active if n not in self.merged]
        for n in todo:
            if not getattr(self.adapters[n], "mergeable", False):
                raise NotMergeableError(f"adapter {display_key(n)!r} ({type(self.adapters[n]).__name__}) cannot be merged")
        quantized = quant.is_quantized(self.base) and bool(todo)
        with torch.no_grad():
            if quantized:  # dequantize -> merge -> requantize; the exact original is kept for unmerge
                original, self.base = self.base, quant.float_linear(self.base)
            for n in todo:
                self.adapters[n].merge(self)
                self.merged.append(n)
            if quantized:
                merged = self.base.weight
                self.base = quant.requantize_like(original, merged)
                self.merge_error = (quant.dequantized_weight(self.base) - merged).abs().max().item()
                self.__dict__.setdefault("_prequant", original)
        self.refresh()
        return todo

    def unmerge(self) -> None:
        original = self.__dict__.pop("_prequant", None)
        with torch.no_grad():
            if original is not None:  # let the adapters undo their bookkeeping, then restore the exact base
                self.base = quant.float_linear(self.base)
            while self.merged:
                n = self.merged.pop()
                self.adapters[n].unmerge(self)
            if original is not None:
                self.base, self.merge_error = original, 0.0
        self.refresh()

    # ---- forward
    def forward(self, *args, **kwargs):
        fn = self.base
        for n in self._live:
            fn = partial(self.adapters[n], self, fn)
        return fn(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}, disabled={self.disabled}"


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (weight stored (in, out))."""
    if isinstance(module, Slot):
        module = module.base
    if quant.is_quantized(module):
        out_f, in_f = quant.quantized_shape(module)
        return in_f, out_f
    w = module.weight
    if type(module).__name__ == "Conv1D":
        return w.shape[0], w.shape[1]
    return w.shape[1], w.shape[0]


def linear_weight_oi(module: nn.Module) -> torch.Tensor:
    """(out, in) weight of an nn.Linear, a transformers Conv1D or a quantized linear (dequantized copy)."""
    if isinstance(module, Slot):
        return module.weight_oi()
    if quant.is_quantized(module):
        return quant.dequantized_weight(module)
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def base_linear(slot: Slot, x: torch.Tensor) -> torch.Tensor:
    """y = W x + b for the slot's own (possibly modified) weight; used by weight-rewriting methods."""
    return nn.functional.linear(x, slot.weight_oi(), slot.bias)


# ---------------------------------------------------------------- logical module names
# A slot keeps its base as ``slot.base``; peftlab names modules *logically*, as if slots were not there
# (``layers.0.self_attn.q_proj`` even when ``self_attn`` is wrapped), so selections, saved adapters
# and fingerprints do not depend on which modules happen to be wrapped.
def walk(module: nn.Module, prefix: str = ""):
    """Yield (logical name, module) for every module, skipping slots' adapters."""
    yield prefix, module
    children = module.base._modules if isinstance(module, Slot) else module._modules
    for name, child in children.items():
        if child is not None:
            yield from walk(child, f"{prefix}.{name}" if prefix else name)


def resolve(model: nn.Module, name: str) -> nn.Module:
    """The module at a logical (or real) name; raises AttributeError naming the missing part."""
    mod = model
    for atom in name.split(".") if name else []:
        while atom not in mod._modules and isinstance(mod, Slot):
            mod = mod._modules["base"]
        if atom not in mod._modules or mod._modules[atom] is None:
            raise AttributeError(f"{type(model).__name__} has no module {name!r}")
        mod = mod._modules[atom]
    return mod


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(module that holds ``name`` as a direct child, child attribute name)."""
    parent_name, _, child = name.rpartition(".")
    parent = resolve(model, parent_name)
    while child not in parent._modules and isinstance(parent, Slot):
        parent = parent._modules["base"]
    return parent, child


CACHE_ARGS = ("cache", "past_key_values", "past_key_value")


def cache_arg(signature) -> str:
    """The name a forward takes its key/value cache under: transformers ≥ 5.24 renamed ``past_key_values``
    to ``cache``. Adapters that bind the call to the forward's signature (prefix, prompt, MEFT) must use
    that name: a cache handed over under the old one never reached attention on 5.25."""
    params = signature.parameters
    return next((n for n in CACHE_ARGS if n in params), "past_key_values")
