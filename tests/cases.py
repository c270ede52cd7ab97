"""Method cases for the shared correctness matrix. Each later method adds one entry here.

Fields: ``config`` builds a small config; ``merge``: merge/unmerge defined; ``families``: families it
supports (None = all); ``zero_start_tol``: tolerance of the step-0 identity check (None = the
method is only approximately the base model, and the check reports cosine similarity instead).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import peftlab


@dataclass
class Case:
    config: Callable[[], peftlab.MethodConfig]
    merge: bool = True
    families: tuple[str, ...] | None = None
    zero_start_tol: float | None = 1e-5
    min_cosine: float | None = 0.9  # when zero_start_tol is None: the bound (None: no start property)
    real: bool = True  # also run on the packaged MiniLM / SmolLM2


CASES: dict[str, Case] = {
    "lora": Case(lambda: peftlab.LoRAConfig(r=4, alpha=8)),
    "rslora": Case(lambda: peftlab.LoRAConfig(r=4, alpha=8, use_rslora=True, targets=["q", "k", "v", "o"]), real=False),
    "dora": Case(lambda: peftlab.DoRAConfig(r=4, alpha=8)),
    "ia3": Case(lambda: peftlab.IA3Config()),
    "bitfit": Case(lambda: peftlab.BitFitConfig()),
    "goft": Case(lambda: peftlab.get_config("goft")),
    "goft_star": Case(lambda: peftlab.get_config("goft", scale=True, targets=["q", "v", "ffn_out"]), real=False),
    "qgoft": Case(lambda: peftlab.get_config("qgoft", reg_lambda=0.01)),
    "adapter_houlsby": Case(lambda: peftlab.get_config("adapter", bottleneck=4), merge=False),
    "adapter_pfeiffer": Case(lambda: peftlab.get_config("adapter", placement="pfeiffer", reduction_factor=8,
                                                        activation="gelu"), merge=False, real=False),
    "pst": Case(lambda: peftlab.get_config("pst", r1=2, r2=2)),
    "magnitude_prune": Case(lambda: peftlab.get_config("magnitude_prune", r=2), real=False),
    "movement_prune": Case(lambda: peftlab.get_config("movement_prune"), real=False),
    "prefix": Case(lambda: peftlab.get_config("prefix", num_virtual_tokens=3, encoder_hidden=16), merge=False,
                   zero_start_tol=None, min_cosine=None, families=("bert", "roberta", "gpt2", "llama", "opt", "bart")),
    "prefix_flat": Case(lambda: peftlab.get_config("prefix", num_virtual_tokens=2, reparameterize=False, layers=[1, 2]),
                        merge=False, zero_start_tol=None, min_cosine=None, families=("bert", "llama", "bart"), real=False),
    "prompt": Case(lambda: peftlab.get_config("prompt", num_virtual_tokens=3), merge=False, zero_start_tol=None,
                   min_cosine=None, families=("bert", "roberta", "deberta-v2", "gpt2", "llama", "opt", "bart", "t5")),
    "s4": Case(lambda: peftlab.get_config("s4", budget=0.05), merge=False, zero_start_tol=None, min_cosine=None,
               families=("bert", "roberta", "gpt2", "llama", "opt", "bart")),
    "s4_lb": Case(lambda: peftlab.get_config("s4", budget=0.05, pattern="increasing",
                                             strategies=[["L"], ["B", "L"], ["B"], ["L", "B"]]), real=False),
    "prefix_past": Case(lambda: peftlab.get_config("prefix", mode="past", num_virtual_tokens=3, encoder_hidden=8),
                        merge=False, zero_start_tol=None, min_cosine=None, real=False,
                        families=("bert", "roberta", "gpt2", "llama", "opt")),
    # MEFT starts close to (not at) the base model: cosine bound, not equality (METHODS.md §2.2)
    "meft1": Case(lambda: peftlab.get_config("meft", variant=1, r=4), merge=False, zero_start_tol=None,
                  min_cosine=0.9, families=("bert", "roberta", "llama")),
    "meft2": Case(lambda: peftlab.get_config("meft", variant=2, r=4), merge=False, zero_start_tol=None,
                  min_cosine=0.9, families=("bert", "roberta", "llama"), real=False),
    "meft3": Case(lambda: peftlab.get_config("meft", variant=3, r=4, reversible_layers=2), merge=False,
                  zero_start_tol=None, min_cosine=0.9, families=("bert", "roberta", "llama"), real=False),
    "parallel_adapter": Case(lambda: peftlab.get_config("parallel_adapter", bottleneck=8), merge=False,
                             families=("bert", "roberta", "deberta-v2", "gpt2", "llama", "t5", "vit")),
    "loha": Case(lambda: peftlab.get_config("loha", r=2, alpha=4)),
    "lokr": Case(lambda: peftlab.get_config("lokr", r=2, alpha=4, targets=["q", "v", "ffn_in"])),
    "lora_fa": Case(lambda: peftlab.get_config("lora_fa", r=4, alpha=8)),
    "lora_plus": Case(lambda: peftlab.get_config("lora_plus", r=4, lr_ratio=8.0), real=False),
    "pissa": Case(lambda: peftlab.LoRAConfig(r=4, alpha=8, init="pissa", targets=["q", "v", "ffn_out"])),
    "olora": Case(lambda: peftlab.LoRAConfig(r=4, alpha=8, init="olora"), real=False),
    "vera": Case(lambda: peftlab.get_config("vera", r=4, targets=["q", "v", "ffn_out"])),
    "vera_seeded": Case(lambda: peftlab.get_config("vera", r=8, save_projection=False, projection_prng_key=5),
                        real=False),
    "dylora": Case(lambda: peftlab.get_config("dylora", r=4, alpha=8, rank=3)),
    "adalora": Case(lambda: peftlab.get_config("adalora", r=4, target_r=2, alpha=8.0, orth_reg_weight=0.1)),
    "diff_pruning": Case(lambda: peftlab.get_config("diff_pruning", keep_fraction=0.05), real=False),
    "fishmask": Case(lambda: peftlab.get_config("fishmask", keep_fraction=0.05), real=False),
    "ln_tuning": Case(lambda: peftlab.get_config("ln_tuning")),
    "mam": Case(lambda: peftlab.get_config("mam", prefix_length=3, prefix_hidden=16, bottleneck=8), merge=False,
                zero_start_tol=None, min_cosine=None, families=("bert", "roberta", "gpt2", "llama")),
    "unipelt": Case(lambda: peftlab.get_config("unipelt", r=2, prefix_length=3, prefix_hidden=8, bottleneck=8),
                    merge=False, zero_start_tol=None, min_cosine=None,
                    families=("bert", "roberta", "gpt2", "llama", "opt", "bart")),
    "compacter": Case(lambda: peftlab.get_config("compacter", reduction_factor=4), merge=False),
    "phm_adapter_pp": Case(lambda: peftlab.get_config("compacter", placement="pfeiffer", factorized=False,
                                                      reduction_factor=4), merge=False, real=False),
    "ssf": Case(lambda: peftlab.get_config("ssf")),
    "p_tuning": Case(lambda: peftlab.get_config("p_tuning", num_virtual_tokens=3, encoder_hidden=16), merge=False,
                     zero_start_tol=None, min_cosine=None,
                     families=("bert", "roberta", "deberta-v2", "gpt2", "llama", "opt", "bart", "t5")),
    "p_tuning_lstm": Case(lambda: peftlab.get_config("p_tuning", num_virtual_tokens=3, encoder="lstm", encoder_hidden=8),
                          merge=False, zero_start_tol=None, min_cosine=None, real=False,
                          families=("bert", "gpt2", "llama", "bart")),
    "oft": Case(lambda: peftlab.get_config("oft", block_size=8)),
    "oft_coft_shared": Case(lambda: peftlab.get_config("oft", r=4, coft=True, eps=0.5, block_share=True,
                                                       targets=["q", "v", "ffn_out"]), real=False),
    "boft": Case(lambda: peftlab.get_config("boft", block_size=4, n_butterfly_factor=2)),
}
