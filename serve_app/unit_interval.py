"""The one check for "a number between 0 and 1": thresholds in settings, label configs, contexts and the CLI."""

from __future__ import annotations

import math
from typing import Any


def unit_interval(value: Any, name: str) -> float:
    """`value` as a float in [0, 1], else a ValueError naming `name` (callers turn it into their own error).

    Accepts numbers and numeric strings; refuses booleans, NaN, infinities, lists, objects and integers
    too large for a float, without ever raising anything but ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be a number between 0 and 1, got a {type(value).__name__}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        # repr() of an integer beyond 4,300 digits raises, so such numbers are described, not shown
        shown = f"an integer of {value.bit_length()} bits" if isinstance(value, int) else repr(value[:40])
        raise ValueError(f"{name} must be a number between 0 and 1, got {shown}") from None
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {number:g}")
    return number
