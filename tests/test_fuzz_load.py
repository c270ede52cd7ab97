"""Property test: whatever is done to an adapter folder, ``peftlab.load`` either succeeds or raises a
PeftlabError, and on failure the model is exactly as before (state dict keys/values, module types,
requires_grad flags)."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_robustness import assert_same, snapshot

import peftlab
from peftlab.state import _sha256
from peftlab.testing import tiny_model

CONFIGS = {
    "lora": lambda: peftlab.LoRAConfig(r=2),
    "compose": lambda: peftlab.compose(peftlab.get_config("prompt", num_virtual_tokens=2), peftlab.IA3Config()),
    "prefix": lambda: peftlab.get_config("prefix", num_virtual_tokens=2, encoder_hidden=8),
}
JSON_PATHS = [("config", "r"), ("config", "alpha"), ("config", "targets"), ("config", "layers"), ("config", "parts"),
              ("config", "num_virtual_tokens"), ("config", "layer_lengths"), ("config",), ("targets",), ("heads",),
              ("fingerprint",), ("fingerprint", "shapes"), ("method",), ("name",), ("format_version",), ("sha256",)]
values = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**13), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=4), st.lists(st.integers(-2, 40), max_size=3),
                   st.dictionaries(st.text(max_size=3), st.integers(-2, 5), max_size=2))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = tiny_model("bert")
    for name, make in CONFIGS.items():
        peftlab.attach(model, make(), name=name)
        peftlab.save(model, root / name, name=name)
    return root


def _mutate_json(folder: Path, path, value, delete: bool):
    f = folder / "peftlab_config.json"
    meta = json.loads(f.read_text())
    node = meta
    for k in path[:-1]:
        node = node.get(k) if isinstance(node, dict) else None
    if isinstance(node, dict):
        if delete:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    f.write_text(json.dumps(meta))


def _mutate_tensors(folder: Path, saved: Path, how: str, pick: int, fix_sha: bool):
    f = folder / "adapter.safetensors"
    if how == "truncate":
        data = f.read_bytes()
        f.write_bytes(data[: pick % max(len(data), 1)])
    elif how == "swap":
        shutil.copy(saved / sorted(CONFIGS)[pick % len(CONFIGS)] / "adapter.safetensors", f)
    else:
        t = load_file(str(f))
        keys = sorted(t)
        k = keys[pick % len(keys)]
        if how == "drop":
            del t[k]
        elif how == "reshape":
            t[k] = torch.zeros(t[k].numel() + 1)
        elif how == "head_extra":
            t["head::bert.embeddings.word_embeddings.weight"] = torch.zeros(101, 32)
        elif how == "head_shape":
            t["head::classifier.weight"] = torch.zeros(pick % 5 + 1, 32)
        save_file(t, str(f))
    if fix_sha:
        _mutate_json(folder, ("sha256",), _sha256(f), False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(sorted(CONFIGS)), json_path=st.sampled_from(JSON_PATHS), value=values,
       delete=st.booleans(), touch_json=st.booleans(),
       tensor_how=st.sampled_from([None, "truncate", "swap", "drop", "reshape", "head_extra", "head_shape"]),
       pick=st.integers(0, 10**6), fix_sha=st.booleans())
def test_load_succeeds_or_fails_cleanly(saved, which, json_path, value, delete, touch_json, tensor_how, pick, fix_sha):
    folder = Path(tempfile.mkdtemp()) / which
    try:
        shutil.copytree(saved / which, folder)
        if touch_json:
            _mutate_json(folder, json_path, copy.deepcopy(value), delete)
        if tensor_how is not None:
            _mutate_tensors(folder, saved, tensor_how, pick, fix_sha)
        model = tiny_model("bert")
        snap = snapshot(model)
        try:
            peftlab.load(model, folder)
        except peftlab.PeftlabError:
            assert_same(model, snap)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
