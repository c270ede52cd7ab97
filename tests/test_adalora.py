"""AdaLoRA: budget schedule endpoints, ranks that move and sum to the budget, orthogonality term,
peft parity and peft-format round trips (with a pruned rank pattern)."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.interop.peft_format import to_peft_config, to_peft_state_dict
from peftlab.testing import loss_of, tiny_inputs, tiny_model
from peftlab.tuners.adalora import budget_at

peft = pytest.importorskip("peft")
from test_peft_interop import _randomize, out  # noqa: E402


def test_budget_schedule_endpoints_and_shape():
    assert budget_at(0, 100, 48, 24, 10, 20) == 48
    assert budget_at(10, 100, 48, 24, 10, 20) == 48
    assert budget_at(80, 100, 48, 24, 10, 20) == 24
    assert budget_at(81, 100, 48, 24, 10, 20) == 24
    mid = [budget_at(t, 100, 48, 24, 10, 20) for t in range(10, 81)]
    assert all(a >= b for a, b in zip(mid, mid[1:]))
    assert budget_at(45, 100, 48, 24, 10, 20) == int(24 + 24 * 0.5**3)  # cubic, halfway


def _train(model, inputs, total, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(peftlab.trainable_parameters(model).values(), lr=2e-2)
    model.train()
    for step in range(1, total + 1):
        opt.zero_grad()
        loss = loss_of(model, inputs) + peftlab.training_loss(model)
        loss.backward()
        peftlab.before_optimizer_step(model, step, total)
        opt.step()
    return model.eval()


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_ranks_move_and_sum_to_the_budget(family):
    cfg = peftlab.get_config("adalora", r=6, target_r=3, tinit=2, tfinal=3, delta_t=2, orth_reg_weight=0.1,
                             targets=["q", "v", "ffn_in", "ffn_out"])
    m = peftlab.attach(tiny_model(family), cfg)
    ranks0 = cfg.ranks(m)
    assert set(ranks0.values()) == {6}
    inputs = tiny_inputs(family, batch=4, seq=9)
    _train(m, inputs, total=20)
    ranks = cfg.ranks(m)
    assert sum(ranks.values()) == 3 * len(ranks)  # exactly the target budget
    assert len(set(ranks.values())) > 1, ranks  # the allocation is not uniform: ranks moved between layers
    # after T - t_final the ranks stay fixed
    before = {k: v.clone() for k, v in m.state_dict().items() if k.endswith("rank_mask")}
    peftlab.before_optimizer_step(m, 19, 20)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    # a masked triplet contributes nothing: zeroing its λ leaves the output unchanged
    slot = peftlab.core.slots(m)[0][1]
    ad = slot.adapters["default"]
    x = torch.randn(2, slot.in_features)
    y = slot(x)
    with torch.no_grad():
        ad.lora_E[~ad.rank_mask.bool()] = 123.0
    assert torch.equal(slot(x), y)


def test_orthogonality_regulariser_is_the_papers():
    cfg = peftlab.get_config("adalora", r=3, target_r=2, orth_reg_weight=0.25, targets=["q"])
    m = peftlab.attach(tiny_model("bert"), cfg)
    want = 0.0
    for _, s in peftlab.core.slots(m):
        a = s.adapters["default"]
        want += ((a.lora_B.t() @ a.lora_B - torch.eye(3)) ** 2).sum() + ((a.lora_A @ a.lora_A.t() - torch.eye(3)) ** 2).sum()
    assert torch.allclose(peftlab.training_loss(m), 0.25 * want)
    # the term pushes P, Q towards orthogonality
    opt = torch.optim.SGD(peftlab.trainable_parameters(m).values(), lr=0.5)
    first = peftlab.training_loss(m).item()
    for _ in range(20):
        opt.zero_grad()
        peftlab.training_loss(m).backward()
        opt.step()
    assert peftlab.training_loss(m).item() < 0.5 * first


def _trained(family, base):
    cfg = peftlab.get_config("adalora", r=4, target_r=2, alpha=6.0, tinit=1, tfinal=2, delta_t=1, total_steps=8,
                             targets={"gpt2": ["c_attn", "mlp.c_fc"]}.get(family, ["q", "v", "ffn_in"]))
    m = peftlab.attach(copy.deepcopy(base), cfg)
    _randomize(m)
    return _train(m, tiny_inputs(family, batch=4), total=8)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_same_outputs_as_peft_and_roundtrip(family, tmp_path):
    base = tiny_model(family)
    x = tiny_inputs(family)
    ours = _trained(family, base)
    assert sum(peftlab.get_adapter_config(ours).ranks(ours).values()) < 4 * len(peftlab.core.slots(ours))
    peftlab.export_peft(ours, tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    assert (out(theirs, x) - out(ours, x)).abs().max().item() <= 1e-5
    theirs.save_pretrained(tmp_path / "q")
    back = peftlab.import_peft(copy.deepcopy(base), tmp_path / "q")
    assert peftlab.get_adapter_config(back).ranks(back) == peftlab.get_adapter_config(ours).ranks(ours)
    assert (out(back, x) - out(ours, x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_untrained_twin_same_outputs(family):
    base = tiny_model(family)
    x = tiny_inputs(family)
    ours = peftlab.attach(copy.deepcopy(base), peftlab.get_config("adalora", r=4, target_r=2, total_steps=10))
    _randomize(ours)
    twin = peft.get_peft_model(copy.deepcopy(base), to_peft_config(ours))
    peft.set_peft_model_state_dict(twin, to_peft_state_dict(ours))
    assert (out(ours, x) - out(twin.eval(), x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("field,value", [("r", 0), ("target_r", 20), ("beta1", 1.0), ("orth_reg_weight", -1.0),
                                         ("delta_t", 0), ("alpha", float("nan")), ("tinit", -1)])
def test_invalid_fields(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        peftlab.get_config("adalora", **{field: value})
