"""GOFT / qGOFT specifics: Eq. 3 pairing, exact orthogonality, invariants, counts, regulariser."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.testing import output_tensor, tiny_inputs, tiny_model
from peftlab.tuners.goft import GivensRotation, givens_pairs


def test_pairing_matches_worked_vectors():
    assert givens_pairs(8) == [([0, 2, 4, 6], [1, 3, 5, 7]), ([0, 4], [2, 6]), ([0], [4])]
    assert givens_pairs(6) == [([0, 2, 4], [1, 3, 5]), ([0], [2]), ([0], [4])]  # 4 carried at level 2
    assert givens_pairs(3) == [([0], [1]), ([0], [2])]
    sizes = [len(i) for i, _ in givens_pairs(768)]
    assert sizes == [384, 192, 96, 48, 24, 12, 6, 3, 1, 1] and sum(sizes) == 767
    for d in range(2, 70):
        lv = givens_pairs(d)
        assert sum(len(i) for i, _ in lv) == d - 1 and len(lv) == (d - 1).bit_length()
        for i, j in lv:  # rotations within a level are disjoint
            assert len(set(i) | set(j)) == 2 * len(i)


@pytest.mark.parametrize("d", [2, 3, 5, 8, 384, 768])
def test_R_is_orthogonal_for_random_angles(d):
    g = GivensRotation(d)
    with torch.no_grad():
        g.phi.normal_(0, 2.0)
    R = g.dense().double()
    assert (R.t() @ R - torch.eye(d, dtype=torch.float64)).abs().max().item() <= 1e-5
    assert not torch.allclose(R, torch.eye(d, dtype=torch.float64))


def test_fast_apply_equals_dense_product_of_givens_matrices():
    d = 7
    g = GivensRotation(d)
    with torch.no_grad():
        g.phi.normal_()
    theta = torch.pi * torch.tanh(g.phi.detach().double())
    R, k = torch.eye(d, dtype=torch.float64), 0
    for i_s, j_s in givens_pairs(d):  # R = P_L ... P_1, with P_r = prod_k G(i, j; θ)
        P = torch.eye(d, dtype=torch.float64)
        for i, j in zip(i_s, j_s):
            c, s = torch.cos(theta[k]), torch.sin(theta[k])
            P[i, i], P[j, j], P[i, j], P[j, i] = c, c, -s, s
            k += 1
        R = P @ R
    x = torch.randn(5, d, dtype=torch.float64)
    assert torch.allclose(g.rotate(x.float()).double(), x @ R, atol=1e-6)  # rows: (Rᵀ x)ᵀ = xᵀ R
    assert torch.allclose(g.dense().double(), R, atol=1e-6)


def test_goft_preserves_column_norms_and_angles_of_W():
    m = tiny_model("bert")
    peftlab.attach(m, peftlab.get_config("goft", targets=["query"], layers=[0]))
    slot = m.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        slot.adapters["default"].phi.normal_()
    W = slot.weight_oi().detach().clone()
    peftlab.merge(m)
    W2 = slot.weight_oi().detach()
    # neurons are the rows of W (out, in): their norms and pairwise angles are unchanged by W Rᵀ
    assert torch.allclose(W2.norm(dim=1), W.norm(dim=1), atol=1e-5)
    assert torch.allclose(W2 @ W2.t(), W @ W.t(), atol=1e-5)
    assert not torch.allclose(W2, W, atol=1e-4)


def test_parameter_counts_match_formulas_deberta_v3_base_dims():
    import transformers

    cfg = transformers.DebertaV2Config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, vocab_size=16, max_position_embeddings=16)
    with torch.device("meta"):
        base = transformers.DebertaV2ForSequenceClassification(cfg)
    for method, expected in (("goft", 82_872), ("qgoft", 331_488)):
        m = peftlab.attach(copy.deepcopy(base), peftlab.get_config(method, targets="all-linear"))
        row = peftlab.report(m).adapters[0]
        assert row.params == row.formula == expected
    m = peftlab.attach(copy.deepcopy(base), peftlab.get_config("goft", targets="all-linear", scale=True))
    assert peftlab.report(m).adapters[0].params == 82_872 + 12 * (5 * 768 + 3072)  # GOFT* = 165,816


def test_default_targets_follow_the_paper():
    enc = peftlab.attach(tiny_model("bert"), peftlab.get_config("goft"))
    assert len(peftlab.core.slots(enc)) == 4 * 6  # all linear layers of every block
    dec = peftlab.attach(tiny_model("llama"), peftlab.get_config("goft"))
    assert sorted({n.split(".")[-1] for n, _ in peftlab.core.slots(dec)}) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_qgoft_regulariser_zero_at_init_positive_after_perturbation_and_in_training_loss():
    m = tiny_model("bert")
    peftlab.attach(m, peftlab.get_config("qgoft", reg_lambda=0.05))
    assert peftlab.training_loss(m).item() == 0.0
    with torch.no_grad():
        for p in peftlab.trainable_parameters(m).values():
            p.add_(0.1 * torch.randn_like(p))
    reg = peftlab.training_loss(m)
    assert reg.item() > 0 and reg.requires_grad
    manual = sum(
        (s.adapters["default"].blocks[:, 0, 0] * s.adapters["default"].blocks[:, 0, 1]
         + s.adapters["default"].blocks[:, 1, 0] * s.adapters["default"].blocks[:, 1, 1]).pow(2).sum()
        for _, s in peftlab.core.slots(m)
    )
    assert torch.allclose(reg, 0.05 * manual)
    peftlab.set_active(m, [])
    assert peftlab.training_loss(m) is None  # inactive adapters add nothing


def test_regulariser_gradient_gradcheck():
    g = GivensRotation(6, quasi=True).double()
    with torch.no_grad():
        g.blocks.add_(0.3 * torch.randn_like(g.blocks))

    def f(blocks):
        b = blocks.view(-1, 2, 2)
        return (b[:, 0, 0] * b[:, 0, 1] + b[:, 1, 0] * b[:, 1, 1]).pow(2).sum()

    assert torch.autograd.gradcheck(f, (g.blocks.detach().clone().requires_grad_(),))
    g.orthogonality_penalty().backward()
    blocks = g.blocks.detach().clone().requires_grad_()
    f(blocks).backward()
    assert torch.allclose(g.blocks.grad, blocks.grad)


def test_recompute_and_kept_levels_give_same_gradients():
    m1, x = tiny_model("llama"), tiny_inputs("llama")
    m2 = copy.deepcopy(m1)
    peftlab.attach(m1, peftlab.get_config("qgoft", recompute=True))
    peftlab.attach(m2, peftlab.get_config("qgoft", recompute=False))
    with torch.no_grad():
        for a, b in zip(peftlab.trainable_parameters(m1).values(), peftlab.trainable_parameters(m2).values()):
            a.add_(0.1)
            b.add_(0.1)
    for m in (m1, m2):
        output_tensor(m(**x)).pow(2).mean().backward()
    for (n, a), b in zip(peftlab.trainable_parameters(m1).items(), peftlab.trainable_parameters(m2).values()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), n


@pytest.mark.parametrize("method", ["goft", "qgoft"])
def test_weight_and_activation_paths_agree(method):
    m1, x = tiny_model("bert"), tiny_inputs("bert")
    m2 = copy.deepcopy(m1)
    peftlab.attach(m1, peftlab.get_config(method, apply="weight", scale=True))
    peftlab.attach(m2, peftlab.get_config(method, apply="activation", scale=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a, b in zip(peftlab.trainable_parameters(m1).values(), peftlab.trainable_parameters(m2).values()):
            noise = 0.2 * torch.randn(a.shape, generator=g)
            a.add_(noise)
            b.add_(noise)
    y1, y2 = output_tensor(m1(**x)), output_tensor(m2(**x))
    assert torch.allclose(y1, y2, atol=1e-5)
    y1.pow(2).mean().backward()
    y2.pow(2).mean().backward()
    for (n, a), b in zip(peftlab.trainable_parameters(m1).items(), peftlab.trainable_parameters(m2).values()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("quasi", [False, True])
@pytest.mark.parametrize("d", [7, 16])
def test_weight_levels_function_gradcheck(quasi, d):
    """The hand-written backward of the weight path (only the rotated columns, recomputed) is exact."""
    from peftlab.tuners.goft import _LevelsOnRows

    g = GivensRotation(d, quasi=quasi).double()
    idx = [getattr(g, f"{c}{r}") for r in range(len(g.sizes)) for c in "ij"]
    m = [x.detach().double().requires_grad_() for x in g.block_entries()]
    with torch.no_grad():
        for x in m:
            x.add_(0.3 * torch.randn_like(x))
    w = torch.randn(5, d, dtype=torch.float64, requires_grad=True)
    f = lambda w, *m: _LevelsOnRows.apply(w, torch.stack(m), tuple(g.sizes), False, True, *idx)  # noqa: E731
    assert torch.autograd.gradcheck(f, (w, *m))
    with torch.no_grad():  # and it equals W Rᵀ with R from the (independent) activation path
        if quasi:
            g.blocks.copy_(torch.stack([torch.stack([m[0], m[1]], -1), torch.stack([m[2], m[3]], -1)], -2))
        else:
            g.phi.normal_()
            m = list(g.block_entries())
        dense = g.rotate(torch.eye(d, dtype=torch.float64))
        assert torch.allclose(f(w, *m), w @ dense.t(), atol=1e-10)
