"""Task loaders on the real released files in ../shared/data (skipped when absent).

Row counts are the official sizes (see ../shared/data/README.md): every line survives GLUE's quoting
quirks (unbalanced quotes, MRPC's BOM, header-less CoLA) and every QA item gets a valid answer index.
"""

from __future__ import annotations

import pytest

from peftlab.train import tasks as T

GLUE_SIZES = {  # task: {split: rows}
    "sst2": {"train": 67349, "dev": 872}, "cola": {"train": 8551, "dev": 1043},
    "mrpc": {"train": 3668, "dev": 408}, "rte": {"train": 2490, "dev": 277},
    "wnli": {"train": 635, "dev": 71}, "qnli": {"dev": 5463},
}
GLUE_LABELS = {("sst2", "dev"): 444, ("cola", "dev"): 721, ("mrpc", "dev"): 279, ("mrpc", "train"): 2474,
               ("sst2", "train"): 37569, ("rte", "dev"): 131, ("wnli", "dev"): 31}  # rows with label 1


@pytest.mark.parametrize("task", sorted(GLUE_SIZES))
def test_glue_files_load_completely(shared_data, task):
    for split, n in GLUE_SIZES[task].items():
        ex = T.read_glue(task, shared_data / "glue", split)
        assert len(ex) == n, (task, split)
        assert all(len(e.texts) == len(T.GLUE[task].columns) and all(t for t in e.texts) for e in ex)
        if (task, split) in GLUE_LABELS:
            assert sum(e.label == 1 for e in ex) == GLUE_LABELS[task, split]
    if task == "mrpc":  # BOM stripped: the header was found, quotes kept verbatim
        assert any('"' in t for e in T.read_glue(task, shared_data / "glue", "train") for t in e.texts)


QA_SIZES = {
    "arc_easy": ("arc_easy/ARC-Easy-Train.jsonl", 2251, "arc_easy/ARC-Easy-Dev.jsonl", 570),
    "arc_challenge": ("arc_challenge/ARC-Challenge-Train.jsonl", 1119, "arc_challenge/ARC-Challenge-Dev.jsonl", 299),
    "openbookqa": ("openbookqa/train.tsv", 4957, "openbookqa/dev.tsv", 500),
    "piqa": (None, 0, "piqa/valid.jsonl", 1838),
    "sciq": (None, 0, "sciq/valid.json", 1000),
    "winogrande": ("winogrande/train_s.jsonl", 640, "winogrande/dev.jsonl", 1267),
}


@pytest.mark.parametrize("task", sorted(QA_SIZES))
def test_qa_files_load_completely(shared_data, task):
    tr, n_tr, dv, n_dv = QA_SIZES[task]
    assert T.QA_DEFAULT_FILES[task] == (tr, dv)
    reader = T.QA_READERS[task]
    for f, n in ((tr, n_tr), (dv, n_dv)):
        if f is None:
            continue
        ex = reader(shared_data / "qa" / f)
        assert len(ex) == n, (task, f)
        assert all(0 <= e.label < len(e.choices) and len(e.choices) >= 2 for e in ex)
        assert all(all(c.strip() for c in e.choices) for e in ex)
        labels = [e.label for e in ex]
        assert len(set(labels)) >= 2 and max(labels.count(k) for k in set(labels)) < 0.6 * len(labels)
