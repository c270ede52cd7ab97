"""Base config shared by every method: target selection, serialization, and the method interface.

A method subclasses :class:`MethodConfig` (a dataclass), sets ``method`` and ``default_roles``, and
implements :meth:`MethodConfig.make_adapter`. Methods that need more than one attachment (composite
methods such as S4) override :meth:`MethodConfig.parts`; methods that touch something other than
individual modules (shared prefix encoders, input extensions) may override :meth:`build_shared`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn


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

    targets: list[str] | str | None = None
    target_regex: str | None = None
    layers: list[int] | None = None
    target_classes: list[str] | None = None
    exclude: list[str] | None = None
    modules_to_save: list[str] | None = None

    # ----------------------------------------------------------------- method interface
    def parts(self) -> list[MethodConfig]:
        """The simple configs this one expands into (composites override this)."""
        return [self]

    def default_targets(self, model: nn.Module) -> list[str]:
        """Targets used when ``targets`` is None (methods may depend on the family)."""
        return list(self.default_roles)

    def keep(self, target) -> bool:
        """Final per-target filter after selection (e.g. BitFit skips norms without a bias)."""
        return True

    def build_shared(self, model: nn.Module) -> nn.Module | None:
        """A module shared by all of this config's adapters (e.g. a prefix encoder), or None."""
        return None

    def make_adapter(self, target, shared: nn.Module | None) -> nn.Module:
        """Build the adapter for one matched target (a :class:`peftlab.targets.Target`)."""
        raise NotImplementedError

    def check_model(self, model: nn.Module) -> None:
        """Raise UnsupportedArchitectureError if the method cannot serve this model."""

    def formula_count(self, targets: list) -> int | None:
        """Trainable parameters predicted by the paper's formula for these targets (None = n/a)."""
        return None

    def training_loss(self, model: nn.Module, name: str):
        """An extra term for the training loss (regularizers), or None."""
        return None

    def on_train_step(self, model: nn.Module, name: str, step: int, total_steps: int) -> None:
        """Called by training loops after every optimizer step (schedules such as PST sparsity)."""

    def before_optimizer_step(self, model: nn.Module, name: str, step: int, total_steps: int) -> None:
        """Called by training loops after backward, before the optimizer step (gradients present; AdaLoRA)."""

    def optimizer_options(self, model: nn.Module, name: str) -> dict:
        """Optimizer wishes for some of this adapter's parameters: ``{param: {"lr_scale": k, "weight_decay": w}}``
        (read by :func:`peftlab.param_groups`; LoRA+ scales B's learning rate)."""
        return {}

    def checkpoint_eligible(self, model: nn.Module, name: str, step: int, total_steps: int) -> bool:
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
            v = getattr(self, f.name)
            d[f.name] = v.to_dict() if isinstance(v, MethodConfig) else v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MethodConfig:
        d = {k: v for k, v in d.items() if k != "method"}
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TypeError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        out = {}
        for k, v in d.items():
            out[k] = _coerce(hints.get(k), v, f"{cls.__name__}.{k}")
        obj = cls(**out)
        obj.validate()
        return obj

    def validate(self) -> None:
        """Check field values; subclasses extend. Raise ValueError naming the field."""
        if isinstance(self.targets, str) and self.targets != "all-linear":
            self.targets = [self.targets]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def __post_init__(self) -> None:
        self.validate()


def _coerce(tp, v, where: str):
    """Light type check for values coming from JSON/YAML; raises TypeError naming the field."""
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
            except TypeError as e:
                errs.append(str(e))
        raise TypeError(f"{where}: value {v!r} has the wrong type ({'; '.join(errs)})")
    if origin is list:
        if not isinstance(v, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {type(v).__name__}")
        (a,) = typing.get_args(tp) or (None,)
        return [_coerce(a, x, where) for x in v]
    if origin is dict:
        if not isinstance(v, dict):
            raise TypeError(f"{where}: expected a mapping, got {type(v).__name__}")
        return dict(v)
    if origin is typing.Literal:
        if v not in typing.get_args(tp):
            raise TypeError(f"{where}: expected one of {typing.get_args(tp)}, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{where}: expected a number, got {v!r}")
        return float(v)
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{where}: expected an integer, got {v!r}")
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise TypeError(f"{where}: expected true/false, got {v!r}")
        return v
    if tp is str:
        if not isinstance(v, str):
            raise TypeError(f"{where}: expected a string, got {v!r}")
        return v
    if isinstance(tp, type) and issubclass(tp, MethodConfig) and isinstance(v, dict):
        return tp.from_dict(v)
    return v
