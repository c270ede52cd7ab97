"""Shared base of adapters defined by a dense weight update ΔW (LoHa, LoKr, VeRA ...).

``forward`` adds ``update(x)`` (by default ``x ΔWᵀ``) to the inner output; merge/unmerge add/subtract
ΔW (out, in layout) to/from the slot's base weight. Subclasses implement :meth:`delta_weight` and may
override :meth:`update` with a cheaper factored product.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..errors import PeftlabError
from ..slot import Adapter


class DeltaAdapter(Adapter):
    mergeable = True

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta_weight().to(x.dtype))

    def forward(self, slot, base_fn, x):
        return base_fn(x) + self.update(x)

    def merge(self, slot) -> None:
        w = slot.weight_oi()
        w.add_(self.delta_weight().to(w.dtype))

    def unmerge(self, slot) -> None:
        w = slot.weight_oi()
        w.sub_(self.delta_weight().to(w.dtype))


def refuse_conv1d_for_peft(method: str, adapters: dict) -> None:
    """peft's LyCORIS-style tuners (LoHa, LoKr) only wrap nn.Linear: refuse exporting GPT-2 Conv1D targets."""
    bad = [n for n, a in adapters.items() if getattr(a, "fan_in_fan_out", False)]
    if bad:
        raise PeftlabError(f"peft's {method} does not support transformers Conv1D layers (GPT-2): {bad[0]}")
