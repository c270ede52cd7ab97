"""Sharded training (``train.fsdp: true``) for models that do not fit one process: FSDP2.

The engine is torch's FSDP2 (``torch.distributed.fsdp.fully_shard``, Zhao et al. 2023, "PyTorch FSDP"):
every parameter, gradient and optimizer state is split across the processes, and each transformer block
is all-gathered just before its forward (and again for its backward) and freed after it. Two routes lead
to it, decided by what accelerate accepts:

* **accelerate's FSDP plugin** (GPUs). Launched with an accelerate FSDP config
  (``examples/accelerate_fsdp.yaml``), or with ``train.fsdp: true`` and any multi-GPU launch (peftlab then
  hands accelerate the same plugin: FSDP v2, one unit per transformer block), ``Accelerator.prepare``
  shards the model. Sharding is asked for by either (:func:`requested`).
* **torch's ``fully_shard`` called by peftlab** (CPU). accelerate does not do FSDP on CPU: with
  ``--use_fsdp``, a FSDP config file or an ``fsdp_plugin`` passed to ``Accelerator(cpu=True)`` its
  ``distributed_type`` stays ``MULTI_CPU`` (gloo; its ``prepare`` would wrap the model in DDP), silently,
  and with ``cpu=False`` on a machine without a GPU it is ``NO`` with every process rank 0 (checked with
  accelerate 1.16). There :func:`shard` applies ``fully_shard`` the way accelerate's FSDP v2 does: one unit
  per class named in the model's ``_no_split_modules`` (its transformer blocks), then the root for the rest
  (embeddings, final norm, heads), over a gloo process group.

Both routes leave the model's own modules in place (FSDP2 swaps parameters for sharded ``DTensor`` s, it
does not wrap modules), so the adapter's parameter names are unchanged and :func:`full` gathers a full
tensor from a sharded one (a collective: every process must call it; only the main one writes files).
Every process must build the same initial model (same weights, same seed for new heads and adapters):
each keeps its own shard of its own copy.

Quantized bases: bitsandbytes keeps a 4-bit weight's quantization state on the ``Params4bit`` tensor,
which sharding replaces by a plain one; bitsandbytes recovers it from ``module.quant_state`` when that is
set (its FSDP-QLoRA support), so :func:`shard` sets it and the packed 4-bit weights are sharded too.
accelerate's plugin instead leaves uint8-stored 4-bit weights unsharded (replicated on every process).
int8 weights (``Linear8bitLt``) cannot be sharded (bitsandbytes reads their scales ``CB``/``SCB`` from the
weight tensor itself; sharded, the forward fails with ``AttributeError: 'Parameter' object has no attribute
'CB'``), so :func:`shard` leaves them whole on every process (``ignored_params``) and shards the rest.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from .. import quant
from ..state import full_tensor as full

__all__ = ["accelerate_plugin", "blocks", "by_accelerate", "full", "held_bytes", "like", "requested", "shard"]

log = logging.getLogger("peftlab.train")


def requested(fsdp: bool) -> bool:
    """``train.fsdp``, or a launch with an accelerate FSDP config (``ACCELERATE_USE_FSDP``, also on CPU)."""
    return fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def accelerate_plugin():
    """The FSDP v2 plugin peftlab gives accelerate for ``train.fsdp: true`` on GPUs, or None where accelerate
    would not use it (no GPU) or an accelerate FSDP config already chose one (``ACCELERATE_USE_FSDP``)."""
    if not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")


def by_accelerate(acc) -> bool:
    """True when accelerate shards the model itself (its distributed type is FSDP)."""
    return acc is not None and getattr(acc.distributed_type, "name", "") == "FSDP"


def blocks(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as units of their own: instances of the model's ``_no_split_modules`` classes."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


def shard(model: nn.Module, device_type: str, world: int) -> int:
    """Apply FSDP2 in place: ``fully_shard`` on every block (:func:`blocks`), then on the root. Returns the
    number of blocks. Needs an initialised process group of ``world`` processes (the launcher's)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    keep = set()  # int8 weights stay whole on every process: bitsandbytes keeps their scales on the tensor
    for m in model.modules():
        if quant._is_4bit(m):  # bitsandbytes restores a 4-bit weight's state from its module after sharding
            m.quant_state = m.weight.quant_state
        elif quant._is_8bit(m):
            keep.add(m.weight)
    mesh = init_device_mesh(device_type, (world,))
    units = blocks(model)
    for m in [*units, model]:
        fully_shard(m, mesh=mesh, ignored_params=keep or None)
    return len(units)


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) laid out as ``param``: this process's shard when ``param`` is sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor) or value.shape != param.shape:
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def held_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of parameters this process holds, bytes of the whole model's parameters)."""
    from torch.distributed.tensor import DTensor

    mine = whole = 0
    for p in model.parameters():
        size = p.element_size()
        whole += p.numel() * size
        mine += (p.to_local() if isinstance(p, DTensor) else p).numel() * size
    return mine, whole
