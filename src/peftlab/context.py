"""What a method gets from the core when it attaches: :class:`AttachContext`.

Configs are plain data; everything that depends on the model (its family, width, the selected
targets, the shared module, the adapter name) is handed to ``build_shared`` / ``make_adapter`` /
``formula_count`` here, so no config stores attach-time state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from .errors import UnsupportedArchitectureError
from .families import Family, family_of
from .slot import adapter_key
from .targets import Target, select


@dataclass(frozen=True)
class AttachContext:
    model: nn.Module
    family: Family | None
    name: str  # adapter name ("" outside an attachment, e.g. for a formula count)
    part: str | None  # part label inside a composite config, None for a simple one
    targets: tuple[Target, ...]
    shared: nn.Module | None = None  # what the config's build_shared returned

    @property
    def key(self) -> str:
        """The adapter key of this part in every slot (see :func:`peftlab.slot.adapter_key`)."""
        return adapter_key(self.name, self.part)

    @property
    def hidden_size(self) -> int:
        cfg = getattr(self.model, "config", None)
        for k in ("hidden_size", "d_model", "n_embd"):
            if getattr(cfg, k, None):
                return int(getattr(cfg, k))
        raise UnsupportedArchitectureError(f"cannot determine the hidden size of {type(self.model).__name__}")

    def with_shared(self, shared: nn.Module | None) -> AttachContext:
        return dataclasses.replace(self, shared=shared)


def context_for(model: nn.Module, config, name: str = "", part: str | None = None) -> AttachContext:
    """Select ``config``'s targets on ``model`` (raises TargetNotFoundError) and wrap everything up."""
    return AttachContext(model, family_of(model), name, part, tuple(select(model, config)))
