"""Save and load adapters: ``<dir>/peftlab_config.json`` + ``<dir>/adapter.safetensors``.

The JSON holds the method, its hyper-parameters, the targeted module names, the peftlab version, a
fingerprint of the base model (model type and the shapes of targeted weights) and the SHA-256 of the
tensor file. Tensor keys (format 2) are ``<module path>::<param>`` for a slot adapter,
``<module path>::<part>/<param>`` for a part of a composite config, ``shared::<param>`` /
``shared::<part>/<param>`` for shared modules and ``head::<head module>.<param>`` for trained heads;
folders of format 1 (numbered parts) are translated on load. Safetensors only, never pickle.

``save`` writes the whole folder under a fresh temporary name beside the destination (created
exclusively, so nothing planted there is followed) and swaps it in with renames. ``load`` checks
everything it can before touching the model, only loads the heads the config declares (with the
declared shapes) and is a transaction: on any failure the model is exactly as before. A malformed
folder raises :class:`CorruptAdapterError` naming the file and key; ``delete`` restores the head
values ``load`` replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import quant
from ._version import __version__
from .core import (
    adapter_names,
    attach,
    check_name,
    get_adapter_config,
    restore_heads,
    shared_modules,
    slots,
    state,
    transaction,
)
from .errors import AdapterExistsError, CorruptAdapterError, IncompatibleAdapterError, PeftlabError
from .registry import config_class
from .slot import load_state_tensors, resolve, split_key, state_tensors

CONFIG_NAME = "peftlab_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = "peftlab-adapter"
FORMAT_VERSION = 2


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


def tensor_key(scope: str, part: str | None, param: str) -> str:
    """The one writer of file tensor keys: scope is a module path, ``shared`` or ``head``."""
    return f"{scope}::{param}" if part is None else f"{scope}::{part}/{param}"


def parse_tensor_key(key: str) -> tuple[str, str | None, str]:
    """The one parser of file tensor keys: (scope, part or None, param)."""
    scope, _, rest = key.partition("::")
    if scope == "head" or "/" not in rest:
        return scope, None, rest
    part, _, param = rest.partition("/")
    return scope, part, param


def _owners(model: nn.Module, name: str) -> dict[tuple[str, str | None], nn.Module]:
    """(scope, part) -> the slot adapter or shared module of adapter ``name`` stored under it."""
    out = {}
    for path, slot in slots(model):
        for key in slot.keys_of(name):
            out[(path, split_key(key)[1])] = slot.adapters[key]
    for key, m in shared_modules(model).items():
        if split_key(key)[0] == name:
            out[("shared", split_key(key)[1])] = m
    return out


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """All tensors that make up adapter ``name`` in its file (slot adapters' ``state_tensors``, shared
    modules, heads)."""
    get_adapter_config(model, name)
    out: dict[str, torch.Tensor] = {}
    for (scope, part), m in _owners(model, name).items():
        for k, v in state_tensors(m).items():
            out[tensor_key(scope, part, k)] = v
    for h in state(model).heads.get(name, []):
        for k, v in resolve(model, h).state_dict().items():
            out[tensor_key("head", None, f"{h}.{k}")] = v
    return out


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a ``DTensor`` sharded by FSDP (all-gathered: a collective), or ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def save(model: nn.Module, path: str | os.PathLike, name: str = "default", *, write: bool = True) -> Path:
    """Write adapter ``name`` to directory ``path``, replacing it as a whole (files there that are not part
    of an adapter are carried over).

    On a model sharded by FSDP every process must call ``save`` (the full tensors are gathered from all of
    them) and only the main one with ``write=True``; the others pass ``write=False`` and write nothing."""
    config = get_adapter_config(model, name)
    path = Path(path)
    tensors = {k: full_tensor(v).detach().contiguous().cpu() for k, v in adapter_state_dict(model, name).items()}
    if not write:
        return path
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    targets = [p for p, s in slots(model) if s.keys_of(name)]
    tmp = Path(tempfile.mkdtemp(dir=path.absolute().parent, prefix=f".{path.name}.tmp-"))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "peftlab": __version__})
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
            "sha256": _sha256(tmp / WEIGHTS_NAME),
            "n_tensors": len(tensors),
        }
        with open(tmp / CONFIG_NAME, "x") as f:
            f.write(json.dumps(meta, indent=2, sort_keys=True))
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _swap_in(tmp: Path, path: Path) -> None:
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    if path.is_symlink() or not path.is_dir():
        raise PeftlabError(f"{path}: exists and is not a directory; not replacing it")
    for e in path.iterdir():  # carry over what is not ours (notes, a README ...)
        if e.name not in (CONFIG_NAME, WEIGHTS_NAME) and not e.name.startswith(CONFIG_NAME):
            if e.is_dir() and not e.is_symlink():
                shutil.copytree(e, tmp / e.name, symlinks=True)
            else:
                shutil.copy2(e, tmp / e.name, follow_symlinks=False)
    old = Path(tempfile.mkdtemp(dir=path.absolute().parent, prefix=f".{path.name}.old-"))
    os.rename(path, old / "previous")
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old / "previous", path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _field(meta: dict, key: str, types, where: Path, default=None, required: bool = True):
    if key not in meta:
        if required:
            raise CorruptAdapterError(f"{where}: missing field {key!r}")
        return default
    v, allowed = meta[key], types if isinstance(types, tuple) else (types,)
    if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
        raise CorruptAdapterError(f"{where}: field {key!r} has the wrong type ({type(v).__name__})")
    return v


def read_meta(path: str | os.PathLike) -> dict:
    """The parsed peftlab_config.json, every field the loader uses type-checked (CorruptAdapterError)."""
    path = Path(path)
    cfg = path / CONFIG_NAME
    if not cfg.is_file():
        raise CorruptAdapterError(f"{path}: no {CONFIG_NAME} (is this a peftlab adapter directory?)")
    try:
        meta = json.loads(cfg.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptAdapterError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptAdapterError(f"{cfg}: not a peftlab adapter config")
    if _field(meta, "format_version", int, cfg, 1, required=False) not in (1, 2):
        raise CorruptAdapterError(f"{cfg}: unsupported format_version {meta['format_version']!r}")
    _field(meta, "method", str, cfg)
    _field(meta, "config", dict, cfg)
    _field(meta, "sha256", str, cfg)
    _field(meta, "name", (str, type(None)), cfg, required=False)
    for key in ("targets", "heads"):
        v = _field(meta, key, list, cfg, [], required=key == "targets")
        if not all(isinstance(x, str) for x in v):
            raise CorruptAdapterError(f"{cfg}: field {key!r} must be a list of module names")
    fp = _field(meta, "fingerprint", dict, cfg)
    if not isinstance(fp.get("shapes", {}), dict):
        raise CorruptAdapterError(f"{cfg}: field 'fingerprint.shapes' must be a mapping")
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


def _upgrade_v1(tensors: dict[str, torch.Tensor], labels: list[str | None]) -> dict[str, torch.Tensor]:
    """Format 1 numbered the parts of a composite: ``<path>::__<i>/<param>`` (part 0 unnumbered) and
    ``shared::<i>::<param>``; format 2 names them by label."""
    out = {}
    for k, v in tensors.items():
        scope, _, rest = k.partition("::")
        part, param = 0, rest
        if scope == "shared":
            i, _, param = rest.partition("::")
            part = int(i) if i.isdigit() else -1
        elif scope != "head" and rest.startswith("__"):
            i, _, param = rest[2:].partition("/")
            part = int(i) if i.isdigit() else -1
        if scope != "head" and not 0 <= part < len(labels):
            raise CorruptAdapterError(f"tensor {k!r}: no part {part} in this config (format 1)")
        out[k if scope == "head" else tensor_key(scope, labels[part], param)] = v
    return out


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None, is_trainable: bool = True) -> nn.Module:
    """Attach the adapter saved in ``path`` under ``name`` (default: the saved name)."""
    path = Path(path)
    meta = read_meta(path)
    name = name or meta.get("name") or "default"
    check_name(name)
    cls = config_class(meta["method"])
    try:
        config = cls.from_dict(meta["config"])
    except (TypeError, ValueError) as e:  # ConfigError, and what a method's own validate raises
        raise CorruptAdapterError(f"{path / CONFIG_NAME}: 'config' is invalid for method {meta['method']!r}: {e}") from None
    tensors = read_tensors(path, meta)
    if name in adapter_names(model):
        raise AdapterExistsError(f"an adapter named {name!r} is already attached")
    check_fingerprint(model, meta)
    with transaction(model, name) as st:
        try:
            attach(model, config, name)
        except PeftlabError:
            raise
        except Exception as e:  # a config that validates but cannot be built (absurd sizes ...)
            raise CorruptAdapterError(f"{path / CONFIG_NAME}: cannot attach this adapter ({type(e).__name__}: {e})") from e
        if meta.get("format_version", 1) == 1:
            tensors = _upgrade_v1(tensors, [label for label, _ in st.parts[name]])
        _fill(model, name, tensors, st)
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _fill(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], st) -> None:
    """Copy the file's tensors into adapter ``name`` (each slot adapter / shared module takes its own group
    through ``load_state_tensors``); heads only where the config declares them, checked before any is written."""
    owners = _owners(model, name)
    groups: dict[tuple[str, str | None], dict[str, torch.Tensor]] = {o: {} for o in owners}
    heads = {}
    for k, v in tensors.items():
        scope, part, param = parse_tensor_key(k)
        if scope == "head":
            heads[k] = v
        elif (scope, part) in groups:
            groups[(scope, part)][param] = v
        else:
            raise IncompatibleAdapterError(f"adapter tensors do not match: unexpected {k!r}")
    for (scope, part), group in groups.items():
        load_state_tensors(owners[(scope, part)], group, scope if part is None else f"{scope}::{part}")
    expected = {tensor_key("head", None, f"{h}.{k}"): v for h in st.heads[name]
                for k, v in resolve(model, h).state_dict().items()}
    undeclared = sorted(set(heads) - set(expected))
    if undeclared:
        raise IncompatibleAdapterError(
            f"head tensors {undeclared[:5]} are not parameters of the heads this config declares ({st.heads[name]})")
    for k in heads:
        if expected[k].shape != heads[k].shape:
            raise IncompatibleAdapterError(f"{k}: shape {tuple(heads[k].shape)} != {tuple(expected[k].shape)}")
    backup = {}
    for h in st.heads[name]:
        for k, v in resolve(model, h).state_dict().items():
            if tensor_key("head", None, f"{h}.{k}") in heads:
                backup.setdefault(h, {})[k] = v.detach().clone()
    try:
        with torch.no_grad():
            for k in heads:
                expected[k].copy_(heads[k])
    except BaseException:
        restore_heads(model, backup)
        raise
    st.head_backup[name] = backup
