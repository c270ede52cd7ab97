"""P-tuning (Liu et al. 2021, "GPT understands, too"): a soft prompt produced by a prompt encoder,

    P = f(E),  E ∈ R^{p×d} learned virtual-token embeddings,   X' = [P; E(x)]                (§3.2)
    f = MLP:   Linear(d, h) → ReLU → Linear(h, h) → ReLU → Linear(h, d)
    f = LSTM:  a bidirectional LSTM (``encoder_layers`` layers, hidden h) → Linear(2h, 2h) → ReLU → Linear(2h, d)

prepended at the input stack exactly like prompt tuning (:mod:`peftlab.tuners.prompt`, whose adapter
this one extends: masks, token types, output stripping and generation are shared). The encoder's
layout and defaults follow Hugging Face peft's ``p_tuning`` (h = d when ``encoder_hidden`` is None;
E ~ N(0, 1); dropout between LSTM layers), so peft's weights load unchanged and give the same outputs.
``reparameterize=False`` stores P itself (peft's inference mode; what an import from peft's format
gives, since peft saves only the encoder's output P as ``prompt_embeddings``).
The LSTM runs as an unrolled recurrence over the p virtual tokens on parameters named as nn.LSTM's
(:class:`LSTMWeights`), so the forward captures in one graph under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..config import FRACTION, SIZE, MethodConfig
from ..errors import ConfigError
from ..registry import register
from .prompt import InputPromptConfig, SoftPrompt

ENCODERS = ("mlp", "lstm")


class LSTMWeights(nn.Module):
    """The parameters of a bidirectional nn.LSTM under nn.LSTM's names and init (U(−1/√h, 1/√h)), so its
    state dict is interchangeable with one; a plain module because dynamo refuses to trace nn.LSTM."""

    def __init__(self, d: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.hidden_size, self.num_layers, self.dropout = hidden, layers, dropout
        bound = hidden ** -0.5
        for layer in range(layers):
            d_in = d if layer == 0 else 2 * hidden
            for suffix in ("", "_reverse"):
                for name, shape in (("weight_ih", (4 * hidden, d_in)), ("weight_hh", (4 * hidden, hidden)),
                                    ("bias_ih", (4 * hidden,)), ("bias_hh", (4 * hidden,))):
                    self.register_parameter(f"{name}_l{layer}{suffix}",
                                            nn.Parameter(torch.empty(shape).uniform_(-bound, bound)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs (p, 2h) on one sequence x (p, d), unrolled over the p positions (nn.LSTM's gate order):
        [i f g o] = W_ih x_t + b_ih + W_hh h_{t−1} + b_hh;  c_t = σ(f) c_{t−1} + σ(i) tanh(g);  h_t = σ(o) tanh(c_t)."""
        p = x.shape[0]
        for layer in range(self.num_layers):
            if layer:
                x = F.dropout(x, self.dropout, self.training)
            outs = []
            for suffix, steps in (("", range(p)), ("_reverse", range(p - 1, -1, -1))):
                w_hh = getattr(self, f"weight_hh_l{layer}{suffix}")
                bias = getattr(self, f"bias_ih_l{layer}{suffix}") + getattr(self, f"bias_hh_l{layer}{suffix}")
                gx = F.linear(x, getattr(self, f"weight_ih_l{layer}{suffix}"), bias)
                h = c = x.new_zeros(self.hidden_size)
                seq = [h] * p
                for t in steps:
                    i, f, g, o = (gx[t] + F.linear(h, w_hh)).chunk(4)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    seq[t] = h
                outs.append(torch.stack(seq))
            x = torch.cat(outs, dim=-1)
        return x


