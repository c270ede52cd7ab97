"""The training loop: ``run(config) -> results``. Resumable, NaN-safe, distributed via accelerate.

Data order is a pure function of (seed, epoch), and the loop state (step, best score, patience,
history, RNG) is checkpointed, so a run killed at any point and resumed with ``resume=True`` ends
with the same metrics as an uninterrupted one. Under ``accelerate launch`` each global batch is
split across processes and gradients are averaged by DDP; evaluation runs on the main process. With
``train.fsdp: true`` the model is sharded instead (FSDP2, :mod:`peftlab.train.sharding`); forwards and
gathers are then collective, so every process evaluates and takes part in saving, and the main one writes.
The logged loss is the mean over the processes (the global batch's loss).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path

import torch

import peftlab

from .. import quant
from ..errors import PeftlabError
from ..lm_head import answer_loss, answer_scores
from . import checkpoint, fs, sharding
from . import resume as resume_check
from .config import ConfigError, RunConfig, load_config
from .data import (
    TaskData,
    collate,
    encode_choice_eval,
    encode_choice_train,
    encode_classification,
    load_task,
)
from .guard import DivergenceGuard, TrainingDivergedError, unhealthy
from .metrics import compute

log = logging.getLogger("peftlab.train")
__all__ = ["TrainingDivergedError", "build_model", "evaluate", "run"]


def _accelerator(cfg: RunConfig):
    try:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
    except ImportError:  # pragma: no cover
        return None
    # cpu=True on CPU-only machines makes launchers' WORLD_SIZE>1 a gloo process group (MULTI_CPU); there
    # accelerate ignores any FSDP request, and peftlab shards with torch's fully_shard (train/sharding.py)
    return Accelerator(cpu=not torch.cuda.is_available(),
                       fsdp_plugin=sharding.accelerate_plugin() if cfg.train.fsdp else None,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.train.find_unused_parameters)])


def build_model(cfg: RunConfig, data: TaskData, trust_remote_code: bool = False):
    """Tokenizer + backbone (head sized for the task) with the method attached. ``trust_remote_code`` only
    from the user's explicit ``--trust-remote-code`` flag; it is never read from, nor stored in, a config."""
    import re

    from .backbones import check_model_args, load_model, load_tokenizer, model_config

    task = "causal-lm" if data.kind == "choice" else ("regression" if data.kind == "regression" else "classification")
    name = cfg.model
    conf = model_config(name, trust_remote_code)  # validate against the config before loading any weights
    model_args = dict(cfg.model_args)
    scheme = model_args.pop("quantize", None)  # peftlab's own key: a quantized frozen base (peftlab.quant)
    check_model_args(name, conf, model_args)
    positions = getattr(conf, "max_position_embeddings", None)
    if isinstance(positions, int) and cfg.train.max_length > positions:
        raise ConfigError(f"train.max_length: {cfg.train.max_length} exceeds {name}'s max_position_embeddings ({positions})")
    tok = load_tokenizer(name, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    kwargs = model_args
    if task != "causal-lm" and data.label_names:
        kwargs.setdefault("id2label", dict(enumerate(data.label_names)))
        kwargs.setdefault("label2id", {v: k for k, v in enumerate(data.label_names)})
    model = load_model(name, task=task, num_labels=data.num_labels, trust_remote_code=trust_remote_code, **kwargs)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    if scheme is not None:
        quant.quantize(model, scheme)
        log.info("base quantized to %s: %s of linear weights", scheme,
                 ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in quant.linear_bytes(model).items()))
    if cfg.method != "full":
        try:
            peftlab.attach(model, peftlab.get_config(cfg.method, **cfg.method_args))
        except re.error as e:
            raise ConfigError(f"method_args: invalid regular expression ({e})") from None
    return model, tok


def _schedule(cfg: RunConfig, total: int):
    t = cfg.train
    warm = t.warmup_steps if t.warmup_steps is not None else int(round(t.warmup_ratio * total))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / max(warm, 1)
        if t.schedule == "constant":
            return 1.0
        frac = (step - warm) / max(total - warm, 1)
        return max(0.0, 1 - frac) if t.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    return f


