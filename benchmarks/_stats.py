"""The house rules for a timing claim, in one place for every benchmark.

1. Everything compared runs in one process, one step of each per *round*, on the same
   batch, the order rotated from round to round (so none is always first after a cache-
   cold moment), after warm-up rounds that are not counted: :func:`interleave`.
2. The claim is the median of the per-round ratios (a ratio of two steps that ran a few
   milliseconds apart cancels most of a shared machine's drift): :func:`ratio`.
3. Its 95% confidence interval is the distribution-free order-statistic interval of the
   median (ranks from the binomial distribution, no resampling): :func:`median_ci`. For a
   quantity derived from several medians, :func:`bootstrap` resamples the rounds.

With fewer than 6 rounds no order-statistic interval reaches 95%; the interval returned is
then [min, max] and ``ci_level`` says what coverage it really has.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Iterable, Iterator

from mixprec.stats import median_ci, ratio, summary  # noqa: F401  (re-exported: one implementation)

__all__ = ["interleave", "median_ci", "ratio", "summary", "bootstrap", "timed"]


def timed(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """Seconds one call of ``fn`` takes (with ``sync`` before and after, on a GPU)."""
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0


def interleave(steps: dict[str, Callable[[Any], object]], batches: Iterator[Any], rounds: int, warmup: int,
               sync: Callable[[], None] | None = None, only: Callable[[int], Iterable[str]] | None = None
               ) -> dict[str, list[float]]:
    """Time one call ``steps[name](batch)`` of each name per round, the same batch for all,
    the order rotated each round; ``warmup`` rounds first, not recorded.

    ``only(r)`` may name the subset that runs in round ``r`` (for a mode too slow to run in
    every round); rounds where a name did not run leave no entry for it.
    Returns {name: [seconds per recorded round]}.
    """
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        batch = next(batches)
        chosen = [n for n in names if only is None or n in set(only(r))]
        k = r % len(chosen) if chosen else 0
        for name in chosen[k:] + chosen[:k]:
            dt = timed(lambda: steps[name](batch), sync)
            if r >= warmup:
                times[name].append(dt)
    return times


def bootstrap(statistic: Callable[[list[int]], float], n: int, resamples: int = 2000, seed: int = 0
              ) -> tuple[float, float]:
    """Percentile 95% interval of ``statistic(indices)`` over rounds resampled with
    replacement (``indices`` picks the rounds; the statistic reads its own data)."""
    rng = random.Random(seed)
    values = sorted(statistic(rng.choices(range(n), k=n)) for _ in range(resamples))
    return values[int(0.025 * resamples)], values[int(0.975 * resamples) - 1]
