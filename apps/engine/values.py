"""Type checks for values read from JSON (run specs, checkpoint metadata), shared by the apps.

JSON gives no types: a recorded number may be a bool, a string or NaN. These say whether a value
is what a field needs, and ``short`` quotes an offending value in an error without flooding it.
"""

from __future__ import annotations

import math


def is_int(value: object, low: int | None = None, high: int | None = None) -> bool:
    """An int (not a bool), within [low, high] where given."""
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def is_real(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_rate(value: object) -> bool:
    """A number in [0, 1)."""
    return is_real(value) and 0 <= value < 1


def short(value: object) -> str:
    """repr(value), cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
