"""Prefix tuning: attention math, masks across attention implementations, generation, parts, materialise."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.testing import output_tensor, tiny_inputs, tiny_model
from peftlab.tuners.prefix import materialize


def out(m, x):
    with torch.no_grad():
        return output_tensor(m(**x))


def _prefixed(family, **kw):
    m = tiny_model(family)
    peftlab.attach(m, peftlab.get_config("prefix", **{"num_virtual_tokens": 3, "encoder_hidden": 16, **kw}))
    return m


def test_llama_attention_equals_manual_prefix_attention():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m = _prefixed("llama", reparameterize=False, layers=[0])
    slot = m.model.layers[0].self_attn
    attn = slot.base
    h = torch.randn(1, 5, 32)
    pos = torch.arange(5)[None]
    cos, sin = m.model.rotary_emb(h, pos)
    with torch.no_grad():
        got, _ = slot(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None)
        hd, nh, nkv = attn.head_dim, 4, 2
        q = attn.q_proj(h).view(1, 5, nh, hd).transpose(1, 2)
        k = attn.k_proj(h).view(1, 5, nkv, hd).transpose(1, 2)
        v = attn.v_proj(h).view(1, 5, nkv, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        pk, pv = slot.adapters["default"].shared.prefix("model-layers-0-self_attn")
        k = torch.cat([pk[None], k], 2).repeat_interleave(nh // nkv, 1)
        v = torch.cat([pv[None], v], 2).repeat_interleave(nh // nkv, 1)
        scores = q @ k.transpose(-1, -2) / hd**0.5
        causal = torch.ones(5, 5).tril().bool()
        allowed = torch.cat([torch.ones(5, 3, dtype=torch.bool), causal], 1)  # prefix always visible
        scores = scores.masked_fill(~allowed, float("-inf"))
        ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 5, -1))
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "opt", "bart"])
def test_eager_and_sdpa_masks_agree(family):
    m = tiny_model(family)
    peftlab.attach(m, peftlab.get_config("prefix", num_virtual_tokens=2, encoder_hidden=8, layers=[0, 1]))
    x = tiny_inputs(family)
    x["attention_mask"][0, -1] = 0  # padding too
    m.config._attn_implementation = "sdpa"
    a = out(m, x)
    m2 = copy.deepcopy(m)
    for mod in m2.modules():
        if hasattr(mod, "config"):
            mod.config._attn_implementation = "eager"
    b = out(m2, x)
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bart"])
def test_generate_with_cache_matches_stepwise_no_cache(family):
    m = _prefixed(family)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peftlab.trainable_parameters(m).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    ids = tiny_inputs(family, batch=1)["input_ids"]
    from transformers import GenerationConfig

    m.generation_config = GenerationConfig(decoder_start_token_id=2, pad_token_id=0)  # no eos: always 5 tokens
    gc = GenerationConfig(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, decoder_start_token_id=2)
    gen = m.generate(input_ids=ids, generation_config=gc)
    with torch.no_grad():  # reference: greedy decoding without any cache
        if family == "bart":
            dec = torch.tensor([[2]])
            for _ in range(5):
                logits = m(input_ids=ids, decoder_input_ids=dec, use_cache=False).logits
                dec = torch.cat([dec, logits[:, -1:].argmax(-1)], 1)
            ref = dec
        else:
            seq = ids
            for _ in range(5):
                logits = m(input_ids=seq, use_cache=False).logits
                seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
            ref = seq
    assert torch.equal(gen[:, -5:], ref[:, -5:])
    kw = {"decoder_input_ids": ref[:, :3]} if family == "bart" else {}
    with torch.no_grad():  # and the prefix is really used
        y = m(input_ids=ids, use_cache=False, **kw).logits
        with peftlab.disabled(m):
            assert not torch.allclose(m(input_ids=ids, use_cache=False, **kw).logits, y)


def test_parts_with_disjoint_layers_and_different_lengths_coexist():
    m = tiny_model("llama")
    x = tiny_inputs("llama")
    peftlab.attach(m, peftlab.get_config("prefix", num_virtual_tokens=2, layers=[0, 1], reparameterize=False), name="a")
    peftlab.attach(m, peftlab.get_config("prefix", num_virtual_tokens=5, layers=[2, 3], encoder_hidden=8), name="b")
    peftlab.attach(m, peftlab.get_config("prefix", layer_lengths={3: 4}, num_virtual_tokens=1, layers=[3],
                                         reparameterize=False), name="c")  # nested on the same layer
    peftlab.attach(m, peftlab.LoRAConfig(r=2), name="l")
    shapes = {k: v for n in ("a", "b", "c") for k, v in m.peftlab_shared[n].shapes.items()}
    assert shapes["model-layers-0-self_attn"][0] == 2 and shapes["model-layers-2-self_attn"][0] == 5
    y = out(m, x)
    peftlab.set_active(m, ["a", "b", "l"])
    assert not torch.allclose(out(m, x), y)
    peftlab.set_active(m, ["a", "b", "c", "l"])
    assert torch.allclose(out(m, x), y)
    m.train()
    output_tensor(m(**x)).pow(2).mean().backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert any("peftlab_shared.c." in n for n in grads) and grads <= set(peftlab.trainable_parameters(m))


def test_materialize_keeps_outputs_and_drops_the_mlp(tmp_path):
    m = _prefixed("gpt2")
    x = tiny_inputs("gpt2")
    with torch.no_grad():
        for p in peftlab.trainable_parameters(m).values():
            p.add_(0.1)
    y = out(m, x)
    before = peftlab.report(m).adapters[0].params
    materialize(m)
    after = peftlab.report(m).adapters[0].params
    assert torch.allclose(out(m, x), y, atol=1e-6)
    assert after == 4 * 2 * 3 * 32 < before  # 2·l·d per layer
    peftlab.save(m, tmp_path / "p")
    fresh = tiny_model("gpt2")
    peftlab.load(fresh, tmp_path / "p")
    assert torch.allclose(out(fresh, x), y, atol=1e-6)


@pytest.mark.parametrize("family", ["t5", "deberta-v2", "vit"])
def test_unsupported_families_refused_clearly(family):
    m = tiny_model(family)
    with pytest.raises(peftlab.UnsupportedArchitectureError, match="not supported"):
        peftlab.attach(m, peftlab.get_config("prefix"))
    assert not peftlab.core.slots(m)


peft = pytest.importorskip("peft")


@pytest.mark.parametrize("family,task", [("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS"), ("llama", "CAUSAL_LM"),
                                         ("opt", "CAUSAL_LM")])
def test_past_mode_equals_peft_prefix_tuning(family, task):
    base = tiny_model(family)
    x = tiny_inputs(family)
    ours = peftlab.attach(copy.deepcopy(base), peftlab.get_config("prefix", mode="past", num_virtual_tokens=3,
                                                                  reparameterize=False))
    enc = ours.peftlab_shared["default"]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3)).eval()
    w = theirs.prompt_encoder["default"].embedding.weight  # (l, layers · 2 · kv_dim), peft's layout
    with torch.no_grad():
        w.normal_()
        rows = w.view(3, len(enc.shapes) * 2, -1)
        for i, k in enumerate(enc.shapes):  # ours: per layer (2, heads, l, head_dim)
            _, h, hd = enc.shapes[k]
            enc.prefixes[k].copy_(rows[:, 2 * i : 2 * i + 2].reshape(3, 2, h, hd).permute(1, 2, 0, 3))
        if task == "SEQ_CLS":
            theirs.base_model.classifier.modules_to_save["default"].load_state_dict(ours.classifier.state_dict())
    assert torch.allclose(out(ours, x), out(theirs, x), atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_past_mode_generation_matches_no_cache(family):
    from transformers import GenerationConfig

    m = tiny_model(family)
    peftlab.attach(m, peftlab.get_config("prefix", mode="past", num_virtual_tokens=3, encoder_hidden=8))
    with torch.no_grad():
        for p in peftlab.trainable_parameters(m).values():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    ids = tiny_inputs(family, batch=1)["input_ids"]
    m.generation_config = GenerationConfig(pad_token_id=0)
    gen = m.generate(input_ids=ids, generation_config=GenerationConfig(max_new_tokens=4, min_new_tokens=4,
                                                                       do_sample=False, pad_token_id=0))
    seq = ids
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, m(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, seq)


def test_past_mode_rejects_layer_subsets():
    with pytest.raises(ValueError, match="every layer"):
        peftlab.get_config("prefix", mode="past", layers=[0])


def test_cache_argument_name_follows_the_forward_signature():
    """transformers 5.24 renamed attention forwards' ``past_key_values`` to ``cache``; prefix/prompt bind
    arguments to the signature, so they must hand their cache view over under the name the forward takes."""
    import inspect

    from peftlab.slot import cache_arg

    def new(hidden_states, attention_mask=None, cache=None, **kwargs): ...

    def old(hidden_states, attention_mask=None, past_key_values=None, **kwargs): ...

    def older(hidden_states, past_key_value=None): ...

    def none(hidden_states, attention_mask=None): ...

    assert [cache_arg(inspect.signature(f)) for f in (new, old, older, none)] == [
        "cache", "past_key_values", "past_key_value", "past_key_values"]
