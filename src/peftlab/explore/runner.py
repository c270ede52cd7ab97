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
    as ``{"error": ...}`` so the exploration records it and goes on."""
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    from ..train import fs, run

    t0 = time.perf_counter()
    scores, params = {}, None
    try:
        for task in job["tasks"]:
            out = Path(job["out"]) / fs.slug(task["name"])  # a task name is never a path
            fs.remove(out, job["out"])
            cfg = {"model": job["model"], "method": "s4", "method_args": job["s4"], "task": task,
                   "train": {**job["train"], "progress": False}, "output_dir": str(out)}
            res = run(cfg)
            metric = res["metric"]
            scores[task["name"]] = res["final"][metric]
            params = res["adapter_params"]
            fs.remove(out / "checkpoint", out)
        score = 100 * sum(scores.values()) / len(scores)
        return {"id": job["id"], "scores": scores, "score": score, "adapter_params": params,
                "seconds": time.perf_counter() - t0}
    except Exception as e:  # recorded, not fatal
        return {"id": job["id"], "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3),
                "seconds": time.perf_counter() - t0}


def load_done(path: Path) -> dict[str, dict]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: that trial simply runs again
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
    done = load_done(log)
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
