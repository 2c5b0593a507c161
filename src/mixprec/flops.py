"""Matmul FLOPs per module, counted once with torch.utils.flop_counter, and the share of
them that runs in low precision under the current per-module formats."""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def own_flops(model: nn.Module, run_forward: Callable[[], object]) -> dict[str, int]:
    """FLOPs each module does itself (its total minus its children's), from one forward.

    Keys are qualified names ("" for the root); a container's own FLOPs are the ones its
    ``forward`` does directly (e.g. attention's ``scaled_dot_product_attention``).
    """
    with FlopCounterMode(display=False) as counter:
        run_forward()
    root = type(model).__name__
    totals: dict[str, int] = {}
    for key, per_op in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = "" if key == root else key[len(root) + 1:] if key.startswith(root + ".") else None
        if name is not None:
            totals[name] = int(sum(per_op.values()))
    own = dict(totals)
    for name, total in totals.items():
        if name:
            # Subtract from the nearest counted ancestor (a ModuleList is never called, so
            # `blocks.0`'s parent in this table is the root).
            parent = _nearest_counted_ancestor(name, totals)
            if parent is not None:
                own[parent] -= total
    return {k: v for k, v in own.items() if v > 0}


def _nearest_counted_ancestor(name: str, totals: dict[str, int]) -> str | None:
    while name:
        name = name.rpartition(".")[0]
        if name in totals:
            return name
    return None


def low_precision_share(own: dict[str, int], fp32_modules: Iterable[str], all_fp32: bool = False) -> float | None:
    """Fraction of the counted FLOPs done by modules outside ``fp32_modules`` (and their subtrees)."""
    total = sum(own.values())
    if total == 0:
        return None
    if all_fp32:
        return 0.0
    roots = list(fp32_modules)
    low = sum(f for name, f in own.items()
              if not any(name == r or name.startswith(r + ".") for r in roots))
    return low / total