class PromptEncoderPrompt(SoftPrompt):
    """A SoftPrompt whose prompt is ``f(E)``; module names as peft's PromptEncoder (``embedding``,
    ``lstm_head``, ``mlp_head``), so peft's encoder state dict loads as is."""

    def __init__(self, p: int, d: int, encoder: str | None, hidden: int, layers: int, dropout: float,
                 strip: bool, signature: inspect.Signature):
        super().__init__(None, strip, signature)
        self.embedding = nn.Embedding(p, d)
        self.encoder = encoder
        if encoder == "lstm":
            self.lstm_head = LSTMWeights(d, hidden, layers, dropout)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, d))
        elif encoder == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, d))

    @property
    def prompt(self) -> torch.Tensor:
        e = self.embedding.weight
        if self.encoder == "lstm":
            return self.mlp_head(self.lstm_head(e))
        if self.encoder == "mlp":
            return self.mlp_head(e)
        return e

    peft_toplevel = True  # peft stores a prompt learner's tensors without a module path

    def to_peft_tensors(self):
        return {"prompt_embeddings": self.prompt}

    def from_peft_tensors(self, t):
        return {"embedding.weight": t["prompt_embeddings"]}


@register
@dataclass
class PTuningConfig(InputPromptConfig):
    """P-tuning: ``num_virtual_tokens`` prompt vectors produced by an MLP or LSTM prompt encoder."""

    method = "p_tuning"
    peft_type = "P_TUNING"
    limits = MethodConfig.limits | {"num_virtual_tokens": SIZE, "encoder_hidden": SIZE, "encoder_layers": SIZE,
                                    "encoder_dropout": FRACTION}

    num_virtual_tokens: int = 20
    encoder: str = "mlp"
    encoder_hidden: int | None = None  # None: the model's hidden size (as peft)
    encoder_layers: int = 2  # LSTM layers (the MLP has 3 linears, as peft)
    encoder_dropout: float = 0.0
    reparameterize: bool = True  # False: the prompt itself is trained/stored (peft's inference mode)

    def validate(self) -> None:
        super().validate()
        if self.encoder not in ENCODERS:
            raise ConfigError(f"PTuningConfig.encoder: must be one of {ENCODERS}, got {self.encoder!r}")

    @staticmethod
    def _width(target) -> int:
        return target.module.get_input_embeddings().weight.shape[1]

    def make_adapter(self, target, ctx):
        d = self._width(target)
        return PromptEncoderPrompt(self.num_virtual_tokens, d, self.encoder if self.reparameterize else None,
                                   self.encoder_hidden or d, self.encoder_layers, self.encoder_dropout,
                                   self.strips(ctx), inspect.signature(target.module.forward))

    def formula_count(self, ctx) -> int:
        total = 0
        for t in ctx.targets:
            d, p = self._width(t), self.num_virtual_tokens
            h = self.encoder_hidden or d
            total += p * d
            if self.reparameterize and self.encoder == "mlp":
                total += (d * h + h) + (h * h + h) + (h * d + d)
            elif self.reparameterize:
                lstm = 2 * sum(4 * h * (i + h) + 8 * h for i in [d] + [2 * h] * (self.encoder_layers - 1))
                total += lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
        return total

    def to_peft_fields(self, adapters):
        cfg = next(iter(adapters.values()))
        d = cfg.embedding.weight.shape[1]
        return {"num_virtual_tokens": self.num_virtual_tokens, "token_dim": d, "num_transformer_submodules": 1,
                "encoder_reparameterization_type": self.encoder.upper(), "encoder_hidden_size": self.encoder_hidden or d,
                "encoder_num_layers": self.encoder_layers, "encoder_dropout": self.encoder_dropout,
                "target_modules": None, "fan_in_fan_out": None}

    @classmethod
    def from_peft_fields(cls, d, resolve):
        if d.get("peft_type") != "P_TUNING":
            return None
        if (d.get("num_transformer_submodules") or 1) != 1:
            raise ValueError("peft P-tuning of encoder-decoders (num_transformer_submodules=2) is not supported")
        return {"num_virtual_tokens": d["num_virtual_tokens"], "encoder": str(d.get("encoder_reparameterization_type", "MLP")).lower(),
                "encoder_hidden": d.get("encoder_hidden_size"), "encoder_layers": d.get("encoder_num_layers", 2),
                "encoder_dropout": d.get("encoder_dropout", 0.0), "reparameterize": False, "targets": None}
