"""DyLoRA (Valipour et al. 2023): LoRA trained for every rank b ≤ r at once (nested ranks).

Each training step uses the truncated update ΔW_b = (α/b)·B[:, :b] A[:b, :] with b ~ U{r_min..r},
one b per step shared by all layers (the paper's nested-dropout-like sampling); afterwards any b ≤ r
is served without retraining: :func:`set_rank` (or the config field ``rank``) picks it.

Compile-friendly forward: b is a tensor buffer and truncation is a mask (arange(r) < b) times the
rank-r activation, never Python slicing on a sampled int. The next b is drawn by ``on_train_step``
(after every optimizer step) from a generator seeded with (``seed``, step), so runs are reproducible;
eval mode uses the inference rank ``rank`` (default r). Init as LoRA (A Kaiming-uniform, B = 0).

Departures (documented): every component ≤ b receives gradient (the paper's ablation also has a
"frozen" mode that updates only the b-th row/column; not implemented). On disk the adapter keeps all
r components; peft export writes a plain LoRA truncated at the current inference rank (r = b, scale α/b).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..config import MethodConfig
from ..core import part_adapters, slots, state
from ..errors import NotMergeableError, PeftlabError
from ..registry import register
from ..slot import adapter_key, linear_dims
from .checks import check_number
from .delta import DeltaAdapter


def sample_rank(seed: int, step: int, r_min: int, r: int) -> int:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return int(torch.randint(r_min, r + 1, (), generator=g))


class DyLoRALayer(DeltaAdapter):

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, rank: int, train_rank: int, dropout: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.alpha = float(alpha)
        self.register_buffer("rank", torch.tensor(rank))  # inference rank (saved)
        self.register_buffer("train_rank", torch.tensor(train_rank), persistent=False)
        self.register_buffer("_index", torch.arange(r), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _mask_scale(self) -> torch.Tensor:
        """(arange(r) < b)·α/b for the current b (training: sampled, eval: the inference rank)."""
        b = self.train_rank if self.training else self.rank
        return (self._index < b).to(self.lora_A.dtype) * (self.alpha / b)

    def forward(self, slot, base_fn, x):
        h = F.linear(self.dropout(x), self.lora_A) * self._mask_scale().to(x.dtype)
        return base_fn(x) + F.linear(h, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """ΔW_b = (α/b)·B[:, :b] A[:b] at the inference rank b."""
        m = (self._index < self.rank).to(self.lora_A.dtype) * (self.alpha / self.rank)
        return (self.lora_B * m) @ self.lora_A

    def to_peft_tensors(self):
        b = int(self.rank)
        return {"lora_A.weight": self.lora_A[:b], "lora_B.weight": self.lora_B[:, :b]}


def set_rank(model: nn.Module, rank: int, name: str = "default") -> None:
    """Serve DyLoRA adapter ``name`` at rank ``rank`` (1 ≤ rank ≤ r) from now on (saved with the adapter)."""
    cfg = state(model).configs.get(name)
    if not isinstance(cfg, DyLoRAConfig):
        raise PeftlabError(f"adapter {name!r} is not a DyLoRA adapter")
    check_number("set_rank", "rank", rank, lo=1, hi=cfg.r, integer=True)
    key = adapter_key(name)
    if any(key in s.merged for _, s in slots(model)):
        raise NotMergeableError(f"adapter {name!r} is merged; unmerge before set_rank")
    for _, a in part_adapters(model, key):
        a.rank.fill_(rank)
    cfg.rank = rank


@register
@dataclass
class DyLoRAConfig(MethodConfig):
    """Dynamic-rank LoRA. ``rank``: inference rank (None = r); ``r_min``: smallest sampled rank."""

    method = "dylora"
    default_roles = ("q", "v")
    peft_type = "LORA"  # exported as a plain LoRA truncated at the inference rank

    r: int = 8
    alpha: float | None = None
    r_min: int = 1
    rank: int | None = None
    dropout: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        check_number(name, "r", self.r, lo=1, integer=True)
        check_number(name, "r_min", self.r_min, lo=1, hi=self.r, integer=True)
        if self.rank is not None:
            check_number(name, "rank", self.rank, lo=1, hi=self.r, integer=True)
        if self.alpha is not None:
            check_number(name, "alpha", self.alpha, lo=0, lo_open=True)
        check_number(name, "dropout", self.dropout, lo=0, hi=1, hi_open=True)
        check_number(name, "seed", self.seed, lo=0, integer=True)

    def make_adapter(self, target, ctx):
        d_in, d_out = linear_dims(target.module)
        alpha = self.r if self.alpha is None else self.alpha
        return DyLoRALayer(d_in, d_out, self.r, alpha, self.rank or self.r,
                           sample_rank(self.seed, 0, self.r_min, self.r), self.dropout)

    def on_train_step(self, model, key, step, total_steps):
        b = sample_rank(self.seed, step, self.r_min, self.r)
        for _, a in part_adapters(model, key):
            a.train_rank.fill_(b)

    def formula_count(self, ctx) -> int:
        targets = ctx.targets
        return sum(self.r * sum(linear_dims(t.module)) for t in targets)

    def to_peft_fields(self, adapters):
        b = self.rank or self.r
        return {"r": b, "lora_alpha": self.r if self.alpha is None else self.alpha, "lora_dropout": self.dropout,
                "use_rslora": False, "use_dora": False}
