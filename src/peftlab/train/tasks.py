"""Tasks: GLUE (local GLUE-format TSVs or the HF hub), multiple-choice QA, user CSV/JSONL.

A classification/regression task yields ``Example(texts, label)``; a multiple-choice task yields
``Choice(context, choices, label)``. GLUE TSVs are read with ``csv.QUOTE_NONE`` (GLUE text holds
unbalanced quotes), MRPC's UTF-8 BOM is stripped, CoLA has no header.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, PeftlabError
from . import fs

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


def read_text(path: Path) -> str:
    """A UTF-8 data file (BOM stripped); :class:`DataError` naming the file if missing, binary or not UTF-8."""
    return fs.read_text(path, "data file", DataError)


def _tsv(path: Path) -> list[list[str]]:
    text = read_text(path)
    return [r for r in csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE) if r]


def _read_tsv(path: Path) -> tuple[list[str] | None, list[list[str]]]:
    rows = _tsv(path)
    if not rows:
        raise DataError(f"{path}: empty file")
    return rows[0], rows[1:]


class _BadRow(Exception):
    """Raised by a row parser; :func:`_rows` adds the file and row number."""


def _rows(path: Path, rows, parse) -> list:
    """``parse(row)`` for each row; a malformed row raises :class:`DataError` naming the file and row."""
    out = []
    for i, r in enumerate(rows, 1):
        try:
            item = parse(r)
        except PeftlabError:
            raise
        except _BadRow as e:
            raise DataError(f"{path}: row {i}: {e}") from None
        except KeyError as e:
            raise DataError(f"{path}: row {i}: missing field {e}") from None
        except (IndexError, ValueError, TypeError, AttributeError) as e:
            raise DataError(f"{path}: row {i}: malformed ({type(e).__name__}: {e})") from None
        if item is not None:
            out.append(item)
    return out


def read_glue(task: str, path: Path, split: str) -> list[Example]:
    """``split``: 'train' or one of the dev files (without .tsv)."""
    spec = GLUE[task]
    path = Path(path)
    if path.name != spec.dir and (path / spec.dir).is_dir():
        path = path / spec.dir
    f = path / (split if split.endswith(".tsv") else f"{split}.tsv")
    if task == "cola":  # no header: source, label, original mark, sentence
        return _rows(f, _tsv(f), lambda r: Example((r[3],), int(r[1])))
    header, rows = _read_tsv(f)
    try:
        cols = [header.index(c) for c in spec.columns]
        li = header.index(spec.label)
    except ValueError:
        raise PeftlabError(f"{f}: expected columns {spec.columns + (spec.label,)}, found {header}") from None

    def parse(r):
        if len(r) <= max(cols + [li]):
            return None  # GLUE has a few malformed lines (QQP); skip them like the reference scripts
        raw = r[li].strip()
        if task == "stsb":
            label: float | int = float(raw)
        elif spec.labels:
            if raw not in spec.labels:
                return None
            label = spec.labels.index(raw)
        else:
            label = int(raw)
        return Example(tuple(r[c] for c in cols), label)

    return _rows(f, rows, parse)


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


def _json_rows(path: Path) -> list[tuple[str, object]]:
    """(where, value) of each JSONL line (or each element of a JSON array file)."""
    text = read_text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return [(f"{path}: item {i}", r) for i, r in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path}: line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
    return out


def _table_records(path: Path) -> list[tuple[str, dict]]:
    if path.suffix in (".jsonl", ".json"):
        rows = _json_rows(path)
        for where, r in rows:
            if not isinstance(r, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(r).__name__}")
    else:
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
        rows = []
        for r in reader:
            where = f"{path}: line {reader.line_num}"
            if None in r or any(v is None for v in r.values()):
                n = len(r) - (None in r) + len(r.get(None) or [])
                raise DataError(f"{where}: {n if None in r else 'fewer'} fields, but the header has {len(reader.fieldnames)}")
            rows.append((where, r))
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty file (expected a header row and data rows)")
    if not rows:
        raise DataError(f"{path}: no data rows")
    return rows


def table_rows(path: Path, text_columns: list[str] | None, label_column: str) -> list[tuple[tuple[str, ...], object, str]]:
    """(texts, raw label, where) of each row of a user CSV/JSONL file. ``text_columns`` None: every column
    but the label, at most two; a file with more is refused, naming them."""
    path = Path(path)
    rows = _table_records(path)
    first_where, first = rows[0]
    cols = list(text_columns) if text_columns else [c for c in first if c != label_column]
    if not text_columns and len(cols) > 2:
        raise DataError(f"{path}: {len(cols)} text columns besides {label_column!r} ({', '.join(map(repr, cols))}); "
                        "name the 1 or 2 to use in task.text_columns")
    if not cols:
        raise DataError(f"{first_where}: no text column besides the label column {label_column!r}")
    out = []
    for where, row in rows:
        missing = [c for c in [*cols, label_column] if c not in row]
        if missing:
            raise DataError(f"{where}: lacks column(s) {missing}; it has {sorted(map(str, row))}")
        if not text_columns and set(row) != set(first):
            raise DataError(f"{where}: columns {sorted(map(str, row))} differ from {first_where}'s {sorted(map(str, first))}")
        texts = []
        for c in cols:
            v = row[c]
            if v is None or isinstance(v, (bool, list, dict)):
                raise DataError(f"{where}: column {c!r} is {json.dumps(v)}, not text")
            texts.append(str(v))
        out.append((tuple(texts), row[label_column], where))
    return out


def number_label(v, where: str) -> float:
    """A regression target: a finite number (or a string holding one)."""
    if v is None or isinstance(v, (bool, list, dict)):
        raise DataError(f"{where}: label {json.dumps(v)} is not a number")
    try:
        x = float(v)
    except ValueError:
        raise DataError(f"{where}: label {v!r} is not a number (a regression task needs numeric labels)") from None
    if not math.isfinite(x):
        raise DataError(f"{where}: label {v!r} is not finite")
    return x


def class_key(v, where: str) -> int | str:
    """A class label as found in the data: an integer (also from "3" or 3.0) or a non-empty string."""
    if v is None or isinstance(v, (bool, list, dict)):
        raise DataError(f"{where}: label {json.dumps(v)} is not a class label")
    if isinstance(v, float):
        if not v.is_integer():
            raise DataError(f"{where}: label {v} is not a class (numeric targets: set task.regression: true)")
        return int(v)
    if isinstance(v, int):
        return v
    s = str(v).strip()
    if not s:
        raise DataError(f"{where}: empty label")
    return int(s) if re.fullmatch(r"[+-]?\d+", s) else s


def map_label(v, where: str, label_map: dict[str, int]) -> int:
    for key in (str(v), None):
        key = key if key is not None else str(class_key(v, where))
        if key in label_map:
            return label_map[key]
    raise DataError(f"{where}: label {json.dumps(v)} not in task.labels {list(label_map)}")


def infer_classes(rows: list[tuple[tuple[str, ...], object, str]]) -> list[int | str]:
    """The sorted distinct class labels of the rows; refuses mixed numbers and strings, or a single class."""
    keys = {class_key(raw, where): where for _, raw, where in rows}
    kinds = {type(k) for k in keys}
    if len(kinds) > 1:
        i = next(k for k in keys if isinstance(k, int))
        s = next(k for k in keys if isinstance(k, str))
        raise DataError(f"{keys[s]}: label {s!r} is a string but {keys[i]} has the number {i}; list the labels in task.labels")
    if len(keys) < 2:
        raise DataError(f"{next(iter(keys.values()))}: the data holds a single class {next(iter(keys))!r}; "
                        "classification needs 2 or more (or set task.regression: true)")
    return sorted(keys)


def read_table(path: Path, text_columns: list[str] | None, label_column: str, label_map: dict | None = None,
               regression: bool = False) -> list[Example]:
    """User data: CSV or JSONL with named text/label columns. Labels: mapped by ``label_map`` (name -> class),
    numbers when ``regression``, else class ids 0..K-1 as found in the file."""
    rows = table_rows(path, text_columns, label_column)
    if regression:
        return [Example(t, number_label(y, w)) for t, y, w in rows]
    if label_map is None:
        label_map = {str(c): i for i, c in enumerate(infer_classes(rows))}
    return [Example(t, map_label(y, w, label_map)) for t, y, w in rows]


# ------------------------------------------------------------------- multiple-choice QA
def _jsonl(path: Path) -> list[dict]:
    rows = _json_rows(Path(path))
    for where, r in rows:
        if not isinstance(r, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(r).__name__}")
    return [r for _, r in rows]


def _labels(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"label file not found: {path}")
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def read_arc(path: Path) -> list[Choice]:
    def parse(r):
        ch = r["question"]["choices"]
        labels = [c["label"] for c in ch]
        if r["answerKey"] not in labels:
            return None
        return Choice(f"Question: {r['question']['stem']}\nAnswer:", [" " + c["text"] for c in ch], labels.index(r["answerKey"]))

    return _rows(path, _jsonl(path), parse)


def read_openbookqa(path: Path) -> list[Choice]:
    header, rows = _read_tsv(path)
    try:
        qi, ci, ai = header.index("Question Stem"), header.index("Choices"), header.index("Answer Key")
    except ValueError:
        raise DataError(f"{path}: expected columns 'Question Stem', 'Choices', 'Answer Key'; found {header}") from None

    def parse(r):
        parts = re.split(r"\(([A-D])\)\s*", r[ci])[1:]
        labels, texts = parts[0::2], [t.strip() for t in parts[1::2]]
        return Choice(f"Question: {r[qi]}\nAnswer:", [" " + t for t in texts], labels.index(r[ai].strip()))

    return _rows(path, rows, parse)


def read_piqa(path: Path, labels_path: Path | None = None) -> list[Choice]:
    rows = _jsonl(path)
    labels = _labels(labels_path or path.with_name(path.stem + "-labels.lst"))
    if len(labels) != len(rows):
        raise PeftlabError(f"{path}: {len(rows)} rows but {len(labels)} labels")
    return _rows(path, list(zip(rows, labels)),
                 lambda ry: Choice(f"Question: {ry[0]['goal']}\nAnswer:", [" " + ry[0]["sol1"], " " + ry[0]["sol2"]], int(ry[1])))


def read_sciq(path: Path, seed: int = 0) -> list[Choice]:
    rows = [r for _, r in _json_rows(Path(path))]
    rng = random.Random(seed)  # fixed choice order per example

    def parse(r):
        ch = [r["correct_answer"], r["distractor1"], r["distractor2"], r["distractor3"]]
        order = list(range(4))
        rng.shuffle(order)
        ctx = (r.get("support") or "").strip()
        ctx = f"{ctx}\n" if ctx else ""
        return Choice(f"{ctx}Question: {r['question']}\nAnswer:", [" " + ch[i] for i in order], order.index(0))

    return _rows(path, rows, parse)


def read_winogrande(path: Path, labels_path: Path | None = None) -> list[Choice]:
    """Partial scoring: context = text up to the blank with the option filled in; the shared
    continuation after the blank is scored (as in GPT-3). Encoded as the choice strings."""
    rows = _jsonl(path)
    lp = labels_path or path.with_name(path.stem + "-labels.lst")
    labels = _labels(lp) if lp.is_file() else [r["answer"] for r in rows]

    def parse(ry):
        r, y = ry
        pre, post = r["sentence"].split("_", 1)
        return Choice("", [pre + r["option1"] + post, pre + r["option2"] + post], int(y) - 1)

    return _rows(path, list(zip(rows, labels)), parse)


BOOL_ANSWERS = {"true": 1, "yes": 1, "1": 1, "false": 0, "no": 0, "0": 0}


def read_boolq(path: Path) -> list[Choice]:
    """BoolQ rows: ``question``, ``passage`` and ``answer`` (or ``label``): a boolean, 0/1 or yes/no/true/false.
    A row without an answer, or with another value, is refused naming the file and row."""

    def parse(r):
        ans = r.get("answer", r.get("label"))
        key = str(ans).strip().lower() if isinstance(ans, (str, bool, int)) else None
        if key not in BOOL_ANSWERS:
            raise _BadRow(f"answer/label {json.dumps(ans)} is not true/false, yes/no or 0/1")
        return Choice(f"{r.get('passage', '')}\nQuestion: {r['question']}?\nAnswer:", [" no", " yes"], BOOL_ANSWERS[key])

    return _rows(path, _jsonl(path), parse)


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
