"""Memory planner: peak training memory of a model with its adapters, before any training.

``plan(model, batch_size, seq_len)`` splits the peak of one training step into

- **weights**: every parameter and buffer by storage kind (``float32``, ``bfloat16``, ``nf4``, ``int8`` ...;
  quantized linears count their packed storage and statistics);
- **trainable** parameters, their **gradients** (same dtype) and the **optimizer state** (AdamW: two fp32
  moments per trainable entry, SGD with momentum: one, plain SGD: none);
- **activations**: the most bytes of tensors autograd holds for the backward pass at any one time, counted
  once per storage and without the parameters it also saves, measured by two probe steps (forward and
  backward, batch 1 and 2, no optimizer) under ``torch.autograd.graph.saved_tensors_hooks``: their difference is the per-sample part, the rest is what
  does not grow with the batch (a weight the method rebuilds and saves: PST's masked weight, GOFT's rotated
  one). Whatever a method does to
  its saved tensors is seen as it is (MEFT's reversible stack saves almost nothing, a quantized base saves
  what bitsandbytes saves, LoRA-FA does not save x ...), so no per-method table has to be kept;
- **transient**: the working space of the backward pass: the largest single saved tensor once more (the
  gradient that flows back through it, e.g. the logits' gradient of a causal LM), or, for methods that
  recompute activations in the backward pass (MEFT), what the recomputation saves at once, once more for the
  gradients that flow through it, whichever is larger.

``peak = weights + optimizer + max(activations + transient, gradients + step workspace)``: the backward
pass starts with every saved activation alive and no gradient yet, and ends with every gradient and no
activation; the optimizer step then needs the gradients plus one trainable-sized workspace (``foreach``
AdamW). Measured against real steps this is within a few percent where the old sum of all terms
over-predicted full fine-tuning by 16%. ``max_batch(budget)`` is the largest
batch whose peak fits ``budget`` bytes. The probe runs forward and backward on batches of 1 and 2 (no optimizer step),
on a deep copy when a ``config`` is given; without one it restores the gradients it leaves, so the caller's
model is untouched either way. Measured against real steps:
``benchmarks/memory_plan.py`` (predicted vs measured table in benchmarks/results/memory_plan.md).
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import quant
from .errors import PeftlabError

OPTIMIZER_MOMENTS = {"adamw": 2, "adam": 2, "sgd": 0, "sgd_momentum": 1}
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """``"8GiB"``, ``"512 MB"``, ``"1.5g"`` or a number of bytes -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise PeftlabError(f"memory budget must be positive, got {text!r}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise PeftlabError(f"cannot read memory size {text!r}; use e.g. 8GiB, 512MB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class MemoryPlan:
    batch_size: int
    seq_len: int
    optimizer: str
    weights: dict[str, int] = field(default_factory=dict)  # storage kind -> bytes
    trainable_params: int = 0
    trainable_bytes: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations_per_sample: int = 0
    transient_per_sample: int = 0
    activations_fixed: int = 0  # saved tensors that do not grow with the batch (rebuilt weights)

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def fixed(self) -> int:
        """What does not grow with the batch: weights, optimizer state, batch-independent saved tensors."""
        return self.weight_bytes + self.optimizer_state + self.activations_fixed

    def activations(self, batch_size: int | None = None) -> int:
        return self.activations_fixed + self.activations_per_sample * (batch_size or self.batch_size)

    def peak(self, batch_size: int | None = None) -> int:
        b = batch_size or self.batch_size
        backward = (self.activations_per_sample + self.transient_per_sample) * b
        return self.fixed + max(backward, self.gradients + self.trainable_bytes - self.activations_fixed)

    def max_batch(self, budget: int | str) -> int:
        """The largest batch whose predicted peak fits ``budget`` (0 if not even one sample does)."""
        budget = parse_bytes(budget)
        if self.fixed + self.gradients + self.trainable_bytes > budget:
            return 0
        per = self.activations_per_sample + self.transient_per_sample
        return max(0, int((budget - self.fixed) // per)) if per else 10**9

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(weight_bytes=self.weight_bytes, activations_bytes=self.activations(), peak_bytes=self.peak())
        return d

    def table(self, budget: int | str | None = None) -> str:
        rows = [(f"weights ({k})", v) for k, v in sorted(self.weights.items())]
        rows += [(f"trainable parameters ({self.trainable_params:,})", self.trainable_bytes),
                 ("gradients", self.gradients), (f"optimizer state ({self.optimizer})", self.optimizer_state),
                 (f"saved activations (batch {self.batch_size}, seq {self.seq_len})", self.activations()),
                 ("backward working space", self.transient_per_sample * self.batch_size),
                 ("optimizer-step working space", self.trainable_bytes),
                 ("predicted peak", self.peak())]
        out = "\n".join(f"{name:<48} {fmt_bytes(v):>12}" for name, v in rows)
        if budget is not None:
            out += f"\n{'largest batch within ' + fmt_bytes(parse_bytes(budget)):<48} {self.max_batch(budget):>12}"
        return out


def _weights_by_kind(model: nn.Module) -> dict[str, int]:
    kinds: dict[str, int] = {}
    seen: set[int] = set()
    quantized = [m for m in model.modules() if quant.is_quantized(m) and type(m).__name__ != "Slot"]
    for m in quantized:
        b = quant.linear_bytes(nn.Sequential(m))["quantized"]
        kind = quant.scheme_of(m)
        kinds[kind] = kinds.get(kind, 0) + b
        seen.add(m.weight.data_ptr())
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        kind = str(t.dtype).removeprefix("torch.")
        kinds[kind] = kinds.get(kind, 0) + t.numel() * t.element_size()
    return kinds


def probe_inputs(model: nn.Module, batch_size: int, seq_len: int, scored_tokens: int | None = None) -> dict:
    """Random token inputs (and labels, so the loss is part of the graph) of the given shape. Causal LMs:
    ``scored_tokens`` = k labels only the last k tokens of each row (multiple-choice answers)."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (batch_size, seq_len), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if any(type(model).__name__.endswith(s) for s in ("ForCausalLM", "LMHeadModel")):
        out["labels"] = ids.clone()
        if scored_tokens is not None:
            out["labels"][:, : max(seq_len - scored_tokens, 0)] = -100
    elif type(model).__name__.endswith("ForSequenceClassification"):
        n = getattr(cfg, "num_labels", 2)
        out["labels"] = torch.zeros(batch_size, dtype=torch.float if n == 1 else torch.long)
    maxpos = getattr(cfg, "max_position_embeddings", None)
    if maxpos is not None and seq_len > maxpos:
        raise PeftlabError(f"seq_len {seq_len} is beyond the model's {maxpos} positions")
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in out.items()}


class _Saved:
    """What autograd keeps for a saved tensor while the probe runs: releases its storage's count when the
    graph node that holds it is freed."""

    __slots__ = ("tensor", "ptr", "ledger")

    def __init__(self, tensor, ptr, ledger):
        self.tensor, self.ptr, self.ledger = tensor, ptr, ledger

    def __del__(self):
        self.ledger.release(self.ptr)


class _Ledger:
    """Bytes of the distinct storages autograd holds right now, and the most it held at once."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.live, self.now, self.peak, self.largest = exclude, {}, 0, 0, 0
        self.backward = False  # set once the forward is done: what is saved from then on is recomputation
        self.recomputed = 0  # bytes saved during the backward pass (recomputed activations), at most at once
        self._recomputing = 0

    def pack(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return t
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr == 0 or ptr in self.exclude:
            return t
        entry = self.live.setdefault(ptr, [0, s.nbytes()])
        if entry[0] == 0:
            self.now += entry[1]
            self.peak = max(self.peak, self.now)
            if self.backward:
                self._recomputing += entry[1]
                self.recomputed = max(self.recomputed, self._recomputing)
                entry.append(True)
        entry[0] += 1
        self.largest = max(self.largest, entry[1])
        return _Saved(t, ptr, self)

    @staticmethod
    def unpack(x):
        return x.tensor if isinstance(x, _Saved) else x

    def release(self, ptr):
        entry = self.live.get(ptr)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.now -= entry[1]
                if len(entry) > 2:
                    self._recomputing -= entry[1]
                del self.live[ptr]


def saved_activation_bytes(model: nn.Module, inputs: dict, recomputed: bool = False, loss_fn=None):
    """(the most bytes autograd held at once in saved tensors over one forward *and backward*, the largest
    single saved storage[, the most bytes saved at once by recomputation in the backward pass]), parameters
    and buffers excluded. Tensors saved while the backward pass recomputes
    (MEFT's reversible blocks, GOFT's recomputed rotations) count while they live. Gradients the probe leaves
    on parameters are put back as they were."""
    ledger = _Ledger({t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())})
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    try:
        with torch.autograd.graph.saved_tensors_hooks(ledger.pack, ledger.unpack):
            if loss_fn is not None:
                loss = loss_fn(model, inputs)
            else:
                out = model(**inputs)
                loss = out.loss if getattr(out, "loss", None) is not None else out[0].float().pow(2).mean()
                del out
            ledger.backward = True
            if loss.requires_grad:
                loss.backward()
            del loss
    finally:
        for p, g in zip(params, grads):
            p.grad = g
    return (ledger.peak, ledger.largest, ledger.recomputed) if recomputed else (ledger.peak, ledger.largest)


def plan(model: nn.Module, config=None, batch_size: int = 8, seq_len: int = 128, optimizer: str = "adamw",
         scored_tokens: int | None = None,
         trainable_dtype: torch.dtype | None = None) -> MemoryPlan:
    """Predict the peak training memory of ``model`` (with ``config`` attached to a copy, if given).
    ``scored_tokens``: causal LMs trained on the last k tokens only (multiple-choice QA), with the LM head run
    on those only (:mod:`peftlab.lm_head`), as ``peftlab train`` does."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PeftlabError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise PeftlabError(f"seq_len must be a positive integer, got {seq_len!r}")
    if optimizer not in OPTIMIZER_MOMENTS:
        raise PeftlabError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZER_MOMENTS)}")
    if config is not None:
        from .core import attach

        model = attach(copy.deepcopy(model), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    train_bytes = sum(p.numel() * p.element_size() for p in trainable)
    was_training = model.training
    model.train()
    try:
        # multiple-choice training scores the answer tokens only, and runs the LM head on those only
        loss_fn = None
        if scored_tokens is not None:
            from .lm_head import answer_loss as loss_fn
        one, largest, re1 = saved_activation_bytes(model, probe_inputs(model, 1, seq_len, scored_tokens),
                                                   recomputed=True, loss_fn=loss_fn)
        two, largest2, re2 = saved_activation_bytes(model, probe_inputs(model, 2, seq_len, scored_tokens),
                                                    recomputed=True, loss_fn=loss_fn)
    finally:
        model.train(was_training)
    per_sample = max(two - one, 0)
    return MemoryPlan(batch_size=batch_size, seq_len=seq_len, optimizer=optimizer,
                      weights=_weights_by_kind(model), trainable_params=n_train, trainable_bytes=train_bytes,
                      gradients=train_bytes, optimizer_state=OPTIMIZER_MOMENTS[optimizer] * n_train * 4,
                      activations_per_sample=per_sample, activations_fixed=max(one - per_sample, 0),
                      transient_per_sample=max(largest2 - largest, re2 - re1, 0))
