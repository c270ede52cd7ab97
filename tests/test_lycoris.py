"""LoHa / LoKr specifics: the update is the stated product, factorization rule, counts, validation."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.context import context_for
from peftlab.testing import tiny_model
from peftlab.tuners.lokr import factorization


def _slot_adapters(model):
    return [(s, s.adapters["default"]) for _, s in peftlab.core.slots(model)]


def test_loha_update_is_hadamard_of_two_low_rank_products():
    m = peftlab.attach(tiny_model("bert"), peftlab.get_config("loha", r=2, alpha=3))
    slot, ad = _slot_adapters(m)[0]
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_()
    x = torch.randn(5, slot.in_features)
    dw = (ad.hada_w1_a @ ad.hada_w1_b) * (ad.hada_w2_a @ ad.hada_w2_b) * 1.5
    assert torch.allclose(slot(x), slot.base(x) + x @ dw.t(), atol=1e-5)
    assert torch.linalg.matrix_rank(dw) > 2  # the Hadamard product exceeds rank r


@pytest.mark.parametrize("decompose_both", [False, True])
def test_lokr_update_is_kronecker(decompose_both):
    m = peftlab.attach(tiny_model("llama"), peftlab.get_config("lokr", r=1, decompose_both=decompose_both,
                                                               targets=["ffn_in"]))
    slot, ad = _slot_adapters(m)[0]
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_()
    w1, w2 = ad.factors()
    x = torch.randn(2, 3, slot.in_features)
    assert torch.allclose(slot(x), slot.base(x) + x @ torch.kron(w1, w2).t(), atol=1e-4)
    assert hasattr(ad, "lokr_w1_a") == decompose_both


def test_factorization_agrees_with_peft():
    lokr_layer = pytest.importorskip("peft.tuners.lokr.layer")
    for dim in (1, 7, 12, 32, 64, 96, 127, 128, 768, 1000, 3072):
        for f in (-1, 1, 3, 4, 8, 16, 100):
            assert factorization(dim, f) == lokr_layer.factorization(dim, f), (dim, f)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_formula_matches_trainable_count(method):
    cfg = peftlab.get_config(method, r=3, targets=["q", "v", "ffn_in", "ffn_out"])
    m = peftlab.attach(tiny_model("bert"), cfg)
    n = sum(p.numel() for _, ad in _slot_adapters(m) for p in ad.parameters())
    assert n == cfg.formula_count(context_for(tiny_model("bert"), cfg))


@pytest.mark.parametrize("method,field,value", [("loha", "r", 0), ("loha", "alpha", float("nan")),
                                                ("lokr", "r", -1), ("lokr", "alpha", float("inf")),
                                                ("lokr", "decompose_factor", 0), ("lokr", "decompose_factor", -2),
                                                ("loha", "r", 2.5)])
def test_invalid_fields_rejected(method, field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        peftlab.get_config(method, **{field: value})


def test_loha_gradients_match_autograd_of_the_formula():
    m = peftlab.attach(tiny_model("bert"), peftlab.get_config("loha", r=2, alpha=3))
    ad = _slot_adapters(m)[0][1]
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_()
    g = torch.randn_like(ad.delta_weight())
    (ad.delta_weight() * g).sum().backward()
    ours = [p.grad.clone() for p in (ad.hada_w1_a, ad.hada_w1_b, ad.hada_w2_a, ad.hada_w2_b)]
    ps = [p.detach().clone().requires_grad_() for p in (ad.hada_w1_a, ad.hada_w1_b, ad.hada_w2_a, ad.hada_w2_b)]
    (((ps[0] @ ps[1]) * (ps[2] @ ps[3]) * 1.5) * g).sum().backward()
    assert all(torch.allclose(a, p.grad, atol=1e-4) for a, p in zip(ours, ps))
