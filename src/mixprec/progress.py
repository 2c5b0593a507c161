"""The training progress bar (tqdm, on stderr): step, loss, loss scale, skipped steps, steps/s,
and a line for each of the first non-finite steps naming the module that broke."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from mixprec.runs.train import StepEvent

MAX_LOCALIZATION_LINES = 5  # the rest are in the JSON and `mixprec inspect`


class TrainProgress:
    """A context manager whose :meth:`update` is the ``on_step`` callback of ``train``."""

    def __init__(self, name: str, total: int, enabled: bool = True) -> None:
        self._bar: Any = None
        self._name, self._total, self._enabled = name, total, enabled
        self._told = 0

    def __enter__(self) -> "TrainProgress":
        return self

    def update(self, event: StepEvent) -> None:
        if event.localization is not None and self._told < MAX_LOCALIZATION_LINES:
            self._told += 1
            line = f"step {event.step}: {event.localization['message']}"
            tqdm.write(line, file=sys.stderr) if self._bar is not None else sys.stderr.write(line + "\n")
        if not self._enabled:
            return
        if self._bar is None:
            # Opened at the first step, so a set-up error stays the only line on stderr;
            # a resumed run starts the bar where it is. mininterval keeps refreshes rare.
            self._bar = tqdm(total=self._total, initial=event.step - 1, desc=self._name, unit="step",
                             file=sys.stderr, dynamic_ncols=True, mininterval=0.5, leave=True)
        r = event.result
        loss = "nan" if r.loss is None or r.loss != r.loss else f"{r.loss:.4f}"
        self._bar.set_postfix_str(f"loss {loss}  scale {r.next_loss_scale:g}  skipped {event.skipped_so_far}", refresh=False)
        self._bar.update(1)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()
