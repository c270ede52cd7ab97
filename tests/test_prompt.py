"""Prompt tuning: label alignment, generation with the cache, parity with Hugging Face peft."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.testing import output_tensor, tiny_inputs, tiny_model


def _prompted(family, n=3, **kw):
    m = tiny_model(family)
    peftlab.attach(m, peftlab.get_config("prompt", num_virtual_tokens=n, **kw))
    with torch.no_grad():
        for p in peftlab.trainable_parameters(m).values():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return m


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "t5", "bart"])
def test_generate_with_cache_matches_stepwise_no_cache(family):
    from transformers import GenerationConfig

    m = _prompted(family)
    ids = tiny_inputs(family, batch=1)["input_ids"]
    m.generation_config = GenerationConfig(decoder_start_token_id=2, pad_token_id=0)
    gen = m.generate(input_ids=ids, generation_config=GenerationConfig(
        max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, decoder_start_token_id=2))
    with torch.no_grad():
        if family in ("t5", "bart"):
            seq = torch.tensor([[2]])
            for _ in range(5):
                logits = m(input_ids=ids, decoder_input_ids=seq, use_cache=False).logits
                seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
        else:
            seq = ids
            for _ in range(5):
                logits = m(input_ids=seq, use_cache=False).logits
                seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen[:, -5:], seq[:, -5:])
    kw = {"decoder_input_ids": seq[:, :3]} if family in ("t5", "bart") else {}
    with torch.no_grad():
        y = output_tensor_of(m, ids, kw)
        with peftlab.disabled(m):
            assert not torch.allclose(output_tensor_of(m, ids, kw), y)  # the prompt is really used


def output_tensor_of(m, ids, kw):
    return m(input_ids=ids, use_cache=False, **kw).logits


def test_causal_lm_labels_line_up_and_loss_trains():
    m = _prompted("llama")
    x = tiny_inputs("llama")
    out = m(**x, labels=x["input_ids"])
    assert out.logits.shape[1] == x["input_ids"].shape[1]
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 101), x["input_ids"][:, 1:].reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-5)
    out.loss.backward()
    assert m.model.adapters["default"].prompt.grad.abs().sum() > 0


def test_init_from_vocabulary_and_token_ids():
    m = tiny_model("bert")
    peftlab.attach(m, peftlab.get_config("prompt", num_virtual_tokens=4, init="token_ids", init_token_ids=[5, 7]))
    emb = m.bert.base.embeddings.word_embeddings.weight
    assert torch.equal(m.bert.adapters["default"].prompt.data, emb[[5, 7, 5, 7]])
    a = peftlab.get_config("prompt", seed=3)
    b = peftlab.get_config("prompt", seed=3)
    m1, m2 = tiny_model("llama"), tiny_model("llama")
    peftlab.attach(m1, a)
    peftlab.attach(m2, b)
    assert torch.equal(m1.model.adapters["default"].prompt, m2.model.adapters["default"].prompt)
    vocab = m1.model.base.embed_tokens.weight
    assert all((vocab == row).all(1).any() for row in m1.model.adapters["default"].prompt)


peft = pytest.importorskip("peft")


@pytest.mark.parametrize("family,task", [("llama", "CAUSAL_LM"), ("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS")])
def test_parity_with_peft_prompt_tuning(family, task):
    base = tiny_model(family)
    x = tiny_inputs(family)
    ours = peftlab.attach(copy.deepcopy(base), peftlab.get_config("prompt", num_virtual_tokens=4))
    with torch.no_grad():
        ours.base_model.adapters["default"].prompt.normal_()
    cfg = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=4)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    if task == "SEQ_CLS":  # same head
        theirs.base_model.classifier.modules_to_save["default"].load_state_dict(ours.classifier.state_dict())
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.base_model.adapters["default"].prompt)
        a = output_tensor(ours(**x))
        b = output_tensor(theirs(**x))
    if task == "CAUSAL_LM":
        b = b[:, 4:]  # peft also returns logits for the virtual tokens
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generate_on_smollm2(smollm, method):
    from transformers import GenerationConfig

    m = copy.deepcopy(smollm)
    cfg = {"prefix": {"num_virtual_tokens": 4, "encoder_hidden": 16}, "prompt": {"num_virtual_tokens": 4}}[method]
    peftlab.attach(m, peftlab.get_config(method, **cfg))
    ids = torch.tensor([[1, 504, 3458, 314, 260]])
    gen = m.generate(input_ids=ids, generation_config=GenerationConfig(max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                                                       pad_token_id=0, eos_token_id=None))
    seq = ids
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, m(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, seq)
