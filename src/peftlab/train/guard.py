"""Divergence detection and the finiteness check every saved checkpoint must pass.

Rule (:class:`DivergenceGuard`): training has diverged at a step when
  * its loss or its gradient norm is NaN or infinite, or
  * from the second step on, its loss exceeds ``factor`` (1e3) times the smaller of the median of the
    first ``warmup`` (3) losses seen (the starting level) and the median of the last ``window`` (50)
    losses (the running level): a loss that jumps, or creeps up, three orders of magnitude above where
    it started or where it has been lately.
A checkpoint (``checkpoint/`` for --resume, ``best/``) is only written after :func:`unhealthy` finds the
trainable parameters finite and the model's outputs on a fixed probe batch finite.
"""

from __future__ import annotations

import math
import statistics

import torch

from ..errors import PeftlabError


class TrainingDivergedError(PeftlabError, RuntimeError):
    """The loss or the gradients became non-finite, or the loss far exceeded its running level."""


class DivergenceGuard:
    def __init__(self, factor: float = 1e3, warmup: int = 3, window: int = 50, state: dict | None = None):
        self.factor, self.warmup, self.window = factor, warmup, window
        state = state or {}
        self.first: list[float] = list(state.get("first", []))
        self.recent: list[float] = list(state.get("recent", []))

    def state(self) -> dict:
        return {"first": self.first, "recent": self.recent}

    def check(self, loss: float, grad_norm: float | None = None) -> str | None:
        """Why this step diverged, or None; records the loss when it did not."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"non-finite gradient norm ({grad_norm}) at loss {loss:.4g}"
        if self.first:
            level = min(statistics.median(self.first), statistics.median(self.recent))
            if loss > self.factor * max(level, 1e-12):
                return (f"loss {loss:.4g} is more than {self.factor:g} x its running level {level:.4g} "
                        "(median of the first and of the recent losses)")
        if len(self.first) < self.warmup:
            self.first.append(loss)
        self.recent = (self.recent + [loss])[-self.window:]
        return None


@torch.no_grad()
def unhealthy(model, params: dict[str, torch.Tensor], probe: dict | None) -> str | None:
    """Why ``model`` must not be saved (non-finite trainable parameters, or non-finite outputs on ``probe``), or None."""
    bad = [n for n, p in params.items() if not bool(torch.isfinite(p).all())]
    if bad:
        return f"non-finite parameters ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})"
    if probe is None:
        return None
    was_training = model.training
    model.eval()
    try:
        logits = model(**{k: v for k, v in probe.items() if k != "labels"}).logits
    finally:
        model.train(was_training)
    if not bool(torch.isfinite(logits.float()).all()):
        return "non-finite model outputs on the probe batch"
    return None
