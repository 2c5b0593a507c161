"""Tasks for tests/test_distributed.py.

- ``slow_lm``: the ``lm`` recipe with a pause in every loss call, so a torchrun job runs
  long enough for a test to SIGKILL one of its ranks mid-run. Same name, model, data and
  numbers as ``lm``: a slow run's parameters equal a plain ``lm`` run's.
- ``nan_lm``: the ``lm`` recipe whose ``lm_head`` input turns into NaN on rank ``rank``
  only, in its ``at_call``-th training-mode forward pass: localization must name that rank.
"""

from __future__ import annotations

import os
import time

import torch

from mixprec.recipes.lm import lm
from mixprec.task import Task


def slow_lm(delay: float = 0.2, **kwargs) -> Task:
    task = lm(**kwargs)
    inner = task.loss

    def loss(model, batch):
        time.sleep(delay)
        return inner(model, batch)

    task.loss = loss
    return task


def nan_lm(rank: int = 1, at_call: int = 2, **kwargs) -> Task:
    task = lm(**kwargs)
    inner_build = task.build_model
    calls = {"n": 0}

    def build_model():
        model = inner_build()

        def poison(mod, args):
            if not mod.training:
                return None
            calls["n"] += 1
            if int(os.environ.get("RANK", "0")) == rank and calls["n"] == at_call:
                return (args[0] * float("nan"),)  # still in the graph: every rank reduces every bucket
            return None

        model.lm_head.register_forward_pre_hook(poison)
        return model

    task.build_model = build_model
    return task
