"""peft-format interop: peftlab -> peft (PeftModel.from_pretrained) and peft (save_pretrained) -> peftlab."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import peftlab
from peftlab.testing import output_tensor, tiny_inputs, tiny_model

peft = pytest.importorskip("peft")

OURS = {
    "lora": lambda: peftlab.LoRAConfig(r=4, alpha=16, targets=["q", "v"]),
    "dora": lambda: peftlab.DoRAConfig(r=4, alpha=8, targets=["q", "k", "v"]),
    "ia3": lambda: peftlab.IA3Config(),
}


def out(model, inputs):
    with torch.no_grad():
        return output_tensor(model(**inputs))


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftlab.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("method", list(OURS))
def test_export_then_peft_loads_same_outputs(method, family, tmp_path):
    base = tiny_model(family)
    x = tiny_inputs(family)
    ours = peftlab.attach(copy.deepcopy(base), OURS[method]())
    _randomize(ours)
    peftlab.export_peft(ours, tmp_path / "p")
    assert {p.name for p in (tmp_path / "p").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    assert (out(theirs, x) - out(ours, x)).abs().max().item() <= 1e-5


def _peft_model(method, family, base):
    if family == "bert":
        qv, kv, ff = ["query", "value"], ["key", "value", "output.dense"], ["output.dense"]
    elif family == "gpt2":
        qv, kv, ff = ["c_attn"], ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]
    else:
        qv, kv, ff = ["q_proj", "v_proj"], ["k_proj", "v_proj", "down_proj"], ["down_proj"]
    task = "SEQ_CLS" if family == "bert" else "CAUSAL_LM"
    if method in ("lora", "dora"):
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=qv, use_dora=method == "dora", task_type=task,
                              init_lora_weights=False)
    else:
        cfg = peft.IA3Config(target_modules=kv, feedforward_modules=ff, task_type=task, init_ia3_weights=False)
    return peft.get_peft_model(copy.deepcopy(base), cfg).eval()


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("method", list(OURS))
def test_peft_saved_then_import_same_outputs(method, family, tmp_path):
    base = tiny_model(family)
    x = tiny_inputs(family)
    theirs = _peft_model(method, family, base)
    if method == "ia3":  # init_ia3_weights=False is not random for every version: perturb explicitly
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if "ia3_l" in n:
                    p.add_(0.3 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "p")
    ours = peftlab.import_peft(copy.deepcopy(base), tmp_path / "p")
    assert peftlab.get_adapter_config(ours).method == method
    assert (out(ours, x) - out(theirs, x)).abs().max().item() <= 1e-5
    assert (out(ours, x) - out(base, x)).abs().max().item() > 1e-4  # the adapter really does something
    # and back out again: our export of the imported adapter is what peft wrote
    peftlab.export_peft(ours, tmp_path / "q")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "q").eval()
    assert (out(again, x) - out(theirs, x)).abs().max().item() <= 1e-5


def test_import_errors_leave_model_untouched(tmp_path):
    base = tiny_model("bert")
    theirs = _peft_model("lora", "bert", base)
    theirs.save_pretrained(tmp_path / "p")
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    cfg_path = tmp_path / "p" / "adapter_config.json"
    good = cfg_path.read_text()

    def check_untouched(m):
        assert not hasattr(m, "peftlab_state")
        assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())

    other = tiny_model("llama")  # mismatched base: no module matches
    with pytest.raises(peftlab.IncompatibleAdapterError):
        peftlab.import_peft(other, tmp_path / "p")
    assert not hasattr(other, "peftlab_state")
    d = json.loads(good)
    d["peft_type"] = "VBLORA"  # a peft method peftlab does not have
    cfg_path.write_text(json.dumps(d))
    with pytest.raises(peftlab.UnknownMethodError, match="VBLORA"):
        peftlab.import_peft(base, tmp_path / "p")
    check_untouched(base)
    cfg_path.write_text("{not json")
    with pytest.raises(peftlab.CorruptAdapterError):
        peftlab.import_peft(base, tmp_path / "p")
    cfg_path.write_text(good)
    w = tmp_path / "p" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(peftlab.CorruptAdapterError):
        peftlab.import_peft(base, tmp_path / "p")
    check_untouched(base)


def test_export_of_method_without_peft_equivalent_is_refused(tmp_path):
    m = peftlab.attach(tiny_model("bert"), peftlab.BitFitConfig())
    with pytest.raises(peftlab.PeftlabError, match="no equivalent"):
        peftlab.export_peft(m, tmp_path / "p")
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_minilm_roundtrip_both_ways(minilm, tmp_path):
    ids = torch.randint(1000, 20000, (2, 12), generator=torch.Generator().manual_seed(0))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ours = peftlab.attach(copy.deepcopy(minilm), peftlab.LoRAConfig(r=8, targets=["q", "v"]))
    _randomize(ours)
    peftlab.export_peft(ours, tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(minilm), tmp_path / "p").eval()
    assert (out(theirs, x) - out(ours, x)).abs().max().item() <= 1e-5
    theirs.save_pretrained(tmp_path / "q")
    back = peftlab.import_peft(copy.deepcopy(minilm), tmp_path / "q")
    assert (out(back, x) - out(ours, x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_p_tuning_roundtrip_both_ways(encoder, family, tmp_path):
    """peft stores a P-tuning adapter as its encoder's output (``prompt_embeddings``): ours exports that, and
    imports it as a prompt without encoder (peft's inference mode) with the same outputs; and back again."""
    from safetensors.torch import load_file

    base = tiny_model(family)
    x = tiny_inputs(family)
    ours = peftlab.attach(copy.deepcopy(base), peftlab.get_config("p_tuning", num_virtual_tokens=3, encoder=encoder,
                                                                   encoder_hidden=8))
    _randomize(ours)
    peftlab.export_peft(ours, tmp_path / "p")
    saved = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    assert saved["prompt_embeddings"].shape == (3, 32)
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["peft_type"] == "P_TUNING"
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    y = out(ours, x)
    z = out(theirs, x)
    assert (y - (z if z.shape == y.shape else z[:, 3:])).abs().max().item() <= 1e-5
    assert (y - out(base, x)).abs().max().item() > 1e-4
    # peft -> ours: a peft-trained (randomised) encoder, saved by peft
    task = "SEQ_CLS" if family == "bert" else "CAUSAL_LM"
    trained = peft.get_peft_model(copy.deepcopy(base), peft.PromptEncoderConfig(
        task_type=task, num_virtual_tokens=3, encoder_reparameterization_type=encoder.upper(), encoder_hidden_size=8))
    _randomize_all(trained.prompt_encoder)
    trained.eval().save_pretrained(tmp_path / "q")
    imported = peftlab.import_peft(copy.deepcopy(base), tmp_path / "q")
    cfg = peftlab.get_adapter_config(imported)
    assert cfg.method == "p_tuning" and not cfg.reparameterize and cfg.encoder == encoder
    t = out(trained, x)
    y = out(imported, x)
    assert (y - (t if t.shape == y.shape else t[:, 3:])).abs().max().item() <= 1e-5
    peftlab.export_peft(imported, tmp_path / "r")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "r").eval()
    assert (out(again, x) - t).abs().max().item() <= 1e-5


def _randomize_all(module, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
