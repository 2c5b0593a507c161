"""The median and its confidence interval, for timings measured in rounds.

Step times on a shared machine are skewed and noisy, so a speed claim is the median of
per-round ratios (one step of each compared run per round, on the same batch) with the
distribution-free order-statistic interval of that median. Used by ``verify`` and the
benchmarks (benchmarks/_stats.py re-exports these).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

__all__ = ["median_ci", "ratio", "summary"]


def _binom_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(lo, hi, coverage): the order-statistic confidence interval of the median.

    The interval [x_(j), x_(n+1-j)] (1-based ranks) covers the population median with
    probability 1 - 2 P(X <= j-1), X ~ Bin(n, 1/2); the largest j reaching ``level`` is
    used. Below 6 values none reaches 95%: then [min, max] and its actual coverage.
    """
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_ci of no values")
    best = 1
    for j in range(1, n // 2 + 1):
        if 1 - 2 * _binom_cdf(j - 1, n) >= level:
            best = j
        else:
            break
    coverage = 1 - 2 * _binom_cdf(best - 1, n) if n > 1 else 0.0
    return xs[best - 1], xs[n - best], coverage


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, 95% CI (order statistics) and count of ``values``."""
    lo, hi, coverage = median_ci(values)
    return {"median": statistics.median(values), "ci95": [lo, hi], "ci_level": coverage, "rounds": len(values)}


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, Any]:
    """Per-round ratios numerator[i] / denominator[i] (same rounds), summarized."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"ratio needs paired, non-empty rounds; got {len(numerator)} and {len(denominator)}")
    return summary([a / b for a, b in zip(numerator, denominator)])
