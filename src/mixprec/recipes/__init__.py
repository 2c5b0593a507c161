"""Built-in recipes: ready-made Tasks, one per domain, listed by ``mixprec recipes``.

Each recipe module defines a factory ``(**kwargs) -> mixprec.Task`` and ``RECIPE``, its
:class:`RecipeInfo`; keyword arguments come from ``--task-arg key=value`` on the command
line. Recipe modules import only torch and numpy at import time: heavier libraries
(transformers, scikit-learn) are imported when a Task is built, and nothing downloads.
"""

from __future__ import annotations

import importlib

from mixprec.errors import UsageError
from mixprec.recipes.info import RecipeInfo

__all__ = ["RecipeInfo", "RECIPES", "RECIPE_ORDER", "DEFAULT_RECIPE", "get_recipe"]

# The parity table's row order: one recipe per domain.
RECIPE_ORDER = ("lm", "bert", "vision", "detection", "recsys", "asr", "gan", "tts")


def _load() -> dict[str, RecipeInfo]:
    found = {}
    for name in RECIPE_ORDER:
        found[name] = importlib.import_module(f"mixprec.recipes.{name}").RECIPE
    return found


RECIPES: dict[str, RecipeInfo] = _load()

DEFAULT_RECIPE = "lm"


def get_recipe(name: str) -> RecipeInfo:
    """The recipe called ``name``; a UsageError listing the valid names otherwise."""
    try:
        return RECIPES[name]
    except (KeyError, TypeError):
        valid = ", ".join(RECIPES)
        raise UsageError(f"unknown recipe {name!r}; valid recipes: {valid}") from None
