"""The memory planner: exact static terms, activations linear in the batch, budgets, no side effects."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.planner import parse_bytes, plan, probe_inputs, saved_activation_bytes
from peftlab.testing import tiny_model


def test_static_terms_are_exact():
    model = tiny_model("bert")
    p = plan(model, peftlab.LoRAConfig(r=4), batch_size=4, seq_len=16)
    ref = peftlab.attach(tiny_model("bert"), peftlab.LoRAConfig(r=4))
    trainable = [q for q in ref.parameters() if q.requires_grad]
    assert p.trainable_params == sum(q.numel() for q in trainable)
    assert p.gradients == p.trainable_bytes == sum(q.numel() * 4 for q in trainable)
    assert p.optimizer_state == 2 * 4 * p.trainable_params
    tensors = list(ref.parameters()) + list(ref.buffers())
    assert p.weight_bytes == sum(t.numel() * t.element_size() for t in tensors)
    assert plan(model, peftlab.LoRAConfig(r=4), 4, 16, optimizer="sgd").optimizer_state == 0


def test_plan_with_a_config_leaves_the_model_alone():
    model = tiny_model("llama")
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    plan(model, peftlab.LoRAConfig(r=2), batch_size=2, seq_len=8)
    assert not peftlab.core.has_adapters(model)
    assert keys.keys() == model.state_dict().keys()
    assert all(torch.equal(keys[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_saved_activations_grow_linearly_with_the_batch(family):
    model = peftlab.attach(tiny_model(family), peftlab.LoRAConfig(r=2))
    model.train()
    one, _ = saved_activation_bytes(model, probe_inputs(model, 1, 16))
    four, _ = saved_activation_bytes(model, probe_inputs(model, 4, 16))
    assert 0.95 * 4 * one <= four <= 1.05 * 4 * one
    longer, _ = saved_activation_bytes(model, probe_inputs(model, 1, 32))
    assert longer > 1.5 * one  # and with the sequence


def test_methods_differ_where_their_memory_does():
    full = plan(tiny_model("bert"), None, 8, 32)
    lora = plan(tiny_model("bert"), peftlab.LoRAConfig(r=2), 8, 32)
    meft = plan(tiny_model("bert"), peftlab.get_config("meft", variant=1, r=2), 8, 32)
    assert lora.trainable_params < full.trainable_params / 10
    assert lora.optimizer_state < full.optimizer_state / 10
    assert meft.activations_per_sample < 0.5 * lora.activations_per_sample  # reversible: almost nothing saved


def test_quantized_weights_are_counted_packed():
    pytest.importorskip("bitsandbytes")
    from peftlab import quant

    fp = plan(tiny_model("llama"), peftlab.LoRAConfig(r=2), 2, 8)
    q = tiny_model("llama")
    quant.quantize(q, "nf4")
    qp = plan(q, peftlab.LoRAConfig(r=2), 2, 8)
    assert "nf4" in qp.weights and qp.weight_bytes < fp.weight_bytes
    assert qp.trainable_params == fp.trainable_params


def test_max_batch_fits_the_budget():
    p = plan(tiny_model("bert"), peftlab.LoRAConfig(r=2), 8, 32)
    budget = p.peak(8) + 3 * (p.activations_per_sample + p.transient_per_sample) // 2
    b = p.max_batch(budget)
    assert p.peak(b) <= budget < p.peak(b + 1)
    assert p.max_batch(p.weight_bytes) == 0
    assert "largest batch" in p.table(budget)


@pytest.mark.parametrize("text,value", [("8GiB", 8 * 2**30), ("512 MB", 512 * 10**6), ("1.5g", int(1.5e9)), (4096, 4096)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["", "8 parsecs", "-1GB", 0, "GiB"])
def test_parse_bytes_refuses(bad):
    with pytest.raises(peftlab.PeftlabError):
        parse_bytes(bad)


def test_bad_plan_arguments_are_peftlab_errors():
    model = tiny_model("bert")
    for kw in ({"batch_size": 0}, {"seq_len": -3}, {"optimizer": "lion"}, {"seq_len": 10_000}):
        with pytest.raises(peftlab.PeftlabError):
            plan(model, peftlab.LoRAConfig(r=2), **{"batch_size": 2, "seq_len": 8, **kw})


def test_scoring_a_few_answer_tokens_plans_far_less_than_the_full_lm_loss():
    model = peftlab.attach(tiny_model("llama"), peftlab.LoRAConfig(r=2))
    full = plan(model, None, 4, 48)
    answers = plan(model, None, 4, 48, scored_tokens=2)
    assert answers.activations_per_sample < full.activations_per_sample
    assert answers.weight_bytes == full.weight_bytes


def test_envelope_keeps_the_lines_that_lead_somewhere():
    from peftlab.planner import _envelope

    # three moments of a step probed at batches 2 and 3: fixed 100 + 1/sample, fixed 10 + 20/sample, and one
    # (fixed 50 + 2/sample) that is never the highest once the other two are counted
    lines = _envelope([102, 50, 54], [103, 70, 56], batch=2)
    assert sorted(lines) == [(10, 20), (100, 1)]
    # allocations that do not line up (data-dependent shapes): one line through the two peaks
    assert _envelope([5, 9], [12], batch=2) == [(3, 3)]


@pytest.mark.parametrize("config", [None, peftlab.LoRAConfig(r=2), peftlab.get_config("meft", variant=1, r=2)],
                         ids=["full", "lora", "meft"])
def test_step_peak_matches_a_real_step_at_the_planned_batch(config):
    """The planner probes batches 2 and 3; the bytes alive at the peak of a real batch-8 step (counted the same
    way, at the dispatcher) must match what it extrapolates, wherever in the step that peak falls."""
    from peftlab.planner import step_bytes

    model = tiny_model("bert") if config is None else peftlab.attach(tiny_model("bert"), config)
    model.train()
    p = plan(model, None, 8, 32)
    real = max(step_bytes(model, probe_inputs(model, 8, 32))[1])
    predicted = max(f + s * 8 for f, s in p.step_lines)
    assert abs(predicted - real) <= 0.02 * real
    # and the peak moves: at batch 1 the full model's step peaks when all gradients are alive
    if config is None:
        assert len(p.step_lines) >= 2
