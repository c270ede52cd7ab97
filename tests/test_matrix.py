"""The shared correctness matrix: every method x every architecture family (tests/cases.py)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from cases import CASES

import peftlab
from peftlab.testing import FAMILIES, loss_of, output_tensor, tiny_inputs, tiny_model

PAIRS = [(m, f) for m, c in CASES.items() for f in FAMILIES if c.families is None or f in c.families]
ids = [f"{m}-{f}" for m, f in PAIRS]


def _setup(method, family, seed=0):
    model = tiny_model(family, seed=seed)
    inputs = tiny_inputs(family)
    with torch.no_grad():
        base = output_tensor(model(**inputs)).clone()
    peftlab.attach(model, CASES[method].config())
    return model, inputs, base


def _adapter_params(model):
    """Trainable parameters minus those of the task head."""
    heads = [h + "." for hs in peftlab.core.state(model).heads.values() for h in hs]
    return {n: p for n, p in peftlab.trainable_parameters(model).items() if not any(n.startswith(h) for h in heads)}


def _perturb(model, scale=0.1, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in _adapter_params(model).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _out(model, inputs):
    with torch.no_grad():
        return output_tensor(model(**inputs))


@pytest.mark.parametrize("method,family", PAIRS, ids=ids)
def test_zero_start(method, family):
    model, inputs, base = _setup(method, family)
    y = _out(model, inputs)
    tol = CASES[method].zero_start_tol
    if tol is None:
        cos = torch.nn.functional.cosine_similarity(y.flatten(), base.flatten(), dim=0).item()
        print(f"{method}/{family}: cosine similarity to the base model at init {cos:.5f}")
        if CASES[method].min_cosine is None:
            pytest.skip(f"{method} has no identity start by design (cosine {cos:.3f})")
        assert cos > CASES[method].min_cosine
    else:
        assert (y - base).abs().max().item() <= tol


@pytest.mark.parametrize("method,family", PAIRS, ids=ids)
def test_gradients_and_steps_touch_only_trainable(method, family):
    model, inputs, _ = _setup(method, family)
    model.train()
    trainable = peftlab.trainable_parameters(model)
    assert trainable, "no trainable parameters"
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss = loss_of(model, inputs)
        extra = peftlab.training_loss(model)
        (loss if extra is None else loss + extra).backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad <= set(trainable), f"gradients reached frozen params: {sorted(with_grad - set(trainable))[:5]}"
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
        opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    params = dict(model.named_parameters())
    assert changed, "optimizer steps changed nothing"
    frozen_changed = [k for k in changed if k in params and k not in trainable]
    assert not frozen_changed, f"frozen parameters changed: {frozen_changed[:5]}"


@pytest.mark.parametrize("method,family", PAIRS, ids=ids)
def test_disabled_equals_base(method, family):
    model, inputs, base = _setup(method, family)
    _perturb(model)  # adapter params only, so the base (with its head) is unchanged
    scale = base.abs().max()
    assert (_out(model, inputs) - base).abs().max() > 1e-3 * scale, "perturbed adapter had no effect"
    with peftlab.disabled(model):
        assert (_out(model, inputs) - base).abs().max().item() <= 1e-6
    assert (_out(model, inputs) - base).abs().max() > 1e-3 * scale, "adapter not re-enabled after the context"


@pytest.mark.parametrize("method,family", PAIRS, ids=ids)
def test_merge_unmerge(method, family):
    model, inputs, _ = _setup(method, family)
    _perturb(model)
    y = _out(model, inputs)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    if not CASES[method].merge:
        with pytest.raises(peftlab.NotMergeableError):
            peftlab.merge(model)
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()), "failed merge changed weights"
        return
    peftlab.merge(model)
    ym = _out(model, inputs)
    assert ((ym - y).abs().max() / y.abs().max().clamp_min(1e-6)).item() <= 1e-4
    peftlab.unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, weights[k], atol=1e-5, rtol=1e-5), f"unmerge did not restore {k}"
    assert (_out(model, inputs) - y).abs().max().item() <= 1e-5
    # unload(merge=True) leaves a plain HF model with the same outputs
    peftlab.unload(model, merge=True)
    assert not any(isinstance(m, peftlab.slot.Slot) for m in model.modules())
    assert ((_out(model, inputs) - y).abs().max() / y.abs().max()).item() <= 1e-4


@pytest.mark.parametrize("method,family", PAIRS, ids=ids)
def test_save_load_roundtrip(method, family, tmp_path):
    model, inputs, _ = _setup(method, family)
    _perturb(model)
    y = _out(model, inputs)
    peftlab.save(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "peftlab_config.json").read_text())
    assert meta["method"] == CASES[method].config().method
    fresh = tiny_model(family, seed=0)
    peftlab.load(fresh, tmp_path / "ad")
    assert (_out(fresh, inputs) - y).abs().max().item() <= 1e-5


FRESH = """
import json, sys, torch, peftlab
from peftlab.testing import tiny_model, tiny_inputs, output_tensor
jobs = json.loads(sys.argv[1])
for job in jobs:
    m = tiny_model(job["family"], seed=0)
    peftlab.load(m, job["dir"])
    with torch.no_grad():
        y = output_tensor(m(**tiny_inputs(job["family"])))
    torch.save(y, job["out"])
