"""Mixed-adapter batches: each row equals that row run alone with only its adapter active."""

import pytest
import torch

import peftlab
from peftlab.errors import AdapterNotFoundError, PeftlabError
from peftlab.serving import NotBatchableError
from peftlab.serving.mixers import BUILDS
from peftlab.testing import output_tensor, tiny_inputs, tiny_model


def _attach(model, configs: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for name, cfg in configs.items():
        peftlab.attach(model, cfg, name)
    peftlab.set_active(model, list(configs))
    with torch.no_grad():  # move every adapter off its zero start, so rows really differ
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith(("classifier", "score", "lm_head")):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _alone(model, inputs, names, fn=None):
    fn = fn or (lambda m, row: output_tensor(m(**row)))
    outs = []
    for i, n in enumerate(names):
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        if n is None:
            with peftlab.disabled(model):
                outs.append(fn(model, row))
        else:
            peftlab.set_active(model, [n])
            outs.append(fn(model, row))
    return outs


def _check_forward(model, inputs, names, atol=1e-5):
    with torch.no_grad():
        ref = _alone(model, inputs, names)
        with peftlab.batch_adapters(model, names):
            mixed = output_tensor(model(**inputs))
    for i, r in enumerate(ref):
        torch.testing.assert_close(mixed[i:i + 1], r, atol=atol, rtol=1e-5)
    return mixed


def test_lora_family_bert():
    m = _attach(tiny_model("bert"), {
        "a": peftlab.LoRAConfig(r=4, targets=["q", "v", "ffn_in"]),
        "b": peftlab.LoRAConfig(r=8, alpha=16, use_rslora=True, targets=["q", "k"]),
        "c": peftlab.DoRAConfig(r=2, targets=["v", "o"]),
    })
    inputs = tiny_inputs("bert", batch=5)
    mixed = _check_forward(m, inputs, ["a", "b", None, "c", "a"])
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3) and not torch.allclose(mixed[1], mixed[3], atol=1e-3)


def test_lora_family_generate_llama():
    m = _attach(tiny_model("llama"), {
        "a": peftlab.LoRAConfig(r=4, targets=["q", "v", "o", "ffn_out"]),
        "d": peftlab.DoRAConfig(r=4, targets=["q", "v"]),
    })
    inputs = tiny_inputs("llama", batch=4, seq=6)
    names = ["a", None, "d", "a"]
    _check_forward(m, inputs, names)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = _alone(m, inputs, names, lambda mm, row: mm.generate(**row, **gen))
    with peftlab.batch_adapters(m, names):
        out = m.generate(**inputs, **gen)
    for i, r in enumerate(ref):
        assert torch.equal(out[i:i + 1], r)
    assert len({tuple(r[0, 6:].tolist()) for r in ref}) > 1  # the adapters do change the continuation


def test_lora_dora_on_gpt2_conv1d():
    m = _attach(tiny_model("gpt2"), {"a": peftlab.LoRAConfig(r=4, targets=["q", "ffn_in"]),
                                     "d": peftlab.DoRAConfig(r=2, targets=["q", "o"])})
    _check_forward(m, tiny_inputs("gpt2", batch=3), ["d", "a", None])


def test_ia3_and_adapters_and_mixed_kinds():
    m = _attach(tiny_model("bert"), {
        "ia3": peftlab.IA3Config(),
        "ser": peftlab.get_config("adapter", bottleneck=8),
        "par": peftlab.get_config("parallel_adapter", bottleneck=4),
        "lora": peftlab.LoRAConfig(r=4, targets=["k", "v", "ffn_out"]),  # shares k/v/ffn_out with ia3: row-wise
        "bit": peftlab.BitFitConfig(),
    })
    _check_forward(m, tiny_inputs("bert", batch=6), ["ia3", "ser", None, "par", "lora", "bit"])
    m2 = _attach(tiny_model("gpt2"), {"x": peftlab.IA3Config(), "y": peftlab.IA3Config()})
    _check_forward(m2, tiny_inputs("gpt2", batch=3), ["y", None, "x"])


