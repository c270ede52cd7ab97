"""Run configuration (YAML) with strict validation: unknown keys and wrong types name the key.

    model: minilm                 # HF name or path, or the short names minilm / smollm2-135m
    method: lora                  # a registered method, or "full" (full fine-tuning baseline)
    method_args: {r: 8, targets: [q, v]}
    task: {name: sst2, data_dir: ../shared/data/glue, train_limit: 8000}
    train: {epochs: 1, batch_size: 32, lr: 5.0e-4, max_length: 128, warmup_ratio: 0.06}
    output_dir: runs/sst2-lora

Overrides on the command line use dotted keys: ``train.lr=1e-3 method_args.r=16``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import _coerce
from ..errors import ConfigError


@dataclass
class TaskConfig:
    name: str = "sst2"  # GLUE task, QA task (arc_easy ...), "table" (CSV/JSONL) or "demo"
    data_dir: str | None = None  # GLUE/QA root or task folder; None = ../shared/data beside the checkout
    train_file: str | None = None  # for "table" tasks (and to override a task's default files)
    dev_file: str | None = None
    text_columns: list[str] | None = None  # None: every column but the label (at most 2), in file order
    label_column: str = "label"
    labels: list[str] | None = None  # label strings of a "table" task, in class order
    regression: bool = False
    train_limit: int | None = None  # fixed seeded subset of the training set
    eval_limit: int | None = None
    subset_seed: int = 0
    length_normalize: bool = True  # QA: score choices by mean log-likelihood per token
    from_hub: bool = False  # GLUE via `datasets` from the Hugging Face hub (needs the network)


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    grad_accum: int = 1
    lr: float = 5e-4
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.06
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_length: int = 128
    seed: int = 42
    eval_every: int | None = None  # steps; None = at the end of every epoch
    save_every: int | None = None  # checkpoint for --resume every N steps (None = at each evaluation)
    patience: int | None = None  # early stopping: evaluations without improvement
    metric: str | None = None  # metric that selects the best checkpoint (default: the task's first)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    find_unused_parameters: bool = False  # DDP option (needed by methods with side-effect gradients)
    fsdp: bool = False  # shard the model across processes (FSDP2) instead of replicating it (DDP); docs/training.md
    progress: bool = True
    log_every: int | None = 50  # steps between train.log lines (loss, lr, steps/s, ETA); None = off


@dataclass
class RunConfig:
    model: str = "minilm"
    method: str = "lora"
    method_args: dict[str, Any] = field(default_factory=dict)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/run"
    model_args: dict[str, Any] = field(default_factory=dict)  # extra from_pretrained kwargs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _allows_none(tp) -> bool:
    return tp is type(None) or tp is Any or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                                             and type(None) in typing.get_args(tp))


def _build(cls, data: dict, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - names))
    if unknown:
        where = ", ".join(f"{path}.{k}" if path else k for k in unknown)
        raise ConfigError(f"unknown config key(s): {where}; valid keys{' of ' + path if path else ''}: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in data.items():
        key = f"{path}.{k}" if path else k
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v or {}, key)
            continue
        if v is None and not _allows_none(tp):
            raise ConfigError(f"{key}: null is not allowed here")
        try:
            kwargs[k] = _coerce(tp, v, key)
        except TypeError as e:
            raise ConfigError(str(e)) from None
    return cls(**kwargs)


def _parse_value(key: str, text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {text!r} is not valid YAML ({' '.join(str(e).split())})") from None


def read_mapping(path: str | Path, what: str = "config") -> dict:
    """The top-level mapping of a YAML (or JSON) file; refuses a missing, binary, empty or non-mapping file."""
    from . import fs

    p = Path(path)
    text = fs.read_text(p, f"{what} file", ConfigError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({' '.join(str(e).split())})") from None
    if data is None or data == {}:
        raise ConfigError(f"{p}: empty {what} file; see docs/training.md for the keys")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        key, val = ov.split("=", 1)
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {ov!r}: empty key part")
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a mapping")
        node[parts[-1]] = _parse_value(key, val)
    return data


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _opt(check):
    return lambda v: v is None or check(v)


def _at_least(lo):
    return lambda v: _int(v) and v >= lo


def _positive(v) -> bool:
    return _num(v) and v > 0


# key -> (what a valid value is, check). One table, one check function (validate).
RULES: dict[str, tuple[str, typing.Callable]] = {
    "train.epochs": ("a finite number >= 0 (> 0 unless train.max_steps is set)", lambda v: _num(v) and v >= 0),
    "train.max_steps": ("null or an integer >= 0", _opt(_at_least(0))),
    "train.batch_size": ("an integer >= 1", _at_least(1)),
    "train.eval_batch_size": ("an integer >= 1", _at_least(1)),
    "train.grad_accum": ("an integer >= 1", _at_least(1)),
    "train.lr": ("a finite number > 0", _positive),
    "train.warmup_ratio": ("a number in [0, 1)", lambda v: _num(v) and 0 <= v < 1),
    "train.warmup_steps": ("null or an integer >= 0", _opt(_at_least(0))),
    "train.weight_decay": ("a finite number >= 0", lambda v: _num(v) and v >= 0),
    "train.max_grad_norm": ("null or a finite number > 0", _opt(_positive)),
    "train.max_length": ("an integer >= 8", _at_least(8)),
    "train.seed": ("an integer in [0, 2**63)", lambda v: _int(v) and 0 <= v < 2**63),
    "train.eval_every": ("null or an integer >= 1", _opt(_at_least(1))),
    "train.save_every": ("null or an integer >= 1", _opt(_at_least(1))),
    "train.patience": ("null or an integer >= 1", _opt(_at_least(1))),
    "train.adam_betas": ("two numbers in [0, 1)", lambda v: isinstance(v, list) and len(v) == 2
                         and all(_num(b) and 0 <= b < 1 for b in v)),
    "train.adam_eps": ("a finite number > 0", _positive),
    "train.log_every": ("null or an integer >= 1", _opt(_at_least(1))),
    "train.progress": ("true or false", lambda v: isinstance(v, bool)),
    "train.find_unused_parameters": ("true or false", lambda v: isinstance(v, bool)),
    "train.fsdp": ("true or false", lambda v: isinstance(v, bool)),
    "task.name": ("a non-empty string", lambda v: isinstance(v, str) and v.strip() != ""),
    "task.train_limit": ("null or an integer >= 1", _opt(_at_least(1))),
    "task.eval_limit": ("null or an integer >= 1", _opt(_at_least(1))),
    "task.subset_seed": ("an integer >= 0", _at_least(0)),
    "task.text_columns": ("null or a list of 1 or 2 distinct column names (name the columns to use)",
                          _opt(lambda v: 1 <= len(v) <= 2 and len(set(v)) == len(v) and all(v))),
    "task.labels": ("null or a list of at least 2 distinct label strings",
                    _opt(lambda v: len(v) >= 2 and len(set(v)) == len(v))),
    "task.label_column": ("a non-empty string", lambda v: isinstance(v, str) and v != ""),
    "model": ("a non-empty string (a short name, hub name or folder)", lambda v: isinstance(v, str) and v.strip() != ""),
    "output_dir": ("a non-empty path", lambda v: isinstance(v, str) and v.strip() not in ("", ".", "/")),
}


def validate(cfg: RunConfig) -> None:
    """Check every field in :data:`RULES`; raise :class:`ConfigError` naming the key, its value and the rule."""
    for key, (what, ok) in RULES.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if not ok(node):
            raise ConfigError(f"{key}: {node!r} is invalid; expected {what}")
    if cfg.train.epochs == 0 and cfg.train.max_steps is None:
        raise ConfigError("train.epochs: 0 is invalid without train.max_steps")
    if "trust_remote_code" in cfg.model_args:
        raise ConfigError("model_args.trust_remote_code: not accepted in a config (it would be stored and rerun "
                          "silently); pass --trust-remote-code on the command line each time instead")
    scheme = cfg.model_args.get("quantize")
    if scheme is not None and scheme not in ("nf4", "fp4", "int8"):
        raise ConfigError(f"model_args.quantize: {scheme!r} is invalid; expected one of nf4, fp4, int8")
    if scheme is not None and cfg.method == "full":
        raise ConfigError("model_args.quantize: a quantized base is frozen, full fine-tuning cannot train it; "
                          "pick a PEFT method")


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    if isinstance(source, dict):
        data = dict(source)
    else:
        data = read_mapping(source)
    data = apply_overrides(data, overrides or [])
    task = data.get("task")
    if isinstance(task, dict) and isinstance(task.get("labels"), list):  # labels: [0, 1] names classes 0 and 1
        data["task"] = task = dict(task)
        task["labels"] = [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in task["labels"]]
    cfg = _build(RunConfig, data, "")
    validate(cfg)
    if cfg.method not in ("full",):
        from ..registry import config_class

        try:
            cls = config_class(cfg.method)
        except KeyError as e:
            raise ConfigError(f"method: {e}") from None
        try:
            cls.from_dict(cfg.method_args)
        except (TypeError, ValueError, re.error) as e:
            raise ConfigError(f"method_args: {' '.join(str(e).split())}") from None
    elif cfg.method_args:
        raise ConfigError("method_args must be empty for method: full")
    return cfg
