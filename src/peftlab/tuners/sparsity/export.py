"""Export of sparsity-trained models (PST, magnitude pruning): dense HF folder, compact form, report.

- ``export_hf(model, dir)``: W_final = M ⊙ W̃ folded into the weights, the sparsity parameters dropped,
  written with ``save_pretrained`` (safetensors) so ``from_pretrained`` loads a normal HF model.
- ``save_compact(model, path)`` / ``load_compact(model, path)``: the sparsified layers only, as a
  packed bitmask (1 bit per weight) + the non-zero values (fp32, lossless) in one safetensors file;
  its size shrinks with sparsity (≈ 1/32 + (1 − s) of the dense fp32 size).
- ``sparsity_report(model)``: per layer, zeros / total of the effective weight.
- ``save_sparse_delta(model, path)`` / ``apply_sparse_delta(model, path)``: the same packed form for the
  sparse *update* δ of diff pruning and FishMask (W + δ: the base weights are not sparse, the update is).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...core import delete, slots, state, unload
from ...errors import CorruptAdapterError, PeftlabError
from ...slot import resolve
from .base import SparseLinear


def _sparse_slots(model: nn.Module):
    out = []
    for path, s in slots(model):
        for n in s.active:
            if isinstance(s.adapters[n], SparseLinear) and n not in s.merged:
                out.append((path, s, s.adapters[n]))
    if not out and not any(isinstance(a, SparseLinear) for _, s in slots(model) for a in s.adapters.values()):
        raise PeftlabError("the model has no sparsity adapter (pst / magnitude_prune) attached")
    return out


@torch.no_grad()
def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module path -> M ⊙ W̃ in (out, in) layout."""
    return {p: ad.masked_weight(s.weight_oi()).detach().to(s.weight_oi().dtype) for p, s, ad in _sparse_slots(model)}


def sparsity_report(model: nn.Module) -> dict:
    layers = {}
    for p, w in effective_weights(model).items():
        layers[p] = {"zeros": int((w == 0).sum()), "total": w.numel(), "sparsity": float((w == 0).float().mean())}
    z, t = sum(v["zeros"] for v in layers.values()), sum(v["total"] for v in layers.values())
    return {"layers": layers, "zeros": z, "total": t, "sparsity": z / max(t, 1)}


def export_hf(model: nn.Module, path: str | os.PathLike) -> Path:
    """A plain HF model directory with the sparse weights folded in (the original model is untouched)."""
    eff = effective_weights(model)
    clone = copy.deepcopy(model)
    st = state(clone)
    for name in list(st.configs):
        if name not in st.active:
            delete(clone, name)
    unload(clone, merge=False)
    with torch.no_grad():
        for p, w in eff.items():
            mod = resolve(clone, p)
            target = mod.weight.t() if type(mod).__name__ == "Conv1D" else mod.weight
            target.copy_(w)
    path = Path(path)
    clone.save_pretrained(path, safe_serialization=True)
    (path / "sparsity_report.json").write_text(json.dumps(sparsity_report(model), indent=2))
    return path


def _write_packed(weights: dict[str, torch.Tensor], path: str | os.PathLike, fmt: str) -> Path:
    """(out, in) tensors as packed bitmask of their non-zeros + those values in fp32 (safetensors)."""
    tensors, meta = {}, {}
    for p, w in weights.items():
        w = w.detach().cpu()
        mask = (w != 0).flatten().numpy()
        tensors[f"{p}.mask"] = torch.from_numpy(np.packbits(mask))
        tensors[f"{p}.values"] = w.flatten()[torch.from_numpy(mask)].float().contiguous()
        meta[p] = list(w.shape)
    path = Path(path)
    save_file(tensors, str(path), metadata={"format": fmt, "shapes": json.dumps(meta)})
    return path


def save_compact(model: nn.Module, path: str | os.PathLike) -> Path:
    """Sparsified layers as packed bitmask + non-zero values (safetensors)."""
    return _write_packed(effective_weights(model), path, "peftlab-sparse")


def sparse_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module path -> the trained sparse δ (out, in) of the active sparse-update adapters (diff pruning,
    FishMask: adapters defining ``sparse_delta()``)."""
    out: dict[str, torch.Tensor] = {}
    for path, s in slots(model):
        for n in s.active:
            a = s.adapters[n]
            if hasattr(a, "sparse_delta") and n not in s.merged:
                d = a.sparse_delta().float()
                out[path] = out[path] + d if path in out else d
    if not out:
        raise PeftlabError("the model has no active sparse-update adapter (diff_pruning / fishmask) to export")
    return out


def save_sparse_delta(model: nn.Module, path: str | os.PathLike) -> Path:
    """The trained δ of every targeted weight as packed bitmask + non-zero values: its size follows the
    number of non-zero entries (≈ 1/32 + density of the dense fp32 size)."""
    return _write_packed(sparse_deltas(model), path, "peftlab-sparse-delta")


def apply_sparse_delta(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Add a sparse-delta file's δ into a plain (un-adapted) model of the same architecture: W ← W + δ."""
    return _write_into(model, path, "sparse delta", add=True)


def read_compact(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Decode a compact (or sparse-delta) file into dense (out, in) tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            shapes = json.loads(f.metadata()["shapes"])
        t = load_file(str(path))
    except Exception as e:
        raise CorruptAdapterError(f"{path}: not a readable peftlab sparse file ({e})") from None
    out = {}
    for p, shape in shapes.items():
        n = int(np.prod(shape))
        mask = torch.from_numpy(np.unpackbits(t[f"{p}.mask"].numpy())[:n].astype(bool))
        w = torch.zeros(n, dtype=torch.float32)
        w[mask] = t[f"{p}.values"]
        out[p] = w.view(shape)
    return out


@torch.no_grad()
def _write_into(model: nn.Module, path, what: str, add: bool) -> nn.Module:
    for p, w in read_compact(path).items():
        mod = resolve(model, p)
        target = mod.weight.t() if type(mod).__name__ == "Conv1D" else mod.weight
        if tuple(target.shape) != tuple(w.shape):
            raise PeftlabError(f"{p}: {what} {tuple(w.shape)} does not fit {tuple(target.shape)}")
        target.add_(w.to(target.dtype)) if add else target.copy_(w.to(target.dtype))
    return model


def load_compact(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Write the compact file's weights into a plain (un-adapted) model of the same architecture."""
    return _write_into(model, path, "compact weight", add=False)


def export_all(model: nn.Module, out_dir: str | os.PathLike) -> dict:
    """Both export forms into ``out_dir`` (``hf/`` and ``sparse.safetensors``) and their sizes.

    ``dense_layers_bytes`` is the fp32 size of the sparsified layers' weights, the baseline the compact
    file is measured against (``compact_ratio``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = sparsity_report(model)
    hf = export_hf(model, out / "hf")
    compact = save_compact(model, out / "sparse.safetensors")
    dense = 4 * rep["total"]
    summary = {
        "sparsity": rep["sparsity"], "zeros": rep["zeros"], "total": rep["total"],
        "hf_bytes": sum(f.stat().st_size for f in hf.iterdir() if f.is_file()),
        "compact_bytes": compact.stat().st_size, "dense_layers_bytes": dense,
        "compact_ratio": compact.stat().st_size / dense,
    }
    (out / "export_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
