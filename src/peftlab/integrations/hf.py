"""peftlab's training hooks in a transformers ``Trainer``.

    trainer = PeftlabTrainer(model=model, args=args, train_dataset=ds)   # hooks + training_loss
    # or, with your own Trainer subclass:
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[PeftlabCallback()])
    # and add peftlab.training_loss(model) in your compute_loss (see ``compute_loss`` below)

A ``TrainerCallback`` cannot change the loss, so the extra loss terms of the active adapters (qGOFT's
orthogonality regulariser ...) go through :class:`PeftlabTrainer` (a Trainer whose ``compute_loss`` adds
them) or the :func:`compute_loss` helper for a Trainer subclass of your own. The callback maps
``on_train_begin`` → :func:`peftlab.before_training` (the train dataloader), ``on_pre_optimizer_step`` → :func:`peftlab.before_optimizer_step` (gradients present, after clipping)
and ``on_step_end`` → :func:`peftlab.on_train_step`. ``step`` is ``state.global_step`` (the steps already
taken before the optimizer step; the steps taken so far at the end of a step), ``total_steps``
``state.max_steps``.
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from ..hooks import before_optimizer_step, before_training, on_train_step, training_loss


def _unwrap(model):
    """The user's model under DDP / accelerate wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


class PeftlabCallback(TrainerCallback):
    """Calls peftlab's step hooks from a transformers Trainer (and :func:`peftlab.before_training` on the
    train dataloader at ``on_train_begin``: the optimizer exists by then, but methods that choose their
    entries there resize their parameters in place, before its first step)."""

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is not None and train_dataloader is not None and state.global_step == 0:
            m = _unwrap(model)
            device = next(m.parameters()).device
            before_training(m, _OnDevice(train_dataloader, device))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            before_optimizer_step(_unwrap(model), state.global_step, state.max_steps)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            on_train_step(_unwrap(model), state.global_step, state.max_steps)


class _OnDevice:
    """A dataloader's batches moved to ``device`` (re-iterable)."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __iter__(self):
        for b in self.loader:
            yield {k: v.to(self.device) if hasattr(v, "to") else v for k, v in b.items()}


def compute_loss(trainer: Trainer, model, inputs, return_outputs: bool = False, **kwargs):
    """``Trainer.compute_loss`` plus :func:`peftlab.training_loss`; call it from your subclass's compute_loss."""
    out = Trainer.compute_loss(trainer, model, inputs, return_outputs=return_outputs, **kwargs)
    loss, outputs = out if return_outputs else (out, None)
    extra = training_loss(_unwrap(model))
    if extra is not None:
        loss = loss + extra
    return (loss, outputs) if return_outputs else loss


class PeftlabTrainer(Trainer):
    """A Trainer with peftlab's hooks: :class:`PeftlabCallback` added and ``training_loss`` in the loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(cb, PeftlabCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(PeftlabCallback())

    def compute_loss(self, model, inputs, return_outputs: bool = False, **kwargs):
        return compute_loss(self, model, inputs, return_outputs=return_outputs, **kwargs)
