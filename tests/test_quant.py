"""Quantized frozen bases (peftlab.quant over bitsandbytes): numbers, training, save/load, merge, peft parity."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import CASES

import peftlab
from peftlab import quant
from peftlab.testing import loss_of, output_tensor, tiny_inputs, tiny_model

pytest.importorskip("bitsandbytes")
norm = pytest.importorskip("scipy.stats").norm


def nf4_code() -> torch.Tensor:
    """NF4 levels by their definition (QLoRA §3, Eq. 4): quantiles of N(0, 1), 8 positive and 7 negative
    so that 0 is exact, normalised to [-1, 1]."""
    offset = 0.9677083
    pos = norm.ppf(torch.linspace(offset, 0.5, 9).numpy())[:-1].tolist()
    neg = (-norm.ppf(torch.linspace(offset, 0.5, 8).numpy())[:-1]).tolist()
    v = torch.tensor(sorted(pos + [0.0] + neg), dtype=torch.float64)
    return (v / v.abs().max()).float()


def nf4_reference(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Quantize + dequantize ``w`` block-wise: absmax scale per block of ``block`` values, nearest NF4 level."""
    code = nf4_code()
    flat = w.reshape(-1, block)
    absmax = flat.abs().amax(dim=1, keepdim=True)
    idx = (flat / absmax).unsqueeze(-1).sub(code).abs().argmin(-1)
    return (code[idx] * absmax).reshape(w.shape)


def test_nf4_levels_and_dequantization_match_the_reference():
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    w = torch.randn(96, 64)
    q, st = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=False)
    assert torch.allclose(st.code.float().sort().values, nf4_code(), atol=1e-6)
    ours = quant.dequantized_weight(quant.quantize_linear(w, None, "nf4", double_quant=False))
    assert torch.allclose(ours, nf4_reference(w), atol=1e-6)
    # double quantization (8-bit scales, QLoRA §3) changes each block's scale by < 1%
    dq = quant.dequantized_weight(quant.quantize_linear(w, None, "nf4", double_quant=True))
    assert (dq - nf4_reference(w)).abs().max() <= 0.01 * w.abs().max()
    assert (dq - w).abs().max() > 0  # it is really quantized


def test_int8_is_rowwise_absmax():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    deq = quant.dequantized_weight(quant.quantize_linear(w, None, "int8"))
    scale = w.abs().amax(dim=1, keepdim=True) / 127  # bitsandbytes keeps the row absmax in fp16
    assert ((deq - w).abs() <= 0.5 * scale + 2e-3).all()  # nearest of 255 levels per row
    assert (deq.abs().amax(dim=1) - w.abs().amax(dim=1)).abs().max() < 2e-3  # the row maximum is a level


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantize_replaces_frozen_linears_and_stays_close(family, scheme):
    model, inputs = tiny_model(family), tiny_inputs(family)
    fp_bytes = quant.linear_bytes(model)["float"]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        ref = output_tensor(model(**inputs))
    quant.quantize(model, scheme)
    info = quant.quantization_info(model)
    assert info["scheme"] == scheme and info["modules"]
    assert not any(n.endswith(("classifier", "lm_head", "score")) for n in info["modules"])
    b = quant.linear_bytes(model)
    assert b["quantized"] + b["float"] < fp_bytes
    with torch.no_grad():  # the quantized model computes exactly with its dequantized weights ...
        for name in info["modules"]:
            lin, w = twin.get_submodule(name), quant.dequantized_weight(model.get_submodule(name))
            lin.weight.copy_(w.t() if type(lin).__name__ == "Conv1D" else w)
        y = output_tensor(model(**inputs))
        assert torch.allclose(y, output_tensor(twin(**inputs)), atol=1e-4)
    assert not torch.allclose(y, ref, atol=1e-4)  # ... which really differ from the fp32 ones


@pytest.mark.parametrize("scheme,bound", [("nf4", 0.3), ("int8", 0.26)])
def test_quantized_linear_bytes_against_fp32(scheme, bound):
    lin = torch.nn.Sequential(torch.nn.Linear(1024, 1024, bias=False))
    fp = quant.linear_bytes(lin)["float"]
    quant.quantize(lin, scheme)
    assert quant.linear_bytes(lin)["quantized"] <= bound * fp


def test_quantize_refuses_bad_requests():
    model = tiny_model("bert")
    with pytest.raises(peftlab.PeftlabError, match="scheme"):
        quant.quantize(model, "nf3")
    with pytest.raises(peftlab.PeftlabError, match="blocksize"):
        quant.quantize(model, "nf4", blocksize=48)
    peftlab.attach(model, peftlab.LoRAConfig(r=2))
    with pytest.raises(peftlab.PeftlabError, match="before attaching"):
        quant.quantize(model, "nf4")


