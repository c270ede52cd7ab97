"""Memory planner: peak training memory of a model with its adapters, before any training.

``plan(model, batch_size, seq_len)`` splits the peak of one training step into

- **weights**: every parameter and buffer by storage kind (``float32``, ``bfloat16``, ``nf4``, ``int8`` ...;
  quantized linears count their packed storage and statistics);
- **trainable** parameters, their **gradients** (same dtype) and the **optimizer state** (AdamW: two fp32
  moments per trainable entry, SGD with momentum: one, plain SGD: none);
- **activations**: the most bytes of tensors autograd holds for the backward pass at any one time, counted
  once per storage and without the parameters it also saves, measured by two probe steps (forward and
  backward, batches 2 and 3, no optimizer) under ``torch.autograd.graph.saved_tensors_hooks``: their
  difference is the per-sample part, the rest is what does not grow with the batch (a weight the method
  rebuilds and saves: PST's masked weight, GOFT's rotated one). Whatever a method does to its saved tensors
  is seen as it is (MEFT's reversible stack saves almost nothing, a quantized base saves what bitsandbytes
  saves, LoRA-FA does not save x ...), so no per-method table has to be kept;
- **backward working space**: everything else alive at the step's peak: the gradients flowing back, the
  blocks MEFT recomputes, the parameter gradients accumulated so far. The same two probe steps run under a
  ``TorchDispatchMode`` that counts every storage an operator returns until it is freed. Both steps
  allocate in the same order, so the i-th allocation is the same moment of the step at any batch: the bytes
  alive then are a line ``fixed + per_sample * b``, and the step's peak at batch b is the highest of these
  lines (their upper envelope, kept in ``step_lines``). The peak can move with the batch: full fine-tuning
  of MiniLM peaks at the end of the backward pass at batch 1 (all gradients) and early in it at batch 8
  (all activations). A batch of 1 is not probed because it can take other kernels than larger batches.

``peak = weights + optimizer + max(step peak, gradients + step workspace)``: the optimizer step needs the
gradients plus one trainable-sized workspace. ``max_batch(budget)`` is the largest batch whose peak fits
``budget`` bytes. The probe runs on a deep copy when a ``config`` is given; without one it restores the
gradients it leaves, so the caller's model is untouched either way. Measured against real steps (RSS of
separate processes): ``benchmarks/memory_plan.py`` (predicted vs measured tables in
benchmarks/results/memory_plan_*.md). The earlier rule (backward working space = the largest saved tensor
once more, or a recomputed block once more) was off by up to 24% (MEFT, seq 512) and 12% (SmolLM2's logits).
"""

from __future__ import annotations

