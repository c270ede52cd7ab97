"""Diff pruning (Guo, Rush & Kim 2021, "Parameter-Efficient Transfer Learning with Diff Pruning").

θ_τ = θ + δ_τ with δ_τ = z_τ ⊙ w_τ on every targeted weight (eq. 2), where z is the stretched
hard-concrete relaxation of an L0 gate (Louizos, Welling & Kingma 2018, eqs. 9-10):
    u ~ U(0, 1),  s = σ((log u − log(1 − u) + log α) / β),  s̄ = s·(ζ − γ) + γ,  z = min(1, max(0, s̄))
with β = 2/3, γ = −0.1, ζ = 1.1 (Louizos' values); at eval time z = min(1, max(0, σ(log α)(ζ − γ) + γ)).
The expected L0 norm E‖δ‖₀ = Σ σ(log α − β log(−γ/ζ)) (eq. 12 of Louizos; eq. 5 of Guo) is added to the
loss with weight ``l0_weight`` (λ) through :meth:`training_loss`.

At step ⌈(1 − finetune_fraction)·T⌉ δ is projected to the target sparsity (Guo §3.2, "magnitude
pruning"): the k = ⌈keep_fraction·N⌉ entries of largest |z ⊙ w| over all targeted weights together are
kept (w ← δ̂ there), every other entry is dropped, and training continues on the fixed mask (the gate is
pinned to exactly 1 / 0 by setting log α = ±100, so it survives a checkpoint resume with the trainable
parameters; the L0 term is then off). Best-checkpoint selection is allowed only after the projection.
After it the adapter file holds only the k kept entries (int32 flat indices + values); before it, the
dense w and log α. ``peftlab.tuners.sparsity.export.save_sparse_delta`` writes the final δ as a packed
sparse file (the sparse export shared with PST).

Init w = 0 (so the model starts exactly at θ) and log α = ``alpha_init`` = 5 (z ≈ 1: every entry starts
open, as in the official code's default; not stated in the paper). Departures: the structured (grouped)
variant is not implemented; log α's learning rate is the weights' × ``alpha_lr_scale`` (default 1,
not tuned). Trainable entries: 2N (w and log α) before the projection, k after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..config import FRACTION, POSITIVE, MethodConfig, Range
from ..core import part_adapters
from ..errors import ConfigError
from ..registry import register
from ..slot import Adapter, linear_dims, load_exact
from .selective import check_entries, global_top_k

PIN = 100.0  # |log α| that makes the hard-concrete gate exactly 0 / 1 (train and eval)
_EPS = 1e-6


class DiffPruningLayer(Adapter):
    mergeable = True

    def __init__(self, shape: tuple[int, int], alpha_init: float, beta: float, gamma: float, zeta: float):
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        self.diff_w = nn.Parameter(torch.zeros(self.shape))
        self.log_alpha = nn.Parameter(torch.full(self.shape, float(alpha_init)))
        self.register_buffer("projected", torch.zeros((), dtype=torch.bool))
        self.beta, self.gamma, self.zeta = beta, gamma, zeta

    def gate(self) -> torch.Tensor:
        """z: a hard-concrete sample in training mode, its deterministic estimate in eval mode."""
        la = self.log_alpha
        if self.training:
            u = torch.rand_like(la).clamp(_EPS, 1 - _EPS)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / self.beta)
        else:
            s = torch.sigmoid(la)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def delta_weight(self) -> torch.Tensor:
        return self.gate() * self.diff_w

    @torch.no_grad()
    def sparse_delta(self) -> torch.Tensor:
        """The trained δ (eval gate), for the sparse export."""
        return self.eval_delta()

    @torch.no_grad()
    def eval_delta(self) -> torch.Tensor:
        s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0) * self.diff_w

    def expected_l0(self) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta)).sum()

    def forward(self, slot, base_fn, x):
        w = slot.weight_oi()
        return F.linear(x, w + self.delta_weight().to(w.dtype), slot.bias)

    def merge(self, slot) -> None:  # the deterministic (eval) δ
        w = slot.weight_oi()
        w.add_(self.eval_delta().to(w.dtype))

    def unmerge(self, slot) -> None:
        w = slot.weight_oi()
        w.sub_(self.eval_delta().to(w.dtype))

    @torch.no_grad()
    def project(self, keep: torch.Tensor) -> None:
        """Keep the flat entries ``keep`` (w ← δ̂ there, 0 elsewhere) and pin the gate to that mask."""
        d = self.eval_delta().flatten()
        w = torch.zeros_like(d)
        w[keep] = d[keep]
        self.diff_w.copy_(w.view(self.shape))
        la = torch.full_like(d, -PIN)
        la[keep] = PIN
        self.log_alpha.copy_(la.view(self.shape))
        self.projected.fill_(True)

    def kept(self) -> torch.Tensor:
        return torch.nonzero(self.log_alpha.detach().flatten() > 0).flatten()

    def state_tensors(self):
        if not bool(self.projected):
            return self.state_dict()
        idx = self.kept()
        return {"indices": idx.to(torch.int32), "values": self.diff_w.detach().flatten()[idx],
                "projected": self.projected}

    def load_state_tensors(self, tensors, where):
        if set(tensors) != {"indices", "values", "projected"}:
            return load_exact(self, tensors, where)
        idx, val = check_entries(tensors["indices"], tensors["values"], self.diff_w.numel(), where)
        with torch.no_grad():
            self.diff_w.zero_().view(-1)[idx] = val.to(self.diff_w.dtype)
            self.log_alpha.fill_(-PIN).view(-1)[idx] = PIN
            self.projected.fill_(True)


@register
@dataclass
class DiffPruningConfig(MethodConfig):
    """Sparse diff δ = z ⊙ w with an L0 (hard-concrete) penalty, projected to ``keep_fraction`` at the end."""

    method = "diff_pruning"
    default_roles = ("q", "k", "v", "o", "ffn_in", "ffn_out", "ffn_gate", "cross_q", "cross_k", "cross_v", "cross_o")
    limits = MethodConfig.limits | {"keep_fraction": Range(0, 1, lo_open=True), "finetune_fraction": FRACTION,
                                    "l0_weight": Range(0), "beta": POSITIVE, "gamma": Range(hi=0, hi_open=True),
                                    "zeta": Range(1, lo_open=True), "alpha_lr_scale": POSITIVE}

    keep_fraction: float = 0.005  # target density after the projection (Guo et al.: 0.5%)
    finetune_fraction: float = 0.3  # share of the steps trained on the fixed mask after the projection
    l0_weight: float = 1.25e-7  # λ of the expected-L0 term
    alpha_init: float = 5.0
    beta: float = 2 / 3
    gamma: float = -0.1
    zeta: float = 1.1
    alpha_lr_scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not math.isfinite(self.alpha_init) or abs(self.alpha_init) >= PIN:
            raise ConfigError(f"DiffPruningConfig.alpha_init: must be finite with |alpha_init| < {PIN:g}")

    def make_adapter(self, target, ctx):
        k, n = linear_dims(target.module)
        return DiffPruningLayer((n, k), self.alpha_init, self.beta, self.gamma, self.zeta)

    def formula_count(self, ctx) -> int:
        return sum(2 * math.prod(linear_dims(t.module)) for t in ctx.targets)

    def _layers(self, model, key) -> list[DiffPruningLayer]:
        return [a for _, a in part_adapters(model, key)]

    def _projected(self, model, key) -> bool:
        return all(bool(a.projected) for a in self._layers(model, key))

    def trainable_entries(self, model, key):
        layers = self._layers(model, key)
        return sum(a.kept().numel() for a in layers) if self._projected(model, key) else None

    def training_loss(self, model, key):
        if self.l0_weight == 0 or self._projected(model, key):
            return None
        return self.l0_weight * sum(a.expected_l0() for a in self._layers(model, key))

    def optimizer_options(self, model, key):
        return {a.log_alpha: {"lr_scale": self.alpha_lr_scale, "weight_decay": 0.0} for a in self._layers(model, key)}

    def projection_step(self, total_steps: int) -> int:
        return max(1, math.ceil((1 - self.finetune_fraction) * total_steps))

    def on_train_step(self, model, key, step, total_steps):
        if step >= self.projection_step(total_steps) and not self._projected(model, key):
            self.project(model, key)

    def project(self, model, key) -> None:
        """Magnitude projection of δ to the k = ⌈keep_fraction·N⌉ largest |z ⊙ w| over all layers."""
        layers = self._layers(model, key)
        k = math.ceil(self.keep_fraction * sum(a.diff_w.numel() for a in layers))
        for a, keep in zip(layers, global_top_k([a.eval_delta().abs() for a in layers], k)):
            a.project(keep)

    def checkpoint_eligible(self, model, key, step, total_steps):
        return step >= self.projection_step(total_steps)