QUANT_METHODS = ["lora", "dora", "ia3", "goft", "pst", "adapter_houlsby", "prefix", "prompt", "parallel_adapter"]


def _packed(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype in (torch.uint8, torch.int8)}


@pytest.mark.parametrize("method", QUANT_METHODS)
def test_every_method_trains_on_a_quantized_base(method, tmp_path):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    quant.quantize(model, "nf4")
    peftlab.attach(model, CASES[method].config())
    before = _packed(model)
    trainable = peftlab.trainable_parameters(model)
    assert trainable and all(p.is_floating_point() for p in trainable.values())
    opt = torch.optim.SGD(list(trainable.values()), lr=0.1)
    model.train()
    for _ in range(2):
        loss = loss_of(model, inputs)
        extra = peftlab.training_loss(model)
        (loss + (extra if extra is not None else 0)).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
        opt.step()
        opt.zero_grad()
    model.eval()
    after = _packed(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        y = output_tensor(model(**inputs))
    peftlab.save(model, tmp_path / "a")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "adapter.safetensors"), "pt") as f:
        assert not any(f.get_tensor(k).dtype in (torch.uint8, torch.int8) for k in f.keys())
    fresh = tiny_model("bert")
    quant.quantize(fresh, "nf4")
    peftlab.load(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.allclose(output_tensor(fresh(**inputs)), y, atol=1e-5)


def test_adapter_trained_on_a_quantized_base_loads_on_a_float_base(tmp_path):
    model, inputs = tiny_model("llama"), tiny_inputs("llama")
    quant.quantize(model, "nf4")
    peftlab.attach(model, peftlab.LoRAConfig(r=2, targets=["q", "v", "ffn_in"]))
    peftlab.save(model, tmp_path / "a")
    dense = tiny_model("llama")
    peftlab.load(dense, tmp_path / "a")
    q = tiny_model("llama")
    quant.quantize(q, "nf4")
    peftlab.load(q, tmp_path / "a")
    ours = {n: p for n, p in model.named_parameters() if ".adapters." in n}
    theirs = {n: p for n, p in dense.named_parameters() if ".adapters." in n}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    with torch.no_grad():
        assert torch.allclose(output_tensor(q(**inputs)), output_tensor(model(**inputs)), atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "goft", "pst"])
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_merge_into_quantized_base_requantizes_and_unmerge_is_exact(method, scheme):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    quant.quantize(model, scheme)
    peftlab.attach(model, CASES[method].config())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peftlab.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    packed = _packed(model)
    with torch.no_grad():
        y = output_tensor(model(**inputs))
    peftlab.merge(model)
    errors = quant.merge_errors(model)
    assert errors and max(errors.values()) > 0  # requantization adds round-off, and it is reported
    with torch.no_grad():
        ym = output_tensor(model(**inputs))
    assert torch.nn.functional.cosine_similarity(ym.flatten(), y.flatten(), dim=0) > 0.99
    peftlab.unmerge(model)
    after = _packed(model)
    assert all(torch.equal(packed[k], after[k]) for k in packed)
    with torch.no_grad():
        assert torch.allclose(output_tensor(model(**inputs)), y, atol=1e-5)


def test_dequantize_then_unload_merge_is_exact():
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    quant.quantize(model, "nf4")
    peftlab.attach(model, peftlab.LoRAConfig(r=2))
    with torch.no_grad():
        for n, p in peftlab.trainable_parameters(model).items():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        y = output_tensor(model(**inputs))
    quant.dequantize(model)
    peftlab.unload(model, merge=True)
    assert not any(quant.is_quantized(m) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(output_tensor(model(**inputs)), y, atol=1e-5)


def test_same_quantized_base_and_lora_weights_give_peft_outputs():
    peft = pytest.importorskip("peft")
    model, inputs = tiny_model("llama"), tiny_inputs("llama")
    quant.quantize(model, "nf4")
    twin = copy.deepcopy(model)
    peftlab.attach(model, peftlab.LoRAConfig(r=4, alpha=8, targets=["q", "v"]))
    pm = peft.get_peft_model(twin, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert any("Linear4bit" in type(m).__name__ for m in pm.modules())
    g = torch.Generator().manual_seed(0)
    ours = {n: p for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                layer = n.split("base_model.model.")[1].split(".base_layer")[0].split(".lora_")[0]
                kind = "lora_A" if "lora_A" in n else "lora_B"
                val = torch.randn(p.shape, generator=g) * 0.1
                p.copy_(val)
                match = [v for k, v in ours.items() if k.startswith(layer + ".") and kind in k]
                assert len(match) == 1
                match[0].copy_(val)
        assert torch.allclose(output_tensor(model(**inputs)), output_tensor(pm(**inputs)), atol=1e-5)
