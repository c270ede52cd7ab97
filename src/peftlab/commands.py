"""Subcommands ``train``, ``eval``, ``predict`` and ``export-sparse`` of the ``peftlab`` CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli import _EXTENSIONS
from .errors import PeftlabError


def _train(args) -> int:
    from .train import run

    try:
        res = run(args.config, args.overrides, resume=args.resume)
    except PeftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if res:
        print(json.dumps({k: res[k] for k in ("final", "best", "best_step", "trainable_params", "train_time_s")}, indent=2))
    return 0


def _load_run(run_dir: Path, overrides: list[str]):
    """Model + tokenizer + task data of a finished run, with its best checkpoint loaded."""
    import peftlab

    from .train.config import load_config
    from .train.data import load_task
    from .train.loop import build_model

    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise PeftlabError(f"{run_dir} is not a run directory (no config.json)")
    cfg = load_config(json.loads(cfg_path.read_text()), overrides)
    data = load_task(cfg)
    best = run_dir / "best"
    if cfg.method == "full":
        import transformers

        cls = transformers.AutoModelForCausalLM if data.kind == "choice" else transformers.AutoModelForSequenceClassification
        from .backbones import load_tokenizer

        return cls.from_pretrained(best).eval(), load_tokenizer(cfg.model), data, cfg
    method, cfg.method = cfg.method, "full"  # build the bare model, then load the saved adapter onto it
    model, tok = build_model(cfg, data)
    cfg.method = method
    peftlab.load(model, best)
    return model.eval(), tok, data, cfg


def _load_untrained(config: Path, overrides: list[str]):
    """Model (method attached, untrained) + tokenizer + task data of a YAML config: a zero-shot baseline."""
    from .train.config import load_config
    from .train.data import load_task
    from .train.loop import build_model

    cfg = load_config(config, overrides)
    data = load_task(cfg)
    model, tok = build_model(cfg, data)
    return model.eval(), tok, data, cfg


def _eval(args) -> int:
    from .train.loop import evaluate

    src = Path(args.run_dir)
    try:
        if src.is_file():  # a YAML config: evaluate before any training (e.g. zero-shot QA)
            model, tok, data, cfg = _load_untrained(src, args.overrides)
        else:
            model, tok, data, cfg = _load_run(src, args.overrides)
    except PeftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(evaluate(model, tok, data, cfg), indent=2))
    return 0


def _load_adapter(path: Path, model_name: str, labels: list[str] | None):
    """A bare adapter folder (``peftlab.save``) on ``model_name``; the head's size gives the label count."""
    from safetensors import safe_open

    import peftlab

    from .backbones import load_model, load_tokenizer

    with safe_open(str(path / "adapter.safetensors"), "pt") as f:
        heads = [f.get_slice(k).get_shape() for k in f.keys() if k.startswith("head::") and k.endswith(".weight")]
    n = heads[0][0] if heads and len(heads[0]) == 2 else (len(labels) if labels else 2)
    if labels and len(labels) != n:
        raise PeftlabError(f"--labels names {len(labels)} labels but the adapter's head has {n} outputs")
    model = load_model(model_name, task="regression" if n == 1 else "classification", num_labels=n)
    peftlab.load(model, path)
    tok = load_tokenizer(model_name)
    return model.eval(), tok, labels, n == 1, 512


def _predict(args) -> int:
    import torch

    src = Path(args.run_dir)
    if not (src / "config.json").is_file() and (src / "peftlab_config.json").is_file() and (src.parent / "config.json").is_file():
        src = src.parent  # a run's best/ folder: use its run
    try:
        if (src / "config.json").is_file() or not (src / "peftlab_config.json").is_file():
            model, tok, data, cfg = _load_run(src, [])
            if data.kind == "choice":
                raise PeftlabError("predict supports classification/regression runs")
            names, regression, max_len = data.label_names, data.kind == "regression", cfg.train.max_length
        else:
            model, tok, names, regression, max_len = _load_adapter(src, args.model, args.labels)
    except PeftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    texts = list(args.texts)
    if args.file:
        texts += [line.strip() for line in Path(args.file).read_text().splitlines() if line.strip()]
    if not texts:
        print("error: give sentences or --file", file=sys.stderr)
        return 2
    with torch.no_grad():
        for text in texts:
            parts = text.split(" ||| ")
            enc = tok(*parts, return_tensors="pt", truncation=True, max_length=max_len)
            logits = model(**enc).logits[0]
            if regression:
                print(json.dumps({"text": text, "score": logits.item()}))
            else:
                p = logits.softmax(-1)
                k = int(p.argmax())
                print(json.dumps({"text": text, "label": names[k] if names else k, "p": round(float(p[k]), 4)}))
    return 0


def _export_sparse(args) -> int:
    from . import sparse

    try:
        model, _, _, _ = _load_run(Path(args.run_dir), [])
        summary = sparse.export_all(model, args.out)
    except PeftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _extend(sub) -> None:
    t = sub.add_parser("train", help="train as configured by a YAML file")
    t.add_argument("config", help="YAML run config (see docs/training.md)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3 method_args.r=16")
    t.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="evaluate a run's best checkpoint (or, given a YAML config, the untrained model) on the dev set(s)")
    e.add_argument("run_dir", help="a run directory, or a YAML config for a before-training baseline")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. task.eval_limit=100")
    e.set_defaults(func=_eval)
    p = sub.add_parser("predict", help="predict labels with a run's best checkpoint or a saved adapter")
    p.add_argument("run_dir", help="a run directory, or an adapter folder saved by peftlab.save")
    p.add_argument("--model", default="minilm", help="base model of a bare adapter folder (default minilm)")
    p.add_argument("--labels", type=lambda v: v.split(","), help="label names of a bare adapter folder, in class order: neg,pos")
    p.add_argument("texts", nargs="*", help="sentences (a pair: 'first ||| second')")
    p.add_argument("--file", help="one input per line")
    p.set_defaults(func=_predict)
    x = sub.add_parser("export-sparse", help="write a sparsity-trained run (pst, magnitude/movement pruning) as a "
                       "plain HF model folder (OUT/hf) and a compact sparse file (OUT/sparse.safetensors)")
    x.add_argument("run_dir", help="a run directory whose method is a sparsity method")
    x.add_argument("out", help="output folder")
    x.set_defaults(func=_export_sparse)


_EXTENSIONS.append(_extend)
