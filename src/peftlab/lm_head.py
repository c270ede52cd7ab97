"""Causal-LM losses and scores that run the LM head only where they are taken.

A multiple-choice batch scores a few answer tokens after a long context, yet ``model(**batch).loss`` runs
the LM head (SmolLM2: 49,152-way) on every position and keeps those fp32 logits and their gradient: at
batch 8 x 256 that is 0.4 GB of logits alone, twice, for ~16 scored tokens. :func:`scored_logits` instead
registers a forward pre-hook on the model's output embeddings that keeps only the hidden states of the
positions whose next token is scored, so the head computes (N, vocab) for those N positions and nothing
else. The same weights give the same loss and scores as the full computation (tests compare both).
Methods that prepend virtual tokens (prompt tuning) are handled: the position mask is left-padded to the
hidden states' length.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) mask of the positions whose *next* token is labelled, and the (N,) labels they predict."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask, labels[:, 1:][labels[:, 1:] != -100]


@contextlib.contextmanager
def scored_logits(model: nn.Module, mask: torch.Tensor):
    """Inside, ``model(...).logits`` is (N, vocab): the logits at the ``True`` positions of ``mask`` only."""
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (not a causal LM)")

    def keep(_module, args):
        h = args[0]
        m = mask
        if h.shape[1] > m.shape[1]:  # virtual tokens prepended by the adapter
            m = F.pad(m, (h.shape[1] - m.shape[1], 0), value=False)
        return (h[m],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(keep)
    try:
        yield
    finally:
        handle.remove()


def answer_loss(model: nn.Module, batch: dict, unwrapped: nn.Module | None = None) -> torch.Tensor:
    """Mean token cross-entropy over the labelled tokens (as ``model(**batch).loss``), head on those only.
    ``unwrapped``: the HF model inside a DDP/accelerate wrapper ``model`` (it owns the output embeddings)."""
    mask, target = scored_positions(batch["labels"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with scored_logits(unwrapped if unwrapped is not None else model, mask):
        logits = model(**inputs).logits
    return F.cross_entropy(logits.float(), target)


def answer_scores(model: nn.Module, batch: dict, normalize: bool) -> torch.Tensor:
    """Per row: sum (or per-token mean) log-likelihood of its labelled tokens, head on those only."""
    mask, target = scored_positions(batch["labels"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with scored_logits(model, mask):
        logits = model(**inputs).logits
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    rows = mask.nonzero(as_tuple=True)[0]
    s = torch.zeros(mask.shape[0], dtype=lp.dtype, device=lp.device).index_add_(0, rows, lp)
    return s / mask.sum(-1).clamp_min(1) if normalize else s
