"""Issue 17: user-input robustness of the CLI and the training loop (tiny local BERT; fast).

Each defect has a regression test; the table tests run every listed bad input through the CLI entry
function in-process: exit 2, one ``peftlab: error:`` line naming the file/key/row, no traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from local_model import save_tiny_bert

from peftlab.cli import main
from peftlab.errors import DataError, UnsafePathError
from peftlab.train import fs, run
from peftlab.train.tasks import read_boolq

FIX = Path(__file__).parent / "fixtures"
SRC = Path(__file__).resolve().parents[1] / "src" / "peftlab"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def table(tmp_path: Path, rows: str = "text,label\na good film,pos\nan awful film,neg\nfine,pos\ndull,neg\n",
          name: str = "t.csv") -> str:
    p = tmp_path / name
    p.write_text(rows)
    return str(p)


def conf(tiny: str, tmp_path: Path, task: dict | None = None, **train) -> dict:
    task = task or {"name": "table", "train_file": table(tmp_path), "dev_file": table(tmp_path), "labels": ["neg", "pos"]}
    return {"model": tiny, "method": "lora", "method_args": {"r": 2, "targets": ["query", "value"]}, "task": task,
            "output_dir": str(tmp_path / "run"),
            "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "max_length": 32, "progress": False, **train}}


def write_yaml(tmp_path: Path, c: dict, name: str = "c.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(c))
    return str(p)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *names: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("peftlab: error:")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    for n in names:
        assert n in errors[0], (n, errors[0])


# ------------------------------------------------------------------ 1: nothing deleted outside the run
def test_explore_task_names_cannot_delete_outside_the_trial(tiny, tmp_path):
    from peftlab.explore.runner import run_trial

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    trial = tmp_path / "ex" / "trials" / "t0"
    trial.mkdir(parents=True)
    for name in ["../../../victim", str(victim), "..", "."]:
        job = {"id": "x", "model": tiny, "s4": {}, "train": {"max_steps": 1}, "out": str(trial),
               "tasks": [{"name": name}]}
        res = run_trial(job)
        assert "error" in res  # not a task: recorded as failed ...
        assert (victim / "keep.txt").read_text() == "precious"  # ... and nothing outside the trial was touched
    assert all(p.resolve().is_relative_to(trial.resolve()) for p in trial.rglob("*"))


def test_remove_refuses_everything_outside_its_root(tmp_path):
    root = tmp_path / "run"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    for bad in [tmp_path, outside, root, root / "..", root / "sub" / ".." / "..", Path("/")]:
        with pytest.raises(UnsafePathError):
            fs.remove(bad, root)
    fs.remove(root / "link", root)  # a link inside is removed, never its target
    assert outside.is_dir() and not (root / "link").exists()
    fs.remove(root / "sub", root)
    assert not (root / "sub").exists() and root.is_dir()
    assert fs.slug("../../x") == "x" and fs.slug("/abs/path") == "abs-path" and fs.slug("..") == "unnamed"


def test_every_deletion_in_the_package_goes_through_the_one_helper():
    """The class, not the instance: no rmtree/unlink/remove call anywhere but train/fs.py (state.py removes
    the temporary file it has just created; it belongs to the core)."""
    pattern = re.compile(r"rmtree\(|\.unlink\(|os\.remove\(|os\.rmdir\(|\.rmdir\(")
    offenders = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py") if p.name != "fs.py" and p.name != "state.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_demo_clears_only_its_own_files(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    fs.clear_run(tmp_path)
    assert not (tmp_path / "best").exists() and (tmp_path / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ 3: --resume checks the config first
def test_resume_with_a_changed_config_is_refused_before_writing(tiny, tmp_path, capsys):
    c = conf(tiny, tmp_path)
    p = write_yaml(tmp_path, c)
    assert cli(capsys, "train", p)[0] == 0
    before = (tmp_path / "run" / "config.json").read_text()
    for override, named in [("method_args.r=4", "method_args"), ("train.lr=0.5", "train.lr: 0.001 -> 0.5"),
                            ("train.seed=7", "train.seed: 42 -> 7"), (f"model={tiny}x", "model")]:
        rc, _, err = cli(capsys, "train", p, override, "--resume")
        assert_one_line_error(rc, err, named, "--resume")
        assert (tmp_path / "run" / "config.json").read_text() == before  # nothing rewritten
    rc, out, err = cli(capsys, "eval", str(tmp_path / "run"))  # the finished run still evaluates
    assert rc == 0 and "accuracy" in json.loads(out)
    rc, _, err = cli(capsys, "train", p, "train.eval_batch_size=3", "--resume")  # harmless: said, accepted
    assert rc == 0 and "train.eval_batch_size 64 -> 3" in err


# ------------------------------------------------------------------ 5: one process per run directory
def test_second_process_on_the_same_output_dir_is_refused(tiny, tmp_path):
    p = write_yaml(tmp_path, conf(tiny, tmp_path, max_steps=100000, eval_every=100000))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC.parent), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen([sys.executable, "-m", "peftlab", "train", p], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "run" / fs.LOCK_NAME
        deadline = time.time() + 120
        while time.time() < deadline and not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            time.sleep(0.1)
        assert lock.read_text().strip() == str(first.pid)
        before = (tmp_path / "run" / "config.json").read_text()
        second = subprocess.run([sys.executable, "-m", "peftlab", "train", p, "train.lr=0.5", "--resume"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert_one_line_error(second.returncode, second.stderr, "in use by another peftlab process", str(first.pid))
        assert (tmp_path / "run" / "config.json").read_text() == before
    finally:
        first.kill()
        first.wait()
    # the kernel released the killed process' lock: the directory is usable again (resume, same config)
    assert fs.unlock_run(fs.lock_run(tmp_path / "run")) is None


# ------------------------------------------------------------------ 8, 12, 11 and the CLI error table
BAD_OVERRIDES = [
    ("train.max_grad_norm=-1", "train.max_grad_norm"), ("train.max_steps=-1", "train.max_steps"),
    ("train.weight_decay=-5", "train.weight_decay"), ("train.epochs=inf", "train.epochs"),
    ("train.save_every=0", "train.save_every"), ("train.eval_batch_size=0", "train.eval_batch_size"),
    ("train.adam_betas=[0.9]", "train.adam_betas"), ("train.adam_betas=[1.5,0.9]", "train.adam_betas"),
    ("train.adam_eps=0", "train.adam_eps"), ("train.adam_eps=nan", "train.adam_eps"),
    ("task.train_limit=-1", "task.train_limit"), ("task.eval_limit=0", "task.eval_limit"),
    ("train.lr=-1", "train.lr"), ("train.batch_size=true", "train.batch_size"), ("train.seed=-3", "train.seed"),
    ("train.log_every=0", "train.log_every"), ("train.warmup_ratio=1", "train.warmup_ratio"),
    ("train.max_length=4", "train.max_length"), ("train.max_length=100000", "max_position_embeddings"),
    ("model_args.trust_remote_code=true", "--trust-remote-code"), ("model_args.hiden_dropout_prob=0.2", "hidden_dropout_prob"),
    ("model_args.hidden_dropout_prob=null", "model_args"), ("model_args.dtype=abc", "model_args.dtype"),
    ("model_args.dtype=float16", "model_args.dtype"), ("model_args.vocab_size=10", "cannot load its weights"), ("model_args.hidden_dropout_prob=abc", "model_args"),
    ("method_args.target_regex='(+'", "method_args"), ("model=/no/such/model", "/no/such/model"),
    ("task.text_columns=[a,b,c]", "task.text_columns"), ("train.lr=[1", "train.lr"), ("train", "train"),
    ("task.name=nope", "nope"),
]


@pytest.mark.parametrize("override,named", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_config_values_are_one_line_errors(tiny, tmp_path, capsys, override, named):
    rc, _, err = cli(capsys, "train", write_yaml(tmp_path, conf(tiny, tmp_path)), override)
    assert_one_line_error(rc, err, named)
    assert not (tmp_path / "run" / "best").exists()


BAD_FILES = {  # name -> (config file bytes, words the error names)
    "empty": (b"", ["empty config"]), "comments only": (b"# nothing\n", ["empty config"]),
    "empty mapping": (b"{}\n", ["empty config"]), "a list": (b"- 1\n- 2\n", ["mapping", "list"]),
    "a string": (b"hello\n", ["mapping", "str"]), "binary": (b"\x00\x01\x02\xff", ["c.yaml"]),
    "latin-1": ("model: caf\xe9\n".encode("latin-1"), ["UTF-8"]), "bad yaml": (b"a: [1\n", ["invalid YAML"]),
    "unknown key": (b"modle: x\n", ["modle"]), "wrong type": (b"train: 3\n", ["train", "mapping"]),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, name):
    content, words = BAD_FILES[name]
    (tmp_path / "c.yaml").write_bytes(content)
    rc, _, err = cli(capsys, "train", str(tmp_path / "c.yaml"))
    assert_one_line_error(rc, err, *words)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.yaml"]  # nothing written


BAD_TABLES = {  # file name -> (content, words the error names); the file is both train and dev
    "empty.csv": ("", ["empty.csv", "empty"]), "header.csv": ("text,label\n", ["header.csv", "no data rows"]),
    "ragged.csv": ("text,label\na,pos\nb,neg,extra\n", ["ragged.csv", "line 3"]),
    "short.csv": ("text,label\na,pos\nb\n", ["short.csv", "line 3"]),
    "latin1.csv": ("text,label\ncaf\xe9,pos\n", ["latin1.csv", "UTF-8"]),
    "badline.jsonl": ('{"text": "a", "label": "pos"}\n{"text": "b", \n', ["badline.jsonl", "line 2"]),
    "notobj.jsonl": ('{"text": "a", "label": "pos"}\n[1, 2]\n', ["notobj.jsonl", "line 2"]),
    "nulllabel.jsonl": ('{"text": "a", "label": null}\n{"text": "b", "label": "pos"}\n', ["nulllabel.jsonl", "line 1"]),
    "boollabel.jsonl": ('{"text": "a", "label": true}\n{"text": "b", "label": false}\n', ["boollabel.jsonl", "line 1"]),
    "unknown.csv": ("text,label\na,pos\nb,meh\n", ["unknown.csv", "line 3", "meh"]),
    "nulltext.jsonl": ('{"text": null, "label": "pos"}\n', ["nulltext.jsonl", "line 1", "text"]),
    "nolabel.csv": ("text,lab\na,pos\n", ["nolabel.csv", "label"]),
}


@pytest.mark.parametrize("name", list(BAD_TABLES))
def test_bad_table_files_are_one_line_errors(tiny, tmp_path, capsys, name):
    content, words = BAD_TABLES[name]
    f = tmp_path / name
    f.write_bytes(content.encode("latin-1" if "latin1" in name else "utf-8"))
    task = {"name": "table", "train_file": str(f), "dev_file": str(f), "labels": ["neg", "pos"]}
    rc, _, err = cli(capsys, "train", write_yaml(tmp_path, conf(tiny, tmp_path, task)))
    assert_one_line_error(rc, err, *words)


REGRESSION_TABLES = {"words.csv": ("text,label\na,high\nb,0.5\n", ["words.csv", "line 2", "not a number"]),
                     "inf.csv": ("text,label\na,inf\nb,0.5\n", ["inf.csv", "line 2", "finite"])}


@pytest.mark.parametrize("name", list(REGRESSION_TABLES))
def test_non_numeric_regression_labels_are_one_line_errors(tiny, tmp_path, capsys, name):
    content, words = REGRESSION_TABLES[name]
    f = tmp_path / name
    f.write_text(content)
    task = {"name": "table", "train_file": str(f), "dev_file": str(f), "regression": True}
    rc, _, err = cli(capsys, "train", write_yaml(tmp_path, conf(tiny, tmp_path, task)))
    assert_one_line_error(rc, err, *words)


def test_trust_remote_code_needs_the_flag_and_is_never_stored(tiny, tmp_path, capsys):
    p = write_yaml(tmp_path, conf(tiny, tmp_path))
    rc, _, err = cli(capsys, "train", p, "--trust-remote-code")
    assert rc == 0 and "warning: trust_remote_code" in err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert "trust_remote_code" not in json.dumps(saved).replace(str(tmp_path), "")
    rc, out, err = cli(capsys, "predict", str(tmp_path / "run"), "good", "--trust-remote-code")
    assert rc == 0 and "warning: trust_remote_code" in err and json.loads(out)["label"] in ("neg", "pos")
    rc, out, err = cli(capsys, "predict", str(tmp_path / "run"), "good")  # not stored: no flag, no remote code
    assert rc == 0 and "trust_remote_code" not in err


def test_bad_predict_and_eval_inputs_are_one_line_errors(tiny, tmp_path, capsys):
    assert cli(capsys, "train", write_yaml(tmp_path, conf(tiny, tmp_path)))[0] == 0
    runs = str(tmp_path / "run")
    (tmp_path / "bin.txt").write_bytes(b"\x00\xff\xfe")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "peftlab_config.json").write_text("{}")
    best = (tmp_path / "run" / "best" / "adapter.safetensors").read_bytes()
    (tmp_path / "adapter" / "adapter.safetensors").write_bytes(best[: len(best) // 2])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    cases = [
        (["predict", runs, "--file", str(tmp_path / "missing.txt")], ["--file", "missing.txt"]),
        (["predict", runs, "--file", str(tmp_path / "bin.txt")], ["--file", "bin.txt"]),
        (["predict", runs], ["give sentences"]),
        (["predict", str(tmp_path / "nowhere"), "x"], ["nowhere"]),
        (["predict", str(tmp_path / "adapter"), "--model", tiny, "x"], ["adapter.safetensors"]),
        (["eval", str(tmp_path / "nowhere")], ["nowhere"]),
        (["eval", str(tmp_path / "broken")], ["config.json"]),
        (["eval", runs, "train.lr=-1"], ["train.lr"]),
    ]
    for argv, words in cases:
        rc, _, err = cli(capsys, *argv)
        assert_one_line_error(rc, err, *words)


def test_a_genuine_bug_is_an_internal_error_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import peftlab.cli.demo as demo

    def broken(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(demo, "_methods", broken)
    rc, _, err = cli(capsys, "methods")
    assert rc == 1 and "internal error" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "methods"])


# ------------------------------------------------------------------ 9: divergence
def test_divergence_rule():
    from peftlab.train.guard import DivergenceGuard

    g = DivergenceGuard()
    assert all(g.check(x, 1.0) is None for x in [0.7, 0.69, 0.71, 0.6, 0.65])
    assert "non-finite loss" in g.check(float("nan"), 1.0)
    assert "gradient" in g.check(0.6, float("inf"))
    assert "running level" in g.check(2.7e7, 1.0)
    assert g.check(500.0, 1.0) is None  # < 1e3 x the level: noisy, not diverged
    creep = DivergenceGuard()  # a loss creeping up step by step is caught against its starting level
    losses = [0.7 * 1.1**k for k in range(200)]
    fired = next(k for k, x in enumerate(losses) if creep.check(x, 1.0))
    assert losses[fired] > 1e3 * 0.7 and losses[fired - 1] <= 1e3 * 0.77


def test_exploding_loss_stops_with_an_error_and_no_best(tiny, tmp_path, capsys, monkeypatch):
    import torch

    import peftlab

    n = {"k": 0}

    def exploding(model):
        n["k"] += 1
        return torch.tensor(2.7e7) if n["k"] > 5 else None

    monkeypatch.setattr(peftlab, "training_loss", exploding)
    rc, _, err = cli(capsys, "train", write_yaml(tmp_path, conf(tiny, tmp_path, max_steps=10, eval_every=10)))
    assert_one_line_error(rc, err, "step 6", "running level", "train.lr")
    assert not (tmp_path / "run" / "best").exists() and not (tmp_path / "run" / "results.json").exists()


def test_a_checkpoint_with_non_finite_weights_is_never_saved(tiny, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    import peftlab
    from peftlab.train.guard import TrainingDivergedError

    def poison(model, step, total):
        if step == 4:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    monkeypatch.setattr(peftlab, "on_train_step", poison)
    with pytest.raises(TrainingDivergedError, match="non-finite parameters.*nothing saved"):
        run(conf(tiny, tmp_path, max_steps=8, save_every=2, eval_every=2))
    ckpt = tmp_path / "run" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["loop"]["step"] == 2
    assert all(bool(torch.isfinite(v.float()).all()) for v in load_file(ckpt / "state.safetensors").values()
               if v.is_floating_point())
    m = peftlab.train.backbones.load_model(tiny)
    peftlab.load(m, tmp_path / "run" / "best")
    assert torch.isfinite(m(input_ids=torch.tensor([[2, 18, 3]])).logits).all()


# ------------------------------------------------------------------ 10: table labels and columns
def test_table_classes_are_inferred_and_said(tiny, tmp_path, capsys):
    f = table(tmp_path, "text,label\na,0\nb,-1\nc,0\nd,-1\n")
    task = {"name": "table", "train_file": f, "dev_file": f}
    rc, out, err = cli(capsys, "train", write_yaml(tmp_path, conf(tiny, tmp_path, task)))
    assert rc == 0 and "2 classes inferred from the data, in this order: -1, 0" in err
    assert json.loads((tmp_path / "run" / "best" / "peftlab_config.json").read_text()) is not None
    from peftlab.train.config import load_config
    from peftlab.train.data import load_task

    stray = table(tmp_path, "text,label\na,0\nb,1\nc,1000000\n", "stray.csv")
    data = load_task(load_config(conf(tiny, tmp_path, {"name": "table", "train_file": stray, "dev_file": stray})))
    assert data.num_labels == 3 and data.label_names == ["0", "1", "1000000"]


def test_table_text_columns_are_never_dropped_silently(tiny, tmp_path, capsys):
    f = table(tmp_path, "first,second,third,label\na,b,c,pos\nd,e,f,neg\n")
    task = {"name": "table", "train_file": f, "dev_file": f, "labels": ["neg", "pos"]}
    rc, _, err = cli(capsys, "train", write_yaml(tmp_path, conf(tiny, tmp_path, task)))
    assert_one_line_error(rc, err, "3 text columns", "'first', 'second', 'third'", "task.text_columns")
    rc, _, _ = cli(capsys, "train", write_yaml(tmp_path, conf(tiny, tmp_path, {**task, "text_columns": ["first", "third"]})))
    assert rc == 0
    mixed = table(tmp_path, "text,label\na,0\nb,pos\n", "mixed.csv")
    rc, _, err = cli(capsys, "train", write_yaml(tmp_path, conf(tiny, tmp_path, {"name": "table", "train_file": mixed,
                                                                              "dev_file": mixed})), "output_dir=" + str(tmp_path / "r2"))
    assert_one_line_error(rc, err, "mixed.csv", "task.labels")


# ------------------------------------------------------------------ 13: BoolQ rows without an answer
def test_boolq_row_without_answer_is_refused(tmp_path):
    f = tmp_path / "dev.jsonl"
    f.write_text('{"question": "is it", "passage": "p", "answer": true}\n{"question": "is it not", "passage": "p"}\n')
    with pytest.raises(DataError, match=r"dev.jsonl: row 2: answer/label null"):
        read_boolq(f)
    f.write_text('{"question": "q", "passage": "p", "label": "maybe"}\n')
    with pytest.raises(DataError, match="row 1"):
        read_boolq(f)
    assert [c.label for c in read_boolq(FIX / "qa/boolq/dev.jsonl")] == [1, 0]


# ------------------------------------------------------------------ a newcomer's first run
def test_one_line_about_the_new_head_and_progress_lines_in_train_log(tiny, tmp_path, capfd):
    p = write_yaml(tmp_path, conf(tiny, tmp_path, max_steps=6, log_every=2, eval_every=6))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC.parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "peftlab", "train", p], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    both = r.stdout + r.stderr
    assert "LOAD REPORT" not in both and "FutureWarning" not in both and "MISSING" not in both
    assert "peftlab: new classification head: 66 parameters" in r.stderr  # 32 x 2 weights + 2 biases
    lines = (tmp_path / "run" / "train.log").read_text().splitlines()
    steps = [ln for ln in lines if re.search(r"step \d+/6 loss [\d.]+ lr [\d.e+-]+ [\d.]+ steps/s ETA \d+m\d\ds", ln)]
    assert [re.search(r"step (\d+)/", ln).group(1) for ln in steps] == ["2", "4", "6"]
    assert lines.index(steps[0]) < next(i for i, ln in enumerate(lines) if " eval " in ln)


# ------------------------------------------------------------------ issue 16: the cli/ package has no cycle
@pytest.mark.parametrize("module", ["peftlab.cli.train", "peftlab.cli.explore", "peftlab.cli.demo", "peftlab.cli.sparse",
                                    "peftlab.cli.boundary", "peftlab.train.backbones", "peftlab.train.demo_data"])
def test_each_cli_module_imports_on_its_own(module):
    """Each subcommand module imports first, alone, in a fresh interpreter (no cycle through the parser),
    and no module registers itself into a shared list."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC.parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not any("_EXTENSIONS" in p.read_text() for p in SRC.rglob("*.py"))
    assert not any((SRC / f).exists() for f in ("commands.py", "demo.py", "demo_data.py", "backbones.py", "cli.py"))


def test_two_explorations_on_one_output_dir_are_refused(tmp_path):
    from peftlab.errors import RunLockedError
    from peftlab.explore import explore

    held = fs.lock_run(tmp_path)
    try:
        with pytest.raises(RunLockedError, match="in use"):
            explore({"output_dir": str(tmp_path), "samples": 1})
    finally:
        fs.unlock_run(held)
