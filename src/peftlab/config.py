"""Base config shared by every method: target selection, validation, serialization, the method interface.

A config is plain data: attaching it never changes it, so one config object can be attached to several
models in any order. A method subclasses :class:`MethodConfig` (a dataclass), sets ``method`` and
``default_roles``, lists the ranges of its numeric fields in ``limits`` and implements
:meth:`MethodConfig.make_adapter`. Everything that depends on the model arrives through an
:class:`peftlab.context.AttachContext`. Composite methods (S4, ``peftlab.compose``) override
:meth:`expand`; methods that need one module shared by all their adapters (a prefix encoder, MEFT's
reversible stack) override :meth:`build_shared`. docs/ARCHITECTURE.md states when the core calls what.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from torch import nn

from .errors import ConfigError
from .registry import config_class

MAX_SIZE = 1 << 24  # an upper bound on every size field (ranks, widths, lengths): refused before allocating


class Range(NamedTuple):
    """Allowed values of a numeric field (and of the numbers inside a list/dict field): lo ≤ v ≤ hi,
    strict where ``lo_open`` / ``hi_open``. A lower bound ≥ 0 on an int field marks it a size (≤ MAX_SIZE)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False


SIZE = Range(1)  # ranks, widths, lengths
FRACTION = Range(0, 1, hi_open=True)  # dropout, sparsity
POSITIVE = Range(0, lo_open=True)


