"""Adapters saved by the code *before* the core refactor still load and give the same outputs.

tests/fixtures/pre_refactor/<method>/ holds an adapter folder written by peftlab 0.1.0 before the
refactor (perturbed adapter weights on ``tiny_model("bert", seed=0)``), the outputs it produced on
``tiny_inputs("bert")`` (expected_outputs.safetensors) and fixture.json (how it was made).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from peftlab.testing import output_tensor, tiny_inputs, tiny_model

ROOT = Path(__file__).parent / "fixtures" / "pre_refactor"
METHODS = sorted(p.name for p in ROOT.iterdir() if p.is_dir())


def test_all_fixtures_present():
    assert set(METHODS) >= {"lora", "dora", "ia3", "s4", "prefix", "prompt", "pst", "goft", "adapter", "meft"}


@pytest.mark.parametrize("method", METHODS)
def test_pre_refactor_adapter_loads_with_same_outputs(method):
    folder = ROOT / method
    meta = json.loads((folder / "fixture.json").read_text())
    model = tiny_model(meta["family"], seed=meta["model_seed"])
    inputs = tiny_inputs(meta["family"], seed=meta["input_seed"])
    with torch.no_grad():
        base = output_tensor(model(**inputs)).clone()
    peftlab.load(model, folder)
    assert peftlab.get_adapter_config(model).method == meta["method"]
    expected = load_file(str(folder / "expected_outputs.safetensors"))["logits"]
    with torch.no_grad():
        y = output_tensor(model(**inputs))
    assert not torch.allclose(expected, base, atol=1e-4)  # the fixture exercises the adapter
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)
