"""DyLoRA: nested ranks, per-step shared sampling, serving any rank ≤ r, compile-friendly forward."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.testing import loss_of, tiny_inputs, tiny_model
from peftlab.tuners.dylora import set_rank

peft = pytest.importorskip("peft")
from test_peft_interop import _randomize, out  # noqa: E402


def _layers(m):
    return [s.adapters["default"] for _, s in peftlab.core.slots(m)]


def test_any_rank_is_the_truncated_lora():
    m = peftlab.attach(tiny_model("llama"), peftlab.get_config("dylora", r=4, alpha=8, targets=["q", "ffn_out"]))
    _randomize(m)
    slot = peftlab.core.slots(m)[0][1]
    ad = slot.adapters["default"]
    x = torch.randn(3, slot.in_features)
    outs = []
    for b in (1, 2, 4):
        set_rank(m, b)
        want = slot.base(x) + (8 / b) * x @ ad.lora_A[:b].t() @ ad.lora_B[:, :b].t()
        assert torch.allclose(slot(x), want, atol=1e-5)
        outs.append(slot(x))
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    assert peftlab.get_adapter_config(m).rank == 4


def test_training_samples_one_rank_per_step_for_all_layers():
    m = peftlab.attach(tiny_model("bert"), peftlab.get_config("dylora", r=6, r_min=2, seed=3)).train()
    seen = set()
    for step in range(1, 30):
        peftlab.on_train_step(m, step, 30)
        ranks = {int(a.train_rank) for a in _layers(m)}
        assert len(ranks) == 1
        seen |= ranks
    assert seen == set(range(2, 7))
    # gradients reach exactly the first b components
    peftlab.on_train_step(m, 5, 30)
    b = int(_layers(m)[0].train_rank)
    with torch.no_grad():
        for a in _layers(m):
            a.lora_B.normal_()
    loss_of(m, tiny_inputs("bert")).backward()
    g = _layers(m)[0].lora_A.grad
    assert g[:b].abs().sum() > 0 and g[b:].abs().sum() == 0


def test_rank_survives_save_load_and_exports_truncated_lora(tmp_path):
    base = tiny_model("bert")
    x = tiny_inputs("bert")
    m = peftlab.attach(copy.deepcopy(base), peftlab.get_config("dylora", r=4, alpha=8))
    _randomize(m)
    set_rank(m, 2)
    y = out(m, x)
    peftlab.save(m, tmp_path / "a")
    back = peftlab.load(copy.deepcopy(base), tmp_path / "a")
    assert (out(back, x) - y).abs().max().item() <= 1e-6
    peftlab.export_peft(m, tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    assert theirs.peft_config["default"].r == 2
    assert (out(theirs, x) - y).abs().max().item() <= 1e-5


def test_set_rank_checks():
    m = peftlab.attach(tiny_model("bert"), peftlab.get_config("dylora", r=4))
    with pytest.raises(ValueError, match="rank"):
        set_rank(m, 5)
    peftlab.merge(m)
    with pytest.raises(peftlab.NotMergeableError):
        set_rank(m, 2)
    other = peftlab.attach(tiny_model("bert"), peftlab.LoRAConfig())
    with pytest.raises(peftlab.PeftlabError, match="DyLoRA"):
        set_rank(other, 1)


def test_forward_has_no_graph_break():
    m = peftlab.attach(tiny_model("llama"), peftlab.get_config("dylora", r=4)).train()
    slot = peftlab.core.slots(m)[0][1]
    x = torch.randn(2, 5, slot.in_features)
    explained = torch._dynamo.explain(slot)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.parametrize("field,value", [("r", 0), ("r_min", 9), ("rank", 0), ("alpha", float("nan")),
                                         ("seed", -1)])
def test_invalid_fields(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        peftlab.get_config("dylora", **{field: value})
