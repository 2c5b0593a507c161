"""The Task contract: what to train (DESIGN.md, Contracts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn


@dataclass
class Task:
    """What to train: model, optimizer, batches, loss and (optionally) evaluation.

    ``train_batches(seed)`` must be deterministic for a given seed: resuming from a
    checkpoint replays the iterator and discards the batches already consumed.

    ``build_optimizer`` may return one optimizer or a sequence of them (a GAN's generator
    and discriminator optimizers): the engine steps them all under one loss scaler, as in
    PyTorch's AMP recipe for several models and optimizers.
    """

    name: str
    build_model: Callable[[], nn.Module]
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer | Sequence[torch.optim.Optimizer]]
    train_batches: Callable[[int], Iterator[Any]]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None


def build_optimizers(task: Task, model: nn.Module) -> list[torch.optim.Optimizer]:
    """``task.build_optimizer(model)`` as a list, checked: one optimizer or several."""
    built = task.build_optimizer(model)
    optimizers = [built] if isinstance(built, torch.optim.Optimizer) else list(built) if isinstance(built, (list, tuple)) else None
    if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
        raise TypeError(f"task {task.name!r}: build_optimizer must return a torch.optim.Optimizer or a "
                        f"non-empty list/tuple of them, got {type(built).__name__}")
    return optimizers
