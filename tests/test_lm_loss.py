"""The LM head runs only on scored positions, with the same loss, gradients and scores as the full head."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.lm_head import answer_loss, answer_scores
from peftlab.planner import saved_activation_bytes
from peftlab.testing import tiny_model
from peftlab.train.data import choice_scores


def _batch(seq=24, answer=3, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    for i in range(batch):
        end = seq - 2 * i  # rows of different lengths, right-padded
        mask[i, end:] = 0
        labels[i, end - answer - i : end] = ids[i, end - answer - i : end]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", [None, "lora", "prompt"])
def test_answer_loss_equals_the_full_head_loss_and_gradients(family, method):
    model = tiny_model(family)
    if method:
        cfg = peftlab.LoRAConfig(r=2) if method == "lora" else peftlab.get_config("prompt", num_virtual_tokens=3)
        peftlab.attach(model, cfg)
    model.eval()  # no dropout: the two forwards must see the same function (gradients still flow)
    batch = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    full = model(**batch).loss
    g_full = torch.autograd.grad(full, params)
    ours = answer_loss(model, batch)
    g_ours = torch.autograd.grad(ours, params)
    assert torch.allclose(ours, full, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_ours, g_full))


@pytest.mark.parametrize("normalize", [False, True])
def test_answer_scores_equal_the_full_head_scores(normalize):
    model = tiny_model("llama")
    batch = _batch()
    with torch.no_grad():
        full = choice_scores(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                             batch["labels"], normalize)
        ours = answer_scores(model, batch, normalize)
    assert torch.allclose(ours, full, atol=1e-5)


def test_the_head_on_answers_only_saves_far_less():
    model = peftlab.attach(tiny_model("llama"), peftlab.LoRAConfig(r=2))
    model.train()
    batch = _batch(seq=48, answer=2)

    class Full(torch.nn.Module):
        def forward(self, **b):
            return model(**b)

    class Answers(torch.nn.Module):
        def forward(self, **b):
            return type("O", (), {"loss": answer_loss(model, b)})()

    full, _ = saved_activation_bytes(Full(), batch)
    ours, _ = saved_activation_bytes(Answers(), batch)
    assert ours < full
