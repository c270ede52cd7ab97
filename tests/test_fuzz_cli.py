"""Property-based fuzzing of the CLI entry point (in-process): random YAML configs, ``key=value`` overrides
and table files (CSV/JSONL). Properties: no traceback; exit 0, or exit 2 with exactly one
``peftlab: error:`` line; nothing written or deleted outside the run directory.

Every example trains at most one step of a tiny local BERT (``train.max_steps=1`` and
``train.grad_accum=1`` are appended last, so a fuzzed valid value cannot start a long run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from local_model import save_tiny_bert  # noqa: E402

from peftlab.cli import main  # noqa: E402

KEYS = ["model", "method", "method_args", "method_args.r", "method_args.targets", "method_args.target_regex",
        "method_args.alpha", "task", "task.name", "task.labels", "task.text_columns", "task.label_column",
        "task.regression", "task.train_limit", "task.eval_limit", "task.train_file", "train", "train.lr",
        "train.epochs", "train.batch_size", "train.eval_batch_size", "train.max_length", "train.seed",
        "train.warmup_ratio", "train.warmup_steps", "train.weight_decay", "train.max_grad_norm", "train.adam_betas",
        "train.adam_eps", "train.schedule", "train.save_every", "train.eval_every", "train.patience", "train.metric",
        "train.log_every", "train.progress", "model_args", "model_args.hidden_dropout_prob", "model_args.dtype",
        "output", "train.lrr", "task.name.x"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**7, 10**7), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=8), st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=4)), max_size=3),
                   st.dictionaries(st.text(max_size=4), st.integers(-3, 3), max_size=2))
# PEFTLAB_FUZZ_EXAMPLES=200 for a longer, randomised search (default: 12 fixed examples per test, < 90 s in all)
_N = int(os.environ.get("PEFTLAB_FUZZ_EXAMPLES", "12"))
SETTINGS = settings(max_examples=_N, deadline=None, database=None, derandomize="PEFTLAB_FUZZ_EXAMPLES" not in os.environ,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TABLE = "text,label\na good film,pos\nan awful film,neg\nfine,pos\ndull,neg\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


class Sandbox:
    """A fresh folder per example (the cwd during the call); checks what the call created or removed."""

    def __init__(self, root: Path, monkeypatch):
        self.root, self.monkeypatch, self.n = root, monkeypatch, 0

    def new(self) -> Path:
        self.n += 1
        ws = self.root / f"ex{self.n}"
        ws.mkdir()
        (ws / "t.csv").write_text(TABLE)
        return ws

    def call(self, capsys, ws: Path, argv: list[str]) -> None:
        before = {p for p in self.root.rglob("*")}
        self.monkeypatch.chdir(ws)
        capsys.readouterr()
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse usage errors
            rc = e.code
        out, err = capsys.readouterr()
        after = {p for p in self.root.rglob("*")}
        run = ws / "run"
        assert "Traceback" not in err + out, err
        assert rc in (0, 2), (rc, err)
        if rc == 2 and not err.startswith("usage:"):
            errors = [ln for ln in err.splitlines() if ln.startswith("peftlab: error:")]
            assert len(errors) == 1, err
        assert all(p == run or run in p.parents for p in after - before), sorted(map(str, after - before))
        assert all(p == run or run in p.parents for p in before - after), sorted(map(str, before - after))


@pytest.fixture
def sandbox(tmp_path, monkeypatch) -> Sandbox:
    return Sandbox(tmp_path, monkeypatch)


def base(tiny: str, ws: Path) -> dict:
    return {"model": tiny, "method": "lora", "method_args": {"r": 2, "targets": ["query", "value"]},
            "task": {"name": "table", "train_file": str(ws / "t.csv"), "dev_file": str(ws / "t.csv")},
            "output_dir": str(ws / "run"),
            "train": {"max_steps": 1, "batch_size": 2, "lr": 1e-3, "max_length": 32, "progress": False}}


FORCED = ["train.max_steps=1", "train.grad_accum=1"]


@SETTINGS
@given(edits=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=3))
def test_fuzzed_yaml_configs(tiny, sandbox, capsys, edits):
    ws = sandbox.new()
    c = base(tiny, ws)
    for key, value in edits:
        node, parts = c, key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    (ws / "c.yaml").write_text(yaml.safe_dump(c, allow_unicode=True))
    sandbox.call(capsys, ws, ["train", str(ws / "c.yaml"), *FORCED])


@SETTINGS
@given(overrides=st.lists(st.one_of(
    st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={json.dumps(kv[1])}"),
    st.tuples(st.sampled_from(KEYS), st.text(max_size=10)).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=12).filter(lambda s: not s.startswith("-"))), max_size=3))
def test_fuzzed_overrides(tiny, sandbox, capsys, overrides):
    ws = sandbox.new()
    (ws / "c.yaml").write_text(yaml.safe_dump(base(tiny, ws)))
    sandbox.call(capsys, ws, ["train", str(ws / "c.yaml"), *overrides, *FORCED])


CELL = st.one_of(st.text(max_size=6), st.integers(-3, 3), st.none(), st.booleans(), st.floats(allow_nan=True))


@SETTINGS
@given(kind=st.sampled_from(["csv", "jsonl"]), header=st.lists(st.sampled_from(["text", "label", "other", ""]), max_size=4),
       rows=st.lists(st.lists(CELL, max_size=4), max_size=5), labels=st.sampled_from([None, ["neg", "pos"], ["0", "1"]]),
       raw=st.one_of(st.none(), st.binary(max_size=20)))
def test_fuzzed_table_files(tiny, sandbox, capsys, kind, header, rows, labels, raw):
    ws = sandbox.new()
    f = ws / f"data.{kind}"
    if raw is not None:
        f.write_bytes(raw)
    elif kind == "csv":
        f.write_text("\n".join(",".join("" if v is None else str(v) for v in r) for r in [header, *rows]) + "\n")
    else:
        f.write_text("".join(json.dumps(dict(zip(header, r))) + "\n" for r in rows))
    c = base(tiny, ws)
    c["task"].update(train_file=str(f), dev_file=str(f), labels=labels)
    (ws / "c.yaml").write_text(yaml.safe_dump(c))
    sandbox.call(capsys, ws, ["train", str(ws / "c.yaml"), *FORCED])