def test_prompt_rows():
    m = _attach(tiny_model("bert"), {
        "p1": peftlab.get_config("prompt", num_virtual_tokens=3),
        "p2": peftlab.get_config("prompt", num_virtual_tokens=3, seed=5),
        "p5": peftlab.get_config("prompt", num_virtual_tokens=5),
        "lp": peftlab.get_config("prompt", num_virtual_tokens=3, seed=7),
    })
    inputs = tiny_inputs("bert", batch=3)
    _check_forward(m, inputs, ["p1", "p2", "p1"])
    with pytest.raises(NotBatchableError, match="different lengths"):
        with peftlab.batch_adapters(m, ["p1", "p5", "p1"]):
            pass
    with pytest.raises(NotBatchableError, match="SoftPrompt"):
        with peftlab.batch_adapters(m, ["p1", None, "p2"]):
            pass


def test_prompt_and_prefix_generate():
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    for cfgs in ({"p": peftlab.get_config("prompt", num_virtual_tokens=4, init="random"),
                  "q": peftlab.get_config("prompt", num_virtual_tokens=4, init="random", seed=3)},
                 {"p": peftlab.get_config("prefix", num_virtual_tokens=3, reparameterize=False),
                  "q": peftlab.get_config("prefix", num_virtual_tokens=3, encoder_hidden=16)}):
        m = _attach(tiny_model("llama"), cfgs)
        inputs = tiny_inputs("llama", batch=3, seq=5)
        names = ["q", "p", "q"]
        _check_forward(m, inputs, names)
        ref = _alone(m, inputs, names, lambda mm, row: mm.generate(**row, **gen))
        with peftlab.batch_adapters(m, names):
            out = m.generate(**inputs, **gen)
        for i, r in enumerate(ref):
            assert torch.equal(out[i:i + 1], r)


def test_prefix_encoder_rows_and_lengths():
    m = _attach(tiny_model("bert"), {"a": peftlab.get_config("prefix", num_virtual_tokens=2),
                                     "b": peftlab.get_config("prefix", num_virtual_tokens=2, reparameterize=False),
                                     "c": peftlab.get_config("prefix", num_virtual_tokens=4)})
    _check_forward(m, tiny_inputs("bert", batch=3), ["b", "a", "b"])
    with pytest.raises(NotBatchableError, match="different lengths"):
        with peftlab.batch_adapters(m, ["a", "c"]):
            pass


def test_refusals_name_the_method_and_leave_model_unchanged():
    m = _attach(tiny_model("bert"), {"g": peftlab.get_config("goft"), "l": peftlab.LoRAConfig(r=2)})
    inputs = tiny_inputs("bert", batch=2)
    peftlab.set_active(m, ["l"])
    before = output_tensor(m(**inputs))
    with pytest.raises(NotBatchableError, match=r"'g' \(GivensRotation\)"):
        with peftlab.batch_adapters(m, ["l", "g"]):
            pass
    with pytest.raises(AdapterNotFoundError, match="nope"):
        with peftlab.batch_adapters(m, ["l", "nope"]):
            pass
    with pytest.raises(PeftlabError, match="3 adapter names for a batch of 2"):
        with peftlab.batch_adapters(m, ["l", None, "l"]):
            m(**inputs)
    peftlab.merge(m)
    with pytest.raises(PeftlabError, match="unmerge"):
        with peftlab.batch_adapters(m, ["l", None]):
            pass
    peftlab.unmerge(m)
    torch.testing.assert_close(output_tensor(m(**inputs)), before)


def test_stacks_are_cached_and_invalidated():
    m = _attach(tiny_model("bert"), {"a": peftlab.LoRAConfig(r=4), "b": peftlab.LoRAConfig(r=2)})
    inputs = tiny_inputs("bert", batch=2)
    n_slots = 2 * 4  # q and v in 4 layers
    start = BUILDS["count"]
    _check_forward(m, inputs, ["a", "b"])
    assert BUILDS["count"] - start == n_slots
    _check_forward(m, inputs, ["b", None])
    assert BUILDS["count"] - start == n_slots  # reused
    with torch.no_grad():
        m.bert.encoder.layer[0].attention.self.query.adapters["a"].lora_B.mul_(3)
    _check_forward(m, inputs, ["a", "b"])
    assert BUILDS["count"] - start == n_slots + 1  # only the edited slot was rebuilt
    peftlab.attach(m, peftlab.LoRAConfig(r=3, targets=["q"]), "c")
    _check_forward(m, inputs, ["c", "a"])
    assert BUILDS["count"] - start == n_slots + 1 + 4
    peftlab.delete(m, "b")
    _check_forward(m, inputs, ["c", "a"])


