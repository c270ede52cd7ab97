"""UniPELT (Mao et al., ACL 2022): LoRA, prefix tuning and a sequential adapter in every layer, each
behind its own learned gate, as one adapter built on :mod:`peftlab.compose` (Eq. in §3 of the paper):

    LoRA (q, v):     h = W₀x + G_L · (α/r) B A x,         G_L = σ(W_GL x)
    prefix (attn):   P'_K = G_P P_K,  P'_V = G_P P_V,      G_P = σ(W_GP x̄)
    adapter (FFN):   h_A = h_F + G_A · a(h_F),             G_A = σ(W_GA h_F)

The gates are the submodule configs' ``gate=True`` option (:class:`peftlab.slot.Gate`, one linear map to
a scalar and a sigmoid), trained with the rest; they live in each part's slot adapters, so the compose
core stays generic. Defaults are the paper's §4.1 settings: LoRA r = 8, α = 16 on q and v; prefix length
10 (MLP reparameterisation, 512 hidden); adapter bottleneck 48 after the FFN (Pfeiffer placement).
Departures: the prefix gate reads the attention input averaged over positions (one scalar per sequence,
see :mod:`peftlab.tuners.prefix`); prefixes do not shift positions; the adapter starts at zero.
Parts: ``name.lora``, ``name.prefix``, ``name.adapter``; ``layers`` restricts all three.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..compose import UnionConfig
from ..config import POSITIVE, SIZE, MethodConfig
from ..registry import get_config, register


@register
@dataclass
class UniPELTConfig(UnionConfig):
    """Gated LoRA + gated prefix + gated sequential adapter (Mao et al. 2022)."""

    method = "unipelt"
    accepts = ("linear", "module")
    limits = MethodConfig.limits | {"r": SIZE, "alpha": POSITIVE, "prefix_length": SIZE, "prefix_hidden": SIZE,
                                    "bottleneck": SIZE}

    r: int = 8
    alpha: float = 16.0
    lora_targets: list[str] | None = None  # None: q and v
    prefix_length: int = 10
    prefix_hidden: int = 512
    bottleneck: int = 48
    gates: bool = True  # False: the ungated union (an ablation)

    def parts(self) -> list[MethodConfig]:
        return [get_config("lora", r=self.r, alpha=self.alpha, targets=self.lora_targets, layers=self.layers,
                           gate=self.gates),
                get_config("prefix", num_virtual_tokens=self.prefix_length, encoder_hidden=self.prefix_hidden,
                           layers=self.layers, gate=self.gates),
                get_config("adapter", placement="pfeiffer", bottleneck=self.bottleneck, layers=self.layers,
                           gate=self.gates)]
