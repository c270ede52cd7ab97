"""Training hooks: before_optimizer_step (gradients present) from a plain loop and from a real HF Trainer,
training_loss through PeftlabTrainer, and the parts' cached expansion."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.testing import loss_of, tiny_inputs, tiny_model


@pytest.fixture
def calls(monkeypatch):
    """Record every LoRAConfig.before_optimizer_step / on_train_step call with the gradient norm seen."""
    seen = []

    def before(self, model, key, step, total_steps):
        grads = [a.lora_B.grad for _, a in peftlab.core.part_adapters(model, key)]
        seen.append(("before", key, step, total_steps, sum(float(g.abs().sum()) for g in grads if g is not None)))

    def after(self, model, key, step, total_steps):
        seen.append(("after", key, step, total_steps, None))

    monkeypatch.setattr(peftlab.LoRAConfig, "before_optimizer_step", before)
    monkeypatch.setattr(peftlab.LoRAConfig, "on_train_step", after)
    return seen


def test_plain_loop_hooks_see_gradients_and_composite_part_keys(calls):
    m = tiny_model("bert")
    peftlab.attach(m, peftlab.compose(peftlab.IA3Config(), peftlab.LoRAConfig(r=2)))
    x = tiny_inputs("bert")
    opt = torch.optim.SGD(peftlab.trainable_parameters(m).values(), lr=0.1)
    for step in range(2):
        loss_of(m, x).backward()
        peftlab.before_optimizer_step(m, step, 2)
        opt.step()
        opt.zero_grad()
        peftlab.on_train_step(m, step + 1, 2)
    assert [c[:4] for c in calls] == [("before", "default__lora", 0, 2), ("after", "default__lora", 1, 2),
                                      ("before", "default__lora", 1, 2), ("after", "default__lora", 2, 2)]
    assert all(c[4] > 0 for c in calls if c[0] == "before")


def test_parts_are_expanded_once_at_attach(monkeypatch):
    m = tiny_model("bert")
    cfg = peftlab.get_config("s4", budget=0.05)
    peftlab.attach(m, cfg)
    monkeypatch.setattr(type(cfg), "expand", lambda self, model: pytest.fail("expand called after attach"))
    loss_of(m, tiny_inputs("bert")).backward()
    peftlab.before_optimizer_step(m, 0, 1)
    peftlab.on_train_step(m, 1, 1)
    assert peftlab.checkpoint_eligible(m, 1, 1) and peftlab.training_loss(m) is None


def _dataset(n=8):
    x = tiny_inputs("bert", batch=n, seq=6, seed=3)
    labels = torch.arange(n) % 3
    return [{"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i], "labels": labels[i]}
            for i in range(n)]


def _args(tmp_path, steps):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True, max_grad_norm=1.0)


def test_hf_trainer_callback_fires_with_gradients(tmp_path, calls):
    from transformers import Trainer

    from peftlab.integrations.hf import PeftlabCallback

    m = tiny_model("bert")
    peftlab.attach(m, peftlab.LoRAConfig(r=2))
    Trainer(model=m, args=_args(tmp_path, 3), train_dataset=_dataset(), callbacks=[PeftlabCallback()]).train()
    before = [c for c in calls if c[0] == "before"]
    assert [c[2:4] for c in before] == [(0, 3), (1, 3), (2, 3)]
    assert all(c[4] > 0 for c in before), "no gradient present at before_optimizer_step"
    assert [c[2] for c in calls if c[0] == "after"] == [1, 2, 3]


def test_peftlab_trainer_adds_training_loss(tmp_path):
    from transformers import Trainer

    from peftlab.integrations.hf import PeftlabCallback, PeftlabTrainer

    m = tiny_model("bert")
    peftlab.attach(m, peftlab.get_config("qgoft", reg_lambda=1.0))
    with torch.no_grad():
        for p in peftlab.trainable_parameters(m).values():
            p.add_(0.1)  # blocks away from orthogonal: the regulariser is non-zero
    trainer = PeftlabTrainer(model=m, args=_args(tmp_path, 1), train_dataset=_dataset())
    assert any(isinstance(cb, PeftlabCallback) for cb in trainer.callback_handler.callbacks)
    batch = trainer.data_collator(_dataset()[:4])
    plain = Trainer.compute_loss(trainer, m, dict(batch))
    ours = trainer.compute_loss(m, dict(batch))
    reg = peftlab.training_loss(m)
    assert float(reg.detach()) > 0
    torch.testing.assert_close(ours, plain + reg)
    trainer.train()


def test_hf_trainer_callback_computes_the_fishmask_mask_and_trains_it(tmp_path):
    from transformers import Trainer

    from peftlab.core import part_adapters
    from peftlab.integrations.hf import PeftlabCallback

    m = tiny_model("bert")
    peftlab.attach(m, peftlab.get_config("fishmask", keep_fraction=0.02, num_samples=4))
    placeholder = torch.cat([a.indices for _, a in part_adapters(m, "default")])
    Trainer(model=m, args=_args(tmp_path, 2), train_dataset=_dataset(), callbacks=[PeftlabCallback()]).train()
    layers = [a for _, a in part_adapters(m, "default")]
    assert all(bool(a.ready) for a in layers)
    assert not torch.equal(torch.cat([a.indices for a in layers]), placeholder)  # the Fisher mask replaced it
    assert any(a.values.abs().sum() > 0 for a in layers)  # and the optimizer trained the resized values
