"""The server's model and adapters: one base model, adapters registered by folder, at most
``max_loaded`` of them attached at a time (least recently used ones are detached and re-attached from
disk on demand), and the batched model calls. Everything here runs on the server's single worker thread.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core import HEAD_NAMES, delete, has_adapters, set_active, state
from ..errors import AdapterExistsError, AdapterNotFoundError, PeftlabError
from ..slot import resolve
from .batch import batch_adapters


class InputTooLongError(PeftlabError, ValueError):
    """A request's input is longer than the model takes (HTTP 413)."""


@dataclass
class Row:
    adapter: str | None
    text: str


def detect_task(model: nn.Module) -> str:
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or hasattr(model, "generate") and \
            type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    return "regression" if getattr(model.config, "num_labels", 2) == 1 else "classification"


def load_base(name: str, task: str | None = None, num_labels: int | None = None):
    """(model, tokenizer, task) for a short name (``minilm``, ``smollm2-135m``), hub name or local folder."""
    from ..train.backbones import SHORT_NAMES, load_model, load_tokenizer

    if name in SHORT_NAMES:
        model = load_model(name, task, **({"num_labels": num_labels} if num_labels else {}))
    else:
        import transformers as tf

        cfg = tf.AutoConfig.from_pretrained(name)
        archs = cfg.architectures or []
        causal = task == "causal-lm" or (task is None and any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs))
        extra = {"num_labels": 1 if task == "regression" else num_labels} if (task == "regression" or num_labels) else {}
        auto = tf.AutoModelForCausalLM if causal else tf.AutoModelForSequenceClassification
        model = auto.from_pretrained(name, **extra)
    tok = load_tokenizer(name)
    model.eval().requires_grad_(False)
    task = detect_task(model) if task is None or task == "auto" else task
    if task == "causal-lm":
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    return model, tok, task


