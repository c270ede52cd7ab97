"""Cases of the step benchmark: name -> how to build ours, and peft's equivalent (or None).

Each builder takes a fresh MiniLM sequence-classification model and returns the model to train.
Add a method with one entry; ``ref`` names the case whose step time the ratio column compares to
(besides peft's equivalent); an optional ``floor`` builder adds a third side stepped in the same rotation.
"""

from __future__ import annotations

import torch

import peftlab

FFN_OUT_RE = r".*layer\.\d+\.output\.dense"


def minilm_batch(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """A seeded sequence-classification batch for MiniLM (token ids, full attention mask, binary labels)."""
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 20000, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch,), generator=g)}


def _peft(model, cfg):
    import peft

    return peft.get_peft_model(model, cfg)


def lora_ours(m):
    return peftlab.attach(m, peftlab.LoRAConfig(r=8, alpha=8, targets=["query", "value"]))


def lora_peft(m):
    import peft

    return _peft(m, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))


def dora_ours(m):
    return peftlab.attach(m, peftlab.DoRAConfig(r=8, alpha=8, targets=["query", "value"]))


def dora_peft(m):
    import peft

    cfg = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"], use_dora=True, task_type="SEQ_CLS")
    return _peft(m, cfg)


def ia3_ours(m):
    return peftlab.attach(m, peftlab.IA3Config(targets=["key", "value", "ffn_out"]))


def ia3_peft(m):
    import peft

    cfg = peft.IA3Config(target_modules=rf"(.*\.(key|value))|({FFN_OUT_RE})", feedforward_modules=FFN_OUT_RE,
                         task_type="SEQ_CLS")
    return _peft(m, cfg)


def bitfit_ours(m):
    return peftlab.attach(m, peftlab.BitFitConfig())


CASES: dict[str, dict] = {
    "lora": {"ours": lora_ours, "peft": lora_peft, "ref": None},
    "dora": {"ours": dora_ours, "peft": dora_peft, "ref": "lora"},
    "ia3": {"ours": ia3_ours, "peft": ia3_peft, "ref": "lora"},
    "bitfit": {"ours": bitfit_ours, "peft": None, "ref": "lora"},
}

ALL_LINEAR = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def goft_ours(m):
    return peftlab.attach(m, peftlab.get_config("goft"))


def qgoft_ours(m):
    return peftlab.attach(m, peftlab.get_config("qgoft"))


def goft_activation_ours(m):
    return peftlab.attach(m, peftlab.get_config("goft", apply="activation"))


def boft_peft(m):
    import peft

    return _peft(m, peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=ALL_LINEAR,
                                    task_type="SEQ_CLS"))


def oft_peft(m):
    import peft

    return _peft(m, peft.OFTConfig(oft_block_size=32, r=0, target_modules=ALL_LINEAR, task_type="SEQ_CLS"))


CASES.update({
    "goft": {"ours": goft_ours, "peft": boft_peft, "ref": "lora", "peft_name": "BOFT (b=4, m=2)"},
    "qgoft": {"ours": qgoft_ours, "peft": oft_peft, "ref": "lora", "peft_name": "OFT (block 32)"},
    "goft-activation": {"ours": goft_activation_ours, "peft": None, "ref": "lora"},
})


def prefix_ours(m):
    return peftlab.attach(m, peftlab.get_config("prefix", num_virtual_tokens=20, reparameterize=False))


def prefix_peft(m):
    import peft

    return _peft(m, peft.PrefixTuningConfig(num_virtual_tokens=20, task_type="SEQ_CLS"))


def prompt_ours(m):
    return peftlab.attach(m, peftlab.get_config("prompt", num_virtual_tokens=20))


def prompt_peft(m):
    import peft

    return _peft(m, peft.PromptTuningConfig(num_virtual_tokens=20, task_type="SEQ_CLS"))


def adapter_ours(m):
    return peftlab.attach(m, peftlab.get_config("adapter", bottleneck=16))


