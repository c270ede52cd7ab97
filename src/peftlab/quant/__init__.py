"""Quantized frozen bases (QLoRA, Dettmers et al. 2023) through bitsandbytes.

``quantize(model, "nf4")`` replaces the frozen linears of the base by ``bitsandbytes`` 4-bit (NF4 or FP4,
block-wise absmax with ``blocksize`` 64, scales double-quantized as in QLoRA §3) or 8-bit (row-wise absmax
int8, LLM.int8 without outlier decomposition) modules, on CPU as well as GPU. Every method then attaches as
usual: a Slot wraps the quantized module, adapters that only call the base forward (LoRA, (IA)³, adapters,
prefix ...) run the library's kernel, and adapters that need the weight itself (DoRA's column norm, GOFT's
rotated weight, PST's masked weight) read :func:`dequantized_weight`, which is frozen and never stored.

Why bitsandbytes (measured in ``benchmarks/quant_choice.py`` on this CPU; results in benchmarks/results/):
it is the library transformers and peft use for QLoRA, so a quantized base is bit-for-bit the one
``peft`` sees (parity tests compare outputs), it has both NF4 and int8 with a CPU backend, and its NF4
forward+backward was faster on this CPU than torchao's ``NF4Tensor``.

Merging into a quantized base is dequantize → merge → requantize (peft refuses it: issues #2501, #1008);
:func:`peftlab.merge` records the round-off this adds per module (``merge_error``) and ``unmerge`` restores
the exact original quantized weight, which the slot keeps aside while merged. For an exact float model,
call :func:`dequantize` and then ``peftlab.unload(model, merge=True)``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import PeftlabError

SCHEMES = ("nf4", "fp4", "int8")
SKIP_DEFAULT = ("classifier", "score", "qa_outputs", "lm_head", "pooler")


class QuantizationError(PeftlabError, ValueError):
    """A quantization request that cannot be served (unknown scheme, missing library, adapters attached)."""


def _bnb():
    # bitsandbytes warns at import on AVX512-BF16 CPUs that an optional hub kernel is missing (it falls back
    # to its own); that line is noise for every peftlab command, so its logger is quieted for the import
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise QuantizationError("quantized bases need bitsandbytes: pip install 'peftlab[quant]'") from e
    finally:
        quiet.setLevel(level)
    return bnb


def _is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")


def _is_8bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear8bitLt"


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit linear (also when it is wrapped by a Slot)."""
    module = getattr(module, "base", module) if type(module).__name__ == "Slot" else module
    return _is_4bit(module) or _is_8bit(module)


def _state4(module: nn.Module):
    """A 4-bit linear's quantization state: on its weight, or on the module once FSDP has replaced the weight
    by a sharded or gathered plain tensor (peftlab.train.sharding sets ``module.quant_state``)."""
    st = getattr(module.weight, "quant_state", None)
    return st if st is not None else module.quant_state


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) float weight a quantized linear computes with; a new frozen tensor, not a view."""
    bnb = _bnb()
    w = module.weight
    if _is_4bit(module):
        out = bnb.functional.dequantize_4bit(w.data, _state4(module))
        return out.to(module.compute_dtype or torch.float32)
    if _is_8bit(module):
        return bnb.functional.int8_vectorwise_dequant(w.data, _int8_scales(module)).to(torch.float32)
    raise QuantizationError(f"{type(module).__name__} is not a quantized linear")


def _int8_scales(module: nn.Module) -> torch.Tensor:
    """Row absmax of an 8-bit linear: bitsandbytes moves it from the weight to ``module.state`` at the first
    forward."""
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else module.state.SCB


def quantized_shape(module: nn.Module) -> list[int]:
    """The logical (out, in) shape of a quantized linear's weight (its storage is packed)."""
    if _is_4bit(module):
        return list(_state4(module).shape)
    return list(module.weight.shape)


def scheme_of(module: nn.Module) -> str:
    if _is_4bit(module):
        return module.weight.quant_type
    if _is_8bit(module):
        return "int8"
    raise QuantizationError(f"{type(module).__name__} is not a quantized linear")


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, scheme: str = "nf4", *,
                    double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                    blocksize: int = 64) -> nn.Module:
    """A frozen bitsandbytes linear holding ``weight`` ((out, in), any float dtype) quantized by ``scheme``."""
    bnb = _bnb()
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    out_f, in_f = weight.shape
    device = weight.device
    w = weight.detach().to(torch.float32 if scheme == "int8" else compute_dtype).contiguous().cpu()
    if scheme == "int8":
        q = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=0.0,
                                device="meta")
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=scheme, device="meta")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant,
                                     quant_type=scheme, blocksize=blocksize)
        # bitsandbytes repacks the weight in place into a CPU-only layout at the first no-grad eval forward
        # on AVX512-BF16 machines; keep the portable layout (the one peft and GPUs use) so the storage never
        # changes under an adapter and dequantization stays exact
        q.support_avx512bf16_for_cpu = False
    if bias is not None:
        q.bias = nn.Parameter(bias.detach().clone().cpu(), requires_grad=False)
    return q.to(device)  # bitsandbytes quantizes on the move to a device


