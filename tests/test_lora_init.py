"""PiSSA / OLoRA initialisation: factors from W, the function W_res + sBA, peft parity, exact life cycle."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.interop.peft_format import PREFIX, to_peft_state_dict
from peftlab.testing import tiny_inputs, tiny_model

peft = pytest.importorskip("peft")
from test_peft_interop import _randomize, out  # noqa: E402

QV = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
PAIRS = [("pissa", f) for f in ("bert", "gpt2", "llama")] + [("olora", f) for f in ("bert", "llama")]


def _adapters(model):
    return {p: s.adapters["default"] for p, s in peftlab.core.slots(model)}


def _peft(base, family, init, r=4, alpha=8):
    task = "SEQ_CLS" if family == "bert" else "CAUSAL_LM"
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=QV[family], init_lora_weights=init, task_type=task,
                          fan_in_fan_out=family == "gpt2")
    return peft.get_peft_model(copy.deepcopy(base), cfg).eval()


def test_pissa_factors_are_the_principal_rank_r_part():
    m = peftlab.attach(tiny_model("llama"), peftlab.LoRAConfig(r=3, alpha=6, init="pissa", targets=["o"]))
    slot = peftlab.core.slots(m)[0][1]
    ad = slot.adapters["default"]
    w = slot.weight_oi().detach()
    u, s, vh = torch.linalg.svd(w)
    best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    assert torch.allclose(ad.scale * ad.lora_B @ ad.lora_A, best, atol=1e-5)
    residual_sv = torch.linalg.svdvals(w - best)
    assert torch.allclose(residual_sv[: len(s) - 3], s[3:], atol=1e-5)  # W_res keeps the minor components


def test_olora_factors_are_orthonormal_q_and_r():
    m = peftlab.attach(tiny_model("bert"), peftlab.LoRAConfig(r=4, init="olora", targets=["q"]))
    ad = next(iter(_adapters(m).values()))
    assert torch.allclose(ad.lora_B.t() @ ad.lora_B, torch.eye(4), atol=1e-5)
    assert torch.allclose(ad.lora_A.tril(-1), torch.zeros_like(ad.lora_A), atol=0)  # upper-triangular rows of R


@pytest.mark.parametrize("init,family", PAIRS)
def test_same_init_and_outputs_as_peft(init, family):
    base = tiny_model(family)
    x = tiny_inputs(family)
    ours = peftlab.attach(copy.deepcopy(base), peftlab.LoRAConfig(r=4, alpha=8, init=init, targets=QV[family]))
    twin = _peft(base, family, init)
    theirs = {k: v for k, v in twin.state_dict().items() if "lora_" in k}
    for p, ad in _adapters(ours).items():
        assert torch.allclose(ad.lora_A, theirs[f"{PREFIX}{p}.lora_A.default.weight"], atol=1e-5)
        assert torch.allclose(ad.lora_B, theirs[f"{PREFIX}{p}.lora_B.default.weight"], atol=1e-5)
    assert (out(ours, x) - out(twin, x)).abs().max().item() <= 1e-5
    _randomize(ours)  # same trained A, B -> same outputs (peft's base is W_res, ours W plus the frozen term)
    sd = {k: v for k, v in to_peft_state_dict(ours).items() if "lora_" not in k}  # the head
    sd.update({f"{PREFIX}{p}.{k}.weight": getattr(ad, k).detach() for p, ad in _adapters(ours).items()
               for k in ("lora_A", "lora_B")})
    peft.set_peft_model_state_dict(twin, sd)
    assert (out(ours, x) - out(twin, x)).abs().max().item() <= 1e-5
    assert (out(ours, x) - out(base, x)).abs().max().item() > 1e-4


@pytest.mark.parametrize("init,family", PAIRS)
def test_peft_roundtrip_both_ways(init, family, tmp_path):
    base = tiny_model(family)
    x = tiny_inputs(family)
    ours = peftlab.attach(copy.deepcopy(base), peftlab.LoRAConfig(r=4, alpha=8, init=init, targets=QV[family]))
    _randomize(ours)
    peftlab.export_peft(ours, tmp_path / "p")  # converted plain LoRA of rank 2r, loads onto the pristine base
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    assert (out(theirs, x) - out(ours, x)).abs().max().item() <= 1e-5
    # peft-trained PiSSA/OLoRA adapter, saved as is: import recomputes (A0, B0) from the pristine base, as peft does
    model = _peft(base, family, init)
    _randomize(model)
    model.save_pretrained(tmp_path / "q")
    back = peftlab.import_peft(copy.deepcopy(base), tmp_path / "q")
    assert peftlab.get_adapter_config(back).init == init
    assert (out(back, x) - out(model, x)).abs().max().item() <= 1e-5
    # peft's own conversion (path_initial_model_for_weight_conversion) imports as the plain rank-2r LoRA.
    # (peft 0.21's conversion drops the modules_to_save head, so its own reload fails on SEQ_CLS: LMs only)
    if family == "bert":
        return
    init_dir = tmp_path / "init"
    fresh = _peft(base, family, init)
    fresh.save_pretrained(init_dir)
    model.save_pretrained(tmp_path / "c", path_initial_model_for_weight_conversion=str(init_dir))
    conv = peftlab.import_peft(copy.deepcopy(base), tmp_path / "c")
    assert peftlab.get_adapter_config(conv).r == 8
    reread = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "c").eval()
    assert (out(conv, x) - out(reread, x)).abs().max().item() <= 1e-5
    assert (out(conv, x) - out(base, x)).abs().max().item() > 1e-4


def test_life_cycle_is_exact_on_the_pristine_base(tmp_path):
    base = tiny_model("bert")
    x = tiny_inputs("bert")
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    m = peftlab.attach(copy.deepcopy(base), peftlab.LoRAConfig(r=4, init="pissa", targets=["q", "v"],
                                                               modules_to_save=[]))
    _randomize(m)
    y = out(m, x)
    with peftlab.disabled(m):
        assert torch.equal(out(m, x), out(base, x))
    peftlab.save(m, tmp_path / "a")
    loaded = peftlab.load(copy.deepcopy(base), tmp_path / "a")
    assert (out(loaded, x) - y).abs().max().item() <= 1e-6
    plain = peftlab.unload(loaded, merge=False)
    assert all(torch.equal(v, ref[k]) for k, v in plain.state_dict().items())


@pytest.mark.parametrize("cfg", [dict(init="svd"), dict(init="pissa", r=64)])
def test_bad_init_rejected(cfg):
    with pytest.raises((TypeError, ValueError)):
        peftlab.attach(tiny_model("bert"), peftlab.LoRAConfig(**{"targets": ["q"], **cfg}))


def test_init_only_for_lora():
    with pytest.raises(ValueError, match="init"):
        peftlab.get_config("dora", init="pissa")
