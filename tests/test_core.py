"""Core API: registry, target selection, multiple adapters, save/load failure modes, report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import peftlab
from peftlab.families import find_blocks
from peftlab.slot import Slot
from peftlab.targets import select
from peftlab.testing import output_tensor, tiny_inputs, tiny_model


def out(model, inputs):
    with torch.no_grad():
        return output_tensor(model(**inputs))


def slot_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, Slot))


# ---------------------------------------------------------------- registry and configs
def test_registry_lists_and_builds_configs():
    names = peftlab.methods()
    assert {"lora", "dora", "ia3", "bitfit"} <= set(names)
    cfg = peftlab.get_config("lora", r=4, targets=["q"])
    assert isinstance(cfg, peftlab.LoRAConfig) and cfg.r == 4
    for n in names:
        cls = peftlab.config_class(n)
        assert cls.__name__.endswith("Config")
        d = json.loads(json.dumps(cls().to_dict()))  # JSON-serializable
        assert cls.from_dict(d) == cls()


def test_unknown_method_and_bad_params_are_clear():
    with pytest.raises(peftlab.UnknownMethodError, match="registered methods"):
        peftlab.get_config("lorax")
    with pytest.raises(TypeError, match="rank"):
        peftlab.get_config("lora", rank=4)
    with pytest.raises(TypeError, match=r"LoRAConfig\.r"):
        peftlab.LoRAConfig.from_dict({"r": "8"})
    with pytest.raises(ValueError, match=r"LoRAConfig\.r: must be >= 1"):
        peftlab.LoRAConfig(r=0)


# ---------------------------------------------------------------- target selection
def test_default_roles_per_family():
    expect = {
        "bert": "attention.self.query",
        "gpt2": "attn.c_attn",
        "llama": "self_attn.q_proj",
        "t5": "SelfAttention.q",
        "vit": "attention.q_proj",
        "opt": "self_attn.q_proj",
    }
    for fam, suffix in expect.items():
        names = [t.name for t in select(tiny_model(fam), peftlab.LoRAConfig())]
        assert any(n.endswith(suffix) for n in names), (fam, names[:4])


def test_select_by_suffix_regex_layers_classes_all_linear():
    m = tiny_model("bert")
    assert len(select(m, peftlab.LoRAConfig(targets=["query"]))) == 4
    assert len(select(m, peftlab.LoRAConfig(targets=["query"], layers=[1, 3]))) == 2
    assert {t.layer for t in select(m, peftlab.LoRAConfig(targets=["query"], layers=[1, 3]))} == {1, 3}
    rx = select(m, peftlab.LoRAConfig(targets=None, target_regex=r".*layer\.0\..*(query|key)"))
    assert sorted(t.name.split(".")[-1] for t in rx) == ["key", "query"]
    all_lin = select(m, peftlab.LoRAConfig(targets="all-linear"))
    assert len(all_lin) == 4 * 6 and all(t.layer is not None for t in all_lin)  # not the head/pooler
    assert len(select(m, peftlab.LoRAConfig(targets="all-linear", exclude=["output.dense"]))) == 4 * 4
    assert len(select(tiny_model("gpt2"), peftlab.LoRAConfig(targets="all-linear", target_classes=["Conv1D"]))) == 16


def test_enc_dec_blocks_are_one_sequence():
    blocks = [n for _, n, _ in find_blocks(tiny_model("t5"))]
    assert blocks == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]
    names = [t.name for t in select(tiny_model("bart"), peftlab.LoRAConfig(targets=["q"], layers=[2]))]
    assert names == ["model.decoder.layers.0.self_attn.q_proj"]


def test_no_match_lists_candidates():
    m = tiny_model("llama")
    with pytest.raises(peftlab.TargetNotFoundError) as e:
        peftlab.attach(m, peftlab.LoRAConfig(targets=["query"]))
    msg = str(e.value)
    assert "q_proj" in msg and "down_proj" in msg and "roles" in msg
    assert slot_names(m) == [] and not hasattr(m, "peftlab_state")
    with pytest.raises(peftlab.TargetNotFoundError, match="out of range"):
        peftlab.attach(m, peftlab.LoRAConfig(layers=[9]))


# ---------------------------------------------------------------- several adapters
def test_multiple_adapters_activate_disable_delete():
    m = tiny_model("llama")
    x = tiny_inputs("llama")
    base = out(m, x)
    peftlab.attach(m, peftlab.LoRAConfig(r=2), name="a")
    peftlab.attach(m, peftlab.IA3Config(), name="b")
    assert peftlab.adapter_names(m) == ["a", "b"]
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".adapters." in n:
                p.add_(0.05 * torch.randn_like(p))
    both = out(m, x)
    peftlab.set_active(m, "a")
    only_a = out(m, x)
    assert all(not p.requires_grad for n, p in m.named_parameters() if ".adapters.b." in n)
    assert all(p.requires_grad for n, p in m.named_parameters() if ".adapters.a." in n)
    peftlab.set_active(m, ["b"])
    only_b = out(m, x)
    assert not torch.allclose(only_a, only_b) and not torch.allclose(both, only_a)
    peftlab.set_active(m, ["a", "b"])
    assert torch.allclose(out(m, x), both, atol=1e-6)
    with peftlab.disabled(m):
        assert torch.allclose(out(m, x), base, atol=1e-6)
    peftlab.delete(m, "b")
    assert torch.allclose(out(m, x), only_a, atol=1e-6)
    peftlab.delete(m, "a")
    assert slot_names(m) == [] and torch.allclose(out(m, x), base, atol=0)
    assert all(p.requires_grad for p in m.parameters())


def test_errors_for_names():
    m = tiny_model("bert")
    peftlab.attach(m, peftlab.LoRAConfig())
    with pytest.raises(peftlab.AdapterExistsError):
        peftlab.attach(m, peftlab.LoRAConfig())
    with pytest.raises(peftlab.AdapterNotFoundError):
        peftlab.set_active(m, ["nope"])
    with pytest.raises(peftlab.AdapterNotFoundError):
        peftlab.delete(m, "nope")
    with pytest.raises(ValueError):
        peftlab.attach(m, peftlab.LoRAConfig(), name="a.b")


def test_attach_returns_same_object_and_hf_apis_work(tmp_path):
    m = tiny_model("gpt2")
    assert peftlab.attach(m, peftlab.LoRAConfig()) is m
    ids = tiny_inputs("gpt2")["input_ids"][:1]
    gen = m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, ids.shape[1] + 4)
    m.save_pretrained(tmp_path / "hf")  # HF serialization still works
    peftlab.unload(m, merge=True)
    m.save_pretrained(tmp_path / "merged")
    import transformers

    m2 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    assert torch.allclose(out(m2, {"input_ids": ids}), out(m, {"input_ids": ids}), atol=1e-6)


def test_hf_trainer_step_runs(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    m = tiny_model("bert")
    peftlab.attach(m, peftlab.LoRAConfig())
    x = tiny_inputs("bert", batch=4)
    rows = [{"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i], "labels": i % 3} for i in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-2)
    before = {n: p.clone() for n, p in peftlab.trainable_parameters(m).items()}
    transformers.Trainer(model=m, args=args, train_dataset=rows).train()
    after = peftlab.trainable_parameters(m)
    assert any(not torch.equal(before[n], after[n]) for n in before)


# ---------------------------------------------------------------- save / load failures
def _saved(tmp_path, family="bert"):
    m = tiny_model(family)
    peftlab.attach(m, peftlab.LoRAConfig(r=2))
    with torch.no_grad():
        for p in peftlab.trainable_parameters(m).values():
            p.add_(0.1)
    return peftlab.save(m, tmp_path / "ad")


def _untouched(m, ref_state):
    assert slot_names(m) == []
    assert not hasattr(m, "peftlab_state")
    st = m.state_dict()
    assert st.keys() == ref_state.keys() and all(torch.equal(st[k], ref_state[k]) for k in st)


def test_load_onto_other_base_model_fails_cleanly(tmp_path):
    d = _saved(tmp_path)
    for other in ("roberta", "llama"):
        m = tiny_model(other)
        ref = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(peftlab.IncompatibleAdapterError, match="model_type"):
            peftlab.load(m, d)
        _untouched(m, ref)
    import transformers

    cfg = transformers.BertConfig(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=101, max_position_embeddings=64, num_labels=3)
    wider = transformers.BertForSequenceClassification(cfg)
    ref = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(peftlab.IncompatibleAdapterError, match="shape"):
        peftlab.load(wider, d)
    _untouched(wider, ref)


@pytest.mark.parametrize("damage", ["truncate", "flip", "json", "missing", "method", "tensors"])
def test_corrupt_adapter_fails_cleanly(tmp_path, damage):
    d = _saved(tmp_path)
    w, c = d / "adapter.safetensors", d / "peftlab_config.json"
    expected_error = peftlab.CorruptAdapterError
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:-40])
    elif damage == "flip":
        b = bytearray(w.read_bytes())
        b[-3] ^= 0xFF
        w.write_bytes(bytes(b))
    elif damage == "json":
        c.write_text(c.read_text()[:50])
    elif damage == "missing":
        w.unlink()
    elif damage == "method":
        meta = json.loads(c.read_text())
        meta["method"] = "no-such-method"
        c.write_text(json.dumps(meta))
        expected_error = peftlab.UnknownMethodError
    elif damage == "tensors":  # valid file, checksum updated, but a tensor is missing
        from safetensors.torch import load_file, save_file

        t = load_file(str(w))
        t.pop(sorted(t)[0])
        save_file(t, str(w))
        meta = json.loads(c.read_text())
        meta["sha256"] = peftlab.state._sha256(w)
        c.write_text(json.dumps(meta))
        expected_error = peftlab.IncompatibleAdapterError
    m = tiny_model("bert")
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(expected_error):
        peftlab.load(m, d)
    _untouched(m, ref)


def test_save_is_safetensors_only_and_records_fingerprint(tmp_path):
    d = _saved(tmp_path)
    assert sorted(p.name for p in d.iterdir()) == ["adapter.safetensors", "peftlab_config.json"]
    meta = json.loads((d / "peftlab_config.json").read_text())
    assert meta["peftlab_version"] == peftlab.__version__
    assert meta["fingerprint"]["model_type"] == "bert"
    assert meta["fingerprint"]["shapes"]["bert.encoder.layer.0.attention.self.query"] == [32, 32]
    assert meta["config"]["r"] == 2 and meta["method"] == "lora"


def test_not_mergeable_changes_nothing():
    m = tiny_model("bert")

    class Opaque(peftlab.slot.Adapter):
        def forward(self, slot, base_fn, x):
            return base_fn(x) * 2

    peftlab.attach(m, peftlab.LoRAConfig(), name="a")
    slot = m.bert.encoder.layer[0].attention.self.query
    slot.add("opaque", Opaque())
    w = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(peftlab.NotMergeableError):
        peftlab.merge(m)
    assert all(torch.equal(v, w[k]) for k, v in m.state_dict().items())


# ---------------------------------------------------------------- report
def test_report_counts():
    m = tiny_model("bert")
    total = sum(p.numel() for p in m.parameters())
    peftlab.attach(m, peftlab.LoRAConfig(r=2), name="a")
    peftlab.attach(m, peftlab.BitFitConfig(), name="b")
    r = peftlab.report(m)
    assert r.base == total
    rows = {row.name: row for row in r.adapters}
    assert rows["a"].params == rows["a"].formula == 4 * 2 * 2 * (32 + 32)
    assert rows["b"].params == rows["b"].formula == 4 * (7 * 32 + 64)
    assert rows["a"].head == 32 * 3 + 3
    assert r.trainable == rows["a"].params + rows["b"].params + rows["a"].head
    assert r.by_method() == {"lora": rows["a"].params, "bitfit": rows["b"].params}
    assert "lora" in str(r) and "bitfit" in str(r)


def test_cli_methods_lists_registry():
    res = subprocess.run([sys.executable, "-m", "peftlab", "methods"], capture_output=True, text=True, check=True)
    for name in peftlab.methods():
        assert name in res.stdout


def test_new_adapters_follow_the_models_train_eval_mode():
    """An adapter attached to a model in eval mode must not run its dropout (found with MEFT's adapters)."""
    for training in (False, True):
        model = tiny_model("bert").train(training)
        peftlab.attach(model, peftlab.LoRAConfig(r=4, dropout=0.5))
        assert all(m.training == training for m in model.modules())
