"""The design-space explorer: sampling, EDF, stage-wise refinement, resume after kill, failures, backends."""

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

from peftlab.explore import edf, explore, load, summarize
from peftlab.explore.space import Space, sample


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A tiny BERT classifier + word-level tokenizer covering the shipped demo data, saved locally."""
    import transformers

    from peftlab.train.demo_data import NEG, POS, SUBJECTS, TEMPLATES

    words = sorted({w for t in TEMPLATES + SUBJECTS + POS + NEG for w in t.replace(",", " , ").replace(".", " . ")
                    .replace("'", " ' ").replace("{s}", " ").replace("{a}", " ").split()})
    d = tmp_path_factory.mktemp("tinybert")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    cfg = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def space_cfg(model_dir, out, **kw):
    return {"model": model_dir, "tasks": [{"name": "demo", "train_limit": 64, "eval_limit": 48}],
            "train": {"epochs": 1, "batch_size": 16, "lr": 5e-3, "max_length": 24},
            "space": {"budget": 0.05}, "samples": 2, "seed": 0, "stages": ["pattern"], "output_dir": str(out), **kw}


def test_sampler_is_reproducible_and_respects_fixed_components():
    sp = Space(budget=0.01)
    a = [sample(sp, f"k{i}") for i in range(20)]
    assert a == [sample(sp, f"k{i}") for i in range(20)]
    assert len({json.dumps(x) for x in a}) > 10  # really random across keys
    fixed = sp.fixed(pattern="spindle", allocation="uniform", tuned_groups=[0, 1, 2, 3])
    for i in range(10):
        s = sample(fixed, f"k{i}")
        assert s["pattern"] == "spindle" and s["allocation"] == "uniform" and s["tuned_groups"] == [0, 1, 2, 3]
        assert all(sub and set(sub) <= {"A", "P", "B", "L"} for sub in s["strategies"])
    half = sp.fixed(strategies=[["A"], "free", ["B", "L"], "free"])
    assert all(sample(half, f"x{i}")["strategies"][0] == ["A"] for i in range(5))


def test_edf_and_summary():
    errs = [10.0, 20.0, 20.0, 40.0]
    grid, F = edf(errs, [5, 10, 15, 20, 30, 50])
    assert F == [0.0, 0.0, 0.25, 0.25, 0.75, 1.0]  # F(e) = fraction of errors strictly below e
    s = summarize([90.0, 80.0, 80.0, 60.0])
    assert s["mean"] == 77.5 and s["median"] == 80.0 and s["best"] == 90.0 and s["n"] == 4


def test_config_validation(tmp_path):
    from peftlab.errors import PeftlabError

    with pytest.raises(PeftlabError, match="unknown explore key"):
        load({"sampels": 3})
    with pytest.raises(PeftlabError, match="stage"):
        load({"stages": ["grouping-ish"]})


def test_stagewise_exploration_local_with_report(tiny_bert_dir, tmp_path):
    cfg = space_cfg(tiny_bert_dir, tmp_path / "ex", stages=["pattern", "strategies"],
                    strategy_candidates=[["L"], ["B", "L"]], space={"budget": 0.05, "groups": 2,
                                                                    "allocation": "uniform", "tuned_groups": [0, 1]})
    summary = explore(cfg)
    recs = [json.loads(x) for x in (tmp_path / "ex" / "trials.jsonl").read_text().splitlines()]
    assert len(recs) == 5 * 2 + 2 * 2 * 2  # 5 patterns x 2 samples, then 2 groups x 2 candidates x 2
    assert all("score" in r and 0 <= r["score"] <= 100 for r in recs)
    # sample-major order: every pattern's sample k before any sample k+1 (an early stop stays balanced)
    assert [r["id"].rsplit("/", 1)[1] for r in recs[:10]] == ["0"] * 5 + ["1"] * 5
    assert len({r["candidate"] for r in recs[:5]}) == 5
    assert summary["chosen"]["pattern"] in ("increasing", "uniform", "decreasing", "spindle", "bottleneck")
    assert len(summary["chosen"]["strategies"]) == 2
    later = [r for r in recs if r["stage"].startswith("strategies")]
    assert all(r["s4"]["pattern"] == summary["chosen"]["pattern"] for r in later)  # earlier choice fixed
    report = (tmp_path / "ex" / "report.md").read_text()
    assert "| mean demo |" in report  # per-task mean columns
    pat = json.loads((tmp_path / "ex" / "summary.json").read_text())["stages"][0]["stats"]
    for lab, st in pat.items():  # per-task means agree with the trial log
        mine = [r["scores"]["demo"] for r in recs if r["stage"] == "pattern" and r["candidate"] == lab]
        assert st["tasks"]["demo"] == pytest.approx(sum(mine) / len(mine))
    assert "Stage pattern" in report and (tmp_path / "ex" / "edf_pattern.png").stat().st_size > 1000


def test_failing_trial_is_recorded_not_fatal(tiny_bert_dir, tmp_path):
    cfg = space_cfg(tiny_bert_dir, tmp_path / "ex", space={"budget": 0.05, "pattern": ["spindle", "uniform"],
                                                           "strategies": [["P"], ["L"], ["L"], ["L"]],
                                                           "tuned_groups": [0, 1, 2, 3]})
    cfg["train"]["max_length"] = 3  # invalid (< 8): every trial fails inside the training config check
    with pytest.raises(Exception, match="every trial failed"):
        explore(cfg)
    recs = [json.loads(x) for x in (tmp_path / "ex" / "trials.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all("error" in r for r in recs)


RUN = "import sys; from peftlab.explore import explore; explore(sys.argv[1])"


def test_killed_exploration_resumes_where_it_stopped(tiny_bert_dir, tmp_path):
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(space_cfg(tiny_bert_dir, tmp_path / "ex", samples=3)))
    log = tmp_path / "ex" / "trials.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(p)])
    deadline = time.time() + 300
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 4):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = [json.loads(x)["id"] for x in log.read_text().splitlines()]
    assert 4 <= len(first) < 15
    subprocess.run([sys.executable, "-c", RUN, str(p)], check=True, timeout=600)
    ids = [json.loads(x)["id"] for x in log.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 15 and ids[: len(first)] == first  # nothing redone, nothing lost
    assert (tmp_path / "ex" / "summary.json").is_file()


@pytest.mark.distributed
def test_ray_backend_two_workers_matches_local(tiny_bert_dir, tmp_path):
    ray = pytest.importorskip("ray")
    local = explore(space_cfg(tiny_bert_dir, tmp_path / "local"))
    try:
        remote = explore(space_cfg(tiny_bert_dir, tmp_path / "ray", backend="ray", workers=2))
    finally:
        ray.shutdown()
    scores = lambda out: {json.loads(x)["id"]: round(json.loads(x)["score"], 6)  # noqa: E731
                          for x in (Path(out) / "trials.jsonl").read_text().splitlines()}
    assert scores(tmp_path / "local") == scores(tmp_path / "ray")  # same trials, same results
    assert remote["chosen"] == local["chosen"]


def test_cli_explore(tiny_bert_dir, tmp_path):
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(space_cfg(tiny_bert_dir, tmp_path / "ex", samples=1)))
    r = subprocess.run([sys.executable, "-m", "peftlab", "explore", str(p), "space.budget=0.04"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "report:" in r.stdout and len((tmp_path / "ex" / "trials.jsonl").read_text().splitlines()) == 5


def test_python_dash_m_peftlab_cli_knows_every_command():
    """`python -m peftlab.cli` runs the module as __main__; extensions (explore) must still register."""
    r = subprocess.run([sys.executable, "-m", "peftlab.cli", "explore", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--backend" in r.stdout, r.stderr[-2000:]


def _trials(out: Path) -> dict[str, dict]:
    recs = {}
    for line in (out / "trials.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[r["id"]] = r  # the last record of an id is the one that counts
    return recs


def test_memory_budget_skips_and_records_the_designs_the_planner_says_do_not_fit(tiny_bert_dir, tmp_path):
    """A budget below every design: all planned, none trained. A budget between the designs' predicted peaks
    (the same output_dir: skips judged against another budget are planned again): those above it are
    skipped and recorded with their predicted peak, those below are trained."""
    from peftlab.planner import fmt_bytes

    cfg = space_cfg(tiny_bert_dir, tmp_path / "ex", samples=1, memory_budget="1KiB")
    with pytest.raises(Exception, match="every trial failed or was over the memory budget"):
        explore(cfg)
    first = _trials(tmp_path / "ex")
    assert len(first) == 5 and all("skipped" in r and "score" not in r for r in first.values())
    assert not any((tmp_path / "ex" / "trials").glob("*/*/results.json"))  # nothing was trained
    peaks = sorted(r["predicted_peak"] for r in first.values())
    assert peaks[1] < peaks[-1], peaks  # the designs differ in predicted memory
    budget = (peaks[1] + peaks[2]) // 2 if peaks[1] < peaks[2] else (peaks[1] + peaks[-1]) // 2
    summary = explore({**cfg, "memory_budget": budget})
    recs = _trials(tmp_path / "ex")
    over = {i for i, r in first.items() if r["predicted_peak"] > budget}
    assert over and len(over) < 5
    assert {i for i, r in recs.items() if "skipped" in r} == over
    for i, r in recs.items():
        assert r["memory_budget"] == budget and r["predicted_peak"] == first[i]["predicted_peak"]
        assert ("score" in r) == (i not in over)
        if i in over:
            assert fmt_bytes(budget) in r["skipped"] and "demo" in r["skipped"]
    stage = summary["stages"][0]
    assert {s["id"] for s in stage["skipped"]} == over and stage["chosen"] not in {recs[i]["candidate"] for i in over}
    report = (tmp_path / "ex" / "report.md").read_text()
    assert "over the memory budget" in report and all(i in report for i in over)


def test_cli_explore_budget(tiny_bert_dir, tmp_path, capsys):
    from test_reliability import assert_one_line_error, cli

    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(space_cfg(tiny_bert_dir, tmp_path / "ex", samples=1)))
    rc, out, err = cli(capsys, "explore", str(p), "--budget", "lots")
    assert_one_line_error(rc, err, "memory_budget", "lots")
    rc, out, err = cli(capsys, "explore", str(p), "memory_budget=2KiB")
    assert_one_line_error(rc, err, "over the memory budget")
    assert out.count("SKIPPED predicted peak") == 5 and "exceeds the memory budget 2.00 KiB" in out


def test_exploration_over_hybrid_strategies(tiny_bert_dir, tmp_path):
    """The hybrids are strategies of the design space: the strategies stage tries each per group."""
    cfg = space_cfg(tiny_bert_dir, tmp_path / "ex", stages=["strategies"], samples=1,
                    strategy_candidates=[["MAM"], ["UniPELT"], ["Compacter"]],
                    space={"budget": 0.05, "groups": 2, "pattern": "uniform", "allocation": "uniform",
                           "tuned_groups": [0, 1]})
    summary = explore(cfg)
    recs = [json.loads(x) for x in (tmp_path / "ex" / "trials.jsonl").read_text().splitlines()]
    assert len(recs) == 2 * 3 and all("score" in r for r in recs), [r.get("error") for r in recs]
    assert {json.dumps(r["s4"]["strategies"][0]) for r in recs if r["stage"] == "strategies-G1"} == {
        '["MAM"]', '["UniPELT"]', '["Compacter"]'}
    assert all(s[0] in ("MAM", "UniPELT", "Compacter") for s in summary["chosen"]["strategies"])
