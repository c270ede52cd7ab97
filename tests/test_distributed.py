"""Training with 2 processes through accelerate on this CPU machine gives a result of the same quality."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

# `peftlab train` under accelerate with 2 CPU processes (also used by tests/test_meft.py)
LAUNCH_TRAIN_2PROC = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                      "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "peftlab",
                      "train"]

CFG = {
    "model": "minilm", "method": "lora", "method_args": {"r": 4, "targets": ["q", "v"]},
    "task": {"name": "demo", "train_limit": 160, "eval_limit": 96},
    "train": {"max_steps": 30, "batch_size": 8, "lr": 5e-3, "max_length": 24, "eval_every": 30, "seed": 3,
              "progress": False},
}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_accelerate_matches_single_process(tmp_path):
    pytest.importorskip("accelerate")
    two = {**CFG, "output_dir": str(tmp_path / "two")}
    one = {**CFG, "output_dir": str(tmp_path / "one"), "train": {**CFG["train"], "batch_size": 16}}  # same global batch
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(one))
    r = subprocess.run([*LAUNCH_TRAIN_2PROC, str(tmp_path / "two.yaml")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "peftlab", "train", str(tmp_path / "one.yaml")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res2 = json.loads((tmp_path / "two" / "results.json").read_text())
    res1 = json.loads((tmp_path / "one" / "results.json").read_text())
    assert res2["world_size"] == 2 and res1["world_size"] == 1
    assert res2["final"]["accuracy"] >= 0.85 and res1["final"]["accuracy"] >= 0.85
    assert abs(res2["final"]["accuracy"] - res1["final"]["accuracy"]) <= 0.08


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_early_stopping_stops_every_rank(tmp_path):
    """Only the main process evaluates; its early-stopping decision must reach the other rank (no hang)."""
    pytest.importorskip("accelerate")
    cfg = {**CFG, "output_dir": str(tmp_path / "two"),
           "train": {**CFG["train"], "max_steps": 40, "eval_every": 2, "patience": 1, "lr": 1e-12}}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([*LAUNCH_TRAIN_2PROC, str(tmp_path / "two.yaml")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "two" / "results.json").read_text())
    assert res["world_size"] == 2 and res["stopped_early"] and res["steps"] == 4 and res["best_step"] == 2
