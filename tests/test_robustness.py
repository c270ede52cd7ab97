"""Issue 17 (core side): validated configs, transactional attach/load, declared heads only, atomic save,
CorruptAdapterError for malformed folders."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftlab
from peftlab.config import _hints, _numeric
from peftlab.testing import output_tensor, tiny_inputs, tiny_model


def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "peftlab": model.__dict__.get("peftlab_state") is not None,
    }


def load_fails(model, folder, exc, match):
    """``peftlab.load`` raises ``exc`` and leaves ``model`` exactly as it was."""
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        peftlab.load(model, folder)
    assert_same(model, snap)


def assert_same(model, snap):
    now = snapshot(model)
    assert now["types"] == snap["types"]
    assert now["grad"] == snap["grad"]
    assert now["peftlab"] == snap["peftlab"]
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k


# ---------------------------------------------------------------- config validation
def _numeric_fields(cls):
    hints = _hints(cls)
    return [f.name for f in dataclasses.fields(cls) if _numeric(hints.get(f.name)) is not None]


@pytest.mark.parametrize("method", peftlab.methods())
def test_every_numeric_field_rejects_nan_inf_and_non_integral(method):
    cls = peftlab.config_class(method)
    hints = _hints(cls)
    for name in _numeric_fields(cls):
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(peftlab.ConfigError, match=rf"{cls.__name__}\.{name}"):
                cls(**{name: bad})
        if _numeric(hints[name]) is int:
            with pytest.raises(peftlab.ConfigError, match=rf"{cls.__name__}\.{name}"):
                cls(**{name: 2.5})
            if name in cls.limits and cls.limits[name].lo is not None and cls.limits[name].lo >= 0:
                with pytest.raises(peftlab.ConfigError, match=rf"{cls.__name__}\.{name}"):
                    cls(**{name: 10**12})
        for rname, rng in cls.limits.items():
            if rname == name and rng.lo is not None:
                with pytest.raises(peftlab.ConfigError, match=rf"{cls.__name__}\.{name}"):
                    cls(**{name: rng.lo - 1})


@pytest.mark.parametrize("alpha", [math.nan, math.inf, 0.0, -1.0])
def test_lora_dora_alpha_must_be_finite_positive(alpha):
    for cls in (peftlab.LoRAConfig, peftlab.DoRAConfig):
        with pytest.raises(peftlab.ConfigError, match="alpha"):
            cls(alpha=alpha)
        with pytest.raises(ValueError):  # still a ValueError for existing callers
            cls(alpha=alpha)


def test_rank_larger_than_the_layer_is_refused_at_attach_and_model_unchanged():
    m = tiny_model("bert")
    snap = snapshot(m)
    with pytest.raises(peftlab.ConfigError, match=r"LoRAConfig\.r=33 is larger"):
        peftlab.attach(m, peftlab.LoRAConfig(r=33))
    assert_same(m, snap)


def test_unknown_method_error_lists_every_method():
    with pytest.raises(peftlab.UnknownMethodError) as e:
        peftlab.get_config("nope")
    assert str(e.value).endswith(", ".join(peftlab.methods()))


# ---------------------------------------------------------------- transactions
def test_failed_attach_leaves_the_model_exactly_as_before(monkeypatch):
    m = tiny_model("bert")
    peftlab.attach(m, peftlab.IA3Config(), name="keep")
    peftlab.set_active(m, ["keep"])
    snap = snapshot(m)
    n = {"calls": 0}
    real = peftlab.LoRAConfig.make_adapter

    def flaky(self, target, ctx):
        n["calls"] += 1
        if n["calls"] == 3:
            raise MemoryError("simulated allocation failure")
        return real(self, target, ctx)

    monkeypatch.setattr(peftlab.LoRAConfig, "make_adapter", flaky)
    with pytest.raises(MemoryError):
        peftlab.attach(m, peftlab.compose(peftlab.BitFitConfig(), peftlab.LoRAConfig(r=2)), name="new")
    assert_same(m, snap)
    assert peftlab.adapter_names(m) == ["keep"]
    # a fresh model: no peftlab state or empty slot is left behind either
    fresh = tiny_model("bert")
    snap = snapshot(fresh)
    with pytest.raises(peftlab.TargetNotFoundError):
        peftlab.attach(fresh, peftlab.compose(peftlab.LoRAConfig(r=2), peftlab.LoRAConfig(targets=["nothing"])))
    assert_same(fresh, snap)


def _saved(tmp_path, config=None, family="bert"):
    m = tiny_model(family)
    peftlab.attach(m, config or peftlab.LoRAConfig(r=2))
    with torch.no_grad():
        for p in peftlab.trainable_parameters(m).values():
            p.add_(0.1)
    peftlab.save(m, tmp_path / "a")
    return tmp_path / "a"


def _rewrite_json(folder, fn):
    f = folder / "peftlab_config.json"
    meta = json.loads(f.read_text())
    fn(meta)
    f.write_text(json.dumps(meta))


def _rewrite_tensors(folder, fn):
    f = folder / "adapter.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f))
    from peftlab.state import _sha256

    _rewrite_json(folder, lambda meta: meta.__setitem__("sha256", _sha256(f)))


def test_absurd_rank_in_a_config_file_is_corrupt_and_model_unchanged(tmp_path):
    folder = _saved(tmp_path)
    _rewrite_json(folder, lambda meta: meta["config"].__setitem__("r", 10**12))
    load_fails(tiny_model("bert"), folder, peftlab.CorruptAdapterError, r"LoRAConfig\.r")


@pytest.mark.parametrize("mutate", [
    lambda meta: meta["config"].__setitem__("r", "8"),
    lambda meta: meta["config"].__setitem__("r", 2.5),
    lambda meta: meta.__setitem__("config", ["r", 2]),
    lambda meta: meta.__setitem__("targets", {"a": 1}),
    lambda meta: meta.__setitem__("heads", "classifier"),
    lambda meta: meta.__setitem__("fingerprint", []),
    lambda meta: meta["fingerprint"].__setitem__("shapes", [1]),
    lambda meta: meta.pop("sha256"),
    lambda meta: meta.__setitem__("sha256", 5),
    lambda meta: meta.__setitem__("format_version", "two"),
    lambda meta: meta["config"].__setitem__("alpha", -1),
], ids=["str-int", "float-int", "list-config", "dict-targets", "str-heads", "list-fp", "list-shapes",
        "no-sha", "int-sha", "bad-version", "neg-alpha"])
def test_malformed_config_file_raises_corrupt_adapter_error(tmp_path, mutate):
    folder = _saved(tmp_path)
    _rewrite_json(folder, mutate)
    load_fails(tiny_model("bert"), folder, peftlab.CorruptAdapterError, "peftlab_config.json")


def test_broken_files_raise_corrupt_adapter_error(tmp_path):
    folder = _saved(tmp_path)
    m = tiny_model("bert")
    cfg = folder / "peftlab_config.json"
    text = cfg.read_text()
    cfg.write_text(text[: len(text) // 2])
    load_fails(m, folder, peftlab.CorruptAdapterError, "not valid JSON")
    cfg.write_text(text)
    w = folder / "adapter.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    load_fails(m, folder, peftlab.CorruptAdapterError, "adapter.safetensors")
    w.unlink()
    load_fails(m, folder, peftlab.CorruptAdapterError, "file missing")


# ---------------------------------------------------------------- heads
def test_only_declared_heads_load_and_delete_restores_them(tmp_path):
    folder = _saved(tmp_path)
    m = tiny_model("bert")
    snap = snapshot(m)
    emb = "bert.embeddings.word_embeddings.weight"
    _rewrite_tensors(folder, lambda t: t.__setitem__(f"head::{emb}", torch.zeros_like(snap["state"][emb])))
    load_fails(m, folder, peftlab.IncompatibleAdapterError, "not parameters of the heads")
    _rewrite_tensors(folder, lambda t: (t.pop(f"head::{emb}"), t.__setitem__("head::classifier.weight", torch.zeros(5, 32))))
    load_fails(m, folder, peftlab.IncompatibleAdapterError, "head::classifier.weight: shape")
    _rewrite_tensors(folder, lambda t: t.__setitem__("head::classifier.weight", torch.ones(3, 32)))
    peftlab.load(m, folder)
    assert torch.equal(m.classifier.weight, torch.ones(3, 32))
    peftlab.delete(m, "default")
    assert_same(m, snap)


# ---------------------------------------------------------------- atomic save
def test_save_swaps_a_whole_folder_and_follows_no_planted_link(tmp_path):
    m = tiny_model("bert")
    peftlab.attach(m, peftlab.LoRAConfig(r=2))
    dest = tmp_path / "best"
    dest.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    os.symlink(victim, dest / "peftlab_config.json.tmp")
    (dest / "notes.txt").write_text("mine")
    peftlab.save(m, dest)
    assert victim.read_text() == "untouched"
    assert (dest / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "victim.txt"]  # no temporary left behind
    # saving again over the folder (a second version) replaces both files together
    with torch.no_grad():
        m.bert.encoder.layer[0].attention.self.query.adapters["default"].lora_B.add_(1.0)
    peftlab.save(m, dest)
    fresh = tiny_model("bert")
    peftlab.load(fresh, dest)
    x = tiny_inputs("bert")
    torch.testing.assert_close(output_tensor(fresh(**x)), output_tensor(m(**x)))


def test_save_failure_leaves_the_previous_folder(tmp_path, monkeypatch):
    m = tiny_model("bert")
    peftlab.attach(m, peftlab.LoRAConfig(r=2))
    dest = peftlab.save(m, tmp_path / "best")
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    import peftlab.state as st

    monkeypatch.setattr(st, "_sha256", lambda path: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        peftlab.save(m, dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


# ---------------------------------------------------------------- composition
def test_compose_round_trips_and_names_parts(tmp_path):
    cfg = peftlab.compose(peftlab.LoRAConfig(r=2), peftlab.get_config("adapter", bottleneck=4),
                          peftlab.LoRAConfig(r=3, targets=["ffn_out"]))
    d = json.loads(cfg.to_json())
    assert peftlab.ComposeConfig.from_dict(d) == cfg
    m = tiny_model("bert")
    peftlab.attach(m, cfg)
    assert peftlab.report(m).adapters[0].parts == ["default.lora", "default.adapter", "default.lora_2"]
    with torch.no_grad():
        for p in peftlab.trainable_parameters(m).values():
            p.add_(0.05)
    peftlab.save(m, tmp_path / "c")
    fresh = tiny_model("bert")
    peftlab.load(fresh, tmp_path / "c")
    assert peftlab.get_adapter_config(fresh) == cfg
    x = tiny_inputs("bert")
    torch.testing.assert_close(output_tensor(fresh(**x)), output_tensor(m(**x)), atol=1e-6, rtol=0)