class AdapterStore:
    def __init__(self, model: nn.Module, tok, task: str, max_loaded: int = 8, truncate: bool = False):
        self.model, self.tok, self.task = model, tok, task
        self.max_loaded, self.truncate = max(1, int(max_loaded)), truncate
        self.paths: dict[str, Path] = {}
        self.loaded: OrderedDict[str, dict] = OrderedDict()  # name -> its head tensors; most recent last
        self.base_head = {k: v for h in HEAD_NAMES if _has(model, h) for k, v in _module_state(model, h).items()}
        mp = [getattr(model.config, k, None) for k in ("max_position_embeddings", "n_positions")]
        tm = getattr(tok, "model_max_length", None)
        self.max_length = min([x for x in [*mp, tm if tm and tm < 1e6 else None] if x] or [512])
        self.loads = 0

    # ---- adapters
    def add(self, name: str | None, path: str | os.PathLike) -> str:
        """Register (and validate by loading) the adapter folder ``path`` under ``name``."""
        from ..state import read_meta

        path = Path(path)
        name = name or read_meta(path).get("name") or path.name
        if name in self.paths:
            raise AdapterExistsError(f"an adapter named {name!r} is already registered (from {self.paths[name]})")
        self._evict(keep=set(), room=1)
        self._attach(name, path)
        self.paths[name] = path
        return name

    def remove(self, name: str) -> None:
        self._known(name)
        if name in self.loaded:
            self._detach(name)
        del self.paths[name]

    def listing(self) -> list[dict]:
        from ..state import read_meta

        return [{"name": n, "path": str(p), "method": read_meta(p)["method"], "loaded": n in self.loaded}
                for n, p in self.paths.items()]

    def _known(self, name: str) -> None:
        if name not in self.paths:
            raise AdapterNotFoundError(f"no adapter named {name!r}; registered: {sorted(self.paths)}")

    def _attach(self, name: str, path: Path) -> None:
        from ..state import load, read_meta

        for h in read_meta(path).get("heads", []):  # first sight of a saved module: keep the base's values
            if _has(self.model, h) and not any(k.startswith(h + ".") for k in self.base_head):
                self.base_head.update(_module_state(self.model, h))
        load(self.model, path, name=name, is_trainable=False)
        self.loads += 1
        self.loaded[name] = {k: v for h in state(self.model).heads.get(name, []) for k, v in _module_state(self.model, h).items()}
        set_active(self.model, [])

    def _detach(self, name: str) -> None:
        delete(self.model, name)
        self.loaded.pop(name)
        if has_adapters(self.model):
            set_active(self.model, [])

    def _evict(self, keep: set, room: int = 0) -> None:
        """Detach least recently used adapters (not in ``keep``) until ``room`` more fit."""
        for n in [n for n in self.loaded if n not in keep][: max(0, len(self.loaded) + room - self.max_loaded)]:
            self._detach(n)

    def ensure(self, names: list[str | None]) -> dict:
        """Attach the adapters of a batch (re-loading evicted ones from disk); their per-row heads (the saved
        modules of each adapter — task heads, ``modules_to_save`` — over the base model's values)."""
        need = list(dict.fromkeys(n for n in names if n is not None))
        for n in need:
            self._known(n)
        if len(need) > self.max_loaded:
            raise PeftlabError(f"a batch needs {len(need)} adapters but --max-loaded is {self.max_loaded}")
        for n in need:
            if n in self.loaded:
                self.loaded.move_to_end(n)
            else:
                self._evict(keep=set(need), room=1)
                self._attach(n, self.paths[n])
        heads = {n: {**self.base_head, **self.loaded[n]} for n in need}
        heads[None] = self.base_head
        return heads if self.base_head else {}

    # ---- inputs
    def check_length(self, text: str, extra: int = 0) -> None:
        n = len(self.tok(text)["input_ids"]) + extra
        if n > self.max_length and (not self.truncate or extra):
            raise InputTooLongError(f"input of {n} tokens is longer than the model's {self.max_length} "
                                    f"(start the server with --truncate to cut inputs instead)")

    # ---- model calls
    @torch.no_grad()
    def predict(self, rows: list[Row]) -> list[dict]:
        names = [r.adapter for r in rows]
        heads = self.ensure(names)
        enc = self.tok([r.text for r in rows], padding=True, truncation=True, max_length=self.max_length,
                       return_tensors="pt")
        with batch_adapters(self.model, names, heads=heads):
            logits = self.model(**enc).logits.float()
        if self.task == "regression":
            return [{"score": float(v)} for v in logits[:, 0]]
        labels = getattr(self.model.config, "id2label", None) or {}
        probs = logits.softmax(-1)
        return [{"label": labels.get(int(p.argmax()), str(int(p.argmax()))), "probabilities": p.tolist()} for p in probs]

    @torch.no_grad()
    def generate(self, rows: list[Row], max_new_tokens: int, temperature: float) -> list[dict]:
        names = [r.adapter for r in rows]
        self.ensure(names)
        enc = self.tok([r.text for r in rows], padding=True, return_tensors="pt")
        enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
        sample = temperature > 0
        args = dict(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=self.tok.pad_token_id)
        if sample:
            args.update(temperature=temperature, top_k=0, top_p=1.0)
        else:
            args.update(temperature=None, top_k=None, top_p=None)
        with batch_adapters(self.model, names):
            out = self.model.generate(**enc, **args)
        eos = self.tok.eos_token_id
        results = []
        for t in out[:, enc["input_ids"].shape[1]:].tolist():
            t = t[: t.index(eos) + 1] if eos in t else t  # finished rows are padded after their end token
            results.append({"text": self.tok.decode(t, skip_special_tokens=True), "tokens": t})
        return results


def _module_state(model: nn.Module, name: str) -> dict:
    return {f"{name}.{k}": v.detach().clone() for k, v in resolve(model, name).state_dict().items()}


def _has(model: nn.Module, name: str) -> bool:
    try:
        resolve(model, name)
        return True
    except AttributeError:
        return False
