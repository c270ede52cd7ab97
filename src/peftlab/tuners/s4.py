"""S4 design spaces (Chen et al., ICLR 2023) — METHODS.md §1.

The backbone's L blocks (encoder then decoder, as one ordered sequence [U]) are split into G
contiguous groups (default 4) by a grouping *pattern*; a total budget (a fraction of the backbone's
parameters, default 0.5% [S2]) is allocated across the layers of the tuned groups (uniform, as S4
prescribes, or increasing/decreasing); each tuned group gets a non-empty subset of the strategies
A (serial adapter), P (prefix), B (BitFit), L (LoRA on q, v), and every layer of the group carries all
of them. Beyond the paper, a subset may also hold R (scaled parallel adapter at the FFN), C (Compacter++,
a PHM adapter after the FFN) and the named hybrids of :data:`HYBRIDS` — ``MAM`` (= P + R), ``UniPELT``
(= gated L + P + A; the adapters keep S4's Houlsby placement) and ``Compacter`` (= C) — so the explorer can search over them like any strategy. ``S4Config.expand(model)`` plans the sizes on the model and returns a
:class:`peftlab.compose.ComposeConfig` of ordinary ``bitfit`` / ``adapter`` / ``prefix`` / ``lora``
configs on layer subsets (parts ``name.bitfit``, ``name.adapter``, ``name.prefix``, ``name.lora``,
``name.lora_2`` ... one LoRA part per rank), attached under one adapter name through the core.

Our choices where the paper is unverified ([U], all configurable): pattern weights (spindle 1:2:2:1
for G = 4, i.e. 1 + min(g, G−1−g); bottleneck the reverse; increasing 1:2:3:4), sizes by
largest-remainder rounding with ≥ 1 layer per group; the budget solver of METHODS.md §1.3 (BitFit's
fixed count first, the rest split equally among A/P/L: adapter width m from 2 adapters of 2dm + m + d,
LoRA rank from r·Σ(d_in + d_out) over q and v, prefix length from 2·l·d_kv, each ≥ 1; parallel adapter
width from 2dm + m + d; Compacter width from 2(d + m) + m + d (n = 4, rank 1, a multiple of n, ≤ d);
UniPELT's gates, d + 1 each, are not counted); flat (materialised) prefixes so the budget counts what is
trained; Houlsby adapters with zero init.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from ..compose import ComposeConfig
from ..config import SIZE, MethodConfig, Range
from ..context import context_for
from ..errors import ConfigError, UnsupportedArchitectureError
from ..families import family_of, find_blocks
from ..registry import get_config, register
from ..slot import linear_dims
from ..targets import select
from .prefix import SUPPORTED, kv_geometry

PATTERNS = ("increasing", "uniform", "decreasing", "spindle", "bottleneck")
STRATEGIES = ("A", "P", "B", "L")  # the paper's; the explorer samples subsets of these
EXTRA_STRATEGIES = ("R", "C")  # parallel adapter (FFN), Compacter++
HYBRIDS = {"MAM": ("P", "R"), "UniPELT": ("gA", "gP", "gL"), "Compacter": ("C",)}  # "g": behind a UniPELT gate
PRESETS = {  # METHODS.md §1.2: S4-model [S2]; S4-3b-model [U]
    "s4-model": [["A", "L"], ["A", "P"], ["A", "P", "B"], ["P", "B", "L"]],
    "s4-3b-model": [["P", "L"], ["A", "L"], ["P", "B", "L"], ["A", "P", "B"]],
}


PHM_DIM = 4  # Compacter's n inside S4


def components(strategies: list[str]) -> list[tuple[str, bool]]:
    """A group's strategy subset as (letter, gated) pairs, hybrids expanded, without repeats."""
    out: list[tuple[str, bool]] = []
    for s in strategies:
        for c in HYBRIDS.get(s, (s,)):
            item = (c[1:], True) if c.startswith("g") else (c, False)
            if item not in out:
                out.append(item)
    return out


def pattern_weights(pattern: str, groups: int) -> list[float]:
    spindle = [1 + min(g, groups - 1 - g) for g in range(groups)]
    if pattern == "spindle":
        return spindle
    if pattern == "bottleneck":
        return [max(spindle) + 1 - w for w in spindle]
    if pattern == "increasing":
        return [g + 1 for g in range(groups)]
    if pattern == "decreasing":
        return [groups - g for g in range(groups)]
    if pattern == "uniform":
        return [1] * groups
    raise ValueError(f"unknown grouping pattern {pattern!r}; choose from {PATTERNS}")