CASES.update({
    "prefix": {"ours": prefix_ours, "peft": prefix_peft, "ref": "lora"},
    "prompt": {"ours": prompt_ours, "peft": prompt_peft, "ref": "lora"},
    "adapter": {"ours": adapter_ours, "peft": None, "ref": "lora"},
})


def head_only(m):
    """No adapter at all, only the task head trains: the floor of any adapter's step time."""
    for n, p in m.named_parameters():
        p.requires_grad_(n.startswith("classifier"))
    return m


def head_and_first_query_bias(m):
    """No adapter, but layer 0's query bias trains too, so the backward runs through the whole frozen encoder
    exactly as LoRA's does: the floor of any LoRA implementation on (q, v) of every layer."""
    for n, p in m.named_parameters():
        p.requires_grad_(n.startswith("classifier") or n.endswith("layer.0.attention.self.query.bias"))
    return m


def full_finetuning(m):
    """Every weight trains: the floor of GOFT's weight path, which needs the full gradient of W Rᵀ."""
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def meft1_ours(m):
    return peftlab.attach(m, peftlab.get_config("meft", variant=1))


CASES.update({
    # "floor" vs peft's LoRA: the step-time ratio no LoRA implementation can beat (frozen base + head)
    "floor": {"ours": head_only, "peft": lora_peft, "ref": "lora", "peft_name": "LoRA"},
    "meft1": {"ours": meft1_ours, "peft": None, "ref": "lora"},
    "full": {"ours": full_finetuning, "peft": None, "ref": "lora"},
})
# LoRA's third side: the same backward through the frozen encoder with no LoRA arithmetic at all, stepped
# alternately with ours and peft's, so each library's own LoRA cost is (its step - this floor)
CASES["lora"]["floor"] = head_and_first_query_bias


# ---- issue 18: the survey's reparameterised family (ours vs peft side by side where peft has the method)
QV = ["query", "value"]


def _ours(method, **kw):
    return lambda m: peftlab.attach(m, peftlab.get_config(method, **{"targets": QV, **kw}))


def _theirs(cls_name, **kw):
    def build(m):
        import peft

        return _peft(m, getattr(peft, cls_name)(**{"target_modules": QV, "task_type": "SEQ_CLS", **kw}))

    return build


CASES.update({
    "loha": {"ours": _ours("loha", r=8, alpha=8), "peft": _theirs("LoHaConfig", r=8, alpha=8), "ref": "lora"},
    "lokr": {"ours": _ours("lokr", r=8, alpha=8), "peft": _theirs("LoKrConfig", r=8, alpha=8), "ref": "lora"},
    "lora_fa": {"ours": _ours("lora_fa", r=8, alpha=8), "peft": None, "ref": "lora"},
    "pissa": {"ours": _ours("lora", r=8, alpha=8, init="pissa"),
              "peft": _theirs("LoraConfig", r=8, lora_alpha=8, init_lora_weights="pissa"), "ref": "lora"},
    "vera": {"ours": _ours("vera", r=256), "peft": _theirs("VeraConfig", r=256), "ref": "lora"},
    "dylora": {"ours": _ours("dylora", r=8, alpha=8), "peft": None, "ref": "lora"},
    "adalora": {"ours": _ours("adalora", r=12, target_r=8, total_steps=1000),
                "peft": _theirs("AdaLoraConfig", init_r=12, target_r=8, lora_alpha=8.0, total_step=1000),
                "ref": "lora"},
})

# ---- issue 19: the selective family (peft has LN tuning; FishMask / diff pruning against our LoRA).
# FishMask steps with its placeholder mask (same number of entries as the Fisher mask: same cost).

def _ln_theirs(m):
    import peft

    return _peft(m, peft.LNTuningConfig(target_modules=["LayerNorm"], task_type="SEQ_CLS"))


