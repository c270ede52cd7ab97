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
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import _coerce
from ..errors import PeftlabError


class ConfigError(PeftlabError, ValueError):
    pass


@dataclass
class TaskConfig:
    name: str = "sst2"  # GLUE task, QA task (arc_easy ...), "table" (CSV/JSONL) or "demo"
    data_dir: str | None = None  # GLUE/QA root or task folder; None = ../shared/data beside the checkout
    train_file: str | None = None  # for "table" tasks (and to override a task's default files)
    dev_file: str | None = None
    text_columns: list[str] = field(default_factory=lambda: ["text"])
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
    progress: bool = True


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


def _build(cls, data: dict, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
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
        try:
            kwargs[k] = _coerce(tp, v, key)
        except TypeError as e:
            raise ConfigError(str(e)) from None
    return cls(**kwargs)


def _parse_value(text: str):
    return yaml.safe_load(text)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        key, val = ov.split("=", 1)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a mapping")
        node[parts[-1]] = _parse_value(val)
    return data


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    if isinstance(source, dict):
        data = dict(source)
    else:
        p = Path(source)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({e})") from None
    data = apply_overrides(data, overrides or [])
    cfg = _build(RunConfig, data, "")
    t = cfg.train
    for name, ok in (("train.batch_size", t.batch_size >= 1), ("train.grad_accum", t.grad_accum >= 1),
                     ("train.lr", t.lr > 0), ("train.epochs", t.epochs > 0 or t.max_steps is not None),
                     ("train.warmup_ratio", 0 <= t.warmup_ratio < 1), ("train.max_length", t.max_length >= 8)):
        if not ok:
            raise ConfigError(f"{name}: invalid value")
    if cfg.method not in ("full",):
        from ..registry import config_class

        try:
            cls = config_class(cfg.method)
        except KeyError as e:
            raise ConfigError(f"method: {e}") from None
        try:
            cls.from_dict(cfg.method_args)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"method_args: {e}") from None
    elif cfg.method_args:
        raise ConfigError("method_args must be empty for method: full")
    return cfg
