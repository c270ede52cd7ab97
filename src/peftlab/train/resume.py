"""``--resume`` safety: compare the new configuration with the run's ``config.json`` before writing anything.

A changed key that changes the run's results (model, method, r, task, lr, seed, schedule ...) is refused,
naming each key with its old and new value; keys that only change how the run is watched or how fast it
evaluates (:data:`HARMLESS`) are accepted and each change is reported in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ResumeMismatchError

HARMLESS = {
    "train.progress": "progress bar only",
    "train.log_every": "train.log frequency only",
    "train.eval_batch_size": "evaluation speed and memory only",
    "train.save_every": "checkpoint frequency only",
    "train.fsdp": "how the model is laid out across processes only (checkpoints hold full tensors)",
    "output_dir": "the same directory, spelled differently",
}
_UNSET = "<unset>"


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ("method_args", "model_args"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def check(run_dir: Path, new: dict) -> list[str]:
    """Raise :class:`ResumeMismatchError` if ``new`` differs from ``run_dir/config.json`` in a key that matters;
    else return one line per harmless change."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(old, dict):
            raise ValueError("not a mapping")
    except (ValueError, UnicodeDecodeError) as e:
        raise ResumeMismatchError(f"{path}: unreadable ({e}); cannot check that --resume continues the same run") from None
    a, b = _flat(old), _flat(new)
    if Path(str(a.get("output_dir", ""))).resolve() == Path(str(b.get("output_dir", ""))).resolve():
        a["output_dir"] = b["output_dir"]
    changed = [(k, a.get(k, _UNSET), b.get(k, _UNSET)) for k in sorted(set(a) | set(b)) if a.get(k, _UNSET) != b.get(k, _UNSET)]
    bad = [c for c in changed if c[0] not in HARMLESS]
    if bad:
        what = "; ".join(f"{k}: {json.dumps(o)} -> {json.dumps(n)}" for k, o, n in bad)
        raise ResumeMismatchError(f"--resume: the config differs from {path} in {what}; resuming would mix two "
                                  "different runs: use the run's values or a new output_dir")
    return [f"resume: {k} {json.dumps(o)} -> {json.dumps(n)} ({HARMLESS[k]})" for k, o, n in changed]
