"""Turn task examples into tensors: classification batches and causal-LM multiple-choice batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PeftlabError
from . import tasks as T
from .config import RunConfig


def _shared_data() -> Path:
    """../shared/data beside the checkout (or $PEFTLAB_DATA)."""
    import os

    if os.environ.get("PEFTLAB_DATA"):
        return Path(os.environ["PEFTLAB_DATA"])
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (base.parent / "shared" / "data").is_dir():
            return base.parent / "shared" / "data"
    return Path.cwd().parent / "shared" / "data"


SHARED_DATA = _shared_data()


@dataclass
class TaskData:
    kind: str  # "classification" | "regression" | "choice"
    train: list
    dev: dict[str, list]  # dev-set name -> examples
    metrics: tuple[str, ...]
    num_labels: int = 2
    label_names: list[str] | None = None
    extra: dict = field(default_factory=dict)


def _root(cfg: RunConfig, sub: str) -> Path:
    if cfg.task.data_dir:
        return Path(cfg.task.data_dir).expanduser()
    if not (SHARED_DATA / sub).is_dir():
        raise PeftlabError(f"task {cfg.task.name!r}: set task.data_dir (no data found at {SHARED_DATA / sub})")
    return SHARED_DATA / sub


def load_task(cfg: RunConfig) -> TaskData:
    t = cfg.task
    name = T.GLUE_ALIASES.get(t.name.lower(), t.name.lower())
    if name == "demo":
        from .demo_data import LABELS, load_shipped

        train, dev = load_shipped()
        data = TaskData("classification", train, {"dev": dev}, ("accuracy",), 2, list(LABELS))
    elif name in T.GLUE:
        spec = T.GLUE[name]
        if t.from_hub:
            train = T.glue_from_hub(name, "train")
            devs = {k: T.glue_from_hub(name, v) for k, v in T.HUB_DEV.get(name, {"dev": "validation"}).items()}
        else:
            root = _root(cfg, "glue")
            train = T.read_glue(name, root, "train")
            devs = {f.removesuffix(".tsv"): T.read_glue(name, root, f) for f in spec.dev}
        kind = "regression" if name == "stsb" else "classification"
        data = TaskData(kind, train, devs, spec.metrics, T.glue_num_labels(name), list(spec.labels) if spec.labels else None)
    elif name in T.QA_READERS:
        root = _root(cfg, "qa")
        tr_default, dev_default = T.QA_DEFAULT_FILES[name]
        tr = t.train_file or tr_default
        dv = t.dev_file or dev_default
        reader = T.QA_READERS[name]
        train = reader(root / tr) if tr else []
        data = TaskData("choice", train, {"dev": reader(root / dv)}, ("accuracy",))
    elif name == "table":
        data = _table(cfg)
    else:
        raise PeftlabError(f"unknown task {t.name!r}: GLUE ({', '.join(T.GLUE)}), QA ({', '.join(T.QA_READERS)}), table or demo")
    data.train = T.subset(data.train, t.train_limit, t.subset_seed)
    data.dev = {k: T.subset(v, t.eval_limit, t.subset_seed) for k, v in data.dev.items()}
    if not data.train and cfg.train.max_steps != 0:
        raise PeftlabError(f"task {t.name!r} has no training examples (set task.train_file)")
    return data


def _table(cfg: RunConfig) -> TaskData:
    """A user CSV/JSONL task. Classes come from ``task.labels`` or, if unset, from the data (sorted distinct
    labels of train + dev, said in one log line); regression labels must be numbers."""
    import logging

    t = cfg.task
    if not t.train_file or not t.dev_file:
        raise PeftlabError("task 'table' needs task.train_file and task.dev_file (CSV or JSONL)")
    tr = T.table_rows(Path(t.train_file), t.text_columns, t.label_column)
    dv = T.table_rows(Path(t.dev_file), t.text_columns, t.label_column)
    if t.regression:
        ex = [[T.Example(x, T.number_label(y, w)) for x, y, w in rows] for rows in (tr, dv)]
        return TaskData("regression", ex[0], {"dev": ex[1]}, ("pearson", "spearman"), 1)
    names = list(t.labels) if t.labels else [str(c) for c in T.infer_classes(tr + dv)]
    if not t.labels:
        logging.getLogger("peftlab.train").info(
            "task table: %d classes inferred from the data, in this order: %s (set task.labels to name or order them)",
            len(names), ", ".join(names))
    label_map = {lab: i for i, lab in enumerate(names)}
    ex = [[T.Example(x, T.map_label(y, w, label_map)) for x, y, w in rows] for rows in (tr, dv)]
    n = len(names)
    return TaskData("classification", ex[0], {"dev": ex[1]}, ("accuracy", "f1") if n == 2 else ("accuracy",), n, names)


# ------------------------------------------------------------------- classification
def encode_classification(tok, examples: list, max_length: int) -> list[dict]:
    out = []
    for e in examples:
        enc = tok(*e.texts, truncation=True, max_length=max_length)
        out.append({"input_ids": enc["input_ids"], "label": e.label,
                    **({"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {})})
    return out


def collate(items: list[dict], pad_id: int, regression: bool = False) -> dict[str, torch.Tensor]:
    n = max(len(i["input_ids"]) for i in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    tt = torch.zeros((len(items), n), dtype=torch.long) if "token_type_ids" in items[0] else None
    for j, it in enumerate(items):
        L = len(it["input_ids"])
        ids[j, :L] = torch.tensor(it["input_ids"])
        mask[j, :L] = 1
        if tt is not None:
            tt[j, :L] = torch.tensor(it["token_type_ids"])
    batch = {"input_ids": ids, "attention_mask": mask}
    if tt is not None:
        batch["token_type_ids"] = tt
    if "label" in items[0]:
        batch["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.float if regression else torch.long)
    if "lm_labels" in items[0]:
        lab = torch.full((len(items), n), -100, dtype=torch.long)
        for j, it in enumerate(items):
            lab[j, : len(it["lm_labels"])] = torch.tensor(it["lm_labels"])
        batch["labels"] = lab
    return batch


# ------------------------------------------------------------------- multiple choice (causal LM)
def _ctx_choice_ids(tok, context: str, choice: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of context+choice and the number of context tokens (left-truncated to max_length)."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and context == "" else []
    ctx = bos + tok(context, add_special_tokens=False)["input_ids"] if context else bos
    ch = tok(choice, add_special_tokens=False)["input_ids"]
    ids = ctx + ch
    cut = max(0, len(ids) - max_length)
    return ids[cut:], max(len(ctx) - cut, 1 if bos else 0)


def encode_choice_train(tok, examples: list, max_length: int) -> list[dict]:
    """LM fine-tuning on the answer: labels are the answer tokens only."""
    out = []
    for e in examples:
        ids, n_ctx = _ctx_choice_ids(tok, e.context, e.choices[e.label], max_length)
        out.append({"input_ids": ids, "lm_labels": [-100] * n_ctx + ids[n_ctx:]})
    return out


def encode_choice_eval(tok, examples: list, max_length: int) -> list[dict]:
    out = []
    for qi, e in enumerate(examples):
        for ci, c in enumerate(e.choices):
            ids, n_ctx = _ctx_choice_ids(tok, e.context, c, max_length)
            out.append({"input_ids": ids, "lm_labels": [-100] * n_ctx + ids[n_ctx:], "q": qi, "c": ci})
    return out


def choice_scores(logits: torch.Tensor, labels: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Sum (or per-token mean) log-likelihood of the labelled tokens of each row."""
    tgt = labels[:, 1:]
    mask = tgt != -100
    rows, cols = mask.nonzero(as_tuple=True)  # log-softmax over the vocabulary only where an answer token is scored
    lp = torch.log_softmax(logits[:, :-1][rows, cols].float(), dim=-1).gather(-1, tgt[rows, cols].unsqueeze(-1)).squeeze(-1)
    s = torch.zeros(labels.shape[0], dtype=lp.dtype, device=lp.device).index_add_(0, rows, lp)
    return s / mask.sum(-1).clamp_min(1) if normalize else s
