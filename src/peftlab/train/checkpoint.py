"""Resumable training checkpoints: trainable weights, optimizer state, RNG state and loop state.

Written into a temporary directory and swapped in with renames, so a kill at any moment leaves
either the previous or the new checkpoint complete (``checkpoint/`` or, mid-swap, ``checkpoint.old/``).
Tensors go to safetensors; scalars to JSON (no pickle). A model sharded by FSDP is saved as full tensors
(gathered on every process, written by the main one) and loaded back into each process's shards, so a
checkpoint does not depend on the number of processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import fs
from .sharding import full, like

NAME = "checkpoint"


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        scalars["state"][str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = full(v).detach().clone().contiguous().cpu()
            else:
                scalars["state"][str(idx)][k] = v
    return tensors, scalars


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict, scalars: dict) -> None:
    state = {}
    params = [p for g in opt.param_groups for p in g["params"]]  # the state dict's indices
    for idx, sc in scalars["state"].items():
        st = dict(sc)
        for k, v in tensors.items():
            parts = k.split(".")
            if parts[0] == "opt" and parts[1] == idx:
                st[parts[2]] = like(v, params[int(idx)]) if int(idx) < len(params) else v
        state[int(idx)] = st
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})


def save(run_dir: Path, params: dict[str, torch.Tensor], opt, loop_state: dict, write: bool = True) -> None:
    """Write the checkpoint; on a sharded model every process calls this (it gathers), only ``write`` writes."""
    run_dir = Path(run_dir)
    tensors = {f"param.{k}": full(v).detach().clone().contiguous().cpu() for k, v in params.items()}
    ot, osc = _flatten_optimizer(opt)
    if not write:
        return
    tmp = run_dir / f"{NAME}.tmp"
    fs.remove(tmp, run_dir)
    tmp.mkdir(parents=True)
    tensors.update(ot)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"loop": loop_state, "optimizer": osc}))
    with open(tmp / "state.json") as f:
        os.fsync(f.fileno())
    fs.swap_dir(tmp, run_dir / NAME, run_dir)


def find(run_dir: Path) -> Path | None:
    for name in (NAME, f"{NAME}.old"):
        p = Path(run_dir) / name
        if (p / "state.json").is_file() and (p / "state.safetensors").is_file():
            return p
    return None


def load(ckpt: Path, params: dict[str, torch.Tensor], opt) -> dict:
    tensors = load_file(str(ckpt / "state.safetensors"))
    meta = json.loads((ckpt / "state.json").read_text())
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(like(tensors[f"param.{k}"], p))
    _unflatten_optimizer(opt, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(len(tensors)) if f"rng.cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return meta["loop"]
