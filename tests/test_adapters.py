"""Serial (Houlsby / Pfeiffer) and parallel bottleneck adapters: placement, init, sizes, mixing."""

from __future__ import annotations

import json

import pytest
import torch

import peftlab
from peftlab.testing import output_tensor, tiny_inputs, tiny_model


def out(m, x):
    with torch.no_grad():
        return output_tensor(m(**x))


def slot_suffixes(m):
    return sorted(n.split(".", 4)[-1] for n, _ in peftlab.core.slots(m))


def test_houlsby_two_per_block_pfeiffer_one():
    h = peftlab.attach(tiny_model("bert"), peftlab.get_config("adapter"))
    names = [n for n, _ in peftlab.core.slots(h)]
    assert len(names) == 8 and sum(n.endswith("attention.output.dense") for n in names) == 4
    p = peftlab.attach(tiny_model("llama"), peftlab.get_config("adapter", placement="pfeiffer"))
    assert [n.split(".")[-1] for n, _ in peftlab.core.slots(p)] == ["down_proj"] * 4
    t5 = peftlab.attach(tiny_model("t5"), peftlab.get_config("adapter"))
    assert sum("EncDecAttention.o" in n for n, _ in peftlab.core.slots(t5)) == 2  # decoder cross-attention too


def test_bert_init_is_close_but_not_exact():
    m, x = tiny_model("bert"), tiny_inputs("bert")
    base = out(m, x)
    peftlab.attach(m, peftlab.get_config("adapter", init="bert", bottleneck=8))
    y = out(m, x)
    assert (y - base).abs().max() > 0
    assert torch.nn.functional.cosine_similarity(y.flatten(), base.flatten(), dim=0) > 0.99


def test_sizes_reduction_factor_and_per_layer_override_and_json():
    m = tiny_model("bert")  # d = 32
    cfg = peftlab.get_config("adapter", reduction_factor=8, layer_bottleneck={1: 2, 3: 16})
    peftlab.attach(m, cfg)
    widths = {n: s.adapters["default"].adapter.down.out_features for n, s in peftlab.core.slots(m)}
    layer = lambda n: int(n.split(".")[3])  # noqa: E731
    assert {layer(n): w for n, w in widths.items()} == {0: 4, 1: 2, 2: 4, 3: 16}
    row = peftlab.report(m).adapters[0]
    assert row.params == row.formula == sum(2 * (2 * 32 * w + w + 32) for w in (4, 2, 4, 16))
    back = peftlab.config_class("adapter").from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.layer_bottleneck == {"1": 2, "3": 16}


def test_layer_subset_and_mixing_methods_on_one_model():
    m, x = tiny_model("llama"), tiny_inputs("llama")
    base = out(m, x)
    peftlab.attach(m, peftlab.get_config("adapter", layers=[0, 1], bottleneck=4), name="a")
    peftlab.attach(m, peftlab.LoRAConfig(r=2, layers=[2, 3]), name="l")
    peftlab.attach(m, peftlab.BitFitConfig(), name="b")
    peftlab.attach(m, peftlab.get_config("parallel_adapter", layers=[3], bottleneck=4), name="p")
    assert torch.allclose(out(m, x), base, atol=1e-6)
    layers = {name: set() for name in "alpb"}
    for n, s in peftlab.core.slots(m):
        for a in s.adapters:
            layers[a].add(int(n.split(".")[2]))
    assert layers == {"a": {0, 1}, "l": {2, 3}, "b": {0, 1, 2, 3}, "p": {3}}
    m.train()
    output_tensor(m(**x)).pow(2).mean().backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad <= set(peftlab.trainable_parameters(m))
    with peftlab.disabled(m):
        assert torch.allclose(out(m, x), base, atol=1e-6)
    with pytest.raises(peftlab.NotMergeableError):
        peftlab.merge(m)


def test_parallel_adapter_is_parallel_to_the_ffn():
    m = tiny_model("llama")
    peftlab.attach(m, peftlab.get_config("parallel_adapter", bottleneck=4, scaling=2.0, layers=[0]))
    slot = m.model.layers[0].mlp
    ad = slot.adapters["default"]
    with torch.no_grad():
        ad.adapter.up.weight.normal_()
        h = torch.randn(2, 5, 32)
        expect = slot.base(h) + 2.0 * ad.adapter.up(torch.relu(ad.adapter.down(h)))
        assert torch.allclose(slot(h), expect, atol=1e-6)


def test_parallel_adapter_bert_residual_form_and_attention_placement():
    m = tiny_model("bert")
    peftlab.attach(m, peftlab.get_config("parallel_adapter", bottleneck=4, layers=[0]))
    slot = m.bert.encoder.layer[0].output
    ad = slot.adapters["default"]
    with torch.no_grad():
        ad.adapter.up.weight.normal_()
        h, u = torch.randn(2, 5, 64), torch.randn(2, 5, 32)
        b = slot.base
        expect = b.LayerNorm(b.dense(h) + u + 4.0 * ad.adapter(u))  # eval mode: dropout is identity
        assert torch.allclose(slot(h, u), expect, atol=1e-5)
    a = peftlab.attach(tiny_model("bert"), peftlab.get_config("parallel_adapter", placement="attn"))
    assert all(n.endswith("attention.output") for n, _ in peftlab.core.slots(a))


@pytest.mark.parametrize("family", ["opt", "bart"])
def test_parallel_adapter_refused_where_the_ffn_is_inline(family):
    m = tiny_model(family)
    with pytest.raises(peftlab.UnsupportedArchitectureError, match="inline"):
        peftlab.attach(m, peftlab.get_config("parallel_adapter"))
    assert not peftlab.core.slots(m)


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="placement"):
        peftlab.get_config("adapter", placement="middle")
    with pytest.raises(ValueError, match="activation"):
        peftlab.get_config("adapter", activation="swish2")
    with pytest.raises(ValueError, match="init"):
        peftlab.get_config("adapter", init="xavier")