@dataclass
class MethodConfig:
    """Target selection common to all methods.

    Attributes:
        targets: role names of the architecture family (``"q"``, ``"k"``, ``"v"``, ``"o"``,
            ``"ffn_in"``, ``"ffn_out"``, ``"ffn_gate"``, ``"cross_q"`` ...), module-name suffixes
            (``"query"``, ``"attention.output.dense"``) or ``"all-linear"``. ``None`` = the method's
            default roles for the model's family.
        target_regex: a regex that must match the *full* module name (``re.fullmatch``).
        layers: indices of transformer blocks to restrict to (encoder blocks first, then decoder).
        target_classes: class names (``"Linear"``, ``"Conv1D"``) the module must be an instance of.
        exclude: module-name suffixes never to target.
        modules_to_save: module-name suffixes made fully trainable and saved with the adapter
            (a task head, typically). ``None`` = the model's freshly-initialized task head, if any.
    """

    method: ClassVar[str] = ""
    default_roles: ClassVar[tuple[str, ...]] = ("q", "v")
    # module kinds the method can wrap: "linear" (nn.Linear, GPT-2 Conv1D), "norm", "embedding", ...
    accepts: ClassVar[tuple[str, ...]] = ("linear",)
    # Hugging Face peft's name for the same math (enables peftlab.export_peft / import_peft)
    peft_type: ClassVar[str | None] = None
    # field name -> allowed range (checked by validate for every method; float fields are always finite)
    limits: ClassVar[dict[str, Range]] = {"layers": Range(0)}

    targets: list[str] | str | None = None
    target_regex: str | None = None
    layers: list[int] | None = None
    target_classes: list[str] | None = None
    exclude: list[str] | None = None
    modules_to_save: list[str] | None = None

    # ----------------------------------------------------------------- method interface
    def expand(self, model: nn.Module) -> list[tuple[str | None, MethodConfig]]:
        """The simple configs this one attaches as, labelled: ``[(None, self)]``; composites return
        ``[(part label, config), ...]`` (see :mod:`peftlab.compose`). Called once per attach; cached."""
        return [(None, self)]

    def default_targets(self, model: nn.Module) -> list[str]:
        """Targets used when ``targets`` is None (methods may depend on the family)."""
        return list(self.default_roles)

    def target_kinds(self) -> tuple[str, ...]:
        """Module kinds this config selects from (``accepts`` unless a field changes it)."""
        return self.accepts

    def keep(self, target) -> bool:
        """Final per-target filter after selection (e.g. BitFit skips norms without a bias)."""
        return True

    def head_selection(self) -> list[str] | None:
        """Module-name suffixes of the heads trained and saved with the adapter (None: the default head)."""
        return self.modules_to_save

    def check_model(self, model: nn.Module) -> None:
        """Raise UnsupportedArchitectureError if the method cannot serve this model (before anything changes)."""

    def build_shared(self, ctx) -> nn.Module | None:
        """A module shared by all of this config's adapters (e.g. a prefix encoder), or None.
        ``ctx``: :class:`peftlab.context.AttachContext` (``ctx.shared`` is None here)."""
        return None

    def make_adapter(self, target, ctx) -> nn.Module:
        """Build the adapter for one matched target (a :class:`peftlab.targets.Target`); ``ctx.shared`` is
        what :meth:`build_shared` returned (the core also binds it to the adapter as ``adapter.shared``)."""
        raise NotImplementedError

    def formula_count(self, ctx) -> int | None:
        """Trainable parameters predicted by the paper's formula for ``ctx.targets`` (None = n/a)."""
        return None

    def trainable_entries(self, model: nn.Module, key: str) -> int | None:
        """Entries this part trains, where that is not its parameter count (selective methods: the masked
        entries); None = its parameters. Shown by :func:`peftlab.report`."""
        return None

    # training hooks; ``key`` is the adapter key of this part (peftlab.slot.adapter_key), see peftlab.hooks
    def before_training(self, model: nn.Module, key: str, batches, loss_fn=None) -> None:
        """Called once before training (before the optimizer exists) with the training data: ``batches`` is a
        re-iterable of batch dicts, ``loss_fn(model, batch)`` the loss (default ``model(**batch).loss``).
        Data-chosen masks (FishMask's Fisher mask) are computed here."""

    def training_loss(self, model: nn.Module, key: str):
        """An extra term for the training loss (regularizers), or None."""
        return None

    def before_optimizer_step(self, model: nn.Module, key: str, step: int, total_steps: int) -> None:
        """Called after backward (and gradient clipping), before the optimizer step; gradients are present.
        ``step``: optimizer steps already taken (0 before the first)."""

    def on_train_step(self, model: nn.Module, key: str, step: int, total_steps: int) -> None:
        """Called by training loops after every optimizer step (schedules such as PST sparsity)."""

    def optimizer_options(self, model: nn.Module, key: str) -> dict:
        """Optimizer wishes for some of this adapter's parameters: ``{param: {"lr_scale": k, "weight_decay": w}}``
        (read by :func:`peftlab.param_groups`; LoRA+ scales B's learning rate)."""
        return {}

    def checkpoint_eligible(self, model: nn.Module, key: str, step: int, total_steps: int) -> bool:
        """Whether a checkpoint at ``step`` may be selected as the best one (PST: final sparsity only)."""
        return True

    def to_peft_fields(self, adapters: dict[str, nn.Module]) -> dict[str, Any]:
        """Method-specific fields of peft's adapter_config.json; ``adapters``: module name -> adapter."""
        raise NotImplementedError(f"{type(self).__name__} has no peft equivalent")

    @classmethod
    def from_peft_fields(cls, d: dict[str, Any], resolve) -> dict[str, Any] | None:
        """Our config fields for peft config ``d`` (targets excluded), or None if ``d`` is not this method.
        ``resolve(pattern)`` turns a peft module pattern (list of suffixes or regex) into module names."""
        return None

    # ----------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method}
        for f in dataclasses.fields(self):
            d[f.name] = _plain(getattr(self, f.name))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MethodConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping of fields, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if k != "method"}
        hints = _hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names, key=str)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(map(str, unknown))}")
        out = {k: _coerce(hints.get(k), v, f"{cls.__name__}.{k}") for k, v in d.items()}
        return cls(**out)

    def validate(self) -> None:
        """Check field values: types and ``limits`` of every numeric field. Subclasses extend it for their
        enumerations; they raise :class:`ConfigError` naming the field."""
        if isinstance(self.targets, str) and self.targets != "all-linear":
            self.targets = [self.targets]
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None and not isinstance(v, MethodConfig):
                setattr(self, f.name, _check_number(hints.get(f.name), v, self.limits.get(f.name),
                                                    f"{type(self).__name__}.{f.name}"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def __post_init__(self) -> None:
        self.validate()


def check_size(config: MethodConfig, field: str, value: int, limit: int, what: str) -> None:
    """Refuse a size larger than the target allows (before allocating), naming the field."""
    if value > limit:
        raise ConfigError(f"{type(config).__name__}.{field}={value} is larger than {what} ({limit})")


def _plain(v):
    if isinstance(v, MethodConfig):
        return v.to_dict()
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _numeric(tp) -> type | None:
    """int or float if ``tp`` is that type (or Optional of it), else None."""
    if tp in (int, float):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _numeric(args[0])
    return None


def _element_type(tp) -> type | None:
    """int/float for ``list[int]``, ``dict[str, int]`` (and Optional of them)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [_element_type(a) for a in typing.get_args(tp) if a is not type(None)]
        return next((t for t in inner if t is not None), None)
    if typing.get_origin(tp) in (list, dict):
        return _numeric(typing.get_args(tp)[-1]) if typing.get_args(tp) else None
    return None


def _check_number(tp, v, rng: Range | None, where: str):
    """Validate a numeric field (or the numbers of a list/dict field); returns the normalised value."""
    num = _numeric(tp)
    if num is not None:
        return _check_scalar(num, v, rng, where)
    el = _element_type(tp)
    if el is not None and isinstance(v, (list, tuple)):
        return [_check_scalar(el, x, rng, f"{where}[{i}]") for i, x in enumerate(v)]
    if el is not None and isinstance(v, dict):
        return {k: _check_scalar(el, x, rng, f"{where}[{k!r}]") for k, x in v.items()}
    return v


def _check_scalar(num: type, v, rng: Range | None, where: str):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {v!r}")
    if not math.isfinite(v):
        raise ConfigError(f"{where}: must be finite, got {v!r}")
    if num is int:
        if v != int(v):
            raise ConfigError(f"{where}: expected an integer, got {v!r}")
        v = int(v)
    if rng is None:
        return v
    lo, hi = rng.lo, rng.hi
    if num is int and lo is not None and lo >= 0 and hi is None:
        hi = MAX_SIZE
    if lo is not None and (v < lo or (rng.lo_open and v == lo)):
        raise ConfigError(f"{where}: must be {'>' if rng.lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and (v > hi or (rng.hi_open and v == hi)):
        raise ConfigError(f"{where}: must be {'<' if rng.hi_open else '<='} {hi}, got {v!r}")
    return v


def _coerce(tp, v, where: str):
    """Light type check for values coming from JSON/YAML; raises ConfigError naming the field."""
    if tp is None or v is None:
        return v
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errs = []
        for a in typing.get_args(tp):
            if a is type(None):
                continue
            try:
                return _coerce(a, v, where)
            except ConfigError as e:
                errs.append(str(e))
        raise ConfigError(f"{where}: value {v!r} has the wrong type ({'; '.join(errs)})")
    if origin is list:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(v).__name__}")
        (a,) = typing.get_args(tp) or (None,)
        return [_coerce(a, x, where) for x in v]
    if origin is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(v).__name__}")
        return dict(v)
    if origin is typing.Literal:
        if v not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {typing.get_args(tp)}, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {v!r}")
        return float(v)
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (math.inf, -math.inf) or v != int(v):
            raise ConfigError(f"{where}: expected an integer, got {v!r}")
        return int(v)
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: expected true/false, got {v!r}")
        return v
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{where}: expected a string, got {v!r}")
        return v
    if isinstance(tp, type) and issubclass(tp, MethodConfig):
        if isinstance(v, MethodConfig):
            return v
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: expected a config mapping, got {type(v).__name__}")
        cls = config_class(v["method"]) if isinstance(v.get("method"), str) else tp
        if not issubclass(cls, tp):
            raise ConfigError(f"{where}: method {v['method']!r} is not a {tp.__name__}")
        return cls.from_dict(v)
    return v