import copy
import re
import weakref
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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
    working_fixed: int = 0  # other batch-independent tensors alive at the step's peak (gradients so far)
    step_lines: list = field(default_factory=list)  # (fixed, per-sample) bytes of the step's candidate peaks

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
        step = max((f + s * b for f, s in self.step_lines), default=0)
        backward = step - self.activations_fixed
        return self.fixed + max(backward, self.gradients + self.trainable_bytes - self.activations_fixed)

    def max_batch(self, budget: int | str) -> int:
        """The largest batch whose predicted peak fits ``budget`` (0 if not even one sample does)."""
        budget = parse_bytes(budget)
        if self.peak(1) > budget:
            return 0
        hi = 1
        while self.peak(hi * 2) <= budget:
            hi *= 2
            if hi >= 1 << 30:
                return 10**9
        lo, hi = hi, hi * 2  # peak(lo) fits, peak(hi) does not; the peak never falls as the batch grows
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.peak(mid) <= budget else (lo, mid)
        return lo

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(weight_bytes=self.weight_bytes, activations_bytes=self.activations(), peak_bytes=self.peak())
        return d

    def table(self, budget: int | str | None = None) -> str:
        rows = [(f"weights ({k})", v) for k, v in sorted(self.weights.items())]
        rows += [(f"trainable parameters ({self.trainable_params:,})", self.trainable_bytes),
                 ("gradients", self.gradients), (f"optimizer state ({self.optimizer})", self.optimizer_state),
                 (f"saved activations (batch {self.batch_size}, seq {self.seq_len})", self.activations()),
                 ("backward working space", self.transient_per_sample * self.batch_size + self.working_fixed),
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
                del self.live[ptr]


class _LiveBytes(TorchDispatchMode):
    """Bytes of every distinct storage an operator has produced and that is still alive, and the most at once:
    activations, the gradients flowing back, the recomputed blocks and the working tensors of the backward
    pass, seen at the dispatcher, so no method needs a rule of its own. A storage is counted from the
    operator that returns it until it is freed (a weakref finalizer); parameters and buffers are not."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude, self.live, self.now, self.peak, self.timeline = exclude, {}, 0, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                ptr = s.data_ptr()
                if ptr == 0 or ptr in self.live or ptr in self.exclude:
                    continue
                self.live[ptr] = s.nbytes()
                self.now += self.live[ptr]
                self.peak = max(self.peak, self.now)
                self.timeline.append(self.now)
                weakref.finalize(s, self._free, ptr)
        return out

    def _free(self, ptr):
        self.now -= self.live.pop(ptr, 0)


def step_bytes(model: nn.Module, inputs: dict, loss_fn=None) -> tuple[int, list[int]]:
    """One probe step (forward and backward, no optimizer) seen two ways at once: (saved-tensor peak, bytes of
    all tensors alive right after each allocation, gradients included). The caller's gradients are put back."""
    ledger_params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    tracker = _LiveBytes(ledger_params)
    try:
        with tracker:
            saved, _ = saved_activation_bytes(model, inputs, loss_fn=loss_fn)
    finally:
        for p, g in zip(params, grads):
            p.grad = g
    return saved, tracker.timeline


def saved_activation_bytes(model: nn.Module, inputs: dict, loss_fn=None):
    """(the most bytes autograd held at once in saved tensors over one forward *and backward*, the largest
    single saved storage), parameters and buffers excluded. Tensors saved while the backward pass recomputes
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
            if loss.requires_grad:
                loss.backward()
            del loss
    finally:
        for p, g in zip(params, grads):
            p.grad = g
    return ledger.peak, ledger.largest


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
        # batches 2 and 3: a batch of 1 can take other kernels (fewer allocations) than the batch to plan
        two, live2 = step_bytes(model, probe_inputs(model, 2, seq_len, scored_tokens), loss_fn)
        three, live3 = step_bytes(model, probe_inputs(model, 3, seq_len, scored_tokens), loss_fn)
    finally:
        model.train(was_training)
    per_sample = max(three - two, 0)
    fixed_saved = max(two - 2 * per_sample, 0)
    lines = _envelope(live2, live3, 2)
    live_fixed, live_per_sample = max(lines, key=lambda ln: ln[0] + ln[1] * batch_size)
    return MemoryPlan(batch_size=batch_size, seq_len=seq_len, optimizer=optimizer,
                      weights=_weights_by_kind(model), trainable_params=n_train, trainable_bytes=train_bytes,
                      gradients=train_bytes, optimizer_state=OPTIMIZER_MOMENTS[optimizer] * n_train * 4,
                      activations_per_sample=per_sample, activations_fixed=fixed_saved,
                      transient_per_sample=max(live_per_sample - per_sample, 0),
                      working_fixed=max(live_fixed - fixed_saved, 0), step_lines=lines)


def _envelope(live1: list[int], live2: list[int], batch: int = 1) -> list[tuple[int, int]]:
    """The probe steps at batch ``batch`` and ``batch + 1`` allocate in the same order, so allocation i is the
    same moment of the step in both: the bytes alive then at batch b are ``f + s * b`` with
    s = live2[i] - live1[i] and f = live1[i] - batch * s. The step's peak at batch b is the largest of these lines; keep the ones that are the
    largest for some b >= 1 (the upper envelope). Were the two steps to allocate differently (data-dependent
    shapes), fall back to one line through the two peaks."""
    if len(live1) != len(live2) or not live1:
        p1, p2 = max(live1, default=0), max(live2, default=0)
        s = max(p2 - p1, 0)
        return [(max(p1 - batch * s, 0), s)]
    best: dict[int, int] = {}
    for a, b in zip(live1, live2):
        s = max(b - a, 0)
        f = a - batch * s
        if f > best.get(s, -(1 << 62)):
            best[s] = f
    hull: list[tuple[int, int]] = []  # (f, s), slopes increasing; value at b=1 decides the first line
    for s in sorted(best):
        f = best[s]
        while hull:
            f0, s0 = hull[-1]
            if f0 + s0 <= f + s:  # the steeper line is at least as high from b = 1 on
                hull.pop()
                continue
            if len(hull) >= 2:
                f1, s1 = hull[-2]
                # the middle line (f0, s0) never leads if (f1, s1) and (f, s) cross above it
                if (f - f1) * (s0 - s1) >= (f0 - f1) * (s - s1):
                    hull.pop()
                    continue
            break
        hull.append((f, s))
    return [(max(f, 0), s) for f, s in hull]