def group_sizes(n_layers: int, groups: int = 4, pattern: str = "spindle") -> list[int]:
    """Contiguous group sizes summing to n_layers, ≥ 1 each, proportional to the pattern's weights."""
    if groups < 1 or n_layers < groups:
        raise ValueError(f"cannot split {n_layers} layers into {groups} non-empty groups")
    w = pattern_weights(pattern, groups)
    rest = n_layers - groups
    raw = [rest * x / sum(w) for x in w]
    sizes = [1 + math.floor(r) for r in raw]
    order = sorted(range(groups), key=lambda g: (-(raw[g] - math.floor(raw[g])), g))
    for g in order[: n_layers - sum(sizes)]:
        sizes[g] += 1
    return sizes


def allocation_weights(kind: str, n: int) -> list[float]:
    if kind == "uniform":
        return [1.0] * n
    if kind == "increasing":
        return [float(i + 1) for i in range(n)]
    if kind == "decreasing":
        return [float(n - i) for i in range(n)]
    raise ValueError(f"allocation must be uniform, increasing or decreasing, got {kind!r}")


@register
@dataclass
class S4Config(MethodConfig):
    """S4 design space: grouping pattern, budget allocation, tuned groups and per-group strategies."""

    method = "s4"
    accepts = ("linear", "norm", "module")
    limits = MethodConfig.limits | {"groups": SIZE, "group_sizes": SIZE, "tuned_groups": Range(0),
                                    "budget": Range(0, 1, lo_open=True, hi_open=True)}

    groups: int = 4
    pattern: str = "spindle"
    group_sizes: list[int] | None = None  # explicit sizes override the pattern
    budget: float = 0.005  # fraction of the backbone's parameters
    allocation: str = "uniform"
    tuned_groups: list[int] | None = None  # None = all groups
    strategies: list[list[str]] = field(default_factory=lambda: [list(s) for s in PRESETS["s4-model"]])
    preset: str | None = None  # "s4-model" or "s4-3b-model" (sets strategies)
    adapter_init: str = "zero"

    def validate(self) -> None:
        super().validate()
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ConfigError(f"S4Config.preset: must be one of {sorted(PRESETS)}, got {self.preset!r}")
            self.strategies = [list(s) for s in PRESETS[self.preset]]
        if self.pattern not in PATTERNS:
            raise ConfigError(f"S4Config.pattern: must be one of {PATTERNS}, got {self.pattern!r}")
        if self.allocation not in ("uniform", "increasing", "decreasing"):
            raise ConfigError(f"S4Config.allocation: must be uniform, increasing or decreasing, got {self.allocation!r}")
        if len(self.strategies) != self.groups:
            raise ConfigError(f"S4Config.strategies: must list one subset per group ({self.groups}), got {len(self.strategies)}")
        for g, sub in enumerate(self.strategies):
            bad = [s for s in sub if s not in STRATEGIES + EXTRA_STRATEGIES and s not in HYBRIDS]
            if bad:
                raise ConfigError(f"S4Config.strategies[{g}]: unknown strategy {bad}; use "
                                  f"{STRATEGIES + EXTRA_STRATEGIES} or a hybrid {sorted(HYBRIDS)}")
        if self.tuned_groups is not None:
            if not self.tuned_groups or any(not 0 <= g < self.groups for g in self.tuned_groups):
                raise ConfigError(f"S4Config.tuned_groups: must be a non-empty subset of 0..{self.groups - 1}")
            if any(not self.strategies[g] for g in self.tuned_groups):
                raise ConfigError("S4Config.tuned_groups: every tuned group needs a non-empty strategy subset")

    # ------------------------------------------------------------------ the plan
    def layout(self, n_layers: int) -> list[list[int]]:
        sizes = self.group_sizes or group_sizes(n_layers, self.groups, self.pattern)
        if sum(sizes) != n_layers or len(sizes) != self.groups or min(sizes) < 1:
            raise ConfigError(f"S4Config.group_sizes: {sizes} must be {self.groups} positive numbers summing to {n_layers}")
        out, start = [], 0
        for n in sizes:
            out.append(list(range(start, start + n)))
            start += n
        return out

    def plan(self, model: nn.Module) -> dict:
        """Per layer: strategies and their sizes, plus the realised parameter counts."""
        blocks = find_blocks(model)
        groups = self.layout(len(blocks))
        tuned = self.tuned_groups if self.tuned_groups is not None else [g for g in range(self.groups) if self.strategies[g]]
        layers = [i for g in tuned for i in groups[g]]
        base = sum(p.numel() for n, p in model.named_parameters() if "adapters" not in n and "peftlab_shared" not in n)
        total = self.budget * base
        w = allocation_weights(self.allocation, len(layers))
        per_layer = {i: total * w[k] / sum(w) for k, i in enumerate(layers)}
        d = context_for(model, get_config("lora", layers=[layers[0]])).hidden_size
        rows = {}
        for g in tuned:
            strat = self.strategies[g]
            parts = components(strat)
            for i in groups[g]:
                row = {"group": g, "strategies": list(strat), "budget": per_layer[i],
                       "components": [("g" if gated else "") + c for c, gated in parts]}
                bitfit = self._count(model, i, "B") if ("B", False) in parts else 0
                adjustable = [c for c in parts if c[0] != "B"]
                share = max(per_layer[i] - bitfit, 0) / max(len(adjustable), 1)
                letters = {c for c, _ in parts}
                if "A" in letters:
                    row["adapter_width"] = max(1, math.floor((share - 2 * d) / (2 * (2 * d + 1))))
                if "L" in letters:
                    row["lora_rank"] = max(1, math.floor(share / self._lora_cost(model, i)))
                if "P" in letters:
                    row["prefix_length"] = max(1, math.floor(share / (2 * self._kv_dim(model, i))))
                if "R" in letters:
                    row["parallel_width"] = max(1, math.floor((share - d) / (2 * d + 1)))
                if "C" in letters:
                    n = PHM_DIM
                    row["compacter_width"] = max(n, min(d, math.floor((share - 3 * d) / 3)) // n * n)
                rows[i] = row
        return {"groups": groups, "tuned_groups": tuned, "budget": total, "backbone_params": base, "layers": rows}

    def _count(self, model, layer: int, what: str) -> int:
        cfg = get_config("bitfit", layers=[layer])
        return cfg.formula_count(context_for(model, cfg))

    def _lora_cost(self, model, layer: int) -> int:
        ts = select(model, get_config("lora", layers=[layer]))
        return sum(sum(linear_dims(t.module)) for t in ts)

    def _kv_dim(self, model, layer: int) -> int:
        ts = select(model, get_config("prefix", layers=[layer]))
        h, hd = kv_geometry(ts[0].module, model.config)
        return h * hd

    # ------------------------------------------------------------------ expansion into ordinary configs
    def expand(self, model: nn.Module) -> list[tuple[str, MethodConfig]]:
        """The plan on ``model`` as a composition of ordinary configs (labels bitfit, adapter, prefix, lora...)."""
        rows = self.plan(model)["layers"]
        out: list[MethodConfig] = []

        def layers_with(c: str) -> list[int]:
            return sorted(i for i, r in rows.items() if c in r["components"])

        if layers_with("B"):
            out.append(get_config("bitfit", layers=layers_with("B"), modules_to_save=self.modules_to_save))
        for gate in ("", "g"):  # ungated parts, then UniPELT's gated ones
            with_a = layers_with(gate + "A")
            if with_a:
                out.append(get_config("adapter", layers=with_a, init=self.adapter_init, gate=bool(gate),
                                      layer_bottleneck={str(i): rows[i]["adapter_width"] for i in with_a}))
            with_p = layers_with(gate + "P")
            if with_p:
                out.append(get_config("prefix", layers=with_p, reparameterize=False, gate=bool(gate),
                                      layer_lengths={str(i): rows[i]["prefix_length"] for i in with_p}))
            ranks: dict[int, list[int]] = {}
            for i in layers_with(gate + "L"):
                ranks.setdefault(rows[i]["lora_rank"], []).append(i)
            for r, ls in sorted(ranks.items()):
                out.append(get_config("lora", r=r, alpha=float(r), layers=sorted(ls), gate=bool(gate)))
        if layers_with("R"):
            out.append(get_config("parallel_adapter", layers=layers_with("R"),
                                  layer_bottleneck={str(i): rows[i]["parallel_width"] for i in layers_with("R")}))
        if layers_with("C"):
            out.append(get_config("compacter", placement="pfeiffer", layers=layers_with("C"), phm_dim=PHM_DIM,
                                  layer_bottleneck={str(i): rows[i]["compacter_width"] for i in layers_with("C")}))
        return ComposeConfig(parts=out, modules_to_save=self.modules_to_save).expand(model)

    def check_model(self, model: nn.Module) -> None:
        fam = family_of(model)
        tuned = self.tuned_groups if self.tuned_groups is not None else range(self.groups)
        if any(c == "P" for g in tuned for c, _ in components(self.strategies[g])) and (fam is None or fam.name not in SUPPORTED):
            raise UnsupportedArchitectureError(
                f"S4 strategy P (prefix) is not available on {getattr(model.config, 'model_type', '?')}; "
                f"use strategy subsets of A, B, L for this architecture")
