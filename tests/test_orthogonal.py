"""The orthogonal family (GOFT, OFT, BOFT): one shared base; OFT/BOFT peft parity and peft-format round trips;
exact orthogonality; the block-diagonal / butterfly autograd function; COFT's projection (compile: test_compile.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.interop.peft_format import to_peft_config, to_peft_state_dict
from peftlab.testing import output_tensor, tiny_inputs, tiny_model
from peftlab.tuners.boft import butterfly_perm
from peftlab.tuners.orthogonal import OrthogonalAdapter, butterfly_linear, butterfly_rows, cayley

peft = pytest.importorskip("peft")
from test_peft_interop import _randomize, out  # noqa: E402
from test_peft_methods import check_roundtrip_both_ways, check_same_outputs_as_peft  # noqa: E402

OURS = {
    "oft": dict(method="oft", block_size=8, targets=["q", "v", "ffn_out"]),
    "oft_neumann": dict(method="oft", block_size=8, use_cayley_neumann=True),
    "oft_coft_shared": dict(method="oft", r=4, coft=True, eps=0.05, block_share=True, targets=["q", "k", "v"]),
    "boft_m1": dict(method="boft", block_size=4, n_butterfly_factor=1, targets=["q", "v", "ffn_out"]),
    "boft_m3": dict(method="boft", block_size=4, n_butterfly_factor=3),
    "boft_num": dict(method="boft", block_size=0, block_num=4, n_butterfly_factor=2, targets=["q", "v", "ffn_in"]),
}
FAMILIES = ("bert", "llama", "opt")  # peft's OFT/BOFT wrap nn.Linear only (GPT-2's Conv1D: see below)


def _config(case):
    kw = dict(OURS[case])
    return peftlab.get_config(kw.pop("method"), **kw)


def _block_diag(t):
    return torch.stack([torch.block_diag(*t[i]) for i in range(t.shape[0])])


@pytest.fixture
def peft_butterfly(monkeypatch):
    """peft runs BOFT with m > 1 only through its CUDA extension (without it, it silently sets m = 1): stand a
    torch block-diagonal in for the extension so peft's own m > 1 path runs on CPU."""
    import peft.tuners.boft.layer as layer

    monkeypatch.setattr(layer, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(layer, "FastBlockDiag", type("FastBlockDiag", (), {"apply": staticmethod(_block_diag)}))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(OURS))
def test_same_outputs_as_peft(case, family, peft_butterfly):
    y, y0 = check_same_outputs_as_peft(family, _config(case))
    assert (y - y0).abs().max().item() > 1e-3 * y0.abs().max().item()


@pytest.mark.parametrize("case", ["oft", "boft_m1"])
def test_same_as_unpatched_peft_and_same_start(case):
    """Without any stand-in (m = 1 needs no extension): same tensor names and shapes, both start at the base."""
    base = tiny_model("bert")
    x = tiny_inputs("bert")
    ours = peftlab.attach(copy.deepcopy(base), _config(case))
    twin = peft.get_peft_model(copy.deepcopy(base), to_peft_config(ours)).eval()
    theirs = {k.replace(".default", ""): v.shape for k, v in twin.state_dict().items() if "oft_" in k}
    assert {k: v.shape for k, v in to_peft_state_dict(ours).items() if "oft_" in k} == theirs
    assert (out(ours, x) - out(base, x)).abs().max().item() == 0
    _randomize(ours)
    peft.set_peft_model_state_dict(twin, to_peft_state_dict(ours))
    assert (out(ours, x) - out(twin, x)).abs().max().item() <= 1e-5


def _theirs(case, family):
    qv = ["query", "value"] if family == "bert" else ["q_proj", "v_proj"]
    task = "SEQ_CLS" if family == "bert" else "CAUSAL_LM"
    if case == "oft":  # peft's defaults otherwise (Cayley-Neumann on)
        return peft.OFTConfig(oft_block_size=8, r=0, target_modules=qv, task_type=task, init_weights=False)
    if case == "oft_coft_shared":
        return peft.OFTConfig(oft_block_size=0, r=4, coft=True, eps=0.05, block_share=True, target_modules=qv,
                              task_type=task, init_weights=False, use_cayley_neumann=False)
    return peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=qv, task_type=task,
                           init_weights=False)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("case", ["oft", "oft_coft_shared", "boft"])
def test_roundtrip_both_ways(case, family, tmp_path, peft_butterfly):
    check_roundtrip_both_ways(tiny_model(family), tiny_inputs(family), _config("boft_m3" if case == "boft" else case),
                              _theirs(case, family), case.split("_")[0], tmp_path)


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_gpt2_conv1d_served_but_not_exported(method, tmp_path):
    m = peftlab.attach(tiny_model("gpt2"), peftlab.get_config(method, block_size=4))
    _randomize(m)
    assert (out(m, tiny_inputs("gpt2")) - out(tiny_model("gpt2"), tiny_inputs("gpt2"))).abs().max() > 1e-4
    with pytest.raises(peftlab.PeftlabError, match="Conv1D"):
        peftlab.export_peft(m, tmp_path / "p")


def _adapters(model):
    return [s.adapters["default"] for _, s in peftlab.core.slots(model)]


@pytest.mark.parametrize("method,kw", [("oft", dict(block_size=8)), ("oft", dict(r=2, block_share=True)),
                                       ("boft", dict(block_size=4, n_butterfly_factor=3)), ("goft", {})])
