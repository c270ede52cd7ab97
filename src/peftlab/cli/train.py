"""Subcommands ``train``, ``eval`` and ``predict``."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CorruptAdapterError, DataError, PeftlabError

TRUST_HELP = ("run the Python code shipped in the model folder (transformers trust_remote_code); never stored: "
              "give it again to eval/predict")


def _train(args) -> int:
    from ..train import run

    res = run(args.config, args.overrides, resume=args.resume, trust_remote_code=args.trust_remote_code)
    if res:
        print(json.dumps({k: res[k] for k in ("final", "best", "best_step", "trainable_params", "train_time_s")}, indent=2))
    return 0


def load_run(run_dir: Path, overrides: list[str], trust_remote_code: bool = False):
    """Model + tokenizer + task data of a finished run, with its best checkpoint loaded."""
    import peftlab

    from ..train.config import load_config
    from ..train.data import load_task
    from ..train.loop import build_model

    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise PeftlabError(f"{run_dir} is not a run directory (no config.json)")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise PeftlabError(f"{cfg_path}: not a readable run config ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise PeftlabError(f"{cfg_path}: not a run config (top level is {type(raw).__name__})")
    cfg = load_config(raw, overrides)
    data = load_task(cfg)
    best = run_dir / "best"
    if not best.is_dir():
        raise PeftlabError(f"{run_dir} has no best/ checkpoint (the run has not evaluated yet)")
    if cfg.method == "full":
        import transformers

        from ..train.backbones import _load, load_tokenizer

        cls = transformers.AutoModelForCausalLM if data.kind == "choice" else transformers.AutoModelForSequenceClassification
        model = _load("weights", str(best), lambda: cls.from_pretrained(best, trust_remote_code=trust_remote_code))
        return model.eval(), load_tokenizer(cfg.model, trust_remote_code), data, cfg
    method, cfg.method = cfg.method, "full"  # build the bare model, then load the saved adapter onto it
    model, tok = build_model(cfg, data, trust_remote_code)
    cfg.method = method
    peftlab.load(model, best)
    return model.eval(), tok, data, cfg


def _load_untrained(config: Path, overrides: list[str], trust_remote_code: bool):
    """Model (method attached, untrained) + tokenizer + task data of a YAML config: a zero-shot baseline."""
    from ..train.config import load_config
    from ..train.data import load_task
    from ..train.loop import build_model

    cfg = load_config(config, overrides)
    data = load_task(cfg)
    model, tok = build_model(cfg, data, trust_remote_code)
    return model.eval(), tok, data, cfg


def _eval(args) -> int:
    from ..train.loop import evaluate

    src = Path(args.run_dir)
    if src.is_file():  # a YAML config: evaluate before any training (e.g. zero-shot QA)
        model, tok, data, cfg = _load_untrained(src, args.overrides, args.trust_remote_code)
    elif src.is_dir():
        model, tok, data, cfg = load_run(src, args.overrides, args.trust_remote_code)
    else:
        raise PeftlabError(f"{src}: no such run directory or config file")
    print(json.dumps(evaluate(model, tok, data, cfg), indent=2))
    return 0


def _load_adapter(path: Path, model_name: str, labels: list[str] | None, trust_remote_code: bool):
    """A bare adapter folder (``peftlab.save``) on ``model_name``; the head's size gives the label count."""
    from safetensors import SafetensorError, safe_open

    import peftlab

    from ..train.backbones import load_model, load_tokenizer, model_config

    file = path / "adapter.safetensors"
    try:
        with safe_open(str(file), "pt") as f:
            heads = [f.get_slice(k).get_shape() for k in f.keys() if k.startswith("head::") and k.endswith(".weight")]
    except (SafetensorError, OSError) as e:
        raise CorruptAdapterError(f"{file}: unreadable adapter file ({' '.join(str(e).split())})") from None
    n = heads[0][0] if heads and len(heads[0]) == 2 else (len(labels) if labels else 2)
    if labels and len(labels) != n:
        raise PeftlabError(f"--labels names {len(labels)} labels but the adapter's head has {n} outputs")
    positions = getattr(model_config(model_name, trust_remote_code), "max_position_embeddings", None)
    model = load_model(model_name, task="regression" if n == 1 else "classification", num_labels=n,
                       trust_remote_code=trust_remote_code)
    peftlab.load(model, path)
    tok = load_tokenizer(model_name, trust_remote_code)
    return model.eval(), tok, labels, n == 1, min(512, positions) if isinstance(positions, int) else 512


def read_lines(file: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file (``predict --file``)."""
    from ..train.tasks import read_text

    try:
        return [line.strip() for line in read_text(Path(file)).splitlines() if line.strip()]
    except DataError as e:
        raise DataError(f"--file: {e}") from None


def _predict(args) -> int:
    import torch

    src = Path(args.run_dir)
    if not src.is_dir():
        raise PeftlabError(f"{src}: no such run directory or adapter folder")
    if not (src / "config.json").is_file() and (src / "peftlab_config.json").is_file() and (src.parent / "config.json").is_file():
        src = src.parent  # a run's best/ folder: use its run
    texts = list(args.texts) + (read_lines(args.file) if args.file else [])
    if not texts:
        raise PeftlabError("give sentences or --file")
    if (src / "config.json").is_file() or not (src / "peftlab_config.json").is_file():
        model, tok, data, cfg = load_run(src, [], args.trust_remote_code)
        if data.kind == "choice":
            raise PeftlabError("predict supports classification/regression runs")
        names, regression, max_len = data.label_names, data.kind == "regression", cfg.train.max_length
    else:
        model, tok, names, regression, max_len = _load_adapter(src, args.model, args.labels, args.trust_remote_code)
    with torch.no_grad():
        for text in texts:
            parts = text.split(" ||| ")
            enc = tok(*parts[:2], return_tensors="pt", truncation=True, max_length=max_len)
            logits = model(**enc).logits[0]
            if regression:
                print(json.dumps({"text": text, "score": logits.item()}))
            else:
                p = logits.softmax(-1)
                k = int(p.argmax())
                print(json.dumps({"text": text, "label": names[k] if names else k, "p": round(float(p[k]), 4)}))
    return 0


def add_commands(sub) -> None:
    t = sub.add_parser("train", help="train as configured by a YAML file")
    t.add_argument("config", help="YAML run config (see docs/training.md)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3 method_args.r=16")
    t.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    t.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="evaluate a run's best checkpoint (or, given a YAML config, the untrained model) on the dev set(s)")
    e.add_argument("run_dir", help="a run directory, or a YAML config for a before-training baseline")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. task.eval_limit=100")
    e.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    e.set_defaults(func=_eval)
    p = sub.add_parser("predict", help="predict labels with a run's best checkpoint or a saved adapter")
    p.add_argument("run_dir", help="a run directory, or an adapter folder saved by peftlab.save")
    p.add_argument("--model", default="minilm", help="base model of a bare adapter folder (default minilm)")
    p.add_argument("--labels", type=lambda v: v.split(","), help="label names of a bare adapter folder, in class order: neg,pos")
    p.add_argument("texts", nargs="*", help="sentences (a pair: 'first ||| second')")
    p.add_argument("--file", help="one input per line")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_predict)
