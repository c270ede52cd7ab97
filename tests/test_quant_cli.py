"""`model_args.quantize` in a run and `peftlab plan` on the command line (tiny local BERT)."""

from __future__ import annotations

import json

import pytest
from local_model import save_tiny_bert
from test_reliability import assert_one_line_error, cli, conf, write_yaml

import peftlab
from peftlab import quant

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def test_a_run_on_an_nf4_base_trains_saves_and_predicts(tiny, tmp_path, capsys):
    c = conf(tiny, tmp_path)
    c["model_args"] = {"quantize": "nf4"}
    path = write_yaml(tmp_path, c)
    rc, out, err = cli(capsys, "train", path)
    assert rc == 0, err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["steps"] == 2
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "best" / "adapter.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not any("base" in n.split("::")[0].split(".")[-1] for n in names)
    from peftlab.cli.train import load_run

    model, *_ = load_run(tmp_path / "run", [])
    assert any(quant.is_quantized(m) for m in model.modules())  # eval/predict rebuild the quantized base
    rc, out, err = cli(capsys, "predict", str(tmp_path / "run"), "a good film")
    assert rc == 0, err


@pytest.mark.parametrize("bad,named", [({"quantize": "nf3"}, "model_args.quantize"),
                                       ({"quantize": 4}, "model_args.quantize")])
def test_bad_quantize_values_are_one_line_errors(tiny, tmp_path, capsys, bad, named):
    c = conf(tiny, tmp_path)
    c["model_args"] = bad
    rc, _, err = cli(capsys, "train", write_yaml(tmp_path, c))
    assert_one_line_error(rc, err, named)


def test_full_fine_tuning_of_a_quantized_base_is_refused(tiny, tmp_path, capsys):
    c = conf(tiny, tmp_path)
    c.update(method="full", method_args={}, model_args={"quantize": "int8"})
    rc, _, err = cli(capsys, "train", write_yaml(tmp_path, c))
    assert_one_line_error(rc, err, "model_args.quantize")


def test_plan_prints_the_split_and_the_largest_batch(tiny, tmp_path, capsys):
    path = write_yaml(tmp_path, conf(tiny, tmp_path))
    rc, out, err = cli(capsys, "plan", path, "--budget", "64MiB", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["trainable_params"] > 0 and d["optimizer_state"] == 8 * d["trainable_params"]
    assert d["peak_bytes"] > d["weight_bytes"] > 0
    assert d["max_batch"] >= d["batch_size"]
    rc, out, err = cli(capsys, "plan", path, "--budget", "1GiB")
    assert rc == 0 and "predicted peak" in out and "largest batch" in out
    assert not (tmp_path / "run").exists()  # planning trains nothing and writes nothing


def test_plan_of_a_quantized_run_counts_packed_weights(tiny, tmp_path, capsys):
    c = conf(tiny, tmp_path)
    fp = json.loads(cli(capsys, "plan", write_yaml(tmp_path, c), "--json")[1])
    c["model_args"] = {"quantize": "nf4"}
    q = json.loads(cli(capsys, "plan", write_yaml(tmp_path, c, "q.yaml"), "--json")[1])
    assert "nf4" in q["weights"] and q["weight_bytes"] < fp["weight_bytes"]


@pytest.mark.parametrize("argv,named", [(["--budget", "lots"], "lots"), (["--batch", "0"], "batch_size")])
def test_bad_plan_arguments_are_one_line_errors(tiny, tmp_path, capsys, argv, named):
    rc, _, err = cli(capsys, "plan", write_yaml(tmp_path, conf(tiny, tmp_path)), *argv)
    assert_one_line_error(rc, err, named)


def test_peftlab_exports_plan_and_quantize():
    assert callable(peftlab.plan) and peftlab.quantize is quant.quantize


def test_peftlab_train_builds_lora_plus_groups(tiny, tmp_path, capsys, monkeypatch):
    """`peftlab train` takes its optimizer groups from peftlab.param_groups: LoRA+ B matrices at λ·lr."""
    import torch

    seen = []
    real = torch.optim.AdamW

    def spy(groups, **kw):
        seen.append([(g["lr"], g["weight_decay"], len(g["params"])) for g in groups])
        return real(groups, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    c = conf(tiny, tmp_path)
    c.update(method="lora_plus", method_args={"r": 2, "targets": ["query", "value"], "lr_ratio": 8.0})
    c["train"]["weight_decay"] = 0.01
    rc, _, err = cli(capsys, "train", write_yaml(tmp_path, c))
    assert rc == 0, err
    lrs = {lr for lr, _, _ in seen[0]}
    assert lrs == {1e-3, 8e-3}
    n_layers = 4 * 2  # 4 blocks x (query, value)
    assert sum(n for lr, _, n in seen[0] if lr == 8e-3) >= n_layers  # every lora_B (and 1-D head params)