def test_one_base_exact_orthogonality_and_merge(method, kw):
    m = peftlab.attach(tiny_model("bert"), peftlab.get_config(method, targets=["q", "ffn_out"], **kw))
    _randomize(m, seed=4)
    ads = _adapters(m)
    assert ads and all(isinstance(a, OrthogonalAdapter) for a in ads)
    for a in ads:
        r = a.dense()
        assert a.orthogonality_error() <= 1e-5
        assert (r - torch.eye(r.shape[0])).abs().max() > 1e-2  # a real rotation, not the identity
    slot = peftlab.core.slots(m)[0][1]
    w, a = slot.weight_oi().detach().clone(), slot.adapters["default"]
    s = a.output_scale()
    expected = w @ a.dense().t().detach() * (1 if s is None else s.detach()[:, None])
    peftlab.merge(m)
    assert torch.allclose(slot.weight_oi(), expected, atol=1e-5)  # W -> diag(s) W Rᵀ
    peftlab.unmerge(m)
    assert torch.equal(slot.weight_oi(), w)


def test_neumann_is_peft_series_and_not_exactly_orthogonal():
    q = torch.randn(3, 4, 4) * 0.05
    q = q - q.transpose(1, 2)
    eye = torch.eye(4)
    exact = cayley(q)
    assert torch.allclose(exact, (eye - q) @ torch.linalg.inv(eye + q), atol=1e-6)
    series = cayley(q, neumann_terms=5)
    assert torch.allclose(series, eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q, atol=1e-6)
    assert torch.allclose(series, exact.transpose(1, 2), atol=1e-3)  # approximates (I + Q)(I − Q)⁻¹ = Rᵀ
    assert (series.transpose(1, 2) @ series - eye).abs().max() > 1e-7


def test_butterfly_perm_interleaves_half_blocks():
    assert butterfly_perm(8, 4, 1) == list(range(8))  # factor 0: identity
    assert butterfly_perm(8, 2, 1) == [0, 2, 1, 3, 4, 6, 5, 7]
    assert butterfly_perm(16, 2, 2) == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]


def test_butterfly_linear_matches_autograd_and_gradcheck():
    torch.manual_seed(0)
    d, o, b, m = 16, 6, 2, 3
    perms = torch.tensor([butterfly_perm(d, d // b // 2**i, b // 2) for i in range(m)])
    invs = perms.argsort(1)
    w = torch.randn(o, d, dtype=torch.double)
    args = [torch.randn(2, 3, d, dtype=torch.double), torch.randn(o, dtype=torch.double),
            torch.randn(o, dtype=torch.double), torch.randn(m, d // b, b, b, dtype=torch.double)]
    args = [a.requires_grad_() for a in args]
    x, bias, s, bl = args
    ref = torch.nn.functional.linear(butterfly_rows(x, bl, perms, invs), w) * s + bias
    y = butterfly_linear(x, w, bias, s, bl, perms, invs)
    assert torch.allclose(y, ref, atol=1e-12)
    for via_weight in (False, True):  # both exact backward ways
        assert torch.autograd.gradcheck(
            lambda *a: butterfly_linear(a[0], w, a[1], a[2], a[3], perms, invs, via_weight), args)  # noqa: B023
        assert torch.autograd.gradcheck(
            lambda x_, bl_: butterfly_linear(x_, w, None, None, bl_[:1], via_weight=via_weight), (x, bl))  # noqa: B023


def test_weight_and_activation_paths_agree_with_gradients():
    x = tiny_inputs("llama")
    grads, outs = [], []
    for apply in ("weight", "activation"):
        m = peftlab.attach(tiny_model("llama"), peftlab.get_config("boft", block_size=4, apply=apply))
        _randomize(m, seed=2)
        y = output_tensor(m(**x))
        y.pow(2).mean().backward()
        outs.append(y.detach())
        grads.append({n: p.grad for n, p in peftlab.trainable_parameters(m).items()})
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-5), n


def test_coft_projects_in_forward_and_after_each_step():
    m = peftlab.attach(tiny_model("bert"), peftlab.get_config("oft", block_size=8, coft=True, eps=0.01))
    x = tiny_inputs("bert")
    _randomize(m)  # far outside the ball
    a = _adapters(m)[0]
    norms = torch.linalg.matrix_norm(a.skew_matrices(a.skew.detach()))
    radius = 0.01 / a.skew.shape[0] ** 0.5
    assert (norms > radius).all()
    y = out(m, x)
    peftlab.on_train_step(m, 1, 10)  # the projection is written into the parameters
    for ad in _adapters(m):
        n = torch.linalg.matrix_norm(ad.skew_matrices(ad.skew.detach()))
        assert torch.allclose(n, torch.full_like(n, radius), rtol=1e-4)
        assert (ad.dense() - torch.eye(ad.dense().shape[0])).norm() < 0.05  # R stays close to I (COFT)
    assert (out(m, x) - y).abs().max().item() <= 1e-6  # the forward already used the projected values


def test_counts_and_config_errors():
    m = peftlab.attach(tiny_model("bert"), peftlab.get_config("oft", block_size=8, targets=["q", "ffn_out"]))
    row = peftlab.report(m).adapters[0]
    assert row.params == row.formula == 4 * (4 * 28 + 8 * 28)  # q: 32/8 blocks, ffn_out: 64/8, 8·7/2 each
    m = peftlab.attach(tiny_model("bert"), peftlab.get_config("boft", block_size=4, n_butterfly_factor=2, targets=["q"]))
    row = peftlab.report(m).adapters[0]
    assert row.params == row.formula == 4 * (2 * 8 * 16 + 32)
    with pytest.raises(peftlab.ConfigError, match="block_size"):
        peftlab.get_config("oft", block_size=8, r=2)
    with pytest.raises(peftlab.ConfigError, match="block_size=12"):
        peftlab.attach(tiny_model("bert"), peftlab.get_config("boft", block_size=12))
