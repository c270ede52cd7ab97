"""Training hooks: what a training loop calls so that methods with regularizers, schedules or
gradient-based decisions work without the loop knowing them.

    peftlab.before_training(model, batches)                    # once, before the optimizer (FishMask)
    loss = task_loss + (peftlab.training_loss(model) or 0)
    loss.backward(); clip_grad_norm_(...)
    peftlab.before_optimizer_step(model, step, total_steps)   # gradients present (AdaLoRA, masks)
    optimizer.step(); scheduler.step(); optimizer.zero_grad()
    peftlab.on_train_step(model, step + 1, total_steps)       # schedules (PST sparsity)
    if peftlab.checkpoint_eligible(model, step + 1, total_steps): maybe keep as best

``peftlab train`` calls all five; :mod:`peftlab.integrations.hf` wires them into a transformers
``Trainer``. Each dispatches to the active adapters' (expanded, cached) parts with the part's adapter key.
"""

from __future__ import annotations

from torch import nn

from .core import has_adapters, state
from .slot import adapter_key


def active_parts(model: nn.Module):
    """(adapter key, simple config) of every part of every active adapter, in activation order."""
    if not has_adapters(model):
        return
    st = state(model)
    for name in st.active:
        for label, part in st.parts[name]:
            yield adapter_key(name, label), part


def before_training(model: nn.Module, batches, loss_fn=None) -> None:
    """Call once before training, before building the optimizer: methods that choose what to train from
    data (FishMask) do it here. ``batches``: a re-iterable of training batch dicts; ``loss_fn(model, batch)``
    returns the loss (default ``model(**batch).loss``)."""
    for key, part in active_parts(model):
        part.before_training(model, key, batches, loss_fn)


def training_loss(model: nn.Module):
    """Sum of the extra loss terms (regularizers) of the active adapters, or None."""
    total = None
    for key, part in active_parts(model):
        term = part.training_loss(model, key)
        if term is not None:
            total = term if total is None else total + term
    return total


def before_optimizer_step(model: nn.Module, step: int, total_steps: int) -> None:
    """Call after backward (and clipping), before ``optimizer.step()``; ``step`` = steps already taken."""
    for key, part in active_parts(model):
        part.before_optimizer_step(model, key, step, total_steps)


def on_train_step(model: nn.Module, step: int, total_steps: int) -> None:
    """Call after every optimizer step (``step`` = steps taken so far); methods with schedules react."""
    for key, part in active_parts(model):
        part.on_train_step(model, key, step, total_steps)


def checkpoint_eligible(model: nn.Module, step: int, total_steps: int) -> bool:
    """False while some active method forbids best-checkpoint selection (e.g. before final sparsity)."""
    return all(part.checkpoint_eligible(model, key, step, total_steps) for key, part in active_parts(model))
