"""Hugging Face peft's on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Generic over methods: a method takes part by setting ``peft_type`` on its config and implementing
``to_peft_fields`` / ``from_peft_fields`` (config) and ``to_peft_tensors`` / ``from_peft_tensors``
(adapter). Targets are written as exact module names; heads go to ``modules_to_save``. peft tensor
keys are ``base_model.model.<module>.<name>`` (adapter name removed, as peft saves them).
Only safetensors files are read (never pickle).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core import (
    adapter_names,
    adapter_parts,
    attach,
    get_adapter_config,
    shared_modules,
    slots,
    state,
    transaction,
)
from ..errors import (
    AdapterExistsError,
    CorruptAdapterError,
    IncompatibleAdapterError,
    PeftlabError,
    UnknownMethodError,
)
from ..registry import config_class, methods
from ..slot import resolve as resolve_module
from ..slot import split_key, walk
from ..targets import iter_candidates

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

_TASK_TYPES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
)


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    return next((t for suffix, t in _TASK_TYPES if cls.endswith(suffix)), None)


def _adapters(model: nn.Module, name: str) -> dict[str, nn.Module]:
    return {p: s.adapters[name] for p, s in slots(model) if name in s.adapters}


def to_peft_config_dict(model: nn.Module, name: str = "default") -> dict:
    cfg = get_adapter_config(model, name)
    if cfg.peft_type is None or adapter_parts(model, name) != [(None, cfg)]:
        raise PeftlabError(f"method {cfg.method!r} has no equivalent in peft's format")
    ads = _adapters(model, name)
    heads = state(model).heads.get(name, [])
    fields = cfg.to_peft_fields(ads)  # a field set to None there is left out (e.g. LoHa has no fan_in_fan_out)
    d = {
        "peft_type": cfg.peft_type,
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "target_modules": sorted(ads),
        "modules_to_save": list(heads) or None,
        "fan_in_fan_out": any(s.fan_in_fan_out for p, s in slots(model) if p in ads),
        "inference_mode": True,
        **fields,
    }
    return {k: v for k, v in d.items() if not (k in fields and v is None)}


def to_peft_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    out = {}
    for path, ad in _adapters(model, name).items():
        for k, v in ad.to_peft_tensors().items():
            out[_peft_key(ad, path, k)] = v.detach()
    head = _head_prefix(model, name)
    for h in state(model).heads.get(name, []):
        for k, v in resolve_module(model, h).state_dict().items():
            out[f"{head}{h}.{k}"] = v.detach()
    for sh in _shared(model, name):  # tensors shared by all layers (VeRA's A, B): peft keys "base_model.<name>"
        out.update({f"{SHARED_PREFIX}{k}": v.detach() for k, v in sh.to_peft_tensors().items()})
    return out


SHARED_PREFIX = "base_model."


def _peft_key(adapter: nn.Module, path: str, key: str) -> str:
    """peft's key of tensor ``key`` of the adapter at module ``path``; prompt learners (``peft_toplevel``)
    store theirs without a module path (e.g. ``prompt_embeddings``)."""
    return key if getattr(adapter, "peft_toplevel", False) else f"{PREFIX}{path}.{key}"


def _head_prefix(model: nn.Module, name: str) -> str:
    """peft wraps the model once more (``base_model.model.``) except for prompt learners (``base_model.``)."""
    return SHARED_PREFIX if any(getattr(a, "peft_toplevel", False) for a in _adapters(model, name).values()) else PREFIX


def _shared(model: nn.Module, name: str) -> list[nn.Module]:
    """This adapter's shared modules that take part in peft's format (define ``to_peft_tensors``)."""
    sh = shared_modules(model)
    return [m for k, m in sh.items() if split_key(k)[0] == name and hasattr(m, "to_peft_tensors")]


def to_peft_config(model: nn.Module, name: str = "default"):
    """The equivalent ``peft`` config object (needs peft installed)."""
    import peft

    d = dict(to_peft_config_dict(model, name))
    cls = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[d.pop("peft_type")]
    d.pop("inference_mode")
    known = {f.name for f in dataclasses.fields(cls)}  # e.g. LoHa/LoKr configs have no fan_in_fan_out
    return cls(**{k: v for k, v in d.items() if k in known})


def export_peft(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter ``name`` in peft's format; ``peft.PeftModel.from_pretrained`` loads it."""
    d = to_peft_config_dict(model, name)
    tensors = {k: v.contiguous().cpu() for k, v in to_peft_state_dict(model, name).items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    (path / CONFIG).write_text(json.dumps(d, indent=2, sort_keys=True))
    return path


def _resolver(model: nn.Module, exclude, kinds=("linear",)):
    names = [t.name for t, _ in iter_candidates(model) if t.kind in kinds]

    def excluded(n: str) -> bool:
        if not exclude:
            return False
        if isinstance(exclude, str):
            return re.fullmatch(exclude, n) is not None
        return any(n == e or n.endswith("." + e) for e in exclude)

    def resolve(pattern) -> list[str]:
        if isinstance(pattern, str):
            hits = [n for n in names if re.fullmatch(pattern, n)]
        else:
            hits = [n for n in names if any(n == p or n.endswith("." + p) for p in pattern)]
        return [n for n in hits if not excluded(n)]

    return resolve


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = path / CONFIG
    if not cfg.is_file():
        raise CorruptAdapterError(f"{path}: no {CONFIG} (is this a peft adapter directory?)")
    try:
        d = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptAdapterError(f"{cfg}: not valid JSON ({e})") from None
    w = path / WEIGHTS
    if not w.is_file():
        if (path / "adapter_model.bin").is_file():
            raise CorruptAdapterError(f"{path}: only adapter_model.bin (pickle) found; peftlab reads safetensors only")
        raise CorruptAdapterError(f"{w}: file missing")
    try:
        return d, load_file(str(w))
    except Exception as e:
        raise CorruptAdapterError(f"{w}: unreadable safetensors file ({e})") from None


def import_peft(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Attach a peft-format adapter (LoRA, DoRA, (IA)³) as peftlab adapter ``name``."""
    path = Path(path)
    d, tensors = _read(path)
    if name in adapter_names(model):
        raise AdapterExistsError(f"an adapter named {name!r} is already attached")
    if d.get("layers_to_transform") is not None:
        raise PeftlabError("peft's layers_to_transform is not supported on import; use target_modules names")
    fields, cls = None, None
    for c in map(config_class, methods()):
        resolve = _resolver(model, d.get("exclude_modules"), c.accepts)
        try:
            fields = c.from_peft_fields(d, resolve)
        except ValueError as e:
            raise PeftlabError(f"{path}: {e}") from None
        if fields is not None:
            cls = c
            break
    if cls is None:
        raise UnknownMethodError(f"{path}: peft_type {d.get('peft_type')!r} (use_dora={d.get('use_dora')}) has no peftlab equivalent")
    # prompt learners select their own (input-stack) targets: from_peft_fields returns targets=None
    targets = fields.pop("targets") if "targets" in fields else resolve(d.get("target_modules") or [])
    if targets is not None and not targets:
        raise IncompatibleAdapterError(f"{path}: target_modules {d.get('target_modules')!r} match no "
                                       f"{'/'.join(cls.accepts)} module of this model")
    all_names = {n for n, _ in walk(model)}
    mts = [m for m in dict.fromkeys(d.get("modules_to_save") or [])
           if m in all_names or any(n.endswith("." + m) for n in all_names)]
    config = cls.from_dict({**fields, "targets": targets, "modules_to_save": mts})
    with transaction(model, name):  # on any failure the model is as before
        attach(model, config, name)
        used = set()
        with torch.no_grad():
            for p, ad in _adapters(model, name).items():
                pre = _peft_key(ad, p, "")
                sub = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)
                       and (pre or not k.startswith(SHARED_PREFIX))}
                used |= {pre + k for k in sub}
                try:
                    ours = ad.from_peft_tensors(sub)
                except KeyError as e:
                    raise IncompatibleAdapterError(f"{path}: tensor {e} missing for module {p}") from None
                own = ad.state_dict()
                for k, v in ours.items():
                    if own[k].shape != v.shape:
                        raise IncompatibleAdapterError(f"{p}.{k}: shape {tuple(v.shape)} != {tuple(own[k].shape)}")
                    own[k].copy_(v)
            top = {k[len(SHARED_PREFIX):]: v for k, v in tensors.items()
                   if k.startswith(SHARED_PREFIX) and not k.startswith(PREFIX)}
            for sh in _shared(model, name):
                own = sh.state_dict(keep_vars=True) | dict(sh.named_buffers())
                for k, v in sh.from_peft_tensors(top).items():
                    if own[k].shape != v.shape:
                        raise IncompatibleAdapterError(f"{path}: shared tensor {k} shape {tuple(v.shape)} != {tuple(own[k].shape)}")
                    own[k].copy_(v)
                    used.add(SHARED_PREFIX + k)
            msd = model.state_dict()
            head = _head_prefix(model, name)
            for h in state(model).heads.get(name, []):
                for k in resolve_module(model, h).state_dict():
                    key = f"{head}{h}.{k}"
                    if key in tensors:
                        if msd[f"{h}.{k}"].shape != tensors[key].shape:
                            raise IncompatibleAdapterError(f"head {h}.{k}: shape mismatch")
                        used.add(key)
        extra = sorted(set(tensors) - used)
        if extra:
            raise IncompatibleAdapterError(f"{path}: tensors for modules this model lacks: {extra[:5]}")
        with torch.no_grad():
            for h in state(model).heads.get(name, []):
                for k in resolve_module(model, h).state_dict():
                    key = f"{head}{h}.{k}"
                    if key in tensors:
                        msd[f"{h}.{k}"].copy_(tensors[key])
    return model