CASES.update({
    "ln_tuning": {"ours": lambda m: peftlab.attach(m, peftlab.get_config("ln_tuning", targets=["LayerNorm"])),
                  "peft": _ln_theirs, "ref": "lora"},
    "fishmask": {"ours": lambda m: peftlab.attach(m, peftlab.get_config("fishmask", keep_fraction=0.005)),
                 "peft": None, "ref": "lora"},
    "diff_pruning": {"ours": lambda m: peftlab.attach(m, peftlab.get_config("diff_pruning")), "peft": None, "ref": "lora"},
})

# ---- issue 19: hybrids on the composition mechanism and the survey's additive extras
def _p_tuning_peft(encoder):
    def build(m):
        import peft

        return _peft(m, peft.PromptEncoderConfig(num_virtual_tokens=20, encoder_reparameterization_type=encoder,
                                                 encoder_hidden_size=m.config.hidden_size, task_type="SEQ_CLS"))

    return build


def _plain(method, **kw):
    return lambda m: peftlab.attach(m, peftlab.get_config(method, **kw))


CASES.update({
    "p_tuning": {"ours": _plain("p_tuning", num_virtual_tokens=20), "peft": _p_tuning_peft("MLP"), "ref": "lora"},
    "p_tuning_lstm": {"ours": _plain("p_tuning", num_virtual_tokens=20, encoder="lstm"),
                      "peft": _p_tuning_peft("LSTM"), "ref": "lora"},
    "mam": {"ours": _plain("mam"), "peft": None, "ref": "lora"},
    "unipelt": {"ours": _plain("unipelt"), "peft": None, "ref": "lora"},
    "compacter": {"ours": _plain("compacter", placement="pfeiffer"), "peft": None, "ref": "lora"},
    "ssf": {"ours": _plain("ssf"), "peft": None, "ref": "lora"},
})

# ---- issue 19: the orthogonal family beside peft's OFT / BOFT (all linear layers, as the GOFT rows)
def oft_ours(m):
    return peftlab.attach(m, peftlab.get_config("oft", block_size=32, targets=ALL_LINEAR))


def boft_ours(m):
    return peftlab.attach(m, peftlab.get_config("boft", block_size=4, n_butterfly_factor=2, targets=ALL_LINEAR))


def boft_m1_ours(m):
    return peftlab.attach(m, peftlab.get_config("boft", block_size=4, n_butterfly_factor=1, targets=ALL_LINEAR))


def _torch_block_diag(t):
    return torch.stack([torch.block_diag(*t[i]) for i in range(t.shape[0])])


def boft_peft_butterfly(m):
    """peft's own m = 2 BOFT on CPU: its CUDA block-diagonal extension replaced by torch.block_diag (the stand-in
    of tests/test_orthogonal.py), so peft does the same butterfly work as ours. The extension check is patched
    only while the layers are built; the stand-in stays for their forward (layers built without it never use it)."""
    import peft.tuners.boft.layer as layer

    layer.FastBlockDiag = type("FastBlockDiag", (), {"apply": staticmethod(_torch_block_diag)})
    check = layer.get_fbd_cuda
    layer.get_fbd_cuda = lambda: True
    try:
        return boft_peft(m)
    finally:
        layer.get_fbd_cuda = check


CASES.update({
    "oft": {"ours": oft_ours, "peft": oft_peft, "ref": "lora", "peft_name": "OFT (block 32)"},
    "boft_butterfly": {"ours": boft_ours, "peft": boft_peft_butterfly, "ref": "lora",
                       "peft_name": "BOFT (b=4, m=2, torch stand-in for its CUDA extension)"},
    # peft without its CUDA extension (CPU) silently runs m = 1 for this m = 2 config: the trainable counts show it
    "boft": {"ours": boft_ours, "peft": boft_peft, "ref": "lora", "peft_name": "BOFT (b=4, m=2 asked)"},
    "boft_m1": {"ours": boft_m1_ours, "peft": boft_peft, "ref": "lora", "peft_name": "BOFT (b=4, m=2 asked)"},
})
