"""PiSSA (Meng et al. 2024) and OLoRA (Büyükakyüz 2024) initialisation of LoRA from the base weight.

PiSSA: W = U S Vᵀ; A₀ = diag(√(S_r/s)) V_rᵀ, B₀ = U_r diag(√(S_r/s)), so s·B₀A₀ is W's best rank-r
approximation (s = the LoRA scale, divided out as peft does). OLoRA: W = Q R (thin QR); B₀ = Q[:, :r],
A₀ = R[:r]. Both papers then freeze the residual W_res = W − s·B₀A₀ and train A, B from (A₀, B₀):

    h = W_res x + s·B A x = W x + s·(B A − B₀A₀) x.

Departure (exactness of the whole life cycle): peftlab leaves the base weight W untouched and carries
−s·B₀A₀ as a frozen low-rank term (A₀, B₀ are persistent buffers). The function, the gradients of A and B
and the trained model are the papers'; but ``disabled``/``delete``/``unload(merge=False)`` give back the
exact original model, several adapters can share a base, and a saved adapter loads onto the pristine
base. Cost: one more frozen rank-r product per layer (no extra saved activation: A₀, B₀ need no grad).
Merge adds ΔW = s(BA − B₀A₀); peft export writes that converted plain-LoRA delta (A' = [A; A₀],
B' = [B, −B₀], rank 2r, α scaled to keep s), as peft's ``path_initial_model_for_weight_conversion`` does.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..slot import Slot, linear_dims
from .lora import LoRALayer


def initial_factors(weight_oi: torch.Tensor, r: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀, B₀) in fp32 from W (out, in): PiSSA (principal singular vectors) or OLoRA (thin QR)."""
    w = weight_oi.detach().float()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(s[:r] / scale)
        return root[:, None] * vh[:r], u[:, :r] * root[None, :]
    q, rr = torch.linalg.qr(w)
    return rr[:r].contiguous(), q[:, :r].contiguous()


class ResidualInitLoRALayer(LoRALayer):
    """LoRA started at (A₀, B₀) from W, with the frozen correction −s·B₀A₀ (see module docstring)."""

    @classmethod
    def from_weight(cls, module, r: int, scale: float, dropout: float, init: str) -> ResidualInitLoRALayer:
        base = module.base if isinstance(module, Slot) else module
        w = base.weight.t() if type(base).__name__ == "Conv1D" else base.weight
        d_in, d_out = linear_dims(base)
        if r > min(d_in, d_out):
            raise ValueError(f"LoRAConfig.r={r} exceeds min(in, out)={min(d_in, d_out)}: {init} needs r <= rank(W)")
        layer = cls(d_in, d_out, r, scale, dropout)
        a0, b0 = initial_factors(w, r, scale, init)
        with torch.no_grad():
            layer.lora_A.copy_(a0)
            layer.lora_B.copy_(b0)
        layer.register_buffer("lora_A0", a0.to(w.dtype).clone())
        layer.register_buffer("lora_B0", b0.to(w.dtype).clone())
        return layer

    def forward(self, slot, base_fn, x):
        y = super().forward(slot, base_fn, x)
        h0 = F.linear(x, self.lora_A0.to(x.dtype))
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h0.reshape(-1, h0.shape[-1]), self.lora_B0.t().to(x.dtype),
                          alpha=-self.scale)
        return out.view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·(B A − B₀ A₀), (out, in) layout."""
        return (self.lora_B @ self.lora_A - self.lora_B0 @ self.lora_A0) * self.scale

    def to_peft_tensors(self):
        return {"lora_A.weight": torch.cat([self.lora_A, self.lora_A0]),
                "lora_B.weight": torch.cat([self.lora_B, -self.lora_B0], dim=1)}
