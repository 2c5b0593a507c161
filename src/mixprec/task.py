"""The Task contract: what to train (DESIGN.md, Contracts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn


@dataclass
class Task:
    """What to train: model, optimizer, batches, loss and (optionally) evaluation.

    ``train_batches(seed)`` must be deterministic for a given seed: resuming from a
    checkpoint replays the iterator and discards the batches already consumed.
    """

    name: str
    build_model: Callable[[], nn.Module]
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    train_batches: Callable[[int], Iterator[Any]]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
