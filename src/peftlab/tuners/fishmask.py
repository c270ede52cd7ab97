"""FishMask (Sung, Nair & Raffel 2021, "Training Neural Networks with Fixed Sparse Masks").

A fixed sparse mask over the targeted weights, chosen once before training by the empirical Fisher
information F̂_θ = (1/N) Σ_i (∂ log p(y_i|x_i) / ∂θ)² (the paper's eq. 2: the mean of squared
*per-example* gradients, over N training examples), keeping the k = ⌈keep_fraction·|θ|⌉ largest entries
over all targeted weights together (a global top-k, as the paper). Then only those entries train:
θ = θ₀ + δ with δ non-zero only on the mask (sparse values scattered into the weight,
:class:`peftlab.tuners.selective.SparseDelta`); the adapter file holds just the k indices and values.

The mask comes from data, so it is computed by :meth:`FishMaskConfig.before_training`, the general
pre-training hook: ``peftlab train`` calls it on its training batches; in a plain loop or with a
transformers ``Trainer`` call ``peftlab.before_training(model, batches)`` once before training (or use
``peftlab.integrations.hf.PeftlabCallback``, which does it at ``on_train_begin`` from the train
dataloader). Until then each layer holds a placeholder mask of the right size (evenly strided entries),
so the adapter can be attached, saved and inspected; the first optimizer step refuses to run on it.

Choices (documented departures): the Fisher is taken with the model in eval mode (no dropout noise) on
the task loss the loop trains (the paper: the log-likelihood of the label, the same thing for
classification); ``num_samples`` = 1024 examples (the paper's setting) by default; ties broken by
``topk``. Per-example gradients are computed one example at a time (exact, not the squared batch mean).
Trainable count: k (plus the task head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import SIZE, MethodConfig, Range
from ..core import part_adapters
from ..errors import PeftlabError
from ..registry import register
from ..slot import display_key, linear_dims
from .selective import SparseDelta, global_top_k

KEEP = Range(0, 1, lo_open=True)  # the share of entries kept: 0 < f <= 1


def default_loss(model, batch):
    return model(**batch).loss


def _examples(batches, limit: int):
    """Single-example sub-batches (tensors sliced on dim 0) from an iterable of batch dicts, up to ``limit``."""
    seen = 0
    for batch in batches:
        n = next(v.shape[0] for v in batch.values() if torch.is_tensor(v))
        for i in range(n):
            if seen >= limit:
                return
            yield {k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in batch.items()}
            seen += 1


@torch.no_grad()
def _placeholder(numel: int, k: int) -> torch.Tensor:
    return torch.unique(torch.linspace(0, numel - 1, k).round().long())


@register
@dataclass
class FishMaskConfig(MethodConfig):
    """Sparse fine-tuning of the ``keep_fraction`` highest-Fisher entries of the targeted weights."""

    method = "fishmask"
    default_roles = ("q", "k", "v", "o", "ffn_in", "ffn_out", "ffn_gate", "cross_q", "cross_k", "cross_v", "cross_o")
    limits = MethodConfig.limits | {"keep_fraction": KEEP, "num_samples": SIZE}

    keep_fraction: float = 0.005
    num_samples: int = 1024  # training examples the Fisher is averaged over

    def make_adapter(self, target, ctx):
        k_in, n = linear_dims(target.module)
        numel = n * k_in
        return SparseDelta((n, k_in), _placeholder(numel, max(1, math.ceil(self.keep_fraction * numel))))

    def formula_count(self, ctx) -> int:
        total = sum(math.prod(linear_dims(t.module)) for t in ctx.targets)
        return math.ceil(self.keep_fraction * total)

    def trainable_entries(self, model, key) -> int:
        return sum(a.values.numel() for _, a in part_adapters(model, key))

    def before_training(self, model, key, batches, loss_fn=None) -> None:
        """Compute the Fisher mask (once: an adapter loaded with its mask keeps it)."""
        layers = [a for _, a in part_adapters(model, key)]
        if all(bool(a.ready) for a in layers):
            return
        fisher = empirical_fisher(model, layers, batches, self.num_samples, loss_fn or default_loss)
        k = math.ceil(self.keep_fraction * sum(a.numel for a in layers))
        for a, idx in zip(layers, global_top_k(fisher, k)):
            a.resize(idx)
            a.ready.fill_(True)

    def before_optimizer_step(self, model, key, step, total_steps):
        if step == 0 and not all(bool(a.ready) for _, a in part_adapters(model, key)):
            raise PeftlabError(f"fishmask adapter {display_key(key)!r}: its Fisher mask was never computed; call "
                               "peftlab.before_training(model, batches) before training (peftlab train does)")


def empirical_fisher(model, layers: list[SparseDelta], batches, num_samples: int, loss_fn) -> list[torch.Tensor]:
    """Mean squared per-example gradient of every entry of each layer's weight (each layer temporarily
    holds every entry, so ``values.grad`` is the full weight gradient)."""
    saved = [(a.indices, a.values.detach().clone()) for a in layers]
    for a in layers:
        a.resize(torch.arange(a.numel, device=a.indices.device))
    fisher = [torch.zeros(a.numel, device=a.values.device) for a in layers]
    params = [a.values for a in layers]
    was_training = model.training
    model.eval()
    n = 0
    try:
        with torch.enable_grad():
            for ex in _examples(batches, num_samples):
                grads = torch.autograd.grad(loss_fn(model, ex), params, allow_unused=True)
                for f, g in zip(fisher, grads):
                    if g is not None:
                        f.add_(g.detach().float().square())
                n += 1
    finally:
        model.train(was_training)
        for a, (idx, val) in zip(layers, saved):
            a.resize(idx, val)
    if n == 0:
        raise PeftlabError("fishmask: no training examples to compute the Fisher information from")
    return [f / n for f in fisher]
