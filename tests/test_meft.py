"""MEFT: reversible backward = ordinary autograd, memory that does not grow with depth, reconstruction,
instability detection, generation, training (CLI config, gradient accumulation, 2 processes)."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
import torch
import yaml
from test_distributed import LAUNCH_TRAIN_2PROC
from torch import nn

import peftlab
from peftlab.testing import output_tensor, tiny_inputs, tiny_model
from peftlab.tuners.meft import MEFTStack, ReversibleInstabilityError

FAMS = ("bert", "roberta", "llama")
VARIANTS = (1, 2, 3)


def _stack(model) -> MEFTStack:
    return next(m for m in model.peftlab_shared.values() if isinstance(m, MEFTStack))


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    for m in model.modules():  # HF attention reads config.attention_dropout / self.dropout floats
        if hasattr(m, "attention_dropout") and isinstance(m.attention_dropout, float):
            m.attention_dropout = 0.0


def _grads(model, inputs, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    _stack(model).k = k
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = output_tensor(model(**inputs))
    out.to(torch.float64).pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _model(family, variant, dtype=torch.float32, dropout=True, **kw):
    model = tiny_model(family)
    peftlab.attach(model, peftlab.get_config("meft", variant=variant, r=4, **kw))
    if not dropout:
        _no_dropout(model)
    return model.to(dtype).train(), tiny_inputs(family)


@pytest.mark.parametrize("dropout", [True, False], ids=["dropout", "no-dropout"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMS)
def test_gradient_parity_float64(family, variant, dropout):
    model, inputs = _model(family, variant, torch.float64, dropout)
    ref = _grads(model, inputs, k=0)  # ordinary autograd through the same two-stream model
    rev = _grads(model, inputs, k=len(_stack(model).blocks))
    trainable = set(peftlab.trainable_parameters(model))
    assert set(ref) == set(rev) == trainable
    for n in ref:
        rel = ((rev[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-300)).item()
        assert rel <= 1e-6, (n, rel)


@pytest.mark.parametrize("dropout", [True, False], ids=["dropout", "no-dropout"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMS)
def test_gradient_parity_float32(family, variant, dropout):
    model, inputs = _model(family, variant, torch.float32, dropout)
    ref = _grads(model, inputs, k=0)
    rev = _grads(model, inputs, k=len(_stack(model).blocks))
    cos = {n: torch.nn.functional.cosine_similarity(ref[n].flatten(), rev[n].flatten(), dim=0).item() for n in ref}
    print(f"{family} MEFT{variant}: min per-tensor gradient cosine {min(cos.values()):.6f}, "
          f"reconstruction error {_stack(model).last_reconstruction_error:.2e}")
    assert min(cos.values()) > 0.999, min(cos.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_hybrid_depth_matches_ordinary_autograd(k):
    model, inputs = _model("bert", 1, torch.float64)
    ref, hyb = _grads(model, inputs, k=0), _grads(model, inputs, k=k)
    for n in ref:
        assert torch.allclose(ref[n], hyb[n], rtol=1e-8, atol=1e-12), n


@pytest.mark.parametrize("variant", VARIANTS)
def test_reconstructed_inputs_match_forward_inputs(variant):
    model, inputs = _model("llama", variant, torch.float64)
    st = _stack(model)
    st.record = {"forward": [], "backward": []}
    _grads(model, inputs, k=len(st.blocks))
    fwd, bwd = st.record["forward"], st.record["backward"]
    assert len(fwd) == len(bwd) == len(st.blocks)
    for (f1, f2), (b1, b2) in zip(fwd, bwd):
        err = max((f1 - b1).abs().max().item(), (f2 - b2).abs().max().item()) / f1.abs().max().item()
        assert err < 1e-6, err  # stated tolerance: relative max-abs error 1e-6 in float64 (MEFT3: ~1e-8)
    assert st.last_reconstruction_error < 1e-6


def _saved_bytes(model, inputs) -> int:
    """Bytes that autograd keeps from the forward for the backward (transient recomputation not counted)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = output_tensor(model(**inputs)).float().pow(2).mean()
    loss.backward()
    return total


def test_saved_bytes_do_not_grow_with_depth():
    rev, plain = [], []
    for layers in (2, 4, 8):
        for store, k in ((rev, None), (plain, 0)):
            model = tiny_model("bert", layers=layers)
            peftlab.attach(model, peftlab.get_config("meft", variant=1, r=4, reversible_layers=k))
            store.append(_saved_bytes(model.train(), tiny_inputs("bert", batch=4, seq=32)))
    print("saved bytes (2/4/8 layers): reversible", rev, "ordinary autograd", plain)
    assert rev[0] == rev[1] == rev[2]
    assert plain[2] - plain[1] > 0.9 * (plain[1] - plain[0]) > 0  # the ordinary path grows per layer