def test_per_row_heads():
    m = _attach(tiny_model("bert"), {"a": peftlab.LoRAConfig(r=4), "b": peftlab.LoRAConfig(r=4)})
    g = torch.Generator().manual_seed(3)
    heads = {n: {k: torch.randn(v.shape, generator=g) for k, v in m.classifier.state_dict().items()} for n in "ab"}
    heads = {n: {f"classifier.{k}": v for k, v in h.items()} for n, h in heads.items()}
    inputs = tiny_inputs("bert", batch=4)
    names = ["b", None, "a", "a"]
    heads[None] = {f"classifier.{k}": torch.randn(v.shape, generator=g) for k, v in m.classifier.state_dict().items()}
    own = {k: v.clone() for k, v in m.classifier.state_dict().items()}
    ref = []
    for i, n in enumerate(names):
        m.classifier.load_state_dict({k.split(".", 1)[1]: v for k, v in heads[n].items()})
        ref += _alone(m, {k: v[i:i + 1] for k, v in inputs.items()}, [n])
    m.classifier.load_state_dict(own)
    with torch.no_grad(), peftlab.batch_adapters(m, names, heads=heads):
        out = output_tensor(m(**inputs))
    for i, r in enumerate(ref):
        torch.testing.assert_close(out[i:i + 1], r, atol=1e-5, rtol=1e-5)
    assert "forward" not in m.classifier.__dict__
    del heads["b"]  # rows without an entry use the model's own head
    with torch.no_grad(), peftlab.batch_adapters(m, names, heads=heads):
        out = output_tensor(m(**inputs))
    torch.testing.assert_close(out[:1], _alone(m, {k: v[:1] for k, v in inputs.items()}, ["b"])[0], atol=1e-5, rtol=1e-5)


def test_lora_family_never_runs_per_adapter_forwards(monkeypatch):
    """The LoRA family is one batched computation over the stacked weights: no adapter's own forward runs."""
    from peftlab.tuners.dora import DoRALayer
    from peftlab.tuners.lora import LoRALayer

    m = _attach(tiny_model("llama"), {f"a{i}": (peftlab.DoRAConfig if i % 3 == 0 else peftlab.LoRAConfig)(r=2 + i % 3)
                                      for i in range(6)})
    inputs = tiny_inputs("llama", batch=6)
    names = [f"a{i}" for i in (5, 0, 3, 1, 2, 4)]
    with torch.no_grad():
        ref = _alone(m, inputs, names)

    def boom(*a, **k):
        raise AssertionError("a per-adapter forward ran inside batch_adapters")

    monkeypatch.setattr(LoRALayer, "forward", boom)
    monkeypatch.setattr(DoRALayer, "forward", boom)
    with torch.no_grad(), peftlab.batch_adapters(m, names):
        out = output_tensor(m(**inputs))
    for i, r in enumerate(ref):
        torch.testing.assert_close(out[i:i + 1], r, atol=1e-5, rtol=1e-5)


def test_gated_parts_and_p_tuning_rows():
    """UniPELT's gated LoRA / adapter run their own (gated) forward on their rows; P-tuning rows gather the
    encoder's output like soft prompts."""
    m = _attach(tiny_model("bert"), {
        "g": peftlab.compose(peftlab.LoRAConfig(r=4, gate=True), peftlab.get_config("adapter", bottleneck=8, gate=True)),
        "l": peftlab.LoRAConfig(r=4),
    })
    _check_forward(m, tiny_inputs("bert", batch=4), ["g", "l", None, "g"])
    pt = _attach(tiny_model("llama"), {"a": peftlab.get_config("p_tuning", num_virtual_tokens=3, encoder="lstm",
                                                                encoder_hidden=8),
                                       "b": peftlab.get_config("p_tuning", num_virtual_tokens=3)})
    _check_forward(pt, tiny_inputs("llama", batch=3), ["a", "b", "a"])
