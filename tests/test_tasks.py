"""Task loaders (tiny fixtures mimicking each released format) and metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from peftlab.errors import PeftlabError
from peftlab.train import tasks as T
from peftlab.train.metrics import compute

FIX = Path(__file__).parent / "fixtures"
GLUE_DIR = FIX / "glue"


@pytest.mark.parametrize(
    "task,n,first",
    [
        ("cola", 3, (("The cat sat on the mat.",), 1)),
        ("sst2", 2, (('a "great film ',), 1)),
        ("mrpc", 2, (('He said " yes .', "He agreed ."), 1)),
        ("rte", 2, (("A man eats.", "Someone eats."), 0)),
        ("stsb", 3, (("A plane takes off.", "An air plane is taking off."), 5.0)),
        ("mnli", 3, (("A dog runs.", "An animal moves."), 1)),
        ("qqp", 2, (("How to cook?", "How do I cook?"), 1)),
        ("qnli", 2, (("Who won?", "The home team won."), 0)),
        ("wnli", 2, (("The drain is clogged with hair. It has to be cleaned.", "The hair has to be cleaned."), 1)),
    ],
)
def test_glue_loaders(task, n, first):
    ex = T.read_glue(task, GLUE_DIR, "train")
    assert len(ex) == n  # QQP's malformed line is skipped
    assert (ex[0].texts, ex[0].label) == first
    for f in T.GLUE[task].dev:
        assert T.read_glue(task, GLUE_DIR, f)


def test_glue_quotes_and_bom_survive():
    mrpc = T.read_glue("mrpc", GLUE_DIR / "MRPC", "dev")  # task folder given directly also works
    assert mrpc[0].texts[0].count('"') == 1
    assert T.read_glue("cola", GLUE_DIR, "train")[2].texts == ('She said "hi to me.',)


def test_glue_missing_file_is_clear(tmp_path):
    with pytest.raises(PeftlabError, match="not found"):
        T.read_glue("rte", tmp_path, "train")


def test_qa_loaders():
    arc = T.read_arc(FIX / "qa/arc_easy/train.jsonl")
    assert arc[0].choices == [" shark", " whale", " trout"] and arc[0].label == 1 and arc[1].label == 0
    obqa = T.read_openbookqa(FIX / "qa/openbookqa/dev.tsv")
    assert obqa[0].choices == [" planet", " star", " moon", " comet"] and obqa[0].label == 1
    piqa = T.read_piqa(FIX / "qa/piqa/valid.jsonl")
    assert [c.label for c in piqa] == [0, 1] and piqa[1].choices[1] == " Use a dry towel."
    sciq = T.read_sciq(FIX / "qa/sciq/valid.json")
    assert sciq[0].choices[sciq[0].label] == " carbon dioxide" and "Plants take in" in sciq[0].context
    wg = T.read_winogrande(FIX / "qa/winogrande/dev.jsonl")
    assert wg[0].label == 0 and wg[0].choices[1] == "Sarah was taller than Maria so Maria reached the shelf."
    bq = T.read_boolq(FIX / "qa/boolq/dev.jsonl")
    assert [b.label for b in bq] == [1, 0] and bq[0].choices == [" no", " yes"]


def test_table_loaders():
    csv_ex = T.read_table(FIX / "table.csv", ["text"], "label", {"neg": 0, "pos": 1})
    assert [(e.texts, e.label) for e in csv_ex] == [(("good, really",), 1), (("bad",), 0)]
    js = T.read_table(FIX / "table.jsonl", ["a", "b"], "score", regression=True)
    assert js[1].texts == ("z", "w") and js[1].label == 1.5
    with pytest.raises(PeftlabError, match="lacks column"):
        T.read_table(FIX / "table.csv", ["sentence"], "label")
    with pytest.raises(PeftlabError, match="not in"):
        T.read_table(FIX / "table.csv", ["text"], "label", {"neg": 0})


def test_subset_is_fixed_and_seeded():
    items = list(range(100))
    a, b = T.subset(items, 10, 0), T.subset(items, 10, 0)
    assert a == b and len(set(a)) == 10 and a != T.subset(items, 10, 1)
    assert T.subset(items, None, 0) == items


def test_metrics_match_definitions():
    preds, labels = [1, 0, 1, 1], [1, 0, 0, 1]
    m = compute(("accuracy", "f1", "matthews"), preds, labels)
    assert m["accuracy"] == 0.75
    assert math.isclose(m["f1"], 2 * 2 / (2 * 2 + 1 + 0))  # tp=2, fp=1, fn=0
    tp, tn, fp, fn = 2, 1, 1, 0
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert math.isclose(m["matthews"], mcc)
    r = compute(("pearson", "spearman"), [1.0, 2.0, 3.0, 5.0], [2.0, 4.0, 6.0, 7.0])
    assert math.isclose(r["spearman"], 1.0) and 0.9 < r["pearson"] < 1.0