@torch.no_grad()
def evaluate(model, tok, data: TaskData, cfg: RunConfig) -> dict[str, float]:
    model.eval()
    out: dict[str, float] = {}
    bs = cfg.train.eval_batch_size
    dev = next(model.parameters()).device
    from tqdm.auto import tqdm

    def chunks(n: int, what: str):
        return tqdm(range(0, n, bs), desc=f"eval {what}", unit="batch", leave=False, dynamic_ncols=True,
                    disable=not cfg.train.progress)
    for di, (dname, examples) in enumerate(data.dev.items()):
        prefix = "" if di == 0 else f"{dname}_"
        if data.kind == "choice":
            items = encode_choice_eval(tok, examples, cfg.train.max_length)
            best: dict[int, tuple[float, int]] = {}
            for i in chunks(len(items), dname):
                chunk = items[i : i + bs]
                b = {k: v.to(dev) for k, v in collate(chunk, tok.pad_token_id).items()}
                sc = answer_scores(model, b, cfg.task.length_normalize).cpu()
                for it, s in zip(chunk, sc.tolist()):
                    if it["q"] not in best or s > best[it["q"]][0]:
                        best[it["q"]] = (s, it["c"])
            preds = [best[q][1] for q in range(len(examples))]
            labels = [e.label for e in examples]
        else:
            items = encode_classification(tok, examples, cfg.train.max_length)
            preds, labels = [], []
            for i in chunks(len(items), dname):
                b = collate(items[i : i + bs], tok.pad_token_id, data.kind == "regression")
                labels += b.pop("labels").tolist()
                logits = model(**{k: v.to(dev) for k, v in b.items()}).logits.float().cpu()
                preds += (logits.squeeze(-1) if data.kind == "regression" else logits.argmax(-1)).tolist()
        out.update({prefix + k: v for k, v in compute(data.metrics, preds, labels).items()})
    model.train()
    return out


class _FirstEpoch:
    """The first epoch's global training batches in training order (re-iterable, collated lazily)."""

    def __init__(self, items: list, gbs: int, seed: int, pad_id: int, regression: bool):
        self.items, self.gbs, self.seed, self.pad_id, self.regression = items, gbs, seed, pad_id, regression

    def __iter__(self):
        perm = torch.randperm(len(self.items), generator=torch.Generator().manual_seed(self.seed * 1000)).tolist()
        for j in range(0, len(perm), self.gbs):
            yield collate([self.items[i] for i in perm[j : j + self.gbs]], self.pad_id, self.regression)


