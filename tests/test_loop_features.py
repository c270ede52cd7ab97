"""Loop features on a tiny BERT (fast): every GLUE task kind end to end with its metrics, user tables,
the method hooks (training_loss, on_train_step, checkpoint_eligible), early stopping, hub loading
(with a stand-in `datasets` module), and the shipped demo data."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab.train import run
from peftlab.train.config import load_config
from peftlab.train.data import load_task

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer BERT with MiniLM's tokenizer, saved as a local model folder."""
    import transformers

    from peftlab.train.backbones import load_tokenizer

    path = tmp_path_factory.mktemp("tiny_bert")
    tok = load_tokenizer("minilm")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128)
    transformers.BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def conf(model: str, tmp_path, task: dict, **train) -> dict:
    return {"model": model, "method": "lora", "method_args": {"r": 2, "targets": ["query", "value"]},
            "task": task, "output_dir": str(tmp_path / "run"),
            "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "max_length": 32, "progress": False, **train}}


@pytest.mark.parametrize("task,keys", [
    ("stsb", {"pearson", "spearman"}),
    ("mrpc", {"f1", "accuracy"}),
    ("cola", {"matthews", "accuracy"}),
    ("mnli", {"accuracy", "dev_mismatched_accuracy"}),
    ("qqp", {"f1", "accuracy"}),
    ("rte", {"accuracy"}),
])
def test_glue_tasks_train_and_report_glue_metrics(tiny_bert, tmp_path, task, keys):
    res = run(conf(tiny_bert, tmp_path, {"name": task, "data_dir": str(FIX / "glue")}))
    assert set(res["final"]) == keys
    assert all(isinstance(v, float) and -1.0 <= v <= 1.0 for v in res["final"].values())
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["final"] == res["final"] and saved["steps"] == 2 and saved["steps_per_s"] > 0
    assert saved["trainable_params"] < saved["total_params"] and saved["peak_memory_mb"] > 0
    if task == "stsb":  # regression: a single output, float labels
        from peftlab.cli.train import load_run as _load_run

        model, *_ = _load_run(tmp_path / "run", [])
        assert model.config.num_labels == 1


def test_user_table_task(tiny_bert, tmp_path):
    task = {"name": "table", "train_file": str(FIX / "table.csv"), "dev_file": str(FIX / "table.csv"),
            "labels": ["neg", "pos"]}
    res = run(conf(tiny_bert, tmp_path, task))
    assert set(res["final"]) == {"accuracy", "f1"}


def test_method_hooks_are_called(tiny_bert, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(peftlab, "on_train_step", lambda m, step, total: seen.append((step, total)))
    monkeypatch.setattr(peftlab, "training_loss", lambda m: torch.tensor(100.0))
    monkeypatch.setattr(peftlab, "checkpoint_eligible", lambda m, step, total: step >= 4)
    res = run(conf(tiny_bert, tmp_path, {"name": "rte", "data_dir": str(FIX / "glue")}, max_steps=5, eval_every=1,
                   patience=1))
    assert seen == [(s, 5) for s in range(1, 6)]
    hist = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 5 and all(h["train_loss"] > 100 for h in hist)  # the regulariser is in the loss
    # evaluations before step 4 are neither a best checkpoint nor counted towards patience
    assert res["best_step"] in (4, 5) and res["steps"] == 5


def test_early_stopping(tiny_bert, tmp_path):
    # lr so small that nothing changes: the score never improves, so patience 2 stops after 3 evaluations
    res = run(conf(tiny_bert, tmp_path, {"name": "rte", "data_dir": str(FIX / "glue")}, max_steps=10, eval_every=1,
                   patience=2, lr=1e-12))
    assert res["stopped_early"] and res["steps"] == 3 and res["best_step"] == 1


def test_unknown_metric_is_named(tiny_bert, tmp_path):
    with pytest.raises(peftlab.PeftlabError, match="train.metric 'bleu'"):
        run(conf(tiny_bert, tmp_path, {"name": "rte", "data_dir": str(FIX / "glue")}, metric="bleu"))


class _Label:
    def __init__(self, names):
        self.names = names


class _FakeHubSplit(list):
    def __init__(self, rows, names):
        super().__init__(rows)
        self.features = {"label": _Label(names)}


def test_glue_from_hub_maps_labels_by_name(monkeypatch):
    calls = []
    names = ["entailment", "neutral", "contradiction"]  # the hub's MNLI order, unlike GLUE's TSV labels

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        rows = [{"premise": "p", "hypothesis": f"h{i}", "label": y, "idx": i} for i, y in enumerate([0, 1, 2, -1])]
        return _FakeHubSplit(rows, names)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    cfg = load_config({"model": "minilm", "task": {"name": "mnli", "from_hub": True}})
    data = load_task(cfg)
    assert sorted(calls) == sorted([("nyu-mll/glue", "mnli", s) for s in ("train", "validation_matched", "validation_mismatched")])
    assert set(data.dev) == {"dev_matched", "dev_mismatched"}
    labels = ("contradiction", "entailment", "neutral")
    assert [labels[e.label] for e in data.train] == names  # unlabelled (-1) rows dropped, names preserved
    assert data.train[1].texts == ("p", "h1")


def test_demo_data_is_shipped_and_matches_its_generator():
    from peftlab.train.demo_data import LABELS, demo_examples, load_shipped, shipped_files

    assert all(p.is_file() for p in shipped_files().values())
    for shipped, generated in zip(load_shipped(), demo_examples()):
        assert [(e.texts, e.label) for e in shipped] == [(e.texts, e.label) for e in generated]
    train, dev = load_shipped()
    assert len(train) == 400 and len(dev) == 160 and {e.label for e in train} == {0, 1} and len(LABELS) == 2
    assert not {e.texts for e in train} & {e.texts for e in dev}


def test_cli_predict_from_adapter_folder_and_eval_from_yaml(tiny_bert, tmp_path, capsys):
    import shutil

    import yaml

    from peftlab.cli import main

    c = conf(tiny_bert, tmp_path, {"name": "table", "train_file": str(FIX / "table.csv"),
                                   "dev_file": str(FIX / "table.csv"), "labels": ["neg", "pos"]})
    run(c)
    capsys.readouterr()
    # a run's best/ folder resolves to its run (label names from the run's config)
    assert main(["predict", str(tmp_path / "run" / "best"), "good", "bad"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [o["text"] for o in out] == ["good", "bad"] and {o["label"] for o in out} <= {"neg", "pos"}
    # a bare adapter folder on a named base model; options may come before the sentences
    shutil.copytree(tmp_path / "run" / "best", tmp_path / "adapter")
    (tmp_path / "in.txt").write_text("fine\n\nawful\n")
    assert main(["predict", str(tmp_path / "adapter"), "--model", tiny_bert, "--labels", "n,p", "good",
                 "--file", str(tmp_path / "in.txt")]) == 0
    bare = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [o["text"] for o in bare] == ["good", "fine", "awful"] and {o["label"] for o in bare} <= {"n", "p"}
    assert bare[0]["p"] == out[0]["p"]  # the same weights and head as the run's best checkpoint
    assert main(["predict", str(tmp_path / "adapter"), "--model", tiny_bert, "--labels", "a,b,c", "x"]) == 2
    assert "3 labels" in capsys.readouterr().err
    # eval of a YAML config: the untrained (method-attached) model, a before-training baseline
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(c))
    assert main(["eval", str(tmp_path / "c.yaml"), "output_dir=" + str(tmp_path / "other")]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"accuracy", "f1"}


RUNNER = "import sys; from peftlab.train import run; run(sys.argv[1], resume=len(sys.argv) > 2)"


@pytest.mark.slow
def test_repeated_sigkill_at_arbitrary_moments_then_resume(tiny_bert, tmp_path):
    """Kill -9 several times: during start-up, training, evaluation and checkpoint writes;
    each restart resumes; the end state equals an uninterrupted run's, best adapter bytes included."""
    import os
    import signal
    import subprocess
    import time

    import yaml

    def c(out):
        d = conf(tiny_bert, tmp_path, {"name": "demo", "eval_limit": 48}, max_steps=60, batch_size=8, eval_every=15,
                 save_every=2, lr=2e-3, seed=5)
        d["output_dir"] = str(out)
        d["method_args"]["dropout"] = 0.1  # dropout consumes RNG: its state must be restored too
        return d

    ref = run(c(tmp_path / "ref"))
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(c(tmp_path / "killed")))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    steps_at_kill = []
    state = tmp_path / "killed" / "checkpoint" / "state.json"

    def ckpt_step() -> int:
        try:
            return json.loads(state.read_text())["loop"]["step"]
        except (OSError, ValueError):  # absent, or being swapped in right now
            return -1

    # (checkpoint step to wait for, extra delay): during start-up, right after checkpoints (mid next step or
    # mid checkpoint write), right after evaluations at steps 15/30/45 (mid best-adapter save)
    for target, delay in ((None, 0.5), (4, 0.0), (15, 0.01), (30, 0.05), (44, 0.2), (45, 0.0)):
        if (tmp_path / "killed" / "results.json").exists():
            break
        proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(p), *(["r"] if steps_at_kill else [])], env=env)
        deadline = time.time() + 300
        while target is not None and ckpt_step() < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        steps_at_kill.append(ckpt_step())
    assert sum(0 < s < 60 for s in steps_at_kill) >= 4, steps_at_kill  # kills landed mid-training
    subprocess.run([sys.executable, "-c", RUNNER, str(p), "r"], env=env, check=True, timeout=600)
    res = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert (res["final"], res["best"], res["best_step"], res["steps"]) == (ref["final"], ref["best"], ref["best_step"], ref["steps"])
    assert (tmp_path / "killed" / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()
    from safetensors.torch import load_file

    got, want = (load_file(tmp_path / r / "best" / "adapter.safetensors") for r in ("killed", "ref"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_choice_scores_are_answer_token_log_likelihoods():
    from peftlab.train.data import choice_scores

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50)
    labels = torch.full((3, 7), -100)
    labels[0, 4:6] = torch.tensor([3, 9])
    labels[1, 2:7] = torch.randint(0, 50, (5,))
    labels[2, 6] = 7
    want = []
    for b in range(3):  # token t is predicted by the logits at position t - 1
        lp = [torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for t in range(1, 7) if labels[b, t] != -100]
        want.append(torch.stack(lp))
    assert torch.allclose(choice_scores(logits, labels, normalize=False), torch.stack([w.sum() for w in want]))
    assert torch.allclose(choice_scores(logits, labels, normalize=True), torch.stack([w.mean() for w in want]))
