"""The training loop and CLI: config validation, a real run, resume after SIGKILL, NaN stop, demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import peftlab
from peftlab.train import ConfigError, load_config, run

BASE = {
    "model": "minilm", "method": "lora", "method_args": {"r": 4, "targets": ["q", "v"]},
    "task": {"name": "demo", "train_limit": 160, "eval_limit": 64},
    "train": {"max_steps": 24, "batch_size": 16, "lr": 5e-3, "max_length": 24, "eval_every": 12, "seed": 3,
              "progress": False},
}


def cfg(tmp_path, **over) -> dict:
    d = json.loads(json.dumps(BASE))
    d["output_dir"] = str(tmp_path / "run")
    for k, v in over.items():
        d[k] = {**d[k], **v} if k in ("task", "train") else v
    return d


# ---------------------------------------------------------------- validation
def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        load_config(cfg(tmp_path, train={"lrr": 1}))
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(cfg(tmp_path, train={"lr": "fast"}))
    with pytest.raises(ConfigError, match="unknown config key.*optimizer"):
        load_config({**cfg(tmp_path), "optimizer": {}})
    with pytest.raises(ConfigError, match="method_args.*rank"):
        load_config(cfg(tmp_path, method_args={"rank": 4}))
    with pytest.raises(ConfigError, match="method.*lorax"):
        load_config(cfg(tmp_path, method="lorax"))
    with pytest.raises(ConfigError, match=r"train\.schedule"):
        load_config(cfg(tmp_path, train={"schedule": "exponential"}))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg(tmp_path)))
    c = load_config(p, ["train.lr=1e-3", "method_args.r=16", "task.name=sst2", "train.eval_every=null"])
    assert c.train.lr == 1e-3 and c.method_args["r"] == 16 and c.task.name == "sst2" and c.train.eval_every is None
    with pytest.raises(ConfigError):
        load_config(p, ["train.lr"])


# ---------------------------------------------------------------- real runs (MiniLM, shipped demo data)
@pytest.mark.slow
def test_run_writes_run_dir_and_learns(tmp_path):
    res = run(cfg(tmp_path, train={"max_steps": 40, "eval_every": 20}))
    out = tmp_path / "run"
    assert {"config.json", "metrics.jsonl", "results.json", "best", "checkpoint", "train.log"} <= {p.name for p in out.iterdir()}
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [20, 40]
    assert res["final"]["accuracy"] >= 0.8, res
    assert res["trainable_params"] > 0 and res["train_time_s"] > 0 and res["peak_memory_mb"] > 0
    # the saved best adapter reproduces the best evaluation
    from peftlab.cli.train import load_run as _load_run
    from peftlab.train.loop import evaluate

    model, tok, data, c = _load_run(out, [])
    assert abs(evaluate(model, tok, data, c)["accuracy"] - res["best"]["accuracy"]) < 1e-9
    with pytest.raises(peftlab.PeftlabError, match="resume"):  # never clobber an existing run
        run(cfg(tmp_path))


@pytest.mark.slow
def test_full_finetuning_baseline(tmp_path):
    res = run(cfg(tmp_path, method="full", method_args={}, train={"max_steps": 6, "eval_every": 6, "lr": 5e-5}))
    assert res["trainable_params"] == res["total_params"]
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()


@pytest.mark.slow
def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}

    def poisoned(model):
        import torch

        calls["n"] += 1
        return torch.tensor(float("nan")) if calls["n"] > 13 else None

    monkeypatch.setattr(peftlab, "training_loss", poisoned)
    with pytest.raises(peftlab.train.TrainingDivergedError, match="non-finite loss .* step 14.*checkpoint"):
        run(cfg(tmp_path, train={"save_every": 4}))
    out = tmp_path / "run"
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["loop"]["step"] == 12
    m = peftlab.train.backbones.load_model("minilm")
    peftlab.load(m, out / "best")  # the best adapter (step 12) is intact and loadable


RUNNER = "import sys; from peftlab.train import run; run(sys.argv[1], resume='--resume' in sys.argv)"


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_results(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    ref = run(cfg(a, train={"save_every": 3}))
    b = tmp_path / "b"
    b.mkdir()
    p = b / "c.yaml"
    p.write_text(yaml.safe_dump(cfg(b, train={"save_every": 3})))
    env = {**os.environ, "OMP_NUM_THREADS": str(__import__("torch").get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(p)], env=env)
    state = b / "run" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if state.is_file() and json.loads(state.read_text())["loop"]["step"] >= 9:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (b / "run" / "results.json").exists(), "the run finished before it could be killed"
    subprocess.run([sys.executable, "-c", RUNNER, str(p), "--resume"], env=env, check=True, timeout=600)
    res = json.loads((b / "run" / "results.json").read_text())
    assert res["final"] == ref["final"] and res["best"] == ref["best"] and res["steps"] == ref["steps"]
    hist_a = (a / "run" / "metrics.jsonl").read_text().splitlines()
    hist_b = (b / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["accuracy"] for x in hist_a] == [json.loads(x)["accuracy"] for x in hist_b]


@pytest.mark.slow
def test_cli_train_eval_predict(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg(tmp_path, train={"max_steps": 12, "eval_every": 12})))
    cli = [sys.executable, "-m", "peftlab"]
    r = subprocess.run([*cli, "train", str(p), "train.lr=3e-3"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr"] == 3e-3
    r = subprocess.run([*cli, "eval", str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "accuracy" in json.loads(r.stdout)
    r = subprocess.run([*cli, "predict", str(tmp_path / "run"), "a wonderful film.", "a dull film."],
                       capture_output=True, text=True, timeout=600)
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["text"] for x in lines] == ["a wonderful film.", "a dull film."] and all("label" in x for x in lines)
    r = subprocess.run([*cli, "train", str(p), "train.lrr=1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "train.lrr" in r.stderr


@pytest.mark.slow
def test_demo_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "peftlab", "demo", "--out", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    acc = float(r.stdout.split("dev accuracy after training:")[1].split()[0])
    assert acc >= 0.9
    assert (Path(tmp_path) / "demo" / "best" / "adapter.safetensors").is_file()


@pytest.mark.slow
def test_multiple_choice_qa_on_smollm(tmp_path):
    """Causal-LM QA: LM loss on the answer, evaluation by length-normalised choice log-likelihood."""
    fix = Path(__file__).parent / "fixtures" / "qa"
    c = {
        "model": "smollm2-135m", "method": "lora", "method_args": {"r": 4, "targets": ["q", "v"]},
        "task": {"name": "arc_easy", "data_dir": str(fix), "train_file": "arc_easy/train.jsonl", "dev_file": "arc_easy/dev.jsonl"},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "max_length": 64, "progress": False},
        "output_dir": str(tmp_path / "run"),
    }
    res = run(c)
    assert 0.0 <= res["final"]["accuracy"] <= 1.0 and res["steps"] == 2
    from peftlab.train.data import choice_scores, collate, encode_choice_eval

    tok = peftlab.train.backbones.load_tokenizer("smollm2-135m")
    from peftlab.train.tasks import read_arc

    items = encode_choice_eval(tok, read_arc(fix / "arc_easy/dev.jsonl"), 64)
    assert len(items) == 5 and all(any(x != -100 for x in it["lm_labels"]) for it in items)
    b = collate(items, tok.pad_token_id)
    import torch

    logits = torch.zeros(len(items), b["input_ids"].shape[1], tok.vocab_size if hasattr(tok, "vocab_size") else 49152)
    s = choice_scores(logits, b["labels"], normalize=True)  # uniform model: mean log-prob = -log(V)
    assert torch.allclose(s, torch.full_like(s, -torch.log(torch.tensor(float(logits.shape[-1])))), atol=1e-4)
