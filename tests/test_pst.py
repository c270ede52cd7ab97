"""PST: schedule, exact per-layer sparsity, straight-through scores, export (HF + compact), baselines."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.testing import output_tensor, tiny_inputs, tiny_model
from peftlab.tuners.sparsity import export as sparse
from peftlab.tuners.sparsity.base import sparsity_at, top_mask
from peftlab.tuners.sparsity.pst import PSTLayer


def out(m, x):
    with torch.no_grad():
        return output_tensor(m(**x))


def test_schedule_worked_vector_and_endpoints():
    s = lambda t: sparsity_at(t, 1000, 0.0, 0.9, 0.1, 0.3)  # noqa: E731
    assert s(0) == 0 and s(100) == 0
    assert s(400) == pytest.approx(0.9 - 0.9 * 0.5**3) == pytest.approx(0.7875)
    assert s(701) == 0.9 and s(1000) == 0.9 and s(700) == pytest.approx(0.9)
    vals = [s(t) for t in range(0, 1001, 10)]
    assert all(a <= b + 1e-12 for a, b in zip(vals, vals[1:]))  # monotone


@pytest.mark.parametrize("sp", [0.0, 0.3, 0.5, 0.9, 0.999])
def test_top_mask_exact_count_with_ties(sp):
    scores = torch.randint(0, 4, (37, 23)).float()  # many ties
    m = top_mask(scores, sp)
    assert int((m == 0).sum()) == int(sp * scores.numel())
    assert torch.equal(m, top_mask(scores, sp))  # deterministic
    if 0 < sp < 1:
        assert scores[m == 0].max() <= scores[m == 1].min()


def _pst_model(family="bert", **kw):
    m = tiny_model(family)
    peftlab.attach(m, peftlab.get_config("pst", r1=2, r2=2, **kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peftlab.trainable_parameters(m).items():
            if ".adapters." in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def test_realised_sparsity_per_layer_is_exact_and_training_steps_set_it():
    m = _pst_model()
    cfg = peftlab.get_adapter_config(m)
    peftlab.on_train_step(m, 400, 1000)
    rep = sparse.sparsity_report(m)
    for p, v in rep["layers"].items():
        assert v["zeros"] == int(0.7875 * v["total"]), p
    assert not peftlab.checkpoint_eligible(m, 400, 1000) and peftlab.checkpoint_eligible(m, 701, 1000)
    assert cfg.final_sparsity == 0.9


def _backward_at_half_sparsity(layer, randomize):
    """Randomize the named (zero-initialised) parameters, set sparsity 0.5, backprop a linear map of a (6, 5) W."""
    with torch.no_grad():
        for name in randomize:
            getattr(layer, name).normal_()
        layer.sparsity.fill_(0.5)
    w = torch.randn(6, 5, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    w_eff = layer.masked_weight(w)
    w_eff.retain_grad()
    (x @ w_eff.t()).sum().backward()
    return w, w_eff


def test_straight_through_gradient_of_scores():
    layer = PSTLayer(6, 5, 2, 2, 1.0, 1.0, 1.0).double()
    w, w_eff = _backward_at_half_sparsity(layer, ("V", "B"))
    wt = (w + layer.U @ layer.V).detach()
    # ∂L/∂S = ∂L/∂W_eff ⊙ W̃, and S = |W̃| + A B + R 1ᵀ + 1 Cᵀ: R's gradient is its row sums
    dS = w_eff.grad * wt
    assert torch.allclose(layer.R.grad, dS.sum(1)) and torch.allclose(layer.C.grad, dS.sum(0))
    assert torch.allclose(layer.A.grad, dS @ layer.B.t())


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_export_hf_has_exactly_the_reported_zeros_and_same_outputs(family, tmp_path):
    import transformers

    m = _pst_model(family)
    x = tiny_inputs(family)
    peftlab.on_train_step(m, 1000, 1000)  # final sparsity 0.9
    y = out(m, x)
    rep = sparse.sparsity_report(m)
    d = sparse.export_hf(m, tmp_path / "hf")
    cls = transformers.AutoModelForSequenceClassification if family == "bert" else transformers.AutoModelForCausalLM
    hf = cls.from_pretrained(d).eval()
    assert torch.allclose(out(hf, x), y, atol=1e-5)
    for p, v in rep["layers"].items():
        mod = hf.get_submodule(p)
        assert int((mod.weight == 0).sum()) == v["zeros"] == int(0.9 * v["total"])
    assert isinstance(m.get_submodule(next(iter(rep["layers"]))), peftlab.slot.Slot)  # original untouched


def test_compact_form_shrinks_with_sparsity_and_round_trips(tmp_path):
    from safetensors.torch import save_file

    m = _pst_model()
    x = tiny_inputs("bert")
    sizes = {}
    for sp in (0.5, 0.9):
        peftlab.get_adapter_config(m).set_sparsity(m, "default", sp)
        eff = sparse.effective_weights(m)
        save_file({k: v.contiguous() for k, v in eff.items()}, str(tmp_path / "dense.safetensors"))
        f = sparse.save_compact(m, tmp_path / f"c{sp}.safetensors")
        sizes[sp] = f.stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert sizes[0.9] <= 0.2 and sizes[0.9] < sizes[0.5]
    y = out(m, x)
    plain = tiny_model("bert")
    head = {k: v for k, v in m.state_dict().items() if k.startswith("classifier")}
    plain.load_state_dict(head, strict=False)
    sparse.load_compact(plain, tmp_path / "c0.9.safetensors")
    assert torch.allclose(out(plain, x), y, atol=1e-5)


def test_merge_at_sparsity_and_save_load_keep_the_mask(tmp_path):
    m = _pst_model()
    x = tiny_inputs("bert")
    peftlab.on_train_step(m, 500, 1000)
    y = out(m, x)
    peftlab.save(m, tmp_path / "a")
    fresh = tiny_model("bert")
    peftlab.load(fresh, tmp_path / "a")
    assert torch.allclose(out(fresh, x), y, atol=1e-6)  # the sparsity level travels with the adapter
    peftlab.merge(m)
    assert torch.allclose(out(m, x), y, atol=1e-5)
    peftlab.unmerge(m)
    assert torch.allclose(out(m, x), y, atol=1e-6)


def test_head_trained_by_default_faithful_head_freezes_it():
    m = tiny_model("bert")
    peftlab.attach(m, peftlab.get_config("pst"))
    assert any(n.startswith("classifier") for n in peftlab.trainable_parameters(m))
    m2 = tiny_model("bert")
    peftlab.attach(m2, peftlab.get_config("pst", faithful_head=True))
    assert not any(n.startswith("classifier") for n in peftlab.trainable_parameters(m2))


def test_trainable_count_formula():
    m = tiny_model("bert")
    peftlab.attach(m, peftlab.get_config("pst"))
    row = peftlab.report(m).adapters[0]
    assert row.params == row.formula == 4 * 17 * (4 * (32 + 32) + 2 * (32 + 64))


def test_magnitude_baselines_prune_by_magnitude():
    for update in ("lora", "full"):
        m = tiny_model("bert")
        peftlab.attach(m, peftlab.get_config("magnitude_prune", update=update, final_sparsity=0.5))
        peftlab.on_train_step(m, 10, 10)
        slot = m.bert.encoder.layer[0].attention.self.query
        w = slot.adapters["default"].masked_weight(slot.weight_oi()).detach()
        kept = w[w != 0].abs()
        dropped = slot.weight_oi().detach()[w == 0].abs()  # at init ΔW = 0: pruned = smallest |W|
        assert dropped.max() <= kept.min() and int((w == 0).sum()) == w.numel() // 2
    full = peftlab.report(m).adapters[0]
    assert full.params == full.formula == 4 * (4 * 32 * 32 + 2 * 32 * 64)


def test_pst_trains_through_the_loop_hooks():
    m = _pst_model()
    x = tiny_inputs("bert")
    opt = torch.optim.AdamW(list(peftlab.trainable_parameters(m).values()), lr=1e-2)
    m.train()
    before = copy.deepcopy({n: p.detach().clone() for n, p in peftlab.trainable_parameters(m).items()})
    for step in range(1, 11):
        opt.zero_grad()
        output_tensor(m(**x)).pow(2).mean().backward()
        opt.step()
        peftlab.on_train_step(m, step, 10)
    after = peftlab.trainable_parameters(m)
    assert all(not torch.equal(before[n], after[n]) for n in before if n.endswith((".U", ".V", ".A", ".B", ".R", ".C")))
    assert sparse.sparsity_report(m)["sparsity"] == pytest.approx(0.9, abs=1e-3)


# ---------------------------------------------------------------- movement pruning baseline
def test_movement_scores_get_the_straight_through_movement_gradient():
    from peftlab.tuners.sparsity.movement import MovementLayer

    layer = MovementLayer(6, 5).double()
    w, w_eff = _backward_at_half_sparsity(layer, ("delta", "scores"))
    wt = (w + layer.delta).detach()
    assert torch.allclose(layer.scores.grad, w_eff.grad * wt)  # ∂ℒ/∂S = ∂ℒ/∂(M⊙W') ⊙ W'
    kept = top_mask(layer.scores.detach(), 0.5)
    assert torch.equal(w_eff.detach() != 0, kept.bool() & (wt != 0))  # pruned where the scores are lowest
    assert torch.equal(layer.delta.grad, w_eff.grad * kept)  # pruned weights get no update


def test_movement_pruning_keeps_weights_that_move_away_from_zero():
    """Weights trained away from zero gain score; the ones pushed towards zero are the ones pruned."""
    m = tiny_model("bert")
    peftlab.attach(m, peftlab.get_config("movement_prune", final_sparsity=0.5, warmup=0.5, cooldown=0.0,
                                         targets=["q"]))
    slot = m.bert.encoder.layer[0].attention.self.query
    w = slot.weight_oi().detach().clone()
    target = w * torch.where(torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.5, 2.0, 0.0)
    layer = slot.adapters["default"]
    opt = torch.optim.SGD([layer.delta, layer.scores], lr=0.05)
    for _ in range(20):  # the warm-up, at sparsity 0: only the scores' movement accumulates
        opt.zero_grad()
        (layer.masked_weight(slot.weight_oi()) - target).pow(2).sum().backward()
        opt.step()
    peftlab.on_train_step(m, 10, 10)
    mask = layer.mask(slot.weight_oi())
    grew = target != 0
    assert int((mask == 0).sum()) == w.numel() // 2
    assert (mask[grew] == 1).float().mean() > 0.95  # what moved away from zero survives


def test_movement_prune_trains_only_its_scores_delta_and_head():
    m = tiny_model("bert")
    peftlab.attach(m, peftlab.get_config("movement_prune"))
    names = peftlab.trainable_parameters(m)
    assert all(n.endswith((".delta", ".scores")) or n.startswith("classifier") for n in names)
    row = peftlab.report(m).adapters[0]
    assert row.params == row.formula == 4 * 2 * (4 * 32 * 32 + 2 * 32 * 64)


@pytest.mark.parametrize("method", ["pst", "movement_prune"])
def test_export_all_sizes(method, tmp_path):
    m = tiny_model("bert")
    peftlab.attach(m, peftlab.get_config(method))
    peftlab.on_train_step(m, 10, 10)
    s = sparse.export_all(m, tmp_path / "x")
    assert s["zeros"] == sparse.sparsity_report(m)["zeros"] and s["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert s["compact_bytes"] == (tmp_path / "x" / "sparse.safetensors").stat().st_size
    assert s["compact_ratio"] <= 0.2 and (tmp_path / "x" / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_cli_export_sparse_of_a_trained_run(tmp_path):
    """Train PST on MiniLM for a few steps, export with the CLI, load the HF folder: same logits, same zeros."""
    import json
    import subprocess
    import sys

    import transformers

    from peftlab.cli.train import load_run as _load_run
    from peftlab.train import run

    cfg = {"model": "minilm", "method": "pst", "method_args": {"final_sparsity": 0.7, "r1": 4, "r2": 4},
           "task": {"name": "demo", "train_limit": 64, "eval_limit": 32},
           "train": {"max_steps": 8, "batch_size": 8, "lr": 1e-3, "max_length": 24, "seed": 1, "progress": False},
           "output_dir": str(tmp_path / "run")}
    run(cfg)
    r = subprocess.run([sys.executable, "-m", "peftlab", "export-sparse", str(tmp_path / "run"), str(tmp_path / "exp")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["sparsity"] == pytest.approx(0.7, abs=1e-3)
    model, tok, _, _ = _load_run(tmp_path / "run", [])
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "exp" / "hf").eval()
    enc = tok(["a fine film", "dull"], return_tensors="pt", padding=True)
    assert torch.allclose(out(hf, enc), out(model, enc), atol=1e-5)
    assert sum(int((hf.get_submodule(p).weight == 0).sum()) for p in sparse.sparsity_report(model)["layers"]) \
        == summary["zeros"]
    r = subprocess.run([sys.executable, "-m", "peftlab", "export-sparse", str(tmp_path / "nope"), str(tmp_path / "e2")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "not a run directory" in r.stderr


def test_movement_mask_does_not_depend_on_the_scores_learning_rate(monkeypatch):
    """Why movement_prune has no ``scores_lr`` (Sanh et al. use 1e-2 for scores vs 3e-5 for weights): under
    AdamW the scores at lr·c are the scores at lr times c, so the top-k mask, hence the whole run, is the same."""
    from peftlab.core import part_adapters
    from peftlab.testing import loss_of
    from peftlab.tuners.sparsity.movement import MovementPruneConfig

    def run(scale):
        monkeypatch.setattr(MovementPruneConfig, "optimizer_options",
                            lambda self, m, k: {a.scores: {"lr_scale": scale} for _, a in part_adapters(m, k)})
        m = peftlab.attach(tiny_model("bert", hidden=64), peftlab.get_config("movement_prune", final_sparsity=0.5))
        opt = torch.optim.AdamW(peftlab.param_groups(m, lr=3e-5))
        for step in range(12):
            loss_of(m, tiny_inputs("bert", batch=4, seed=step)).backward()
            opt.step()
            opt.zero_grad()
            peftlab.on_train_step(m, step + 1, 12)
        layers = part_adapters(m, "default")
        ties = torch.cat([top_mask(torch.zeros_like(a.scores), float(a.sparsity)).flatten() for _, a in layers])
        return torch.cat([a.mask(m.get_submodule(n).weight_oi()).flatten() for n, a in layers]), ties

    (m1, ties), (m2, _) = run(1.0), run(1e-2 / 3e-5)
    assert 0 < int(m1.sum()) < m1.numel() and not torch.equal(m1, ties)  # pruned by learned scores, not by ties
    assert torch.equal(m1, m2)
