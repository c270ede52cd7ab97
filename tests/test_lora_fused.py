"""LoRA's fused base + update autograd function equals the plain composition, and is taken when it may be."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftlab
from peftlab.tuners import lora as lora_mod
from peftlab.tuners.lora import _LinearLoRA


class Net(nn.Module):
    def __init__(self, base: nn.Module):
        super().__init__()
        self.q = base

    def forward(self, x):
        return self.q(x)


def _net(kind: str, dtype=torch.float32, **lora_kw):
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12)
    if kind == "conv1d":
        nn.init.normal_(base.bias)
    net = Net(base).to(dtype)
    peftlab.attach(net, peftlab.LoRAConfig(r=3, alpha=6, targets=["q"], **lora_kw))
    with torch.no_grad():
        for p in peftlab.trainable_parameters(net).values():
            p.normal_()
    return net


def _reference(net, x):
    """base(x) + s·B A x through plain autograd ops."""
    slot = net.q
    layer = slot.adapters["default"]
    return slot.base(x) + layer.update(x)


def _grads(net, x, fn):
    for p in net.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = fn(net, x)
    y.pow(2).sum().backward()
    out = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    if x.requires_grad:
        out["x"] = x.grad
    return y.detach(), out


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("train_base", [False, True])
def test_fused_equals_plain_composition(kind, x_grad, train_base):
    net = _net(kind)
    if train_base:  # e.g. BitFit or full fine-tuning beside LoRA: the fused path must give W0 and b their grads
        for p in net.q.base.parameters():
            p.requires_grad_(True)
    x = torch.randn(2, 5, 12, requires_grad=x_grad)
    with mock.patch.object(_LinearLoRA, "apply", wraps=_LinearLoRA.apply) as spy:
        y_fused, g_fused = _grads(net, x, lambda n, x: n(x))
    assert spy.call_count == 1
    y_ref, g_ref = _grads(net, x, _reference)
    assert (y_fused - y_ref).abs().max() <= 1e-5
    assert g_fused.keys() == g_ref.keys()
    assert ("x" in g_fused) == x_grad and any("base.weight" in k for k in g_fused) == train_base
    for k in g_ref:
        assert torch.allclose(g_fused[k], g_ref[k], atol=1e-4, rtol=1e-4), k


def test_gradcheck_linear_lora_function():
    torch.manual_seed(0)
    d = dict(dtype=torch.float64, requires_grad=True)
    x, w, b = torch.randn(3, 4, 6, **d), torch.randn(5, 6, **d), torch.randn(5, **d)
    a, bb = torch.randn(2, 6, **d), torch.randn(5, 2, **d)
    assert torch.autograd.gradcheck(lambda *t: _LinearLoRA.apply(*t, 0.7), (x, w, b, a, bb))
    assert torch.autograd.gradcheck(lambda *t: _LinearLoRA.apply(t[0], t[1], None, t[2], t[3], 0.7), (x, w, a, bb))


def _path_taken(net, x) -> bool:
    with mock.patch.object(_LinearLoRA, "apply", wraps=_LinearLoRA.apply) as spy:
        net(x)
    return spy.call_count == 1


def test_generic_path_where_fusing_would_change_the_result():
    x = torch.randn(2, 5, 12)
    assert _path_taken(_net("linear"), x)
    assert not _path_taken(_net("linear", dropout=0.1), x)  # dropout acts on the update's input only
    net = _net("linear")
    net.q.base.register_forward_hook(lambda m, i, o: o * 2)  # e.g. accelerate's offload hooks must run
    assert not _path_taken(net, x)
    plain = nn.functional.linear(x, net.q.base.weight, net.q.base.bias)
    assert (net(x) - 2 * plain - net.q.adapters["default"].update(x)).abs().max() <= 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _path_taken(_net("linear"), x)
    net = _net("linear")
    peftlab.attach(net, peftlab.IA3Config(targets=["q"]), name="ia3")
    peftlab.set_active(net, ["ia3", "default"])  # (IA)³ innermost: LoRA's base_fn is not the bare base
    assert net.q._live == ("ia3", "default") and not _path_taken(net, x)
    peftlab.set_active(net, ["default", "ia3"])
    assert net.q._live == ("default", "ia3") and _path_taken(net, x)


def test_compiled_fullgraph_takes_the_fused_path_and_matches_eager():
    torch._dynamo.reset()
    net = _net("linear")
    x = torch.randn(2, 5, 12, requires_grad=True)
    _, g_eager = _grads(net, x, lambda n, x: n(x))
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    y_c, g_c = _grads(net, x, lambda n, x: compiled(x))
    assert (y_c - net(x)).abs().max() <= 1e-5
    for k in g_eager:
        assert torch.allclose(g_c[k], g_eager[k], atol=1e-5), k
    assert lora_mod._fusable(net.q.adapters["default"], net.q, net.q.base, x)