def _peak_mem_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(source, overrides: list[str] | None = None, resume: bool = False, trust_remote_code: bool = False) -> dict:
    """Train and evaluate as configured; returns (and writes) the results.

    The run directory is locked for the whole run (a second process on it gets :class:`RunLockedError`);
    with ``resume`` the configuration is checked against the run's before anything is written."""
    cfg = source if isinstance(source, RunConfig) else load_config(source, overrides)
    acc = _accelerator(cfg)
    main = (acc.process_index if acc else 0) == 0
    out = Path(cfg.output_dir)
    lock, handler = None, None
    try:
        if main:
            out.mkdir(parents=True, exist_ok=True)
            lock = fs.lock_run(out)
            ckpt = checkpoint.find(out)
            if ckpt is not None and not resume:
                raise PeftlabError(f"{out} already holds a run checkpoint; pass --resume to continue it or pick another output_dir")
            notes = resume_check.check(out, cfg.to_dict()) if resume else []
            fs.write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
            handler = logging.FileHandler(out / "train.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            for line in notes:
                log.info(line)
        return _train(cfg, acc, resume, trust_remote_code)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        fs.unlock_run(lock)


def _train(cfg: RunConfig, acc, resume: bool, trust_remote_code: bool) -> dict:
    t = cfg.train
    world = acc.num_processes if acc else 1
    rank = acc.process_index if acc else 0
    main = rank == 0
    out = Path(cfg.output_dir)
    ckpt = checkpoint.find(out)
    torch.manual_seed(t.seed)
    data = load_task(cfg)
    model, tok = build_model(cfg, data, trust_remote_code)
    model.train()
    if data.kind == "choice":
        train_items = encode_choice_train(tok, data.train, t.max_length)
    else:
        train_items = encode_classification(tok, data.train, t.max_length)
    gbs = t.batch_size * world
    per_epoch = max(1, len(train_items) // gbs if world > 1 else math.ceil(len(train_items) / gbs))
    # methods that choose what to train from the data (FishMask) do it now, on the first epoch's global
    # batches (the same on every process), before the optimizer exists
    peftlab.before_training(model, _FirstEpoch(train_items, gbs, t.seed, tok.pad_token_id, data.kind == "regression"),
                            (lambda m, b: answer_loss(m, b, m)) if data.kind == "choice" else None)
    # sharding comes after the data-driven choice above (it sees the whole model on every process)
    by_acc = sharding.by_accelerate(acc)
    # FSDP: every process evaluates and takes part in saving (forwards and gathers are collective)
    sharded = by_acc or (sharding.requested(cfg.train.fsdp) and world > 1)
    if sharded and not by_acc:
        units = sharding.shard(model, acc.device.type, world)
        if main:
            mine, whole = sharding.held_bytes(model)
            log.info("FSDP2 (torch fully_shard; accelerate does not shard on %s): %d blocks + root over %d processes; "
                     "this process holds %d of %d parameter bytes", acc.device.type, units, world, mine, whole)
    elif sharding.requested(cfg.train.fsdp) and world == 1 and main:
        log.info("train.fsdp: one process, nothing to shard; training unsharded")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # one group per (lr, weight decay): no decay on biases and norms; methods' wishes (LoRA+: B at λ·lr)
    opt = torch.optim.AdamW(peftlab.param_groups(model, lr=t.lr, weight_decay=t.weight_decay),
                            lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps)
    steps_per_epoch = max(1, per_epoch // t.grad_accum)
    total = t.max_steps if t.max_steps is not None else max(1, int(round(t.epochs * steps_per_epoch)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total))
    eval_steps = {s for s in range(1, total + 1) if (t.eval_every and s % t.eval_every == 0) or (not t.eval_every and s % steps_per_epoch == 0)}
    eval_steps.add(total)
    metric = t.metric or (data.metrics[0] if data.kind != "choice" else "accuracy")
    names = [(f"{d}_" if i else "") + m for i, d in enumerate(data.dev) for m in data.metrics]
    if metric not in names:  # checked before training, not at the first evaluation
        raise ConfigError(f"train.metric {metric!r} is not one of the task's metrics {names}")
    state = {"step": 0, "best": None, "best_step": None, "bad_evals": 0, "history": [], "train_time": 0.0, "loss_sum": 0.0,
             "loss_n": 0, "guard": {}}
    if acc and not (sharded and not by_acc):  # DDP, or accelerate's FSDP (it shards here)
        model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model) if acc else model
    if sharded:  # the sharded parameters replaced the model's own
        params = {n: p for n, p in raw.named_parameters() if p.requires_grad}
    if resume and ckpt is not None:
        state = checkpoint.load(ckpt, params, opt)  # restores the optimizer's current lr too
        sched.last_epoch = state["step"]
        if main:
            log.info("resumed from %s at step %d", ckpt, state["step"])
            fs.write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in state["history"]))
    elif main:
        fs.write_text(out / "metrics.jsonl", "")
    device = acc.device if acc else torch.device("cpu")
    regression = data.kind == "regression"

    def micro_batch(k: int) -> dict:
        epoch, j = divmod(k, per_epoch)
        perm = torch.randperm(len(train_items), generator=torch.Generator().manual_seed(t.seed * 1000 + epoch))
        idx = perm[j * gbs : (j + 1) * gbs].tolist()
        mine = idx[rank * t.batch_size : (rank + 1) * t.batch_size] if world > 1 else idx
        return {k: v.to(device) for k, v in collate([train_items[i] for i in mine], tok.pad_token_id, regression).items()}

    probe = micro_batch(0) if train_items else None  # fixed batch on which a checkpoint's outputs must be finite
    guard = DivergenceGuard(state=state.get("guard"))

    def stop_diverged(reason: str, step: int) -> None:
        last = checkpoint.find(out)
        msg = (f"{reason} at step {step}: training diverged and stopped. Last good checkpoint: {last if last else 'none yet'}"
               f"{'; best adapter: ' + str(out / 'best') if (out / 'best').is_dir() else ''}. Try a lower learning rate "
               f"(train.lr={t.lr}) or gradient clipping (train.max_grad_norm).")
        if main:
            log.error(msg)
        raise TrainingDivergedError(msg)

    def check_saveable(step: int) -> None:
        why = unhealthy(raw, {n: p for n, p in raw.named_parameters() if p.requires_grad}, probe)
        if why:
            stop_diverged(f"{why}; nothing saved", step)

    bar = None
    t_start, step_start, log_sum, log_n = time.perf_counter(), state["step"], 0.0, 0
    if main and t.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=state["step"], desc=f"{cfg.method} {cfg.task.name}", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter() - state["train_time"]
    stopped_early = False
    while state["step"] < total:
        step = state["step"]
        loss_val = 0.0
        for m in range(t.grad_accum):
            batch = micro_batch(step * t.grad_accum + m)
            # multiple choice: the LM head runs on the answer tokens only (peftlab/lm_head.py)
            loss = answer_loss(model, batch, raw) if data.kind == "choice" else model(**batch).loss
            extra = peftlab.training_loss(raw)
            if extra is not None:
                loss = loss + extra
            if not torch.isfinite(loss.detach()):
                stop_diverged(f"non-finite loss ({loss.item()})", step + 1)
            (acc.backward(loss / t.grad_accum) if acc else (loss / t.grad_accum).backward())
            loss_val += loss.item() / t.grad_accum
        if world > 1:  # the global batch's loss: every process logs and checks the same value
            loss_val = float(acc.reduce(torch.tensor([loss_val], device=device), reduction="mean").item())
        # the gradient norm is measured every step (max_norm inf: no clipping) for the divergence check
        grad_norm = sharding.full((acc.clip_grad_norm_ if acc else torch.nn.utils.clip_grad_norm_)(
            list(params.values()), t.max_grad_norm or float("inf")))
        why = guard.check(loss_val, float(grad_norm))
        if why:
            stop_diverged(why, step + 1)
        peftlab.before_optimizer_step(raw, step, total)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state["step"] = step = step + 1
        peftlab.on_train_step(raw, step, total)
        state["loss_sum"] += loss_val
        state["loss_n"] += 1
        state["guard"] = guard.state()
        log_sum, log_n = log_sum + loss_val, log_n + 1
        if main and t.log_every and step % t.log_every == 0:
            rate = (step - step_start) / max(time.perf_counter() - t_start, 1e-9)
            log.info("step %d/%d loss %.4f lr %.3e %.2f steps/s ETA %s", step, total, log_sum / log_n,
                     sched.get_last_lr()[0], rate, _eta((total - step) / max(rate, 1e-9)))
            log_sum, log_n = 0.0, 0
        if bar is not None:
            bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            bar.update(1)
        save_now = t.save_every is not None and step % t.save_every == 0
        if step in eval_steps:
            if acc:
                acc.wait_for_everyone()
            if main or sharded:
                metrics = evaluate(raw, tok, data, cfg)
                rec = {"step": step, "epoch": step / steps_per_epoch, "train_loss": state["loss_sum"] / max(state["loss_n"], 1), **metrics}
                state["loss_sum"], state["loss_n"] = 0.0, 0
                state["history"].append(rec)
                if main:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    log.info("eval %s", json.dumps(rec))
                score = metrics.get(metric)
                if score is None:
                    raise PeftlabError(f"train.metric {metric!r} is not one of the task's metrics {sorted(metrics)}")
                if not peftlab.checkpoint_eligible(raw, step, total):
                    pass  # e.g. PST before its sparsity schedule ends: neither best nor counted for patience
                elif state["best"] is None or score > state["best"]:
                    check_saveable(step)
                    state.update(best=score, best_step=step, bad_evals=0, best_metrics=metrics)
                    _save_best(raw, out, cfg, write=main)
                else:
                    state["bad_evals"] += 1
            save_now = True
        if save_now and (main or sharded):
            check_saveable(step)
            state["train_time"] = time.perf_counter() - t0
            checkpoint.save(out, {n: p for n, p in raw.named_parameters() if p.requires_grad}, opt, state, write=main)
        if acc and save_now:
            acc.wait_for_everyone()
        if t.patience is not None and step in eval_steps:
            stop = state["bad_evals"] >= t.patience
            if acc and world > 1:  # only the main process evaluates: every process must agree to stop
                from accelerate.utils import broadcast

                stop = bool(broadcast(torch.tensor([int(stop)], device=device), from_process=0).item())
            if stop:
                stopped_early = True
                break
    if bar is not None:
        bar.close()
    train_time = time.perf_counter() - t0
    if not main:
        return {}
    final = state["history"][-1] if state["history"] else {}
    rep = peftlab.report(raw) if cfg.method != "full" else None
    results = {
        "task": cfg.task.name, "method": cfg.method, "model": cfg.model,
        "final": {k: v for k, v in final.items() if k not in ("step", "epoch", "train_loss")},
        "best": state.get("best_metrics"), "best_step": state["best_step"], "metric": metric,
        "steps": state["step"], "total_steps": total, "stopped_early": stopped_early,
        "trainable_params": sum(p.numel() for p in raw.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in raw.parameters()),
        "adapter_params": sum(r.params for r in rep.adapters) if rep else None,
        "train_time_s": train_time, "steps_per_s": state["step"] / max(train_time, 1e-9),
        "peak_memory_mb": _peak_mem_mb(), "world_size": world,
        "train_examples": len(train_items),
    }
    fs.write_text(out / "results.json", json.dumps(results, indent=2))
    log.info("results %s", json.dumps(results))
    return results


def _eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _save_best(model, out: Path, cfg: RunConfig, write: bool = True) -> None:
    """Write ``out/best`` atomically: into ``best.tmp``, then swapped in. A sharded model's full tensors are
    gathered on every process (collective); only ``write`` (the main process) writes."""
    tmp = out / "best.tmp"
    if write:
        fs.remove(tmp, out)
    if cfg.method == "full":
        own = model.state_dict()
        full = {k: sharding.full(v) for k, v in own.items()}
        if write:  # the gathered state only where the model is sharded (else transformers' own handling)
            model.save_pretrained(tmp, safe_serialization=True,
                                  state_dict=full if any(full[k] is not own[k] for k in own) else None)
    else:
        peftlab.save(model, tmp, write=write)
    if write:
        fs.swap_dir(tmp, out / "best", out)