@pytest.mark.slow
@pytest.mark.parametrize("seq", [128, 512])
def test_minilm_saved_bytes_at_most_a_fifth_of_lora(minilm, seq):
    ids = torch.randint(1000, 20000, (4, seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    lora = peftlab.attach(copy.deepcopy(minilm), peftlab.LoRAConfig(r=8, targets=["q", "v"])).train()
    meft = peftlab.attach(copy.deepcopy(minilm), peftlab.get_config("meft", variant=1)).train()
    b_lora, b_meft = _saved_bytes(lora, inputs), _saved_bytes(meft, inputs)
    print(f"seq {seq}: saved bytes LoRA {b_lora / 2**20:.1f} MiB, MEFT1 {b_meft / 2**20:.1f} MiB "
          f"({b_meft / b_lora:.3f}x)")
    assert b_meft <= 0.2 * b_lora


def test_instability_is_detected_and_explained():
    model, inputs = _model("bert", 3, torch.float32, stream_dtype="float32", lam=1e-3, beta=1e-3)
    with pytest.warns(RuntimeWarning, match="reconstruction error"):
        _grads(model, inputs, k=4)
    assert _stack(model).last_reconstruction_error > 0.1
    model, inputs = _model("bert", 1, torch.float32, lam=1e-300)  # 1/λ overflows: inf in the rebuilt inputs
    with pytest.raises(ReversibleInstabilityError, match="reversible_layers"):
        _grads(model, inputs, k=4)


def test_eval_path_equals_training_forward_and_generation_uses_the_cache():
    model, inputs = _model("llama", 1, torch.float32, dropout=False)
    with torch.no_grad():
        y_eval = output_tensor(model.eval()(**inputs))
    y_train = output_tensor(model.train()(**inputs))  # reversible function (grad enabled)
    assert torch.allclose(y_eval, y_train, atol=1e-5)
    model.eval()
    ids = inputs["input_ids"][:1]
    cached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    plain = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("family", ["gpt2", "t5", "opt", "bart", "vit", "deberta-v2"])
def test_unsupported_families_are_refused_untouched(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.UnsupportedArchitectureError, match="MEFT supports"):
        peftlab.attach(model, peftlab.get_config("meft"))
    assert not peftlab.core.has_adapters(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_config_validation_and_counts():
    with pytest.raises(ValueError, match="variant"):
        peftlab.get_config("meft", variant=4)
    with pytest.raises(ValueError, match="whole block stack"):
        peftlab.get_config("meft", targets=["q"])
    with pytest.raises(ValueError, match="non-zero"):
        peftlab.get_config("meft", beta=0.0)
    model = tiny_model("bert")
    d, n_layers = model.config.hidden_size, model.config.num_hidden_layers
    peftlab.attach(model, peftlab.get_config("meft", variant=1, r=8))
    head = sum(p.numel() for p in model.classifier.parameters())
    assert sum(p.numel() for p in peftlab.trainable_parameters(model).values()) - head == 2 * (2 * d * 8 + d + 8) * n_layers
    with pytest.raises(peftlab.UnsupportedArchitectureError, match="already attached"):
        peftlab.attach(model, peftlab.get_config("meft"), name="second")
    with pytest.raises(peftlab.NotMergeableError):
        peftlab.merge(model)


@pytest.mark.slow
def test_trains_from_the_cli_config_with_gradient_accumulation(tmp_path):
    from peftlab.train import run

    cfg = {"model": "minilm", "method": "meft", "method_args": {"variant": 1},
           "task": {"name": "demo", "train_limit": 160, "eval_limit": 64},
           "train": {"max_steps": 30, "batch_size": 8, "grad_accum": 2, "lr": 3e-3, "max_length": 24,
                     "eval_every": 30, "seed": 3, "progress": False},
           "output_dir": str(tmp_path / "run")}
    res = run(cfg)
    assert res["final"]["accuracy"] >= 0.8, res


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_accelerate(tmp_path):
    pytest.importorskip("accelerate")
    cfg = {"model": "minilm", "method": "meft", "method_args": {"variant": 1},
           "task": {"name": "demo", "train_limit": 160, "eval_limit": 64},
           "train": {"max_steps": 20, "batch_size": 8, "lr": 3e-3, "max_length": 24, "eval_every": 20, "seed": 3,
                     "progress": False},
           "output_dir": str(tmp_path / "two")}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([*LAUNCH_TRAIN_2PROC, str(tmp_path / "two.yaml")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "two" / "results.json").read_text())
    assert res["world_size"] == 2 and res["final"]["accuracy"] >= 0.75, res
