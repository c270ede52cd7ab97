"""The reparameterised and selective families' forwards capture as one graph (torch.compile fullgraph, eager backend)."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.testing import output_tensor, tiny_inputs, tiny_model

CONFIGS = {
    "loha": dict(r=2), "lokr": dict(r=2, decompose_both=True, decompose_factor=4), "lora_fa": dict(r=2),
    "vera": dict(r=4, targets=["q", "v", "ffn_out"]), "dylora": dict(r=4), "adalora": dict(r=4, target_r=2),
    "lora": dict(r=4, init="pissa"),
    # the selective family (issue 19)
    "ln_tuning": {}, "fishmask": dict(keep_fraction=0.05), "diff_pruning": {},
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_fullgraph_compile(method):
    torch._dynamo.reset()
    m = peftlab.attach(tiny_model("llama"), peftlab.get_config(method, **CONFIGS[method])).train()
    x = tiny_inputs("llama")
    with torch.no_grad():
        for p in peftlab.trainable_parameters(m).values():
            p.add_(0.05)
    torch.manual_seed(0)
    eager = output_tensor(m(**x))
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.manual_seed(0)
    y = output_tensor(compiled(**x))
    assert (y - eager).abs().max().item() <= 1e-5
    y.float().pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in peftlab.trainable_parameters(m).values())
