"""Tasks: GLUE (local GLUE-format TSVs or the HF hub), multiple-choice QA, user CSV/JSONL.

A classification/regression task yields ``Example(texts, label)``; a multiple-choice task yields
``Choice(context, choices, label)``. GLUE TSVs are read with ``csv.QUOTE_NONE`` (GLUE text holds
unbalanced quotes), MRPC's UTF-8 BOM is stripped, CoLA has no header.
"""

from __future__ import annotations

import csv
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import PeftlabError

csv.field_size_limit(sys.maxsize)


@dataclass
class Example:
    texts: tuple[str, ...]
    label: float | int


@dataclass
class Choice:
    context: str
    choices: list[str]
    label: int


@dataclass(frozen=True)
class GlueSpec:
    dir: str
    columns: tuple  # column names (or indices for header-less CoLA) of the text fields
    label: str | int
    labels: tuple | None  # label strings in order (None = already ints / regression)
    metrics: tuple[str, ...]
    dev: tuple[str, ...] = ("dev.tsv",)
    hub: tuple[str, str, tuple[str, ...]] | None = None  # (hf config, dev split names)


GLUE: dict[str, GlueSpec] = {
    "cola": GlueSpec("CoLA", (3,), 1, None, ("matthews", "accuracy")),
    "sst2": GlueSpec("SST-2", ("sentence",), "label", None, ("accuracy",)),
    "mrpc": GlueSpec("MRPC", ("#1 String", "#2 String"), "Quality", None, ("f1", "accuracy")),
    "qqp": GlueSpec("QQP", ("question1", "question2"), "is_duplicate", None, ("f1", "accuracy")),
    "stsb": GlueSpec("STS-B", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman")),
    "mnli": GlueSpec("MNLI", ("sentence1", "sentence2"), "gold_label", ("contradiction", "entailment", "neutral"),
                     ("accuracy",), dev=("dev_matched.tsv", "dev_mismatched.tsv")),
    "qnli": GlueSpec("QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), ("accuracy",)),
    "rte": GlueSpec("RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), ("accuracy",)),
    "wnli": GlueSpec("WNLI", ("sentence1", "sentence2"), "label", None, ("accuracy",)),
}
GLUE_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "qnli": "qnli"}


def glue_num_labels(task: str) -> int:
    spec = GLUE[task]
    if task == "stsb":
        return 1
    return len(spec.labels) if spec.labels else 2


def _read_tsv(path: Path) -> tuple[list[str] | None, list[list[str]]]:
    if not path.is_file():
        raise PeftlabError(f"data file not found: {path}")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = [r for r in rows if r]
    return rows[0], rows[1:]


def read_glue(task: str, path: Path, split: str) -> list[Example]:
    """``split``: 'train' or one of the dev files (without .tsv)."""
    spec = GLUE[task]
    path = Path(path)
    if path.name != spec.dir and (path / spec.dir).is_dir():
        path = path / spec.dir
    f = path / (split if split.endswith(".tsv") else f"{split}.tsv")
    if task == "cola":  # no header: source, label, original mark, sentence
        if not f.is_file():
            raise PeftlabError(f"data file not found: {f}")
        with open(f, encoding="utf-8", newline="") as fh:
            rows = [r for r in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
        return [Example((r[3],), int(r[1])) for r in rows]
    header, rows = _read_tsv(f)
    try:
        cols = [header.index(c) for c in spec.columns]
        li = header.index(spec.label)
    except ValueError:
        raise PeftlabError(f"{f}: expected columns {spec.columns + (spec.label,)}, found {header}") from None
    out = []
    for r in rows:
        if len(r) <= max(cols + [li]):
            continue  # GLUE has a few malformed lines (QQP); skip them like the reference scripts
        raw = r[li].strip()
        if task == "stsb":
            label: float | int = float(raw)
        elif spec.labels:
            if raw not in spec.labels:
                continue
            label = spec.labels.index(raw)
        else:
            label = int(raw)
        out.append(Example(tuple(r[c] for c in cols), label))
    return out


HUB_COLUMNS = {"cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
               "qqp": ("question1", "question2"), "stsb": ("sentence1", "sentence2"), "mnli": ("premise", "hypothesis"),
               "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2")}
HUB_DEV = {"mnli": {"dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}}


def glue_from_hub(task: str, split: str) -> list[Example]:
    """A GLUE split from the Hugging Face hub (``nyu-mll/glue``) via ``datasets``; needs the network.

    Hub label ids are mapped to this module's label order by name (the hub's MNLI order differs),
    and unlabelled rows (test splits, label -1) are dropped.
    """
    try:
        import datasets
    except ImportError:
        raise PeftlabError("task.from_hub needs the `datasets` package (pip install datasets)") from None
    spec = GLUE[task]
    ds = datasets.load_dataset("nyu-mll/glue", task, split=split)
    names = getattr(ds.features["label"], "names", None)
    out = []
    for row in ds:
        y = row["label"]
        if y == -1:
            continue
        if spec.labels and names:
            y = spec.labels.index(names[y])
        out.append(Example(tuple(row[k] for k in HUB_COLUMNS[task]), float(y) if task == "stsb" else int(y)))
    return out


def read_table(path: Path, text_columns: list[str], label_column: str, label_map: dict | None = None) -> list[Example]:
    """User data: CSV or JSONL with named text/label columns."""
    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"data file not found: {path}")
    if path.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
    out = []
    for i, row in enumerate(rows):
        missing = [c for c in [*text_columns, label_column] if c not in row]
        if missing:
            raise PeftlabError(f"{path}: row {i + 1} lacks column(s) {missing}; it has {sorted(row)}")
        lab = row[label_column]
        if label_map is not None:
            if str(lab) not in label_map:
                raise PeftlabError(f"{path}: row {i + 1}: label {lab!r} not in {sorted(label_map)}")
            lab = label_map[str(lab)]
        else:
            lab = float(lab) if isinstance(lab, float) or (isinstance(lab, str) and "." in lab) else int(lab)
        out.append(Example(tuple(str(row[c]) for c in text_columns), lab))
    return out


# ------------------------------------------------------------------- multiple-choice QA
def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise PeftlabError(f"data file not found: {path}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _labels(path: Path) -> list[str]:
    if not path.is_file():
        raise PeftlabError(f"label file not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_arc(path: Path) -> list[Choice]:
    out = []
    for r in _jsonl(path):
        ch = r["question"]["choices"]
        labels = [c["label"] for c in ch]
        if r["answerKey"] not in labels:
            continue
        out.append(Choice(f"Question: {r['question']['stem']}\nAnswer:", [" " + c["text"] for c in ch],
                          labels.index(r["answerKey"])))
    return out


def read_openbookqa(path: Path) -> list[Choice]:
    header, rows = _read_tsv(path)
    qi, ci, ai = header.index("Question Stem"), header.index("Choices"), header.index("Answer Key")
    out = []
    for r in rows:
        parts = re.split(r"\(([A-D])\)\s*", r[ci])[1:]
        labels, texts = parts[0::2], [t.strip() for t in parts[1::2]]
        out.append(Choice(f"Question: {r[qi]}\nAnswer:", [" " + t for t in texts], labels.index(r[ai].strip())))
    return out


def read_piqa(path: Path, labels_path: Path | None = None) -> list[Choice]:
    rows = _jsonl(path)
    labels = _labels(labels_path or path.with_name(path.stem + "-labels.lst"))
    if len(labels) != len(rows):
        raise PeftlabError(f"{path}: {len(rows)} rows but {len(labels)} labels")
    return [Choice(f"Question: {r['goal']}\nAnswer:", [" " + r["sol1"], " " + r["sol2"]], int(y)) for r, y in zip(rows, labels)]


def read_sciq(path: Path, seed: int = 0) -> list[Choice]:
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    rng = random.Random(seed)  # fixed choice order per example
    out = []
    for r in rows:
        ch = [r["correct_answer"], r["distractor1"], r["distractor2"], r["distractor3"]]
        order = list(range(4))
        rng.shuffle(order)
        ctx = (r.get("support") or "").strip()
        ctx = f"{ctx}\n" if ctx else ""
        out.append(Choice(f"{ctx}Question: {r['question']}\nAnswer:", [" " + ch[i] for i in order], order.index(0)))
    return out


def read_winogrande(path: Path, labels_path: Path | None = None) -> list[Choice]:
    """Partial scoring: context = text up to the blank with the option filled in; the shared
    continuation after the blank is scored (as in GPT-3). Encoded as the choice strings."""
    rows = _jsonl(path)
    lp = labels_path or path.with_name(path.stem + "-labels.lst")
    labels = _labels(lp) if lp.is_file() else [r["answer"] for r in rows]
    out = []
    for r, y in zip(rows, labels):
        pre, post = r["sentence"].split("_", 1)
        out.append(Choice("", [pre + r["option1"] + post, pre + r["option2"] + post], int(y) - 1))
    return out


def read_boolq(path: Path) -> list[Choice]:
    out = []
    for r in _jsonl(path):
        ans = r.get("answer", r.get("label"))
        if isinstance(ans, str):
            ans = ans.lower() in ("true", "yes", "1")
        out.append(Choice(f"{r.get('passage', '')}\nQuestion: {r['question']}?\nAnswer:", [" no", " yes"], int(bool(ans))))
    return out


QA_READERS = {
    "arc_easy": read_arc, "arc_challenge": read_arc, "openbookqa": read_openbookqa, "piqa": read_piqa,
    "sciq": read_sciq, "winogrande": read_winogrande, "boolq": read_boolq,
}
QA_DEFAULT_FILES = {  # relative to a data root laid out like shared/data/qa
    "arc_easy": ("arc_easy/ARC-Easy-Train.jsonl", "arc_easy/ARC-Easy-Dev.jsonl"),
    "arc_challenge": ("arc_challenge/ARC-Challenge-Train.jsonl", "arc_challenge/ARC-Challenge-Dev.jsonl"),
    "openbookqa": ("openbookqa/train.tsv", "openbookqa/dev.tsv"),
    "piqa": (None, "piqa/valid.jsonl"),
    "sciq": (None, "sciq/valid.json"),
    "winogrande": ("winogrande/train_s.jsonl", "winogrande/dev.jsonl"),
    "boolq": ("boolq/train.jsonl", "boolq/dev.jsonl"),
}


def subset(items: list, limit: int | None, seed: int) -> list:
    """A fixed, seeded random subset (the same for every run with the same seed)."""
    if limit is None or limit >= len(items):
        return items
    idx = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in idx]
