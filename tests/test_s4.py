"""S4 design spaces: grouping, allocation, budget solver, strategy mixes on every family, presets."""

from __future__ import annotations

import json

import pytest
import torch

import peftlab
from peftlab.testing import FAMILIES, output_tensor, tiny_inputs, tiny_model
from peftlab.tuners.s4 import PATTERNS, PRESETS, group_sizes


@pytest.mark.parametrize("n", [4, 5, 6, 7, 8, 11, 12, 16, 24, 32, 48])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_group_sizes_for_many_depths(n, pattern):
    s = group_sizes(n, 4, pattern)
    assert sum(s) == n and len(s) == 4 and min(s) >= 1
    if n >= 12:  # the pattern's shape shows once there are enough layers
        if pattern == "increasing":
            assert s == sorted(s) and s[0] < s[-1]
        if pattern == "decreasing":
            assert s == sorted(s, reverse=True) and s[0] > s[-1]
        if pattern == "spindle":
            assert min(s[1], s[2]) > max(s[0], s[3])
        if pattern == "bottleneck":
            assert max(s[1], s[2]) < min(s[0], s[3])
        if pattern == "uniform":
            assert max(s) - min(s) <= 1


def test_reference_sizes_and_errors():
    assert group_sizes(24, 4, "spindle") == [4, 8, 8, 4]
    assert group_sizes(12, 4, "spindle") == [2, 4, 4, 2]
    five = group_sizes(10, 5, "spindle")
    assert sum(five) == 10 and five[2] == max(five) and five[2] > five[4]
    with pytest.raises(ValueError):
        group_sizes(3, 4, "spindle")
    with pytest.raises(ValueError, match="pattern"):
        peftlab.get_config("s4", pattern="hourglass")
    with pytest.raises(ValueError, match="strategy"):
        peftlab.get_config("s4", strategies=[["A"], ["X"], ["B"], ["L"]])
    with pytest.raises(ValueError, match="tuned_groups"):
        peftlab.get_config("s4", tuned_groups=[])


def test_encoder_decoder_is_one_sequence_and_explicit_sizes():
    m = tiny_model("bart")  # 2 encoder + 2 decoder blocks
    cfg = peftlab.get_config("s4", group_sizes=[1, 1, 1, 1], strategies=[["L"], ["B"], ["A"], ["P"]], budget=0.05)
    peftlab.attach(m, cfg)
    plan = cfg.plan(m)
    assert plan["groups"] == [[0], [1], [2], [3]]
    names = {n for n, s in peftlab.core.slots(m)}
    assert any(n.startswith("model.encoder.layers.0") and n.endswith("q_proj") for n in names)  # L on encoder 0
    assert any(n.startswith("model.decoder.layers.1") and n.endswith("self_attn") for n in names)  # P on decoder 1


@pytest.mark.parametrize("family", FAMILIES)
def test_strategy_mixes_on_every_family(family):
    m = tiny_model(family)
    x = tiny_inputs(family)
    base = output_tensor(m(**x)).detach()
    with_p = family in ("bert", "roberta", "gpt2", "llama", "opt", "bart")
    strategies = PRESETS["s4-model"] if with_p else [["A", "L"], ["A", "B"], ["A", "B", "L"], ["B", "L"]]
    peftlab.attach(m, peftlab.get_config("s4", budget=0.05, strategies=strategies))
    methods = {type(p).__name__ for _, p in peftlab.adapter_parts(m)}
    assert {"BitFitConfig", "AdapterConfig", "LoRAConfig"} <= methods
    assert ("PrefixConfig" in methods) == with_p
    output_tensor(m(**x)).pow(2).mean().backward()
    assert {n for n, p in m.named_parameters() if p.grad is not None} <= set(peftlab.trainable_parameters(m))
    with peftlab.disabled(m):
        assert torch.allclose(output_tensor(m(**x)), base, atol=1e-6)
    if not with_p:
        with pytest.raises(peftlab.UnsupportedArchitectureError, match="prefix"):
            peftlab.attach(tiny_model(family), peftlab.get_config("s4", preset="s4-model"))


