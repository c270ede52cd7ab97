"""The S4 design-space explorer: ``peftlab explore SPACE.yaml`` / ``peftlab.explore.explore(cfg)``.

Stage-wise refinement as in the paper (METHODS.md §1.4): for each component in order (default
pattern → allocation → tuned_groups → strategies, the last greedily group by group), every candidate
value c defines the space S ∧ c; N configurations are sampled from it (reproducibly), trained in the
low-epoch regime on the task list, scored by the average dev metric; the candidate with the best mean
score is fixed and the next stage starts. Every trial goes to ``trials.jsonl`` as it finishes, so a
killed exploration resumes where it stopped and a failing trial is recorded, not fatal. The report
(``report.md``, EDF plots, ``summary.json``) compares the candidates' score distributions.

``memory_budget: 8GiB`` (or ``peftlab explore --budget 8GiB``): before a design is trained, the memory
planner (:func:`peftlab.plan`) predicts its peak training memory on every task; a design whose predicted
peak exceeds the budget is not trained but recorded in ``trials.jsonl`` (``skipped``, ``predicted_peak``)
and listed in the report, and its stage compares the designs that fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PeftlabError
from .analysis import edf, plot_edf, summarize  # noqa: F401
from .runner import execute, run_trial  # noqa: F401
from .space import COMPONENTS, Space, candidates, sample

KEYS = {"model", "tasks", "train", "space", "samples", "seed", "stages", "output_dir", "backend", "workers",
        "ray_address", "strategy_candidates", "memory_budget"}


@dataclass
class ExploreConfig:
    model: str = "minilm"
    tasks: list[dict] = field(default_factory=lambda: [{"name": "sst2", "train_limit": 1000, "eval_limit": 300}])
    train: dict = field(default_factory=lambda: {"epochs": 1, "batch_size": 16, "lr": 1e-3, "max_length": 64})
    space: dict = field(default_factory=dict)
    samples: int = 10
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: list(COMPONENTS))
    output_dir: str = "runs/explore"
    backend: str = "local"
    workers: int = 1
    ray_address: str | None = None
    strategy_candidates: list[list[str]] | None = None  # limit the 15 subsets tried per group
    memory_budget: str | int | None = None  # e.g. "8GiB": designs the planner says exceed it are skipped


def load(source, overrides: list[str] | None = None) -> ExploreConfig:
    from ..train import fs
    from ..train.config import apply_overrides, read_mapping

    data = dict(source) if isinstance(source, dict) else read_mapping(source, "exploration")
    data = apply_overrides(data, overrides or [])
    unknown = sorted(map(str, set(data) - KEYS))
    if unknown:
        raise PeftlabError(f"unknown explore key(s) {unknown}; valid: {sorted(KEYS)}")
    cfg = ExploreConfig(**data)
    for key, typ in (("tasks", list), ("train", dict), ("space", dict), ("stages", list), ("model", str),
                     ("output_dir", str), ("backend", str)):
        if not isinstance(getattr(cfg, key), typ):
            raise PeftlabError(f"{key}: expected a {typ.__name__}, got {getattr(cfg, key)!r}")
    for key in ("samples", "seed", "workers"):
        v = getattr(cfg, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "seed" else 1):
            raise PeftlabError(f"{key}: expected an integer >= {0 if key == 'seed' else 1}, got {v!r}")
    if not cfg.tasks or not all(isinstance(t, dict) and isinstance(t.get("name"), str) and t["name"] for t in cfg.tasks):
        raise PeftlabError("tasks: expected a non-empty list of task mappings, each with a name")
    slugs = [fs.slug(t["name"]) for t in cfg.tasks]
    if len(set(slugs)) != len(slugs):
        raise PeftlabError(f"tasks: names {[t['name'] for t in cfg.tasks]} are not distinct as folder names {slugs}")
    if cfg.memory_budget is not None:
        budget_bytes(cfg)
    bad = [s for s in cfg.stages if s not in COMPONENTS]
    if bad:
        raise PeftlabError(f"unknown stage(s) {bad}; stages are {list(COMPONENTS)}")
    return cfg


def budget_bytes(cfg: ExploreConfig) -> int | None:
    """``memory_budget`` in bytes (None: no budget); a one-line error naming the key when unreadable."""
    from ..planner import parse_bytes

    if cfg.memory_budget is None:
        return None
    try:
        return parse_bytes(cfg.memory_budget)
    except PeftlabError as e:
        raise PeftlabError(f"memory_budget: {e}") from None


def _label(v: Any) -> str:
    return "+".join(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else json.dumps(v).replace(" ", "")


def explore(source, overrides: list[str] | None = None, progress=None) -> dict:
    from ..train import fs

    cfg = source if isinstance(source, ExploreConfig) else load(source, overrides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = fs.lock_run(out)  # one exploration per output_dir: trials.jsonl is appended by this process only
    try:
        return _explore(cfg, out, progress)
    finally:
        fs.unlock_run(lock)


def _explore(cfg: ExploreConfig, out: Path, progress) -> dict:
    from ..train import fs

    fs.write_text(out / "explore_config.json", json.dumps(cfg.__dict__, indent=2))
    log = out / "trials.jsonl"
    space = Space(**{**{"groups": 4, "budget": 0.005}, **cfg.space})
    budget = budget_bytes(cfg)
    chosen: dict[str, Any] = {}
    stages_out = []

    def run_stage(stage_name: str, cands: list, make_space) -> Any:
        # sample-major order (k = 0 of every candidate, then k = 1, ...): an exploration stopped early
        # still compares candidates on equal numbers of trials
        jobs = []
        spaces = [(c, make_space(c)) for c in cands]
        for k in range(cfg.samples):
            for c, sp in spaces:
                key = f"{cfg.seed}/{stage_name}/{_label(c)}/{k}"
                jobs.append({"id": key, "stage": stage_name, "candidate": _label(c), "s4": sample(sp, key),
                             "model": cfg.model, "tasks": cfg.tasks, "train": cfg.train,
                             "out": str(out / "trials" / fs.slug(key.replace("/", "_"))),
                             **({"memory_budget": budget} if budget else {})})
        recs = execute(jobs, log, cfg.backend, cfg.workers, cfg.ray_address, progress)
        scored = {_label(c): [recs[j["id"]] for j in jobs if j["candidate"] == _label(c)
                              and "score" in recs.get(j["id"], {})] for c in cands}
        groups = {lab: [r["score"] for r in rs] for lab, rs in scored.items()}
        failed = sum(1 for j in jobs if "error" in recs.get(j["id"], {}))
        skipped = [{"id": j["id"], "candidate": j["candidate"], "predicted_peak": recs[j["id"]]["predicted_peak"]}
                   for j in jobs if "skipped" in recs.get(j["id"], {})]
        stats = {lab: summarize(s) for lab, s in groups.items()}
        for lab, rs in scored.items():  # per-task mean dev metric: shows which task separates the candidates
            if rs:
                stats[lab]["tasks"] = {t: sum(r["scores"][t] for r in rs) / len(rs) for t in rs[0]["scores"]}
        ok = [c for c in cands if stats[_label(c)].get("n")]
        if not ok:
            raise PeftlabError(f"stage {stage_name}: every trial failed{' or was over the memory budget' if skipped else ''}; "
                               f"see {log}")
        best = max(ok, key=lambda c: (stats[_label(c)]["mean"], -stats[_label(c)]["std"]))
        png = plot_edf(groups, out / f"edf_{stage_name.replace('/', '_')}.png", f"stage {stage_name}")
        stages_out.append({"stage": stage_name, "stats": stats, "chosen": _label(best), "failed": failed,
                           "skipped": skipped, "plot": png.name if png else None})
        return best

    for stage in cfg.stages:
        if stage == "strategies":
            cands = cfg.strategy_candidates or candidates("strategies", space.groups)
            per_group: list[Any] = list(space.strategies) if isinstance(space.strategies, list) else ["free"] * space.groups
            for g in range(space.groups):
                best = run_stage(f"strategies-G{g + 1}", cands, lambda c, g=g, pg=tuple(per_group): space.fixed(
                    **chosen, strategies=[*pg[:g], c, *pg[g + 1:]]))
                per_group[g] = best
            chosen["strategies"] = per_group
        else:
            fixed_value = getattr(space, stage)
            cands = candidates(stage, space.groups) if fixed_value == "free" else (
                fixed_value if isinstance(fixed_value, list) and fixed_value and isinstance(fixed_value[0], (str, list)) else [fixed_value])
            chosen[stage] = run_stage(stage, cands, lambda c, stage=stage: space.fixed(**{**chosen, stage: c}))
    summary = {"chosen": chosen, "stages": stages_out, "trials": str(log)}
    fs.write_text(out / "summary.json", json.dumps(summary, indent=2))
    fs.write_text(out / "report.md", report(cfg, summary))
    return summary


def report(cfg: ExploreConfig, summary: dict) -> str:
    from ..planner import fmt_bytes

    lines = [f"# Design-space exploration ({cfg.model}; tasks {', '.join(t['name'] for t in cfg.tasks)}; "
             f"{cfg.samples} samples per candidate; backend {cfg.backend})", ""]
    for st in summary["stages"]:
        tasks = [t["name"] for t in cfg.tasks]
        lines += [f"## Stage {st['stage']} — chosen: **{st['chosen']}**" + (f" ({st['failed']} failed trials)" if st["failed"] else "")
                  + (f" ({len(st['skipped'])} over the memory budget)" if st.get("skipped") else ""), "",
                  "| candidate | n | mean score | std | median | best | worst | " + " | ".join(f"mean {t}" for t in tasks) + " |",
                  "|---|" + "---:|" * (6 + len(tasks))]
        for lab, s in sorted(st["stats"].items(), key=lambda kv: -kv[1].get("mean", -1e9)):
            if s.get("n"):
                per_task = " | ".join(f"{s.get('tasks', {}).get(t, float('nan')):.3f}" for t in tasks)
                lines.append(f"| {lab} | {s['n']} | {s['mean']:.2f} | {s['std']:.2f} | {s['median']:.2f} | {s['best']:.2f} "
                             f"| {s['worst']:.2f} | {per_task} |")
        if st.get("skipped"):
            lines += ["", f"Not trained, predicted peak over the memory budget ({fmt_bytes(budget_bytes(cfg))}): "
                      + ", ".join(f"{r['id']} ({fmt_bytes(r['predicted_peak'])})" for r in st["skipped"])]
        if st["plot"]:
            lines += ["", f"![EDF of error, stage {st['stage']}]({st['plot']})"]
        lines.append("")
    lines.append(f"Final choices: `{json.dumps(summary['chosen'])}`")
    return "\n".join(lines) + "\n"
