"""With identical weights, our LoRA / rsLoRA / DoRA / (IA)³ give the same outputs as Hugging Face peft."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.interop.peft_format import to_peft_state_dict
from peftlab.testing import output_tensor, tiny_inputs, tiny_model

peft = pytest.importorskip("peft")

FAMILIES = ["bert", "gpt2", "llama", "t5", "opt"]
CASES = {
    "lora": lambda: peftlab.LoRAConfig(r=4, alpha=8, targets=["q", "v"]),
    "rslora": lambda: peftlab.LoRAConfig(r=4, alpha=8, use_rslora=True, targets=["q", "v", "o"]),
    "dora": lambda: peftlab.DoRAConfig(r=4, alpha=8, targets=["q", "v"]),
    "ia3": lambda: peftlab.IA3Config(),
}


def _randomize(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in peftlab.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _peft_twin(base, ours, name="default"):
    from peftlab.interop.peft_format import to_peft_config

    cfg = to_peft_config(ours, name)
    twin = peft.get_peft_model(copy.deepcopy(base), cfg)
    missing = peft.set_peft_model_state_dict(twin, to_peft_state_dict(ours, name))
    assert not [k for k in missing.unexpected_keys], missing.unexpected_keys
    return twin.eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(CASES))
def test_same_outputs_as_peft(method, family):
    base = tiny_model(family)
    inputs = tiny_inputs(family)
    ours = peftlab.attach(copy.deepcopy(base), CASES[method]())
    _randomize(ours)
    twin = _peft_twin(base, ours)
    with torch.no_grad():
        a, b = output_tensor(ours(**inputs)), output_tensor(twin(**inputs))
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CASES))
def test_same_outputs_as_peft_minilm(method, minilm):
    ids = torch.randint(1000, 20000, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ours = peftlab.attach(copy.deepcopy(minilm), CASES[method]())
    _randomize(ours)
    twin = _peft_twin(minilm, ours)
    with torch.no_grad():
        a, b = output_tensor(ours(**inputs)), output_tensor(twin(**inputs))
    assert (a - b).abs().max().item() <= 1e-5


P_TUNING_FAMILIES = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "opt": "CAUSAL_LM"}


@pytest.mark.parametrize("family", list(P_TUNING_FAMILIES))
@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_p_tuning_same_outputs_as_peft(encoder, family):
    """peft's prompt encoder weights (embedding, LSTM, MLP head) load into ours unchanged; same outputs.
    For decoders peft's logits also cover the p virtual positions, which ours strip."""
    base = tiny_model(family)
    inputs = tiny_inputs(family)
    twin = peft.get_peft_model(copy.deepcopy(base), peft.PromptEncoderConfig(
        task_type=P_TUNING_FAMILIES[family], num_virtual_tokens=4, encoder_reparameterization_type=encoder,
        encoder_hidden_size=12)).eval()
    ours = peftlab.attach(copy.deepcopy(base), peftlab.get_config("p_tuning", num_virtual_tokens=4,
                                                                   encoder=encoder.lower(), encoder_hidden=12))
    (slot,) = [s for _, s in peftlab.core.slots(ours)]
    with torch.no_grad():
        for p in twin.prompt_encoder["default"].parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
        slot.adapters["default"].load_state_dict(twin.prompt_encoder["default"].state_dict())
        if family == "bert":
            ours.classifier.load_state_dict(twin.base_model.classifier.modules_to_save["default"].state_dict())
        a, b = output_tensor(ours(**inputs)), output_tensor(twin(**inputs))
    b = b if b.shape == a.shape else b[:, 4:]
    assert (a - b).abs().max().item() <= 1e-5
