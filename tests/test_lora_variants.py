"""LoRA-FA (frozen A: no saved layer input), LoRA+ (param groups as peft's create_loraplus_optimizer)."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.testing import loss_of, tiny_inputs, tiny_model

peft = pytest.importorskip("peft")
from test_peft_interop import _randomize, out  # noqa: E402


def _saved_activation_bytes(model, inputs) -> int:
    """Bytes of distinct non-parameter tensors autograd keeps for backward during one forward."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, inputs)
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_lora_fa_does_not_save_layer_inputs(family):
    inputs = tiny_inputs(family, batch=4, seq=16)
    targets = ["ffn_in"]  # inputs of the FFN-in projections are not saved by anything else
    sizes = {}
    for method in ("lora", "lora_fa"):
        m = peftlab.attach(tiny_model(family), peftlab.get_config(method, r=2, targets=targets)).train()
        sizes[method] = _saved_activation_bytes(m, inputs)
    n_layers = 4
    x_bytes = 4 * 16 * 32 * 4  # batch x seq x hidden x fp32, one FFN input per block
    assert sizes["lora"] - sizes["lora_fa"] >= n_layers * x_bytes, sizes


def test_lora_fa_trains_only_b():
    m = peftlab.attach(tiny_model("bert"), peftlab.get_config("lora_fa", r=2))
    names = [n for n in peftlab.trainable_parameters(m) if "adapters" in n]
    assert names and all(n.endswith("lora_B") for n in names)
    a0 = {n: b.clone() for n, b in m.named_buffers() if n.endswith("lora_A")}
    opt = torch.optim.SGD(peftlab.trainable_parameters(m).values(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        loss_of(m.train(), tiny_inputs("bert")).backward()
        opt.step()
    assert all(torch.equal(b, a0[n]) for n, b in m.named_buffers() if n in a0)
    assert any(p.abs().sum() > 0 for n, p in m.named_parameters() if n.endswith("lora_B"))


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("method", ["lora_fa", "lora_plus"])
def test_export_is_a_peft_lora(method, family, tmp_path):
    base = tiny_model(family)
    x = tiny_inputs(family)
    ours = peftlab.attach(copy.deepcopy(base), peftlab.get_config(method, r=4, alpha=8))
    _randomize(ours)
    with torch.no_grad():  # A too (LoRA-FA's is a buffer)
        for n, b in ours.named_buffers():
            if n.endswith("lora_A"):
                b.mul_(3)
    peftlab.export_peft(ours, tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    assert (out(theirs, x) - out(ours, x)).abs().max().item() <= 1e-5
    back = peftlab.import_peft(copy.deepcopy(base), tmp_path / "p")
    assert peftlab.get_adapter_config(back).method == "lora"
    assert (out(back, x) - out(ours, x)).abs().max().item() <= 1e-5


def _canon(name: str) -> str:
    for a, b in (("base_model.model.", ""), (".modules_to_save.default", ""), (".adapters.default", ""),
                 (".lora_A.default.weight", ".lora_A"), (".lora_B.default.weight", ".lora_B")):
        name = name.replace(a, b)
    return name


def _lrs(model, groups):
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {_canon(n): by_id[id(p)] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_lora_plus_groups_match_peft(family):
    base = tiny_model(family)
    ours = peftlab.attach(copy.deepcopy(base), peftlab.get_config("lora_plus", r=4, lr_ratio=8.0,
                                                                  targets=["q", "v", "ffn_out"]))
    cfg = peftlab.interop.peft_format.to_peft_config(ours)
    twin = peft.get_peft_model(copy.deepcopy(base), cfg)
    from peft.optimizers import create_loraplus_optimizer

    opt = create_loraplus_optimizer(twin, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8.0,
                                    loraplus_weight_decay=0.01)
    theirs = _lrs(twin, opt.param_groups)
    mine = _lrs(ours, peftlab.param_groups(ours, lr=1e-3, weight_decay=0.01))
    assert set(mine) == set(theirs)
    assert all(mine[k] == pytest.approx(theirs[k]) for k in mine), {k: (mine[k], theirs[k]) for k in mine}
    assert all(v[0] == pytest.approx(8e-3) for k, v in mine.items() if k.endswith("lora_B"))
    assert {v[0] for k, v in mine.items() if k.endswith("lora_A")} == {1e-3}


def test_param_groups_plain_and_usable():
    m = peftlab.attach(tiny_model("bert"), peftlab.LoRAConfig(r=2))
    groups = peftlab.param_groups(m, lr=0.1, weight_decay=0.5)
    assert {(g["lr"], g["weight_decay"]) for g in groups} == {(0.1, 0.5), (0.1, 0.0)}
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert no_decay == {id(p) for n, p in m.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert sum(len(g["params"]) for g in groups) == len(peftlab.trainable_parameters(m))
    torch.optim.AdamW(groups).step()  # accepted by torch
    full = tiny_model("bert")  # no adapter: every parameter, two decay groups
    assert sum(len(g["params"]) for g in peftlab.param_groups(full, lr=1.0)) == len(list(full.parameters()))


def test_lora_plus_ratio_validated():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr_ratio"):
            peftlab.get_config("lora_plus", lr_ratio=bad)
