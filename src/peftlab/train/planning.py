"""The memory plan of a run configuration: build its model as ``peftlab train`` would, then
:func:`peftlab.planner.plan` it (used by ``peftlab plan`` and by the explorer's memory budget)."""

from __future__ import annotations

from ..planner import MemoryPlan, plan
from .config import RunConfig, load_config
from .data import load_task
from .loop import build_model


def plan_run(source: RunConfig | dict, batch_size: int | None = None, seq_len: int | None = None,
             overrides: list[str] | None = None, trust_remote_code: bool = False) -> tuple[RunConfig, MemoryPlan]:
    """The run's config and its plan at ``batch_size`` / ``seq_len`` (default: train.batch_size / max_length)."""
    cfg = source if isinstance(source, RunConfig) else load_config(source, overrides)
    model, _ = build_model(cfg, load_task(cfg), trust_remote_code)
    batch = cfg.train.batch_size if batch_size is None else batch_size
    seq = cfg.train.max_length if seq_len is None else seq_len
    return cfg, plan(model, batch_size=batch, seq_len=seq, optimizer="adamw")
