"""Uniting several methods on one model under one adapter name (like adapters' ``ConfigUnion``).

    cfg = peftlab.compose(peftlab.LoRAConfig(r=8), peftlab.get_config("adapter", bottleneck=16))
    peftlab.attach(model, cfg)        # report shows default.lora and default.adapter
    peftlab.save(model, "hybrid")     # the config round-trips through JSON like any other

Each part is an ordinary registered config that attaches through the core with its own targets; its
modules are stored under the key ``name__<label>`` (shown as ``name.<label>``, the label being the part's
method, numbered from the second part of the same method on: ``lora``, ``lora_2``). Where parts meet on
one module they compose in the order given (first part innermost). Composite methods such as S4 build
a ComposeConfig from their own fields and return its expansion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .config import MethodConfig
from .errors import ConfigError
from .registry import config_class, register


def label_parts(configs: list[MethodConfig]) -> list[tuple[str, MethodConfig]]:
    """[(label, config)] with labels ``method``, ``method_2``, ... in order."""
    seen: dict[str, int] = {}
    out = []
    for c in configs:
        seen[c.method] = seen.get(c.method, 0) + 1
        out.append((c.method if seen[c.method] == 1 else f"{c.method}_{seen[c.method]}", c))
    return out


@register
@dataclass
class ComposeConfig(MethodConfig):
    """Several registered methods as one adapter. ``parts``: configs (or their ``to_dict()`` mappings).
    The selection fields of the composite itself are unused except ``modules_to_save`` (the heads)."""

    method = "compose"

    parts: list[MethodConfig] = field(default_factory=list)

    def validate(self) -> None:
        self.parts = [_as_config(p, i) for i, p in enumerate(self.parts)]
        super().validate()
        if any(isinstance(p, ComposeConfig) for p in self.parts):
            raise ConfigError("ComposeConfig.parts: nest the parts directly, not a ComposeConfig")

    def expand(self, model: nn.Module) -> list[tuple[str, MethodConfig]]:
        if not self.parts:
            raise ConfigError("ComposeConfig.parts: needs at least one method config")
        out = []
        for label, p in label_parts(self.parts):
            sub = p.expand(model)
            if sub != [(None, p)]:
                raise ConfigError(f"ComposeConfig.parts: {p.method} is itself composite; list its parts instead")
            out.append((label, p))
        return out


def _as_config(p, i: int) -> MethodConfig:
    if isinstance(p, dict) and isinstance(p.get("method"), str):
        return config_class(p["method"]).from_dict(p)
    if not isinstance(p, MethodConfig):
        raise ConfigError(f"ComposeConfig.parts[{i}]: expected a method config or a mapping with 'method', got {p!r}")
    return p


class UnionConfig(MethodConfig):
    """Base of named unions with fixed parts (MAM, UniPELT): a subclass lists its parts in :meth:`parts`
    from its own fields; attaching expands them like a :class:`ComposeConfig` (each part checks the model)."""

    def parts(self) -> list[MethodConfig]:  # pragma: no cover - abstract
        raise NotImplementedError

    def expand(self, model: nn.Module) -> list[tuple[str, MethodConfig]]:
        return ComposeConfig(parts=self.parts(), modules_to_save=self.modules_to_save).expand(model)


def compose(*configs: MethodConfig, modules_to_save: list[str] | None = None) -> ComposeConfig:
    """One config uniting ``configs`` (each keeps its own targets and hyper-parameters)."""
    return ComposeConfig(parts=list(configs), modules_to_save=modules_to_save)
