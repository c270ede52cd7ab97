"""Adapter forwards have no Python-side data-dependent branching: torch.compile(fullgraph=True) works."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.testing import output_tensor, tiny_inputs, tiny_model


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_fullgraph_compile_all_core_methods(family):
    torch._dynamo.reset()
    m = tiny_model(family)
    x = tiny_inputs(family)
    peftlab.attach(m, peftlab.LoRAConfig(r=2, targets=["q"]), name="lora")
    peftlab.attach(m, peftlab.DoRAConfig(r=2, targets=["v"]), name="dora")
    peftlab.attach(m, peftlab.IA3Config(targets=["k", "ffn_out"]), name="ia3")
    peftlab.attach(m, peftlab.BitFitConfig(), name="bitfit")
    with torch.no_grad():
        for p in peftlab.trainable_parameters(m).values():
            p.add_(0.05)
    eager = output_tensor(m(**x))
    compiled = torch.compile(m, fullgraph=True, backend="eager")  # graph capture is what fullgraph checks
    y = output_tensor(compiled(**x))
    assert (y - eager).abs().max().item() <= 1e-5
    y.float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in peftlab.trainable_parameters(m).items() if "lora_B" in n)


@pytest.mark.parametrize("method,kw", [("goft", dict(scale=True)), ("qgoft", dict(scale=True)),
                                       ("oft", dict(block_size=8, coft=True, eps=0.5, targets=["q", "v", "ffn_out"])),
                                       ("boft", dict(block_size=4, n_butterfly_factor=2, targets=["q", "ffn_in"]))])
def test_fullgraph_compile_orthogonal_weight_path(method, kw):
    """The orthogonal family's hand-written autograd.Functions (GOFT's levels, OFT/BOFT's block-diagonal and
    butterfly weight path) capture in one graph, backward included."""
    torch._dynamo.reset()
    m = tiny_model("bert")
    x = tiny_inputs("bert")
    peftlab.attach(m, peftlab.get_config(method, **kw))
    with torch.no_grad():
        for p in peftlab.trainable_parameters(m).values():
            p.add_(0.05)
    eager = output_tensor(m(**x))
    eager.pow(2).mean().backward()
    ref = {n: p.grad.clone() for n, p in peftlab.trainable_parameters(m).items()}
    m.zero_grad()
    y = output_tensor(torch.compile(m, fullgraph=True, backend="aot_eager")(**x))
    assert (y - eager).abs().max().item() <= 1e-5
    y.pow(2).mean().backward()
    for n, p in peftlab.trainable_parameters(m).items():
        assert torch.allclose(p.grad, ref[n], atol=1e-5), n
