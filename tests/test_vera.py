"""VeRA: shared seeded projections (sliced for mixed shapes), d/b vectors, peft parity and interop."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.context import context_for
from peftlab.interop.peft_format import to_peft_config, to_peft_state_dict
from peftlab.testing import tiny_inputs, tiny_model

peft = pytest.importorskip("peft")
from test_peft_interop import _randomize, out  # noqa: E402

MIXED = ["q", "v", "ffn_out"]  # LLaMA tiny: q 32->32, v 32->16 (GQA), down 64->32: three shapes


def _vera(**kw):
    return peftlab.get_config("vera", **{"r": 4, "targets": MIXED, **kw})


def test_update_is_lambda_b_B_lambda_d_A_on_slices():
    m = peftlab.attach(tiny_model("llama"), _vera())
    _randomize(m)
    sh = m.peftlab_shared["default"]
    assert tuple(sh.vera_A.shape) == (4, 64) and tuple(sh.vera_B.shape) == (32, 4)  # max d_in, max d_out
    for _, slot in peftlab.core.slots(m):
        ad = slot.adapters["default"]
        x = torch.randn(3, slot.in_features)
        a, b = sh.vera_A[:, : slot.in_features], sh.vera_B[: slot.out_features]
        want = slot.base(x) + ((x @ a.t()) * ad.vera_lambda_d) @ b.t() * ad.vera_lambda_b
        assert torch.allclose(slot(x), want, atol=1e-5)
    n = sum(p.numel() for n, p in peftlab.trainable_parameters(m).items() if "adapters" in n)
    assert n == _vera().formula_count(context_for(tiny_model("llama"), _vera()))
    assert not any(p.requires_grad for p in sh.buffers())


def test_seed_decides_projections_and_regenerates_on_load(tmp_path):
    a = peftlab.attach(tiny_model("llama"), _vera(projection_prng_key=3, save_projection=False))
    b = peftlab.attach(tiny_model("llama"), _vera(projection_prng_key=3))
    c = peftlab.attach(tiny_model("llama"), _vera(projection_prng_key=4))
    va, vb, vc = (m.peftlab_shared["default"].vera_A for m in (a, b, c))
    assert torch.equal(va, vb) and not torch.equal(va, vc)
    _randomize(a)
    x = tiny_inputs("llama")
    peftlab.save(a, tmp_path / "s")
    from safetensors.torch import load_file
    assert not any("vera_A" in k for k in load_file(str(tmp_path / "s" / "adapter.safetensors")))
    peftlab.save(b, tmp_path / "t")
    assert any("vera_A" in k for k in load_file(str(tmp_path / "t" / "adapter.safetensors")))
    back = peftlab.load(tiny_model("llama"), tmp_path / "s")
    assert (out(back, x) - out(a, x)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("save_projection", [True, False])
def test_same_outputs_as_peft_and_roundtrip(family, save_projection, tmp_path):
    base = tiny_model(family)
    x = tiny_inputs(family)
    targets = ["c_attn", "mlp.c_proj"] if family == "gpt2" else MIXED
    ours = peftlab.attach(copy.deepcopy(base), _vera(targets=targets, save_projection=save_projection,
                                                     projection_prng_key=11))
    twin = peft.get_peft_model(copy.deepcopy(base), to_peft_config(ours)).eval()
    sd = to_peft_state_dict(ours)
    if save_projection:  # peft draws the same projections from the same seed
        assert torch.equal(twin.base_model.vera_A["default"], sd["base_model.vera_A"])
        assert torch.equal(twin.base_model.vera_B["default"], sd["base_model.vera_B"])
    _randomize(ours)
    peft.set_peft_model_state_dict(twin, to_peft_state_dict(ours))
    assert (out(ours, x) - out(twin, x)).abs().max().item() <= 1e-5
    peftlab.export_peft(ours, tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    assert (out(theirs, x) - out(ours, x)).abs().max().item() <= 1e-5
    theirs.save_pretrained(tmp_path / "q")
    back = peftlab.import_peft(copy.deepcopy(base), tmp_path / "q")
    assert peftlab.get_adapter_config(back).method == "vera"
    assert (out(back, x) - out(theirs, x)).abs().max().item() <= 1e-5


def test_import_uses_stored_projections(tmp_path):
    """A peft file whose stored A differs from the seed's: the stored one wins (no silent regeneration)."""
    base = tiny_model("llama")
    x = tiny_inputs("llama")
    cfg = peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        theirs.base_model.vera_A["default"].mul_(2)
    theirs.save_pretrained(tmp_path / "q")
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "q").eval()
    back = peftlab.import_peft(copy.deepcopy(base), tmp_path / "q")
    assert (out(back, x) - out(ref, x)).abs().max().item() <= 1e-5
    assert (out(back, x) - out(base, x)).abs().max().item() > 1e-4


@pytest.mark.parametrize("field,value", [("r", 0), ("d_initial", float("nan")), ("projection_prng_key", -1),
                                         ("dropout", 1.0)])
def test_invalid_fields(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        peftlab.get_config("vera", **{field: value})
