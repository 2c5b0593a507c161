"""Built-in recipes: ready-made Tasks, listed by ``mixprec recipes``.

Each entry of ``RECIPES`` names a factory ``(**kwargs) -> mixprec.Task``; keyword arguments
come from ``--task-arg key=value`` on the command line. Importing this package imports only
torch and the recipe modules themselves (no transformers, no datasets, no downloads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mixprec.errors import UsageError
from mixprec.task import Task

from mixprec.recipes import lm as _lm  # keep mixprec.recipes.lm the module, not the function

__all__ = ["RecipeInfo", "RECIPES", "DEFAULT_RECIPE", "get_recipe"]


@dataclass(frozen=True)
class RecipeInfo:
    """What a recipe is, for listings and reports; ``factory(**kwargs)`` builds its Task."""

    name: str
    factory: Callable[..., Task]
    domain: str
    model: str
    data: str
    metric: str
    description: str


RECIPES: dict[str, RecipeInfo] = {
    "lm": RecipeInfo(
        name="lm",
        factory=_lm.lm,
        domain="language model",
        model="GPT-style byte-level decoder (2 layers, d_model 128, 4 heads, untied lm_head)",
        data="Python standard library .py sources (bytes), split by file",
        metric="val_loss (cross-entropy, nats/byte), perplexity",
        description="Next-byte prediction on Python's own source code; no downloads.",
    ),
}

DEFAULT_RECIPE = "lm"


def get_recipe(name: str) -> RecipeInfo:
    """The recipe called ``name``; a UsageError listing the valid names otherwise."""
    try:
        return RECIPES[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(RECIPES))
        raise UsageError(f"unknown recipe {name!r}; valid recipes: {valid}") from None
