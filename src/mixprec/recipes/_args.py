"""Argument checks shared by the recipes: one-line errors naming the bad value and the valid range."""

from __future__ import annotations

import math
import numbers

from mixprec.errors import UsageError

__all__ = ["check_float", "check_int"]


def check_int(recipe: str, name: str, value, minimum: int = 1) -> None:
    """``value`` must be an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise UsageError(f"{recipe}: {name} must be {what}, got {value!r}")


def check_float(recipe: str, name: str, value, *, low: float, low_inclusive: bool = False,
                high: float | None = None, high_inclusive: bool = False) -> None:
    """``value`` must be a finite real (not a bool) in the interval the bounds describe."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (value >= low if low_inclusive else value > low)
          and (high is None or (value <= high if high_inclusive else value < high)))
    if not ok:
        lo = "[" if low_inclusive else "("
        hi = "inf)" if high is None else f"{high}{']' if high_inclusive else ')'}"
        raise UsageError(f"{recipe}: {name} must be a finite number in {lo}{low}, {hi}, got {value!r}")
