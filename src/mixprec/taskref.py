"""Turn a TASK argument into a Task: a recipe name or ``package.module:function``."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import sys
from typing import Any, Callable

from mixprec.errors import UsageError
from mixprec.task import Task


def parse_task_args(items: list[str] | None) -> dict[str, Any]:
    """``["n_layer=4", "lr=1e-3", "name=x"]`` -> ``{"n_layer": 4, "lr": 0.001, "name": "x"}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"--task-arg {item!r} is not key=value (for example --task-arg n_layer=4)")
        out[key] = _literal(raw.strip())
    return out


def _literal(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def load_task(spec: str | None = None, task_args: dict[str, Any] | None = None) -> Task:
    """Build the Task that ``spec`` names, passing ``task_args`` as keyword arguments."""
    from mixprec.recipes import DEFAULT_RECIPE, RECIPES, get_recipe

    spec = spec or DEFAULT_RECIPE
    kwargs = task_args or {}
    if ":" in spec:
        factory = _import_factory(spec)
    elif spec in RECIPES:
        factory = get_recipe(spec).factory
    else:
        raise UsageError(
            f"unknown task {spec!r}; valid: a recipe ({', '.join(RECIPES)}) or package.module:function returning a mixprec.Task"
        )
    _check_arguments(spec, factory, kwargs)
    task = factory(**kwargs)
    if not isinstance(task, Task):
        raise UsageError(f"task {spec!r} returned {type(task).__name__}, expected a mixprec.Task")
    return task


def _import_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"task {spec!r} is not package.module:function")
    # As `python -m` and torchrun do: the current directory is importable.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"task {spec!r}: cannot import module {module_name!r}: {exc}") from None
    except SyntaxError as exc:
        raise UsageError(f"task {spec!r}: module {module_name!r} has a syntax error: {exc}") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            candidates = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
            raise UsageError(
                f"task {spec!r}: module {module_name!r} has no attribute {attr!r}; callables there: {', '.join(sorted(candidates)[:10]) or 'none'}"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise UsageError(f"task {spec!r}: {attr!r} is a {type(factory).__name__}, not a function returning a Task")
    return factory


def _check_arguments(spec: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(**kwargs)
    except TypeError:
        params = signature.parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return
        accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        bad = [k for k in kwargs if k not in accepted]
        what = f"does not take {', '.join(repr(b) for b in bad)}" if bad else "needs more arguments"
        raise UsageError(f"task {spec!r} {what}; it takes: {', '.join(accepted) or 'no arguments'}") from None