def requantize_like(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new quantized linear with ``module``'s scheme and settings holding ``weight`` ((out, in))."""
    if _is_4bit(module):
        st = _state4(module)
        return quantize_linear(weight, module.bias, st.quant_type if hasattr(st, "quant_type") else "nf4",
                               double_quant=bool(st.nested), compute_dtype=module.compute_dtype or torch.float32,
                               blocksize=st.blocksize)
    return quantize_linear(weight, module.bias, "int8")


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """(out, in) weight of an nn.Linear or a transformers Conv1D (stored (in, out))."""
    w = module.weight
    return w.t() if type(module).__name__ == "Conv1D" else w


def quantize(model: nn.Module, scheme: str = "nf4", *, double_quant: bool = True,
             compute_dtype: torch.dtype | str | None = None, blocksize: int = 64,
             skip: tuple[str, ...] | list[str] | None = None) -> nn.Module:
    """Quantize the frozen linears of ``model`` in place; returns ``model``.

    ``skip``: module-name suffixes left in full precision (default: task heads, ``lm_head``, the pooler).
    GPT-2's Conv1D is converted to an (out, in) quantized linear. Call before attaching adapters.
    """
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
        raise QuantizationError(f"blocksize must be a power of two in [64, 4096], got {blocksize!r}")
    if isinstance(compute_dtype, str):
        compute_dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                         "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}.get(compute_dtype)
        if compute_dtype is None:
            raise QuantizationError("compute_dtype must be one of float32, bfloat16, float16")
    compute_dtype = compute_dtype or torch.float32
    if "peftlab_state" in model.__dict__:
        raise QuantizationError("quantize the base before attaching adapters (peftlab adapters are attached)")
    skip = tuple(SKIP_DEFAULT if skip is None else skip)
    todo = [(n, m) for n, m in model.named_modules()
            if n and type(m).__name__ in ("Linear", "Conv1D")
            and not any(n == s or n.endswith("." + s) for s in skip)]
    if not todo:
        raise QuantizationError(f"{type(model).__name__}: no linear layer to quantize (skip={list(skip)})")
    for name, mod in todo:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        q = quantize_linear(_linear_weight(mod), mod.bias, scheme, double_quant=double_quant,
                            compute_dtype=compute_dtype, blocksize=blocksize)
        setattr(parent, child, q)
    for p in model.parameters():
        if p.dtype in (torch.uint8, torch.int8):
            p.requires_grad_(False)
    model.__dict__["peftlab_quantization"] = {"scheme": scheme, "double_quant": double_quant,
                                               "compute_dtype": str(compute_dtype).removeprefix("torch."),
                                               "blocksize": blocksize, "modules": [n for n, _ in todo]}
    return model


def float_linear(module: nn.Module) -> nn.Linear:
    """A frozen float nn.Linear computing what the quantized ``module`` computes (its dequantized weight)."""
    lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    lin.weight = nn.Parameter(dequantized_weight(module), requires_grad=False)
    if module.bias is not None:
        lin.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    return lin


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every quantized linear of ``model`` (inside slots too) by :func:`float_linear` of it."""
    for holder in list(model.modules()):
        for child, mod in list(holder._modules.items()):
            if mod is not None and (_is_4bit(mod) or _is_8bit(mod)):
                holder._modules[child] = float_linear(mod)
    model.__dict__.pop("peftlab_quantization", None)
    return model


def quantization_info(model: nn.Module) -> dict | None:
    """What :func:`quantize` did to ``model`` (scheme, settings, module names), or None."""
    return model.__dict__.get("peftlab_quantization")


def linear_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by the model's linears' weights: {"quantized": ..., "float": ...}. Quantized ones count
    their packed storage and statistics (absmax, nested absmax, code tables), each tensor once."""
    out, seen = {"quantized": 0, "float": 0}, set()

    def size(t: torch.Tensor | None) -> int:
        if t is None or t.data_ptr() in seen:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()

    for m in model.modules():
        if _is_4bit(m) or _is_8bit(m):
            w, st = m.weight, getattr(m.weight, "quant_state", None)
            n = size(w.data) + (size(_int8_scales(m)) if _is_8bit(m) else 0)
            if st is not None:
                n += size(st.absmax) + size(st.code)
                if st.nested:
                    n += size(st.state2.absmax) + size(st.state2.code) + 4  # + the float offset
            out["quantized"] += n
        elif type(m).__name__ in ("Linear", "Conv1D"):
            out["float"] += size(m.weight)
    return out


def merge_errors(model: nn.Module) -> dict[str, float]:
    """Per merged quantized module: the largest |requantized − merged| weight entry the merge added."""
    return {n: m.merge_error for n, m in model.named_modules() if getattr(m, "merge_error", 0.0)}