def test_budget_solver_realised_counts_within_tolerance():
    """Realised parameters (adapters + prefixes + biases + LoRA) never exceed the budget and reach at
    least 70% of it on a small model (rounding down per layer and strategy; closer on larger models)."""
    import transformers

    cfg = transformers.BertConfig(hidden_size=128, num_hidden_layers=8, num_attention_heads=4, intermediate_size=512,
                                  vocab_size=1000, max_position_embeddings=64)
    for preset in ("s4-model", "s4-3b-model"):
        for alloc in ("uniform", "increasing", "decreasing"):
            m = transformers.BertForSequenceClassification(cfg)
            s4 = peftlab.get_config("s4", preset=preset, budget=0.05, allocation=alloc)
            peftlab.attach(m, s4)
            plan = s4.plan(m)
            realised = peftlab.report(m).adapters[0].params
            assert 0.7 * plan["budget"] <= realised <= plan["budget"], (preset, alloc, realised, plan["budget"])
            widths = [r.get("adapter_width") for r in plan["layers"].values() if "adapter_width" in r]
            if alloc == "increasing":
                assert widths == sorted(widths) and widths[0] < widths[-1]


def test_tuned_groups_subset_and_presets():
    m = tiny_model("llama")
    s4 = peftlab.get_config("s4", tuned_groups=[1, 2], budget=0.05)
    peftlab.attach(m, s4)
    assert sorted(s4.plan(m)["layers"]) == [1, 2]
    layers = {int(n.split(".")[2]) for n, _ in peftlab.core.slots(m) if n.startswith("model.layers.")}
    assert layers == {1, 2}
    assert peftlab.get_config("s4", preset="s4-3b-model").strategies == [list(s) for s in PRESETS["s4-3b-model"]]


def test_save_load_and_json_roundtrip(tmp_path):
    m = tiny_model("gpt2")
    x = tiny_inputs("gpt2")
    cfg = peftlab.get_config("s4", budget=0.05, pattern="bottleneck", allocation="decreasing")
    peftlab.attach(m, cfg)
    with torch.no_grad():
        for p in peftlab.trainable_parameters(m).values():
            p.add_(0.05)
    y = output_tensor(m(**x))
    peftlab.save(m, tmp_path / "s4")
    assert json.loads((tmp_path / "s4" / "peftlab_config.json").read_text())["config"]["pattern"] == "bottleneck"
    fresh = tiny_model("gpt2")
    peftlab.load(fresh, tmp_path / "s4")
    assert torch.allclose(output_tensor(fresh(**x)), y, atol=1e-6)


def test_hybrid_strategies_expand_into_their_methods():
    """MAM = P + R, UniPELT = gated A + P + L, Compacter = C: each group gets the hybrid's parts, sized
    from the group's budget like the paper's strategies, and the whole stays within the budget."""
    m = tiny_model("bert")
    x = tiny_inputs("bert")
    s4 = peftlab.get_config("s4", budget=0.05, strategies=[["MAM"], ["UniPELT"], ["Compacter", "B"], ["L", "MAM"]])
    peftlab.attach(m, s4)
    plan = s4.plan(m)
    rows = plan["layers"]
    assert rows[0]["components"] == ["P", "R"] and rows[1]["components"] == ["gA", "gP", "gL"]
    assert rows[2]["compacter_width"] % 4 == 0 and rows[3]["components"] == ["L", "P", "R"]
    parts = peftlab.adapter_parts(m)
    by = {(p.method, getattr(p, "gate", False)): p.layers for _, p in parts}
    assert by[("prefix", False)] == [0, 3] and by[("parallel_adapter", False)] == [0, 3]
    assert by[("adapter", True)] == by[("prefix", True)] == by[("lora", True)] == [1]
    assert by[("compacter", False)] == [2] and by[("bitfit", False)] == [2]
    assert peftlab.report(m).adapters[0].params <= plan["budget"]
    output_tensor(m(**x)).pow(2).mean().backward()
    with pytest.raises(peftlab.ConfigError, match="hybrid"):
        peftlab.get_config("s4", strategies=[["X"], ["A"], ["A"], ["A"]])
