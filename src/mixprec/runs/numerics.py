"""The numerics side of a train run: monitor sampling, localization by replay, the
controller's decisions, and their outputs (JSONL, TensorBoard, summary).

The monitor observes; the controller decides from what it saw; the engine applies.
A step that goes non-finite on an unsampled step is replayed once with the monitor armed
(same batches, same RNG state, same loss scale) so localization always has the numbers,
while unsampled steps that stay finite cost nothing extra.

Data parallel runs: the monitor samples the same steps on every rank (skipped steps are
agreed across ranks), and each sampled record is gathered from all ranks and merged
(:func:`mixprec.monitor.merge_rank_records`) on every rank, so the controller takes the
same decisions everywhere; localization names the rank that saw the first non-finite
value. Only rank 0 writes the JSONL stream and TensorBoard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixprec import checkpoint
from mixprec.controller import Controller, make_controller
from mixprec.engine import Engine, StepResult
from mixprec.errors import UsageError
from mixprec.flops import low_precision_share, own_flops
from mixprec.jsonio import write_atomic
from mixprec.monitor import (
    DEFAULT_EVERY, JsonlWriter, Monitor, TensorBoardWriter, describe, first_nonfinite_backward,
    first_nonfinite_forward, first_nonfinite_across_ranks, merge_rank_records, summarize,
)
from mixprec.policy import Policy
from mixprec.task import Task

MONITOR_FILE = "monitor.jsonl"


class RunNumerics:
    def __init__(self, task: Task, model: nn.Module, engine: Engine, policy: Policy, *,
                 every: int | None, formats: list[str] | None, run_dir: str | Path | None,
                 tensorboard: str | Path | None, dist: Any = None) -> None:
        self.task, self.model, self.engine, self.policy = task, model, engine, policy
        self.world_size = getattr(dist, "world_size", 1)
        self._rank_records: list[dict[str, Any]] | None = None
        mode = policy.mode_info
        self.low_format = mode.compute if mode.low_precision else "fp16"
        if every is None:
            every = DEFAULT_EVERY
        wants_controller = policy.controller.name != "static"
        self.monitor: Monitor | None = None
        if every:
            targets = [self.low_format] + [f for f in (formats or []) if f != self.low_format]
            # Containers too: a non-finite value made by a container's own code (not by a
            # child) must be pinned on that container.
            self.monitor = Monitor(every=every, formats=targets, containers=True)
            self.monitor.attach(model)
        self.controller: Controller | None = None
        if wants_controller:
            # Progressive promotes leaves by risk; adaptive demotes whatever localization blames.
            containers = policy.controller.name == "adaptive"
            self.controller = make_controller(policy.controller, self.low_format,
                                              engine.candidate_modules(containers=containers))
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._jsonl: JsonlWriter | None = None
        self._tb: TensorBoardWriter | None = None
        self._tensorboard = tensorboard
        self.records: list[dict[str, Any]] = []
        self.localizations: list[dict[str, Any]] = []
        self._flops: dict[str, int] | None = None
        self._window: list[Any] = []
        self._rng_before: dict[str, Any] | None = None
        self._armed_step: int | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, saved: dict[str, Any] | None, first_batch: Any | None, resumed_step: int = 0) -> None:
        if self.run_dir is not None:
            path = self.run_dir / MONITOR_FILE
            if saved is not None and path.exists():
                # Records past the checkpoint were made by the killed run; the resumed run
                # writes them again.
                upto = resumed_step
                keep = [line for line in path.read_text().splitlines(keepends=True)
                        if line.strip() and json.loads(line).get("step", 0) <= upto]
                write_atomic(path, "".join(keep))
            self._jsonl = JsonlWriter(path)
        if self._tensorboard is not None:
            self._tb = TensorBoardWriter(self._tensorboard)
        if self.monitor is not None and first_batch is not None:
            self._flops = self._count_flops(first_batch)
        if saved is not None:
            self.records = list(saved.get("records", []))
            self.localizations = list(saved.get("localizations", []))
            if self.controller is not None and saved.get("controller") is not None:
                self.controller.load_state_dict(saved["controller"])
                self._restore_engine_from_controller()
        elif self.controller is not None:
            self.engine.apply(self.controller.start())

    def _count_flops(self, batch: Any) -> dict[str, int] | None:
        """One extra forward, in eval mode and with the RNGs put back, so the run's numbers
        do not depend on whether FLOPs were counted."""
        rng, was_training = checkpoint.rng_state(), self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.engine.autocast():
                return own_flops(self.model, lambda: self.task.loss(self.model, batch))
        except Exception:  # FLOP counting is a report, never a reason to fail a run
            return None
        finally:
            self.model.train(was_training)
            checkpoint.set_rng_state(rng)

    def _restore_engine_from_controller(self) -> None:
        from mixprec.controller import Decision

        c = self.controller
        if c is None:
            return
        decisions = [Decision(0, m, self.low_format, "fp32", "restored") for m in sorted(c.fp32_modules)]
        if c.all_fp32:
            decisions.append(Decision(0, "*", self.low_format, "fp32", "restored"))
        self.engine.apply(decisions)

    def close(self) -> None:
        for writer in (self._jsonl, self._tb):
            if writer is not None:
                writer.close()
        if self.monitor is not None:
            self.monitor.detach()

    # -- per step -------------------------------------------------------------------------
    def before_window(self, step: int) -> None:
        if self.monitor is None:
            return
        self._window = []
        # Kept so a step that goes non-finite can be replayed exactly (dropout included).
        self._rng_before = checkpoint.rng_state()
        self._armed_step = None
        if self.monitor.should_sample(step):
            self.monitor.arm(step)
            self._armed_step = step

    def add_batch(self, batch: Any) -> None:
        if self.monitor is not None:
            self._window.append(batch)

    def after_step(self, step: int, result: StepResult) -> dict[str, Any] | None:
        """Collect, localize, let the controller decide; return the localization if any."""
        if self.monitor is None:
            return None
        record = None
        if self._armed_step == step:
            record = self.monitor.collect(step, result.loss_scale, self._extra(result))
        localization = None
        if result.skipped and record is None:
            record = self._replay(step, result)
        self._rank_records = None
        if record is not None and self.world_size > 1:
            from mixprec.distributed import all_gather_objects

            self._rank_records = all_gather_objects(record)
            record = merge_rank_records(self._rank_records)
        if result.skipped:
            localization = self._localize(step, result, record)
        if record is not None:
            self.records.append(record)
            if self._jsonl is not None:
                self._jsonl.write(record)
            if self._tb is not None:
                self._tb.write(record)
        if self.controller is not None:
            blamed = localization["blamed"] if localization else None
            self.engine.apply(self.controller.after_step(step, result, record, blamed))
        self._window = []
        return localization

    def _extra(self, result: StepResult, replay: bool = False) -> dict[str, Any]:
        extra: dict[str, Any] = {"action": result.action, "reason": result.reason, "loss": result.loss,
                                 "grad_norm": result.grad_norm, "replay": replay,
                                 "fp32_modules": self.engine.fp32_modules + self.engine.controlled_fp32_modules,
                                 "all_fp32": self.engine.all_fp32}
        if self._flops:
            extra["low_precision_flop_share"] = low_precision_share(
                self._flops, extra["fp32_modules"], self.engine.all_fp32)
        return extra

    def _replay(self, step: int, result: StepResult) -> dict[str, Any]:
        """Re-run the failed window's forward and backward with the monitor armed: same
        batches, RNG and loss scale, so the same values go non-finite. Gradients are discarded."""
        if self.monitor is None or self._rng_before is None:
            raise RuntimeError("replay needs the monitor and the RNG state saved before the window")
        rng_after = checkpoint.rng_state()
        # The forward already ran once for this step: keep BatchNorm's running stats from
        # counting it twice.
        buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        checkpoint.set_rng_state(self._rng_before)
        self.monitor.arm(step)
        try:
            for batch in self._window:
                with self.engine.autocast():
                    loss = self.task.loss(self.model, batch)
                if self.engine.accumulate > 1:
                    loss = loss / self.engine.accumulate
                scaled = loss * result.loss_scale if self.engine.scaler.enabled else loss
                scaled.backward()
        finally:
            record = self.monitor.collect(step, result.loss_scale, self._extra(result, replay=True))
            self.model.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, b in self.model.named_buffers():
                    b.copy_(buffers[name])
            checkpoint.set_rng_state(rng_after)
        return record

    def _localize(self, step: int, result: StepResult, record: dict[str, Any]) -> dict[str, Any]:
        if self._rank_records is not None:
            forward, backward = first_nonfinite_across_ranks(self._rank_records)
        else:
            forward, backward = first_nonfinite_forward(record), first_nonfinite_backward(record)
        blamed = forward["module"] if forward else backward["module"] if backward else None
        message = describe(forward, backward, self.low_format)
        first = forward or backward
        if first is not None and "rank" in first:
            message = f"rank {first['rank']} of {self.world_size}: {message}"
        loc = {"step": step, "reason": result.reason, "forward": forward, "backward": backward, "blamed": blamed,
               "message": message}
        if first is not None and "rank" in first:
            loc["rank"] = first["rank"]
        self.localizations.append(loc)
        return loc

    # -- reporting and state ------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        share = None
        if self._flops:
            share = low_precision_share(self._flops, self.engine.fp32_modules + self.engine.controlled_fp32_modules,
                                        self.engine.all_fp32)
        return {
            "monitor": None if self.monitor is None else {
                "every": self.monitor.every, "formats": list(self.monitor.formats), "samples": len(self.records),
                "summary": summarize(self.records) if self.records else None,
            },
            "localizations": self.localizations,
            "decisions": [d.to_dict() for d in self.controller.decisions] if self.controller else [],
            "controller": self.policy.controller.name,
            "low_precision_flop_share": share,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "localizations": self.localizations,
            "controller": self.controller.state_dict() if self.controller is not None else None,
        }


def check_options(policy: Policy, every: int | None, formats: list[str] | None, run_dir: str | Path | None,
                  tensorboard: str | Path | None, resume: bool) -> None:
    """Refuse bad numerics options before anything is built or written."""
    from mixprec.formats import get_format

    wants_controller = policy.controller.name != "static"
    if wants_controller and policy.mode_info.kind not in ("mixed", "emulated"):
        raise UsageError(f"controller {policy.controller.name!r} changes precision per module during training, "
                         f"which needs fp16-mixed or bf16-mixed (or their emulate: forms); this run is {policy.mode!r}")
    if every == 0 and (wants_controller or run_dir is not None or tensorboard is not None):
        what = "the controller" if wants_controller else "--run-dir/--tensorboard"
        raise UsageError(f"monitor_every 0 turns the monitor off, but {what} needs it; give N >= 1")
    for name in formats or []:
        get_format(name)
    if run_dir is not None:
        run_dir = Path(run_dir)
        _prepare_run_dir(run_dir)
        if not resume and (run_dir / MONITOR_FILE).exists():
            raise UsageError(f"run dir {str(run_dir)!r} already holds a run ({MONITOR_FILE}); "
                             "choose another directory, or resume that run (--checkpoint-dir ... --resume)")


def _prepare_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"run dir {str(run_dir)!r} cannot be created: {exc.strerror or exc}") from None
    if not run_dir.is_dir():
        raise UsageError(f"run dir {str(run_dir)!r} is not a directory")
