"""MAM adapter ("mix-and-match", He et al. ICLR 2022, §4.4 / Table 4): prefix tuning on the attention
plus a scaled parallel adapter on the FFN, as one adapter built on :mod:`peftlab.compose`
(adapter-transformers' ``MAMConfig`` = ``ConfigUnion(PrefixTuningConfig, ParBnConfig)``).

    attention:  head_i = Attn(x W_q, [P_K; C W_k], [P_V; C W_v])        (prefix, l = ``prefix_length``)
    FFN:        h ← FFN(x) + s · W_up ReLU(W_down x)                      (parallel adapter, scale s)

Defaults from the paper / adapters' MAMConfig: prefix length 30 with the MLP reparameterisation
(adapters' ``bottleneck_size=800`` hidden units), parallel adapter with reduction factor 2 (r = 512 at
d = 1024, the paper's setting) and s = 4. Departures: prefixes are prepended per layer without shifting
positions (see :mod:`peftlab.tuners.prefix`), and the adapter starts at zero (zero W_up) as ours do.
Parts: ``name.prefix`` and ``name.parallel_adapter``; ``layers`` restricts both.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..compose import UnionConfig
from ..config import POSITIVE, SIZE, MethodConfig
from ..registry import get_config, register


@register
@dataclass
class MAMConfig(UnionConfig):
    """Prefix tuning (attention) + scaled parallel adapter (FFN), He et al. 2022."""

    method = "mam"
    accepts = ("module",)
    limits = MethodConfig.limits | {"prefix_length": SIZE, "prefix_hidden": SIZE, "bottleneck": SIZE,
                                    "reduction_factor": POSITIVE, "scaling": POSITIVE}

    prefix_length: int = 30
    prefix_hidden: int = 800
    reparameterize: bool = True
    bottleneck: int | None = None
    reduction_factor: float = 2.0
    scaling: float = 4.0

    def parts(self) -> list[MethodConfig]:
        return [get_config("prefix", num_virtual_tokens=self.prefix_length, encoder_hidden=self.prefix_hidden,
                           reparameterize=self.reparameterize, layers=self.layers),
                get_config("parallel_adapter", bottleneck=self.bottleneck, reduction_factor=self.reduction_factor,
                           scaling=self.scaling, layers=self.layers)]
