"""Optimizer parameter groups that honour each active method's wishes (LoRA+: B's learning rate λ·η).

    opt = torch.optim.AdamW(peftlab.param_groups(model, lr=2e-4, weight_decay=0.01))

Every trainable parameter gets ``lr`` and ``weight_decay`` (0 for biases and LayerNorm parameters, the
usual transformers convention, as peftlab's training loop does). A method asks for something else by
overriding :meth:`peftlab.MethodConfig.optimizer_options`, which maps some of its parameters to
``{"lr_scale": k}`` (lr·k) and/or ``{"weight_decay": w}``. Parameters with equal settings share a group.
"""

from __future__ import annotations

from torch import nn

from .hooks import active_parts


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or "layernorm" in name


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """torch optimizer param-group dicts (``params``, ``lr``, ``weight_decay``) over the trainable params."""
    wishes: dict[int, dict] = {}
    for key, part in active_parts(model):
        for p, opts in part.optimizer_options(model, key).items():
            wishes.setdefault(id(p), {}).update(opts)
    groups: dict[tuple[float, float], dict] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        w = wishes.get(id(p), {})
        key = (lr * w.get("lr_scale", 1.0), w.get("weight_decay", 0.0 if _no_decay(n) else weight_decay))
        groups.setdefault(key, {"params": [], "lr": key[0], "weight_decay": key[1]})["params"].append(p)
    return list(groups.values())
