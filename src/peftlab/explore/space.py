"""A design space over the S4 components, and reproducible sampling from it (METHODS.md §1.4).

Each component of the space is ``"free"`` (sampled uniformly), a fixed value, or a list of allowed
values. ``sample(space, key)`` is a pure function of the space and a string key, so every trial is
reproducible and independent of execution order or backend.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass, field
from typing import Any

from ..tuners.s4 import PATTERNS, STRATEGIES

COMPONENTS = ("pattern", "allocation", "tuned_groups", "strategies")
ALLOCATIONS = ("uniform", "increasing", "decreasing")
SUBSETS = [list(c) for n in range(1, 5) for c in itertools.combinations(STRATEGIES, n)]  # 15 per group


def all_tuned_groups(groups: int) -> list[list[int]]:
    return [list(c) for n in range(1, groups + 1) for c in itertools.combinations(range(groups), n)]


def candidates(component: str, groups: int) -> list[Any]:
    if component == "pattern":
        return list(PATTERNS)
    if component == "allocation":
        return list(ALLOCATIONS)
    if component == "tuned_groups":
        return all_tuned_groups(groups)
    if component == "strategies":
        return [list(s) for s in SUBSETS]
    raise ValueError(f"unknown design-space component {component!r}; choose from {COMPONENTS}")


@dataclass
class Space:
    groups: int = 4
    budget: float = 0.005
    pattern: Any = "free"
    allocation: Any = "free"
    tuned_groups: Any = "free"
    strategies: Any = "free"  # "free", one subset per group (list of lists), or per group "free"/subset
    extra: dict = field(default_factory=dict)  # other S4Config fields, fixed

    def fixed(self, **choices) -> Space:
        d = dict(self.__dict__)
        d.update(choices)
        return Space(**d)


def _rng(key: str) -> random.Random:
    return random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:16], 16))


def _pick(rng: random.Random, value, options: list):
    if value == "free":
        return rng.choice(options)
    if isinstance(value, list) and value and all(isinstance(v, (list, str)) for v in value) and value not in options:
        return rng.choice(value)  # a list of allowed values
    return value


def sample(space: Space, key: str) -> dict:
    """One S4 configuration (``peftlab.get_config("s4", **result)``) for trial ``key``."""
    rng = _rng(key)
    g = space.groups
    pattern = _pick(rng, space.pattern, list(PATTERNS))
    allocation = _pick(rng, space.allocation, list(ALLOCATIONS))
    tuned = _pick(rng, space.tuned_groups, all_tuned_groups(g))
    if space.strategies == "free":
        strategies = [rng.choice(SUBSETS) for _ in range(g)]
    else:
        strategies = [rng.choice(SUBSETS) if s == "free" else list(s) for s in space.strategies]
    for i in range(g):
        if i not in tuned:
            strategies[i] = strategies[i] or ["L"]
    return {"groups": g, "pattern": pattern, "allocation": allocation, "tuned_groups": sorted(tuned),
            "strategies": strategies, "budget": space.budget, **space.extra}