"""


@pytest.mark.parametrize("method", sorted(CASES))
def test_save_load_in_fresh_process(method, tmp_path):
    """Save adapters for every family, reload them all in one new Python process."""
    jobs, expected = [], {}
    for m, family in PAIRS:
        if m != method:
            continue
        model, inputs, _ = _setup(method, family)
        _perturb(model)
        expected[family] = _out(model, inputs)
        d = tmp_path / family
        peftlab.save(model, d)
        jobs.append({"family": family, "dir": str(d), "out": str(tmp_path / f"{family}.pt")})
    subprocess.run([sys.executable, "-c", FRESH, json.dumps(jobs)], check=True, timeout=600)
    for job in jobs:
        y = torch.load(job["out"])
        assert (y - expected[job["family"]]).abs().max().item() <= 1e-5, job["family"]


# ---------------------------------------------------------------- real backbones (slow)
REAL = [m for m, c in CASES.items() if c.real]


def _real_check(model, inputs, method):
    model = copy.deepcopy(model)
    with torch.no_grad():
        base = output_tensor(model(**inputs)).clone()
    peftlab.attach(model, CASES[method].config())
    y0 = _out(model, inputs)
    tol = CASES[method].zero_start_tol
    if tol is not None:
        assert (y0 - base).abs().max().item() <= max(tol, 1e-5 * base.abs().max().item())
    model.train()
    loss_of(model, inputs).backward()
    trainable = peftlab.trainable_parameters(model)
    assert {n for n, p in model.named_parameters() if p.grad is not None} <= set(trainable)
    model.eval()
    _perturb(model, scale=0.02)
    y = _out(model, inputs)
    with peftlab.disabled(model):
        assert (_out(model, inputs) - base).abs().max().item() <= 1e-5
    if CASES[method].merge:
        peftlab.merge(model)
        assert ((_out(model, inputs) - y).abs().max() / y.abs().max()).item() <= 1e-4
        peftlab.unmerge(model)
    return model, y


@pytest.mark.slow
@pytest.mark.parametrize("method", REAL)
def test_real_minilm(method, minilm, tmp_path):
    tok_ids = torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": tok_ids, "attention_mask": torch.ones_like(tok_ids)}
    model, y = _real_check(minilm, inputs, method)
    peftlab.save(model, tmp_path / "a")
    fresh = copy.deepcopy(minilm)
    peftlab.load(fresh, tmp_path / "a")
    assert (_out(fresh, inputs) - y).abs().max().item() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("method", REAL)
def test_real_smollm(method, smollm, tmp_path):
    tok_ids = torch.randint(100, 40000, (1, 12), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": tok_ids, "attention_mask": torch.ones_like(tok_ids)}
    model, y = _real_check(smollm, inputs, method)
    peftlab.save(model, tmp_path / "a")
    fresh = copy.deepcopy(smollm)
    peftlab.load(fresh, tmp_path / "a")
    assert (_out(fresh, inputs) - y).abs().max().item() <= 1e-4
