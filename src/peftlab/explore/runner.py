"""Running trials: locally (sequentially or in a process pool) or as Ray tasks; JSONL as they finish."""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path


def run_trial(job: dict) -> dict:
    """Train one sampled S4 configuration on every task (low-epoch regime) and score it.

    Score = 100 × mean over tasks of the task's main dev metric. Never raises: a failure is returned
    as ``{"error": ...}`` so the exploration records it and goes on. With a ``memory_budget`` (bytes) the
    design is planned first (:func:`peftlab.plan`, on every task) and not trained when its predicted peak
    exceeds the budget: ``{"skipped": reason, "predicted_peak": bytes, ...}``."""
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    from ..train import fs, run

    t0 = time.perf_counter()
    scores, params, peak = {}, None, {}
    try:
        cfgs = []
        for task in job["tasks"]:
            out = Path(job["out"]) / fs.slug(task["name"])  # a task name is never a path
            cfgs.append({"model": job["model"], "method": "s4", "method_args": job["s4"], "task": task,
                         "train": {**job["train"], "progress": False}, "output_dir": str(out)})
        if job.get("memory_budget"):
            peak = _predicted_peak(cfgs, job["memory_budget"])
            if "skipped" in peak:
                return {"id": job["id"], **peak, "seconds": time.perf_counter() - t0}
        for task, cfg in zip(job["tasks"], cfgs):
            fs.remove(cfg["output_dir"], job["out"])
            res = run(cfg)
            metric = res["metric"]
            scores[task["name"]] = res["final"][metric]
            params = res["adapter_params"]
            fs.remove(Path(cfg["output_dir"]) / "checkpoint", cfg["output_dir"])
        score = 100 * sum(scores.values()) / len(scores)
        return {"id": job["id"], "scores": scores, "score": score, "adapter_params": params, **peak,
                "seconds": time.perf_counter() - t0}
    except Exception as e:  # recorded, not fatal
        return {"id": job["id"], "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3),
                "seconds": time.perf_counter() - t0}


def _predicted_peak(cfgs: list[dict], budget: int) -> dict:
    """The largest predicted peak over the tasks' runs; with ``skipped`` (the reason) when it exceeds ``budget``."""
    from ..planner import fmt_bytes
    from ..train.planning import plan_run

    worst, where = 0, None
    for cfg in cfgs:
        rc, p = plan_run(cfg)
        if p.peak() > worst:
            worst, where = p.peak(), rc.task.name
    rec = {"predicted_peak": worst, "memory_budget": budget}
    if worst > budget:
        rec["skipped"] = (f"predicted peak {fmt_bytes(worst)} (task {where}) exceeds the memory budget "
                          f"{fmt_bytes(budget)}")
    return rec


def load_done(path: Path, budget: int | None = None) -> dict[str, dict]:
    """The recorded trials by id; a design skipped under another memory budget than ``budget`` is not done."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: that trial simply runs again
                if "skipped" in rec and rec.get("memory_budget") != budget:
                    done.pop(rec["id"], None)  # judged against another budget: plan it again
                    continue
                done[rec["id"]] = rec
    return done


def _append(path: Path, job: dict, res: dict) -> dict:
    rec = {**{k: v for k, v in job.items() if k not in ("tasks", "train", "model", "threads", "out")}, **res}
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return rec


def execute(jobs: list[dict], log: Path, backend: str = "local", workers: int = 1, address: str | None = None,
            progress=None) -> dict[str, dict]:
    """Run the jobs not yet in ``log``; append each result as it finishes; return all records by id."""
    done = load_done(log, jobs[0].get("memory_budget") if jobs else None)
    todo = [j for j in jobs if j["id"] not in done]
    if workers > 1:
        for j in todo:
            j["threads"] = 1
    if not todo:
        return done
    if backend == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                     ignore_reinit_error=True, log_to_driver=False)
        remote = ray.remote(num_cpus=1)(run_trial)
        pending = {remote.remote(j): j for j in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for r in ready:
                job = pending.pop(r)
                done[job["id"]] = _append(log, job, ray.get(r))
                progress and progress(done[job["id"]])
    elif backend == "local" and workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            by_id = {j["id"]: j for j in todo}
            for res in pool.imap_unordered(run_trial, todo):
                done[res["id"]] = _append(log, by_id[res["id"]], res)
                progress and progress(done[res["id"]])
    elif backend == "local":
        for j in todo:
            done[j["id"]] = _append(log, j, run_trial(j))
            progress and progress(done[j["id"]])
    else:
        raise ValueError(f"backend must be local or ray, got {backend!r}")
    return done
