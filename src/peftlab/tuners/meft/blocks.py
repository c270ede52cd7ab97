"""MEFT building blocks: the adapter and the per-family sub-blocks F and G are made of (METHODS.md §2.3).

Sub-block functions take the *base* transformer block and call its sub-modules directly, so that an
adapter can sit inside the residual (FFN-parallel adapter: ``LN(Dropout(W_out σ(W_in u)) + a(u) + u)``)
or after the attention projection (MEFT3 attention adapter: ``z ← z + a(z)``). Modules that other
peftlab adapters wrap *inside* those sub-modules (LoRA on ``query``, prefix on the attention) still run.

- BERT family (BERT, RoBERTa, XLM-R, ELECTRA, CamemBERT; post-LN): as the reference code [C].
- LLaMA family (LLaMA, Mistral, Qwen2; pre-RMSNorm) — beyond the reference code, our choice [I]:
  attention sub-block ``x + (z + a(z))`` with ``z = attn(norm₁(x))``; FFN sub-block
  ``u + mlp(n) + a(n)`` with ``n = norm₂(u)``, i.e. the parallel adapter reads the FFN's input as
  He et al.'s parallel adapter does, which for a pre-norm block is the normalised ``n``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class MEFTAdapter(nn.Module):
    """a(x) = W₂·Dropout(act(W₁·[LN](x) + b₁)) + b₂, no internal residual; W ~ N(0, σ²), b = 0 [C]."""

    def __init__(self, d: int, r: int, act: Callable, dropout: float, layernorm: bool, init_std: float):
        super().__init__()
        self.norm = nn.LayerNorm(d) if layernorm else nn.Identity()
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)
        self.act = act
        self.dropout = nn.Dropout(dropout)
        for lin in (self.down, self.up):
            nn.init.normal_(lin.weight, std=init_std)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(self.norm(x)))))


def _bert_attn(layer: nn.Module, x: torch.Tensor, a: nn.Module | None, kw: dict) -> torch.Tensor:
    att = layer.attention
    h = att.self(x, **kw)[0]
    o = att.output
    z = o.dropout(o.dense(h))
    if a is not None:
        z = z + a(z)
    return o.LayerNorm(z + x)


def _bert_ffn(layer: nn.Module, u: torch.Tensor, a: nn.Module) -> torch.Tensor:
    o = layer.output
    z = o.dropout(o.dense(layer.intermediate(u)))
    return o.LayerNorm(z + a(u) + u)


def _llama_attn(layer: nn.Module, x: torch.Tensor, a: nn.Module | None, kw: dict) -> torch.Tensor:
    z = layer.self_attn(hidden_states=layer.input_layernorm(x), **kw)[0]
    if a is not None:
        z = z + a(z)
    return x + z


def _llama_ffn(layer: nn.Module, u: torch.Tensor, a: nn.Module) -> torch.Tensor:
    n = layer.post_attention_layernorm(u)
    return u + layer.mlp(n) + a(n)


@dataclass(frozen=True)
class BlockKind:
    """How to run one family's block as an attention sub-block followed by an FFN sub-block."""

    attn: Callable[[nn.Module, torch.Tensor, nn.Module | None, dict], torch.Tensor]
    ffn: Callable[[nn.Module, torch.Tensor, nn.Module], torch.Tensor]
    model_types: tuple[str, ...]
    needs: tuple[str, ...]  # sub-module paths the block must have
    bypassed: tuple[str, ...]  # modules whose own forward MEFT does not call (no other adapter may wrap them)


BLOCK_KINDS: dict[str, BlockKind] = {
    "bert": BlockKind(
        _bert_attn, _bert_ffn, ("bert", "roberta", "xlm-roberta", "electra", "camembert"),
        ("attention.self", "attention.output.dense", "attention.output.dropout", "attention.output.LayerNorm",
         "intermediate", "output.dense", "output.dropout", "output.LayerNorm"),
        ("attention", "attention.output", "output"),
    ),
    "llama": BlockKind(
        _llama_attn, _llama_ffn, ("llama", "mistral", "qwen2"),
        ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"),
        (),
    ),
}
