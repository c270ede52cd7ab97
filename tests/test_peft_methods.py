"""Survey methods that peft also has (LoHa, LoKr, ...): same weights give peft's outputs, and adapters
round-trip through peft's on-disk format both ways (export_peft -> PeftModel.from_pretrained, and
save_pretrained -> import_peft -> export_peft)."""

from __future__ import annotations

import copy

import pytest

import peftlab
from peftlab.interop.peft_format import to_peft_config, to_peft_state_dict
from peftlab.testing import tiny_inputs, tiny_model

peft = pytest.importorskip("peft")
from test_peft_interop import _randomize, out  # noqa: E402

LINEAR_ONLY = ("bert", "llama")  # peft's LoHa / LoKr refuse GPT-2's Conv1D


def _ours(method):
    return {
        "loha": lambda: peftlab.get_config("loha", r=3, alpha=6, targets=["q", "v", "ffn_out"]),
        "lokr": lambda: peftlab.get_config("lokr", r=2, alpha=4, targets=["q", "v", "ffn_in"]),
        "lokr_both": lambda: peftlab.get_config("lokr", r=1, alpha=3, decompose_both=True, decompose_factor=4),
    }[method]()


def _theirs(method, family):
    qv = {"bert": ["query", "value"], "gpt2": ["c_attn"]}.get(family, ["q_proj", "v_proj"])
    task = "SEQ_CLS" if family == "bert" else "CAUSAL_LM"
    if method == "loha":
        return peft.LoHaConfig(r=3, alpha=6, target_modules=qv, task_type=task, init_weights=False)
    if method == "lokr":
        return peft.LoKrConfig(r=2, alpha=4, target_modules=qv, task_type=task, init_weights=False)
    return peft.LoKrConfig(r=1, alpha=3, target_modules=qv, task_type=task, init_weights=False, decompose_both=True,
                           decompose_factor=4)


FAMILIES = {"loha": LINEAR_ONLY + ("t5",), "lokr": LINEAR_ONLY + ("opt",), "lokr_both": LINEAR_ONLY}
PAIRS = [(m, f) for m, fs in FAMILIES.items() for f in fs]


def check_same_outputs_as_peft(family, config):
    """Our adapter with random weights and peft's built from our config with the same tensors agree (≤ 1e-5);
    returns our outputs and the base model's."""
    base = tiny_model(family)
    x = tiny_inputs(family)
    ours = peftlab.attach(copy.deepcopy(base), config)
    _randomize(ours)
    twin = peft.get_peft_model(copy.deepcopy(base), to_peft_config(ours))
    res = peft.set_peft_model_state_dict(twin, to_peft_state_dict(ours))
    assert not res.unexpected_keys
    y = out(ours, x)
    assert (y - out(twin.eval(), x)).abs().max().item() <= 1e-5
    return y, out(base, x)


@pytest.mark.parametrize("method,family", PAIRS)
def test_same_outputs_as_peft(method, family):
    check_same_outputs_as_peft(family, _ours(method))


@pytest.mark.parametrize("method,family", PAIRS)
def test_peft_init_matches_ours(method, family):
    """Same parameter names and shapes, and both start at exactly the base model."""
    base = tiny_model(family)
    x = tiny_inputs(family)
    ours = peftlab.attach(copy.deepcopy(base), _ours(method))
    twin = peft.get_peft_model(copy.deepcopy(base), to_peft_config(ours)).eval()
    theirs = {k.replace(".default", ""): v.shape for k, v in twin.state_dict().items() if "lokr_" in k or "hada_" in k}
    mine = {k: v.shape for k, v in to_peft_state_dict(ours).items() if "lokr_" in k or "hada_" in k}
    assert mine == theirs
    assert (out(twin, x) - out(base, x)).abs().max().item() == 0
    assert (out(ours, x) - out(base, x)).abs().max().item() == 0


def check_roundtrip_both_ways(base, x, ours_config, theirs_config, method, tmp_path):
    """Ours -> export_peft -> peft gives our outputs; a peft-saved adapter -> import_peft -> export_peft -> peft
    gives peft's outputs (and differs from the base model)."""
    ours = peftlab.attach(copy.deepcopy(base), ours_config)
    _randomize(ours)
    peftlab.export_peft(ours, tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    assert (out(theirs, x) - out(ours, x)).abs().max().item() <= 1e-5
    model = peft.get_peft_model(copy.deepcopy(base), theirs_config).eval()
    model.save_pretrained(tmp_path / "q")
    back = peftlab.import_peft(copy.deepcopy(base), tmp_path / "q")
    assert peftlab.get_adapter_config(back).method == method
    assert (out(back, x) - out(model, x)).abs().max().item() <= 1e-5
    y0 = out(base, x)
    assert (out(back, x) - y0).abs().max().item() > 1e-3 * y0.abs().max().item()  # peft's random start moved it
    peftlab.export_peft(back, tmp_path / "r")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "r").eval()
    assert (out(again, x) - out(model, x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method,family", [p for p in PAIRS if p[1] != "t5" and p[1] != "opt"])
def test_roundtrip_both_ways(method, family, tmp_path):
    check_roundtrip_both_ways(tiny_model(family), tiny_inputs(family), _ours(method), _theirs(method, family),
                              method.split("_")[0], tmp_path)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_conv1d_served_but_not_exported(method, tmp_path):
    m = peftlab.attach(tiny_model("gpt2"), _ours(method))
    with pytest.raises(peftlab.PeftlabError, match="Conv1D"):
        peftlab.export_peft(m, tmp_path / "p")
