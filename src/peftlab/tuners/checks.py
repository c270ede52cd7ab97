"""Range checks for numeric config fields (finite, within bounds), one line naming the field."""

from __future__ import annotations

import math

from ..errors import ConfigError


def check_number(owner: str, field: str, value, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
                 integer: bool = False) -> None:
    """Raise ConfigError ``"<Owner>.<field> must be ... got v"`` unless ``value`` is finite and in range."""
    where = f"{owner}.{field}"
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{where} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ConfigError(f"{where} must be {'<' if hi_open else '<='} {hi}, got {value!r}")
