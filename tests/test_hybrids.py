"""Hybrids on the composition mechanism (MAM, UniPELT, Compacter) and the additive extras (SSF, P-tuning):
the math each paper states, checked on the attached model."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.core import part_adapters, shared_modules, slots
from peftlab.testing import output_tensor, tiny_inputs, tiny_model


def _out(model, x):
    with torch.no_grad():
        return output_tensor(model(**x))


def _perturb(model, scale=0.1, seed=3, skip=()):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(peftlab.trainable_parameters(model).items()):
            if not any(s in n for s in skip):
                p.add_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------- MAM
def test_mam_defaults_and_parts_follow_the_paper():
    cfg = peftlab.get_config("mam")
    assert (cfg.prefix_length, cfg.prefix_hidden, cfg.reduction_factor, cfg.scaling) == (30, 800, 2.0, 4.0)
    m = peftlab.attach(tiny_model("llama"), peftlab.get_config("mam", prefix_length=5, layers=[1, 2]))
    parts = dict(peftlab.adapter_parts(m))
    assert set(parts) == {"prefix", "parallel_adapter"}
    assert parts["prefix"].num_virtual_tokens == 5 and parts["parallel_adapter"].scaling == 4.0
    pa = dict(part_adapters(m, "default__parallel_adapter"))
    assert sorted(pa) == ["model.layers.1.mlp", "model.layers.2.mlp"]
    assert all(a.adapter.down.out_features == 16 for a in pa.values())  # d / 2 at d = 32
    prefix_slots = [n for n, _ in part_adapters(m, "default__prefix")]
    assert prefix_slots == ["model.layers.1.self_attn", "model.layers.2.self_attn"]


def test_mam_save_load_roundtrip(tmp_path):
    x = tiny_inputs("gpt2")
    m = peftlab.attach(tiny_model("gpt2"), peftlab.get_config("mam", prefix_length=3, prefix_hidden=8, bottleneck=4))
    _perturb(m)
    y = _out(m, x)
    peftlab.save(m, tmp_path / "mam")
    again = peftlab.load(tiny_model("gpt2"), tmp_path / "mam")
    assert peftlab.get_adapter_config(again).method == "mam"
    torch.testing.assert_close(_out(again, x), y, atol=1e-6, rtol=0)


def test_mam_materialized_prefixes_save_and_load(tmp_path):
    """``materialize`` turns MAM's prefix MLP into flat prefixes; the saved adapter is then a composition of the
    flat prefix and the parallel adapter, with the same labels, and reloads with the same outputs."""
    from peftlab.tuners.prefix import materialize

    x = tiny_inputs("llama")
    m = peftlab.attach(tiny_model("llama"), peftlab.get_config("mam", prefix_length=3, prefix_hidden=8, bottleneck=4))
    _perturb(m)
    y = _out(m, x)
    materialize(m)
    torch.testing.assert_close(_out(m, x), y, atol=1e-6, rtol=0)
    cfg = peftlab.get_adapter_config(m)
    assert cfg.method == "compose" and [p.method for p in cfg.parts] == ["prefix", "parallel_adapter"]
    assert not cfg.parts[0].reparameterize
    peftlab.save(m, tmp_path / "flat")
    again = peftlab.load(tiny_model("llama"), tmp_path / "flat")
    assert [label for label, _ in peftlab.adapter_parts(again)] == ["prefix", "parallel_adapter"]
    torch.testing.assert_close(_out(again, x), y, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- UniPELT gates
def _set_gates(model, bias):
    with torch.no_grad():
        for _, s in slots(model):
            for a in s.adapters.values():
                if "gate" in a._modules:
                    a.gate.proj.weight.zero_()
                    a.gate.proj.bias.fill_(bias)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gates_scale_lora_and_adapter_contributions(family):
    """Closed gates (σ(−40) ≈ 0) give the base model; open gates (σ(40) = 1) give the ungated union."""
    x = tiny_inputs(family)
    base = tiny_model(family)
    parts = lambda gate: peftlab.compose(peftlab.LoRAConfig(r=2, gate=gate),  # noqa: E731
                                         peftlab.get_config("adapter", bottleneck=4, gate=gate))
    gated = peftlab.attach(copy.deepcopy(base), parts(True))
    plain = peftlab.attach(copy.deepcopy(base), parts(False))
    _perturb(plain, skip=("classifier",))
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)  # same weights, plus gates
    assert not unexpected and missing and all(".gate." in k for k in missing)
    _set_gates(gated, -40.0)
    torch.testing.assert_close(_out(gated, x), _out(base, x), atol=1e-5, rtol=0)
    _set_gates(gated, 40.0)
    torch.testing.assert_close(_out(gated, x), _out(plain, x), atol=1e-5, rtol=0)
    _set_gates(gated, 0.0)  # σ(0) = 1/2: halfway contributions, so neither of the above
    y = _out(gated, x)
    assert (y - _out(base, x)).abs().max() > 1e-4 and (y - _out(plain, x)).abs().max() > 1e-4


def test_unipelt_gates_everywhere_train_and_refuse_merge():
    m = tiny_model("bert")
    x = tiny_inputs("bert")
    peftlab.attach(m, peftlab.get_config("unipelt", r=2, prefix_length=3, prefix_hidden=8, bottleneck=8))
    labels = dict(peftlab.adapter_parts(m))
    assert set(labels) == {"lora", "prefix", "adapter"} and all(p.gate for p in labels.values())
    gates = {n: p for n, p in peftlab.trainable_parameters(m).items() if ".gate." in n}
    assert len(gates) == 2 * (4 * 2 + 4 + 4)  # weight + bias for q, v (LoRA), attention (prefix), FFN (adapter)
    _perturb(m, skip=(".gate.",))  # LoRA's B and the adapter's W_up start at 0: their gates get no gradient yet
    output_tensor(m(**x)).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.values())
    with pytest.raises(peftlab.errors.NotMergeableError):
        peftlab.merge(m)
    plain = peftlab.attach(tiny_model("bert"), peftlab.get_config("unipelt", gates=False, r=2, prefix_length=3,
                                                                  prefix_hidden=8, bottleneck=8))
    assert not [n for n in peftlab.trainable_parameters(plain) if ".gate." in n]


def test_prefix_gate_scales_the_prefix_per_sequence():
    """G_P = 0 (prefixes of zeros) differs from no prefix only through the attention mass it takes; the
    gate is one scalar per sequence, so two rows of a batch can get different gates."""
    m = peftlab.attach(tiny_model("llama"), peftlab.get_config("prefix", num_virtual_tokens=2, gate=True,
                                                               reparameterize=False))
    ad = next(a for _, s in slots(m) for a in s.adapters.values())
    hs = torch.randn(2, 5, 32)
    g = ad.gate(hs.mean(dim=1))
    assert g.shape == (2, 1) and ((g > 0) & (g < 1)).all()
    with pytest.raises(peftlab.ConfigError, match="gate"):
        peftlab.get_config("prefix", mode="past", gate=True)
    with pytest.raises(peftlab.ConfigError, match="gate"):
        peftlab.get_config("dora", gate=True)


# ---------------------------------------------------------------- Compacter
def test_compacter_weights_are_kronecker_sums_with_one_shared_rule():
    m = tiny_model("bert")
    cfg = peftlab.get_config("compacter", reduction_factor=4, init="glorot")
    peftlab.attach(m, cfg)
    rule = shared_modules(m)["default"].rule
    assert rule.shape == (4, 4, 4)
    ads = part_adapters(m, "default")
    assert len(ads) == 8 and all(a.shared.rule is rule for _, a in ads)  # Houlsby: 2 per block, one A for all
    a = ads[0][1]
    for proj in (a.down, a.up):
        b = proj.left @ proj.right  # rank-1 B_i = s_i t_iᵀ
        want = sum(torch.kron(rule[i], b[i]) for i in range(4))
        torch.testing.assert_close(proj.matrix(rule), want)
    counts = sum(p.numel() for p in peftlab.trainable_parameters(m).values() if not any(
        p is q for q in m.classifier.parameters()))
    assert counts == peftlab.report(m).adapters[0].formula == 4 ** 3 + 8 * (2 * (32 + 8) + 8 + 32)
    output_tensor(m(**tiny_inputs("bert"))).pow(2).mean().backward()
    assert rule.grad is not None and rule.grad.abs().sum() > 0


def test_compacter_pp_placement_phm_variant_and_divisibility():
    m = peftlab.attach(tiny_model("llama"), peftlab.get_config("compacter", placement="pfeiffer", factorized=False,
                                                                reduction_factor=4))
    names = [n for n, _ in part_adapters(m, "default")]
    assert names == [f"model.layers.{i}.mlp.down_proj" for i in range(4)]  # after the FFN only
    assert next(a for _, a in part_adapters(m, "default")).down.w.shape == (4, 8, 2)
    with pytest.raises(peftlab.ConfigError, match="phm_dim"):
        peftlab.attach(tiny_model("llama"), peftlab.get_config("compacter", phm_dim=3))  # 3 does not divide d = 32
    with pytest.raises(peftlab.ConfigError, match="phm_dim"):
        peftlab.attach(tiny_model("llama"), peftlab.get_config("compacter", bottleneck=6))
    dflt = peftlab.attach(tiny_model("llama"), peftlab.get_config("compacter"))  # d/32 = 1, rounded up to n = 4
    assert next(a for _, a in part_adapters(dflt, "default")).down.bias.shape == (4,)


# ---------------------------------------------------------------- SSF
def test_ssf_is_scale_and_shift_and_merges_exactly():
    m = peftlab.attach(tiny_model("llama"), peftlab.get_config("ssf"))
    _perturb(m, scale=0.3)
    slot = peftlab.core.resolve(m, "model.layers.0.self_attn.q_proj")
    ad = slot.adapters["default"]
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = ad.ssf_scale * slot.base(x) + ad.ssf_shift
        torch.testing.assert_close(slot(x), want)
    inputs = tiny_inputs("llama")
    y = _out(m, inputs)
    w0 = slot.base.weight.detach().clone()
    peftlab.merge(m)
    assert slot.base.bias is not None  # LLaMA's q_proj had no bias: the shift needs one
    torch.testing.assert_close(slot.base.weight, ad.ssf_scale.detach()[:, None] * w0)
    torch.testing.assert_close(_out(m, inputs), y, atol=1e-5, rtol=0)
    peftlab.unmerge(m)
    assert slot.base.bias is None
    torch.testing.assert_close(slot.base.weight, w0, atol=1e-6, rtol=0)
    norms = [n for n, _ in part_adapters(m, "default") if "norm" in n]
    assert norms == []  # RMSNorm has no bias to absorb β: skipped
    bert = peftlab.attach(tiny_model("bert"), peftlab.get_config("ssf"))
    assert any("LayerNorm" in n for n, _ in part_adapters(bert, "default"))


# ---------------------------------------------------------------- P-tuning
@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_p_tuning_prompt_is_the_encoder_output(encoder):
    m = peftlab.attach(tiny_model("gpt2"), peftlab.get_config("p_tuning", num_virtual_tokens=4, encoder=encoder,
                                                               encoder_hidden=8))
    ad = next(a for _, s in slots(m) for a in s.adapters.values())
    e = ad.embedding.weight
    with torch.no_grad():
        if encoder == "lstm":  # our unrolled recurrence is torch's LSTM on the same weights
            ref = torch.nn.LSTM(32, 8, num_layers=2, bidirectional=True, batch_first=True)
            ref.load_state_dict(ad.lstm_head.state_dict())
            want = ad.mlp_head(ref(e[None])[0][0])
        else:
            want = ad.mlp_head(e)
        torch.testing.assert_close(ad.prompt, want, atol=1e-6, rtol=0)
    n = sum(p.numel() for p in peftlab.trainable_parameters(m).values())
    assert n == peftlab.report(m).adapters[0].formula


@pytest.mark.parametrize("method", ["p_tuning", "unipelt", "mam", "compacter", "ssf"])
def test_fullgraph_compile(method):
    cfgs = {"p_tuning": peftlab.get_config("p_tuning", num_virtual_tokens=3, encoder="lstm", encoder_hidden=8),
            "unipelt": peftlab.get_config("unipelt", r=2, prefix_length=3, prefix_hidden=8, bottleneck=8),
            "mam": peftlab.get_config("mam", prefix_length=3, prefix_hidden=8, bottleneck=8),
            "compacter": peftlab.get_config("compacter", reduction_factor=4),
            "ssf": peftlab.get_config("ssf")}
    torch._dynamo.reset()
    m = peftlab.attach(tiny_model("llama"), cfgs[method])
    x = tiny_inputs("llama")
    _perturb(m, scale=0.05)
    eager = _out(m, x)
    y = output_tensor(torch.compile(m, fullgraph=True, backend="eager")(**x))
    assert (y - eager).abs().max().item() <= 1e-5
