"""Turn a config's target selection into concrete module matches.

Selection = (roles | name suffixes | "all-linear") ∩ regex ∩ layer indices ∩ classes − exclude.
A selection that matches nothing raises :class:`TargetNotFoundError` listing the candidates.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from torch import nn

from .errors import TargetNotFoundError
from .families import Family, family_of, find_blocks
from .slot import Slot, walk

KIND_CLASSES: dict[str, tuple[str, ...]] = {
    "linear": ("Linear", "Conv1D", "NonDynamicallyQuantizableLinear", "Linear4bit", "Linear8bitLt"),
    "norm": ("LayerNorm", "RMSNorm", "T5LayerNorm", "LlamaRMSNorm"),
    "embedding": ("Embedding",),
}


def module_kind(module: nn.Module) -> str | None:
    if isinstance(module, Slot):
        module = module.base
    cls = type(module).__name__
    for kind, names in KIND_CLASSES.items():
        if cls in names or (kind == "norm" and cls.endswith("RMSNorm")) or (kind == "norm" and cls.endswith("LayerNorm")):
            return kind
    return None


@dataclass
class Target:
    """One module a method attaches to."""

    name: str  # full module name in the model
    module: nn.Module  # the module (the base module if it is already wrapped)
    layer: int | None  # global block index (encoder blocks first), None outside the blocks
    role: str | None  # family role, if the module has one
    kind: str | None  # "linear", "norm", ...


def _block_index(model: nn.Module) -> list[tuple[str, int]]:
    return [(name + ".", i) for i, name, _ in find_blocks(model)]


def _roles_of(fam: Family | None, rel: str) -> list[str]:
    if fam is None:
        return []
    return [role for role, pats in fam.roles.items() if any(fnmatch.fnmatchcase(rel, p) for p in pats)]


def iter_candidates(model: nn.Module):
    """Yield a Target for every module of the model (skipping peftlab's own modules)."""
    fam = family_of(model)
    blocks = _block_index(model)
    for name, mod in walk(model):
        if name.startswith("peftlab_") or ".peftlab_" in name:
            continue
        base = mod.base if isinstance(mod, Slot) else mod
        layer, rel = None, None
        for prefix, i in blocks:
            if name.startswith(prefix):
                layer, rel = i, name[len(prefix):]
                break
        roles = _roles_of(fam, rel) if rel is not None else []
        yield Target(name, base, layer, roles[0] if roles else None, module_kind(base)), roles


def _name_matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def select(model: nn.Module, config, roles: tuple[str, ...] | None = None) -> list[Target]:
    """Match ``config``'s selection against ``model``; raise if nothing matches."""
    fam = family_of(model)
    wanted = config.targets if config.targets is not None else list(roles or config.default_targets(model))
    accepts = set(config.target_kinds())
    layers = set(config.layers) if config.layers is not None else None
    regex = re.compile(config.target_regex) if config.target_regex else None
    classes = set(config.target_classes) if config.target_classes else None
    exclude = config.exclude or []
    if layers is not None:
        n_blocks = len(find_blocks(model))
        bad = sorted(i for i in layers if not 0 <= i < n_blocks)
        if bad:
            raise TargetNotFoundError(f"layer indices {bad} out of range: the model has {n_blocks} blocks (0..{n_blocks - 1})")

    out: list[Target] = []
    all_cands = list(iter_candidates(model))
    for t, t_roles in all_cands:
        if t.kind not in accepts and not ("module" in accepts and t_roles) and "any" not in accepts:
            continue  # "module": any module that has a family role (sub-blocks, attention modules)
        if wanted == "all-linear":
            hit = t.kind == "linear" and t.layer is not None
        elif config.targets is None and config.target_regex and not roles:
            hit = True  # regex alone selects
        else:
            hit = any(w in t_roles or _name_matches(t.name, w) for w in wanted)
        if not hit:
            continue
        if regex is not None and not regex.fullmatch(t.name):
            continue
        if layers is not None and t.layer not in layers:
            continue
        if classes is not None and type(t.module).__name__ not in classes:
            continue
        if any(_name_matches(t.name, e) for e in exclude):
            continue
        if not config.keep(t):
            continue
        out.append(t)
    if not out:
        raise TargetNotFoundError(_miss_message(model, config, wanted, fam, all_cands))
    return out


def _miss_message(model, config, wanted, fam, cands) -> str:
    kinds = set(config.target_kinds())
    names = sorted({t.name for t, _ in cands if t.kind in kinds})
    suffixes = sorted({n.split(".")[-1] for n in names})
    where = f"{type(model).__name__} (model_type={getattr(getattr(model, 'config', None), 'model_type', None)!r})"
    msg = [f"{config.method or 'method'}: no module of {where} matched targets={wanted!r}"]
    if config.target_regex:
        msg.append(f"target_regex={config.target_regex!r}")
    if config.layers is not None:
        msg.append(f"layers={config.layers}")
    if config.target_classes:
        msg.append(f"target_classes={config.target_classes}")
    msg.append(f"candidate {'/'.join(sorted(kinds))} module name suffixes: {', '.join(suffixes[:40])}")
    if fam is not None:
        msg.append(f"roles of family {fam.name!r}: {', '.join(fam.roles)}")
    msg.append(f"example full names: {', '.join(names[:6])}")
    return "; ".join(msg)
