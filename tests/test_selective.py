"""The selective family: LN tuning (peft parity both ways), FishMask (Fisher mask, only masked entries
train, sparse file), diff pruning (hard-concrete L0, projection to the target, sparse file and export)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_peft_interop import _randomize

import peftlab
from peftlab.core import part_adapters
from peftlab.testing import loss_of, output_tensor, tiny_inputs, tiny_model
from peftlab.tuners.sparsity.export import apply_sparse_delta, save_sparse_delta


def out(model, inputs):
    with torch.no_grad():
        return output_tensor(model(**inputs))


def _loss(m, b):
    return loss_of(m, b)


# ---------------------------------------------------------------- LN tuning vs peft
NORMS = {"bert": ["LayerNorm"], "gpt2": ["ln_1", "ln_2", "ln_f"], "llama": ["input_layernorm", "post_attention_layernorm", "norm"]}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_ln_tuning_peft_parity_both_ways(family, tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_model(family)
    x = tiny_inputs(family)
    task = "SEQ_CLS" if family == "bert" else "CAUSAL_LM"
    # peft -> ours: peft's trained norms, saved by peft, imported by us
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LNTuningConfig(target_modules=NORMS[family], task_type=task))
    _randomize(theirs, seed=2)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = peftlab.import_peft(copy.deepcopy(base), tmp_path / "theirs")
    assert peftlab.get_adapter_config(ours).method == "ln_tuning"
    assert (out(ours, x) - out(theirs, x)).abs().max().item() <= 1e-5
    # ours -> peft: same weights, same outputs, and peft loads our export
    ours2 = peftlab.attach(copy.deepcopy(base), peftlab.get_config("ln_tuning", targets=NORMS[family]))
    _randomize(ours2, seed=3)
    peftlab.export_peft(ours2, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert (out(loaded, x) - out(ours2, x)).abs().max().item() <= 1e-5
    assert (out(loaded, x) - out(base, x)).abs().max().item() > 1e-3  # the norms really changed
    # the same number of trainable parameters as peft (heads aside)
    n_peft = sum(p.numel() for n, p in theirs.named_parameters() if p.requires_grad and "ln_tuning" in n)
    assert peftlab.report(ours2).adapters[0].params == n_peft


def test_ln_tuning_default_trains_only_norms():
    m = peftlab.attach(tiny_model("llama"), peftlab.get_config("ln_tuning"))
    names = [n for n in peftlab.trainable_parameters(m) if "ln_tuning_layer" in n]
    n_norms = sum(1 for mod in tiny_model("llama").modules() if type(mod).__name__.endswith("RMSNorm"))
    assert len(names) == n_norms  # one γ per RMSNorm (2 per block + the final norm)


# ---------------------------------------------------------------- FishMask
def _batches(family, n=3):
    return [tiny_inputs(family, batch=2, seed=s) for s in range(n)]


def test_fishmask_mask_is_global_top_k_of_per_example_fisher():
    model = tiny_model("bert")
    cfg = peftlab.get_config("fishmask", keep_fraction=0.02, targets=["query", "value"], num_samples=4)
    ref = copy.deepcopy(model)
    peftlab.attach(model, cfg)
    peftlab.before_training(model, _batches("bert"), _loss)
    # reference: per-example squared gradients of the plain model's weights, averaged over 4 examples
    names = [n for n, _ in part_adapters(model, "default")]
    weights = [ref.get_submodule(n).weight for n in names]
    fisher = [torch.zeros_like(w) for w in weights]
    ref.eval()
    seen = 0
    for b in _batches("bert"):
        for i in range(2):
            if seen < 4:
                g = torch.autograd.grad(loss_of(ref, {k: v[i:i + 1] for k, v in b.items()}), weights)
                for f, gi in zip(fisher, g):
                    f.add_(gi.square())
                seen += 1
    flat = torch.cat([f.flatten() for f in fisher])
    k = math.ceil(0.02 * flat.numel())
    assert peftlab.report(model).adapters[0].entries == k
    chosen = torch.cat([a.indices + off for (_, a), off in
                        zip(part_adapters(model, "default"), torch.tensor([0, *[w.numel() for w in weights]]).cumsum(0))])
    thresh = torch.topk(flat, k).values[-1]
    assert (flat[chosen] >= thresh * (1 - 1e-5)).all()  # every chosen entry is among the k largest
    assert all(bool(a.ready) for _, a in part_adapters(model, "default"))


def test_fishmask_only_masked_entries_train_and_file_is_sparse(tmp_path):
    model = tiny_model("gpt2", hidden=64)
    x = tiny_inputs("gpt2")
    base_w = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    peftlab.attach(model, peftlab.get_config("fishmask", keep_fraction=0.005, num_samples=4))
    peftlab.before_training(model, _batches("gpt2"), _loss)
    opt = torch.optim.AdamW(peftlab.param_groups(model, lr=1e-2))
    model.train()
    for step in range(3):
        loss_of(model, x).backward()
        peftlab.before_optimizer_step(model, step, 3)
        opt.step()
        opt.zero_grad()
    model.eval()
    y = out(model, x)
    peftlab.merge(model)
    changed = total = 0
    for n, m in model.named_modules():
        if n in base_w:
            d = (m.weight - base_w[n]) != 0
            changed += int(d.sum())
            total += d.numel()
    n_entries = peftlab.report(model).adapters[0].entries
    assert 0 < changed <= n_entries == math.ceil(0.005 * total)
    peftlab.unmerge(model)
    peftlab.save(model, tmp_path / "a")
    size = (tmp_path / "a" / "adapter.safetensors").stat().st_size
    assert size < 0.05 * 4 * total  # int32 index + fp32 value per entry, not a dense file
    fresh = tiny_model("gpt2", hidden=64)
    peftlab.load(fresh, tmp_path / "a")
    assert torch.equal(out(fresh, x), y)


def test_fishmask_refuses_to_train_without_a_mask():
    model = peftlab.attach(tiny_model("bert"), peftlab.get_config("fishmask"))
    with pytest.raises(peftlab.PeftlabError, match="before_training"):
        peftlab.before_optimizer_step(model, 0, 10)


def test_fishmask_corrupt_indices_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = peftlab.attach(tiny_model("bert"), peftlab.get_config("fishmask", keep_fraction=0.01))
    peftlab.save(model, tmp_path / "a")
    f = tmp_path / "a" / "adapter.safetensors"
    t = load_file(str(f))
    key = next(k for k in t if k.endswith("::indices"))
    t[key] = t[key].flip(0).contiguous()
    save_file(t, str(f))
    import json

    meta = json.loads((tmp_path / "a" / "peftlab_config.json").read_text())
    meta["sha256"] = peftlab.state._sha256(f)
    (tmp_path / "a" / "peftlab_config.json").write_text(json.dumps(meta))
    fresh = tiny_model("bert")
    with pytest.raises(peftlab.IncompatibleAdapterError, match="strictly increasing"):
        peftlab.load(fresh, tmp_path / "a")
    assert not peftlab.core.has_adapters(fresh)


# ---------------------------------------------------------------- diff pruning
def test_diff_pruning_l0_penalty_and_gate():
    model = peftlab.attach(tiny_model("bert"), peftlab.get_config("diff_pruning", l0_weight=1e-3))
    layers = [a for _, a in part_adapters(model, "default")]
    n = sum(a.log_alpha.numel() for a in layers)
    expected = 1e-3 * n * torch.sigmoid(torch.tensor(5.0 - (2 / 3) * math.log(0.1 / 1.1)))
    assert torch.allclose(peftlab.training_loss(model), expected, rtol=1e-5)
    a = layers[0]
    with torch.no_grad():
        a.log_alpha.fill_(0.0)
    a.train()
    z = a.gate()
    assert ((z >= 0) & (z <= 1)).all() and (z == 0).any() and (z == 1).any()  # hard-concrete: exact 0s and 1s
    a.eval()
    assert torch.allclose(a.gate(), torch.full_like(z, 0.5 * 1.2 - 0.1))


def test_diff_pruning_projection_keeps_global_top_k_then_only_those_train(tmp_path):
    model = tiny_model("llama", hidden=64)
    x = tiny_inputs("llama")
    peftlab.attach(model, peftlab.get_config("diff_pruning", keep_fraction=0.005, finetune_fraction=0.5))
    opt = torch.optim.AdamW(peftlab.param_groups(model, lr=1e-2))
    total = 6
    model.train()
    for step in range(total):
        assert peftlab.checkpoint_eligible(model, step, total) == (step >= 3)
        loss = loss_of(model, x) + peftlab.training_loss(model) if step < 3 else loss_of(model, x)
        if step >= 3:
            assert peftlab.training_loss(model) is None
        loss.backward()
        if step == 3:  # after the projection: no gradient outside the kept entries
            for _, a in part_adapters(model, "default"):
                outside = torch.ones(a.diff_w.numel(), dtype=torch.bool)
                outside[a.kept()] = False
                assert (a.diff_w.grad.flatten()[outside] == 0).all()
        opt.step()
        opt.zero_grad()
        if step + 1 == 3:
            before = {n: a.eval_delta().abs().flatten() for n, a in part_adapters(model, "default")}
        peftlab.on_train_step(model, step + 1, total)
        if step + 1 == 3:
            allv = torch.cat(list(before.values()))
            k = math.ceil(0.005 * allv.numel())
            kept = torch.cat([before[n][a.kept()] for n, a in part_adapters(model, "default")])
            assert kept.numel() == k == peftlab.report(model).adapters[0].entries
            assert kept.min() >= torch.topk(allv, k).values[-1]
    model.eval()
    y = out(model, x)
    peftlab.save(model, tmp_path / "a")
    dense = sum(a.diff_w.numel() for _, a in part_adapters(model, "default")) * 4
    assert (tmp_path / "a" / "adapter.safetensors").stat().st_size < 0.05 * dense
    fresh = tiny_model("llama", hidden=64)
    peftlab.load(fresh, tmp_path / "a")
    assert torch.equal(out(fresh, x), y)
    # the sparse export: δ as bitmask + values, applied to a plain model gives the same outputs
    save_sparse_delta(model, tmp_path / "delta.safetensors")
    plain = apply_sparse_delta(tiny_model("llama", hidden=64), tmp_path / "delta.safetensors")
    assert (out(plain, x) - y).abs().max().item() <= 1e-5
    assert (tmp_path / "delta.safetensors").stat().st_size < 0.1 * dense


def test_peftlab_train_computes_the_fisher_mask(tmp_path):
    from peftlab.train import run

    res = run({"model": "minilm", "method": "fishmask", "method_args": {"keep_fraction": 0.001, "num_samples": 8},
               "task": {"name": "demo", "train_limit": 32, "eval_limit": 16},
               "train": {"max_steps": 2, "batch_size": 8, "max_length": 24, "progress": False},
               "output_dir": str(tmp_path / "run")})
    assert res["steps"] == 2
    meta = peftlab.state.read_meta(tmp_path / "run" / "best")
    t = peftlab.state.read_tensors(tmp_path / "run" / "best", meta)
    assert all(bool(v) for k, v in t.items() if k.endswith("::ready"))

