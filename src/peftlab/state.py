"""Save and load adapters: ``<dir>/peftlab_config.json`` + ``<dir>/adapter.safetensors``.

The JSON holds the method, its hyper-parameters, the targeted module names, the peftlab version, a
fingerprint of the base model (model type and the shapes of targeted weights) and the SHA-256 of the
tensor file. Tensor keys are ``<module path>::<adapter param>`` for slot adapters,
``shared::<part>::<param>`` for shared modules and ``head::<param name>`` for trained heads.
Safetensors only, never pickle. Every check runs before the model is touched; a failure while
filling in the tensors rolls the attachment back.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__, quant
from .core import attach, delete, get_adapter_config, shared_key, slots, state
from .errors import AdapterExistsError, CorruptAdapterError, IncompatibleAdapterError
from .registry import config_class
from .slot import resolve

CONFIG_NAME = "peftlab_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = "peftlab-adapter"
FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shape_of(module: nn.Module):
    if quant.is_quantized(module):  # its logical shape: an adapter fits a quantized and a float base alike
        return quant.quantized_shape(module)
    w = getattr(module, "weight", None)
    return list(w.shape) if isinstance(w, torch.Tensor) else type(module).__name__


def fingerprint(model: nn.Module, targets: list[str]) -> dict:
    cfg = getattr(model, "config", None)
    shapes = {}
    for t in targets:
        m = resolve(model, t)
        shapes[t] = _shape_of(getattr(m, "base", m))
    return {
        "model_type": getattr(cfg, "model_type", None),
        "architectures": getattr(cfg, "architectures", None),
        "hidden_size": getattr(cfg, "hidden_size", getattr(cfg, "d_model", None)),
        "shapes": shapes,
    }


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """All tensors that make up adapter ``name`` (slot adapters, shared modules, heads)."""
    st = state(model)
    get_adapter_config(model, name)
    out: dict[str, torch.Tensor] = {}
    for path, slot in slots(model):
        for key in slot.keys_of(name):
            part = "" if key == name else key[len(name):] + "/"  # composite configs: "__<part>/"
            for k, v in slot.adapters[key].state_dict().items():
                out[f"{path}::{part}{k}"] = v
    sh = model._modules.get("peftlab_shared") or {}
    for i in range(len(st.configs[name].parts())):
        key = shared_key(name, i)
        if key in sh:
            for k, v in sh[key].state_dict().items():
                out[f"shared::{i}::{k}"] = v
    for h in st.heads.get(name, []):
        for k, v in resolve(model, h).state_dict().items():
            out[f"head::{h}.{k}"] = v
    return out


def save(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter ``name`` to directory ``path`` (atomically replacing the two files)."""
    config = get_adapter_config(model, name)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model, name).items()}
    targets = [p for p, s in slots(model) if s.keys_of(name)]
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".adapter.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "peftlab": __version__})
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "peftlab_version": __version__,
            "name": name,
            "method": config.method,
            "config": config.to_dict(),
            "targets": targets,
            "heads": state(model).heads.get(name, []),
            "fingerprint": fingerprint(model, targets),
            "sha256": _sha256(Path(tmp)),
            "n_tensors": len(tensors),
        }
        os.replace(tmp, path / WEIGHTS_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    tmpj = path / (CONFIG_NAME + ".tmp")
    tmpj.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmpj, path / CONFIG_NAME)
    return path


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    cfg = path / CONFIG_NAME
    if not cfg.is_file():
        raise CorruptAdapterError(f"{path}: no {CONFIG_NAME} (is this a peftlab adapter directory?)")
    try:
        meta = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptAdapterError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptAdapterError(f"{cfg}: not a peftlab adapter config")
    for key in ("method", "config", "targets", "fingerprint", "sha256"):
        if key not in meta:
            raise CorruptAdapterError(f"{cfg}: missing field {key!r}")
    return meta


def read_tensors(path: str | os.PathLike, meta: dict) -> dict[str, torch.Tensor]:
    f = Path(path) / WEIGHTS_NAME
    if not f.is_file():
        raise CorruptAdapterError(f"{f}: file missing")
    digest = _sha256(f)
    if digest != meta["sha256"]:
        raise CorruptAdapterError(
            f"{f}: checksum mismatch (file is truncated or corrupted; expected sha256 {meta['sha256'][:12]}..., "
            f"got {digest[:12]}...)"
        )
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises several error types
        raise CorruptAdapterError(f"{f}: unreadable safetensors file ({e})") from None


def check_fingerprint(model: nn.Module, meta: dict) -> None:
    fp = meta["fingerprint"]
    mt = getattr(getattr(model, "config", None), "model_type", None)
    problems = []
    if fp.get("model_type") != mt:
        problems.append(f"adapter was trained on model_type={fp.get('model_type')!r}, this model is {mt!r}")
    for t, shape in fp.get("shapes", {}).items():
        try:
            m = resolve(model, t)
        except AttributeError:
            problems.append(f"module {t} does not exist in this model")
            continue
        got = _shape_of(getattr(m, "base", m))
        if got != shape:
            problems.append(f"{t}: weight shape {got} != {shape} in the adapter")
        if len(problems) > 8:
            break
    if problems:
        raise IncompatibleAdapterError("adapter does not fit this base model: " + "; ".join(problems))


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None, is_trainable: bool = True) -> nn.Module:
    """Attach the adapter saved in ``path`` under ``name`` (default: the saved name)."""
    meta = read_meta(path)
    name = name or meta.get("name") or "default"
    cls = config_class(meta["method"])
    try:
        config = cls.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise CorruptAdapterError(f"{path}: invalid config for method {meta['method']!r}: {e}") from None
    tensors = read_tensors(path, meta)
    if getattr(model, "peftlab_state", None) is not None and name in model.peftlab_state.configs:
        raise AdapterExistsError(f"an adapter named {name!r} is already attached")
    check_fingerprint(model, meta)
    heads = {k[len("head::"):]: v for k, v in tensors.items() if k.startswith("head::")}
    own = {n: p for n, p in model.state_dict().items()}
    for k, v in heads.items():
        if k not in own or own[k].shape != v.shape:
            raise IncompatibleAdapterError(f"head tensor {k}: shape {tuple(v.shape)} does not fit this model")
    attach(model, config, name)
    try:
        expected = adapter_state_dict(model, name)
        exp_keys = {k for k in expected if not k.startswith("head::")}
        got_keys = {k for k in tensors if not k.startswith("head::")}
        if exp_keys != got_keys:
            miss, extra = sorted(exp_keys - got_keys), sorted(got_keys - exp_keys)
            raise IncompatibleAdapterError(f"adapter tensors do not match: missing {miss[:5]}, unexpected {extra[:5]}")
        for k in exp_keys:
            if expected[k].shape != tensors[k].shape:
                raise IncompatibleAdapterError(f"{k}: shape {tuple(tensors[k].shape)} != {tuple(expected[k].shape)}")
        with torch.no_grad():
            for k in exp_keys:
                expected[k].copy_(tensors[k])
            for k, v in heads.items():
                own[k].copy_(v)
    except BaseException:
        delete(model, name)
        raise
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model
