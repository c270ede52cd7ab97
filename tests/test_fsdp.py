"""``train.fsdp``: 2 CPU processes (gloo) shard a tiny LLaMA with FSDP2 and train it as one process does.

accelerate does not do FSDP on CPU (its distributed type stays MULTI_CPU whatever the launch asks), so on
this machine peftlab shards with torch's ``fully_shard`` (peftlab/train/sharding.py); these tests launch
``peftlab train`` with ``accelerate launch`` as a user would, and compare with a one-process run of the same
global batch: the loss at every step, the final trainable weights and optimizer state, and the outputs of
the saved adapter loaded in one process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from local_model import save_tiny_llama
from safetensors.torch import load_file
from test_distributed import LAUNCH_TRAIN_2PROC

pytest.importorskip("accelerate")

CFG = {
    "method": "lora", "method_args": {"r": 4, "targets": ["q_proj", "v_proj"]},
    "task": {"name": "demo", "train_limit": 64, "eval_limit": 16},
    "train": {"max_steps": 6, "batch_size": 8, "lr": 0.01, "max_length": 24, "eval_every": 1, "seed": 3,
              "warmup_steps": 0, "progress": False},
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def conf(llama: str, out, world: int, method: str = "lora", **model_args) -> dict:
    """The run on ``world`` processes: the same global batch (8), sharded when ``world`` > 1."""
    train = {**CFG["train"], "batch_size": 8 // world, "fsdp": world > 1}
    if method == "full":  # full fine-tuning: every weight trained, saved as a transformers model
        return {**CFG, "method": "full", "method_args": {}, "model": llama, "output_dir": str(out),
                "train": {**train, "lr": 1e-3}, "model_args": model_args}
    return {**CFG, "model": llama, "output_dir": str(out), "train": train, "model_args": model_args}


# the documented accelerate FSDP config: on this CPU it asks peftlab for sharding without train.fsdp
LAUNCH_FSDP_CONFIG = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                      str(Path(__file__).parents[1] / "examples" / "accelerate_fsdp.yaml"), "-m", "peftlab", "train"]


def launch_two(tmp_path, cfg: dict, *extra: str, launch=LAUNCH_TRAIN_2PROC) -> str:
    path = tmp_path / "two.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    r = subprocess.run([*launch, str(path), *extra], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return (tmp_path / "two" / "train.log").read_text()


def losses(run) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(one, two) -> None:
    """Same loss curve, same final trainable weights and Adam moments (checkpoint), same world-free files."""
    assert json.loads((two / "results.json").read_text())["world_size"] == 2
    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == CFG["train"]["max_steps"]
    assert l1 != pytest.approx([l1[0]] * len(l1))  # the loss moves: the comparison is not of a constant
    assert l2 == pytest.approx(l1, abs=1e-5)
    a, b = (load_file(str(r / "checkpoint" / "state.safetensors")) for r in (one, two))
    keys = sorted(k for k in a if not k.startswith("rng."))
    assert keys == sorted(k for k in b if not k.startswith("rng."))
    assert any(k.startswith("param.") for k in keys) and any(k.startswith("opt.") for k in keys)
    for k in keys:
        assert b[k].shape == a[k].shape, k  # full tensors, not one process's shard
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


def assert_adapter_loads_in_one_process(one, two) -> None:
    from peftlab.cli.train import load_run
    from peftlab.train.data import collate, encode_classification

    outs = []
    for run in (one, two):
        model, tok, data = load_run(run, [])[:3]
        b = collate(encode_classification(tok, next(iter(data.dev.values()))[:8], 24), tok.pad_token_id)
        b.pop("labels")
        with torch.no_grad():
            outs.append(model.eval()(**b).logits)
        if json.loads((run / "config.json").read_text())["method"] != "full":
            lora_b = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
            assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # a trained adapter (B starts at zero)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_on_two_processes_trains_as_one_process(llama, tmp_path, method):
    from peftlab.train.loop import run

    log = launch_two(tmp_path, conf(llama, tmp_path / "two", 2, method))
    held = re.search(r"FSDP2 .* 4 blocks \+ root over 2 processes; this process holds (\d+) of (\d+) parameter bytes", log)
    assert held, log[-2000:]
    assert int(held[1]) <= 0.55 * int(held[2])  # sharded: each process holds about half
    run(conf(llama, tmp_path / "one", 1, method))
    assert_same_training(tmp_path / "one", tmp_path / "two")
    assert_adapter_loads_in_one_process(tmp_path / "one", tmp_path / "two")


@pytest.mark.distributed
def test_fsdp_on_an_nf4_base_shards_the_4bit_weights_too(llama, tmp_path):
    """Launched with the documented accelerate config; the packed 4-bit weights are sharded as well."""
    pytest.importorskip("bitsandbytes")
    from peftlab.train.loop import run

    cfg = conf(llama, tmp_path / "two", 2, quantize="nf4")
    del cfg["train"]["fsdp"]  # launched with examples/accelerate_fsdp.yaml, which asks for sharding itself
    log = launch_two(tmp_path, cfg, launch=LAUNCH_FSDP_CONFIG)
    held = re.search(r"this process holds (\d+) of (\d+) parameter bytes", log)
    assert held and int(held[1]) <= 0.55 * int(held[2]), log[-2000:]
    run(conf(llama, tmp_path / "one", 1, quantize="nf4"))
    assert_same_training(tmp_path / "one", tmp_path / "two")
    assert_adapter_loads_in_one_process(tmp_path / "one", tmp_path / "two")


@pytest.mark.distributed
def test_a_one_process_checkpoint_resumes_sharded(llama, tmp_path):
    """Checkpoints hold full tensors: one written by one process resumes under FSDP (weights and Adam state
    loaded into each process's shard) and continues exactly as the one-process resume does."""
    from peftlab.train.loop import run

    run(conf(llama, tmp_path / "first", 1))
    for world, name in ((1, "one"), (2, "two")):  # both resume the same checkpoint, rewound to step 3
        d = tmp_path / name
        subprocess.run(["cp", "-r", str(tmp_path / "first"), str(d)], check=True)
        st = json.loads((d / "checkpoint" / "state.json").read_text())
        st["loop"].update(step=3, history=st["loop"]["history"][:3])
        (d / "checkpoint" / "state.json").write_text(json.dumps(st))
        saved = json.loads((d / "config.json").read_text())  # --resume checks the run's config
        saved["output_dir"] = str(d)
        saved["train"]["batch_size"] = 8 // world  # train.fsdp may change on resume (layout only)
        (d / "config.json").write_text(json.dumps(saved))
    run(conf(llama, tmp_path / "one", 1), resume=True)
    launch_two(tmp_path, conf(llama, tmp_path / "two", 2), "--resume")
    first = losses(tmp_path / "first")
    assert losses(tmp_path / "one")[:3] == first[:3] and losses(tmp_path / "one")[3:] != first[3:]
    assert_same_training(tmp_path / "one", tmp_path / "two")
