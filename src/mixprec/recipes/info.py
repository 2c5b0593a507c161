"""What a recipe is, for listings, the parity table and tests (``mixprec recipes``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from mixprec.task import Task


@dataclass(frozen=True)
class RecipeInfo:
    """A built-in recipe: ``factory(**kwargs)`` builds its Task.

    ``metric_key`` names the ``evaluate()`` entry the parity table reports (``higher_is_better``
    says which way is good); ``expected_fp32`` is the documented range of that metric in fp32
    at the defaults after ``verify_steps`` steps, the number of optimizer steps
    ``mixprec verify --all`` runs. ``tiny`` are keyword arguments for a seconds-long build in
    tests. ``scaler``: loss-scaler settings (:class:`~mixprec.policy.ScalerConfig` fields)
    that ``verify --all`` uses for the precisions that scale the loss (fp16), when the
    recipe's numerics call for other than the defaults; the recipe's docstring says why,
    and the parity table shows them.
    """

    name: str
    factory: Callable[..., Task]
    domain: str
    model: str
    data: str
    metric: str
    description: str
    metric_key: str = "val_loss"
    higher_is_better: bool = False
    expected_fp32: tuple[float, float] | None = None
    verify_steps: int = 100
    tiny: dict[str, Any] = field(default_factory=dict)
    tiny_steps: int = 10
    scaler: dict[str, Any] = field(default_factory=dict)
