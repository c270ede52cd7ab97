"""Range checks for numeric config fields that ``MethodConfig.limits`` cannot express (bounds that depend on
another field, e.g. ``target_r <= r``): the core's one scalar check with a Range built on the spot."""

from __future__ import annotations

from ..config import Range, _check_scalar
from ..errors import ConfigError


def refuse_peft_options(d: dict, peft_type: str, defaults) -> None:
    """Refuse a peft config whose ``(key, default)`` options peftlab does not implement (one line naming it)."""
    for key, ok in defaults:
        if d.get(key) not in (ok, None):
            raise ValueError(f"peft {peft_type} option {key}={d.get(key)!r} is not supported by peftlab")


def check_number(owner: str, field: str, value, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
                 integer: bool = False) -> None:
    """Raise ConfigError naming ``<Owner>.<field>`` unless ``value`` is a finite number (an integer where
    ``integer``) within the bounds."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):  # 2.0 would reach tensor shapes
        raise ConfigError(f"{owner}.{field}: expected an integer, got {value!r}")
    _check_scalar(int if integer else float, value, Range(lo, hi, lo_open, hi_open), f"{owner}.{field}")
