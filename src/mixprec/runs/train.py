"""The train run: a Task under a Policy for N optimizer steps, with checkpoints and resume.

Knows nothing of argparse: the CLI parses, calls :func:`train`, prints and exits.
"""

from __future__ import annotations

import itertools
import random
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mixprec import checkpoint, jsonio
from mixprec.engine import NONFINITE_LOSS, Engine, StepResult
from mixprec.environment import environment, resolve_device
from mixprec.errors import UsageError
from mixprec.policy import Policy, parse_policy
from mixprec.runs.numerics import RunNumerics
from mixprec.runs.numerics import check_options as check_numerics_options
from mixprec.task import Task, build_optimizers

TRAIN_SCHEMA = "mixprec.train/1"
TRAIN_FILE = "train.json"  # in the run dir, next to the monitor's stream
# A forward pass that keeps producing non-finite losses will not recover by skipping.
MAX_CONSECUTIVE_NONFINITE_LOSS = 3


@dataclass(frozen=True)
class StepEvent:
    """Passed to the ``on_step`` callback after every optimizer step."""

    step: int
    total: int
    result: StepResult
    seconds: float
    skipped_so_far: int
    localization: dict[str, Any] | None = None


def train(
    task: Task,
    policy: Policy | str = "fp32",
    *,
    steps: int = 100,
    accumulate: int = 1,
    clip_grad_norm: float | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    monitor_every: int | None = None,
    monitor_formats: list[str] | None = None,
    run_dir: str | Path | None = None,
    tensorboard: str | Path | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    grad_observer: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> dict[str, Any]:
    """Train ``task`` under ``policy``; return the ``mixprec.train/1`` result document.

    ``steps`` counts optimizer steps (each consumes ``accumulate`` batches). With
    ``checkpoint_dir`` a checkpoint is written every ``checkpoint_every`` steps and at the
    end; ``resume`` continues from it bit-exactly.

    The monitor samples every ``monitor_every`` steps (default ``monitor.DEFAULT_EVERY``;
    0 turns it off) and on every step that goes non-finite, which it localizes to a module.
    ``run_dir`` receives the monitor's JSONL stream, ``tensorboard`` event files. The
    policy's controller (``static`` by default) acts on what the monitor saw.
    """
    if not isinstance(task, Task):
        raise TypeError(f"train() expects a mixprec.Task, got {type(task).__name__}")
    _positive_int("steps", steps)
    if checkpoint_every is not None:
        _positive_int("checkpoint_every", checkpoint_every)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be an integer, got {seed!r}")
    if monitor_every is not None and (isinstance(monitor_every, bool) or not isinstance(monitor_every, int) or monitor_every < 0):
        raise UsageError(f"monitor_every must be an integer >= 0 (0 = off), got {monitor_every!r}")
    policy = parse_policy(policy)
    device = resolve_device(device)
    config = {"seed": seed, "accumulate": accumulate, "clip_grad_norm": clip_grad_norm}

    check_numerics_options(policy, monitor_every, monitor_formats, run_dir, tensorboard, resume)
    saved = _open_checkpoint_dir(checkpoint_dir, resume, task, policy, config)

    _seed_everything(seed)
    model = task.build_model().to(device)
    optimizers = build_optimizers(task, model)
    engine = Engine(policy, accumulate=accumulate, clip_grad_norm=clip_grad_norm, device=device)
    engine.setup(model, *optimizers)
    engine.grad_observer = grad_observer  # verify compares gradients through it
    numerics = RunNumerics(task, model, engine, policy, every=monitor_every, formats=monitor_formats,
                           run_dir=run_dir, tensorboard=tensorboard)

    start = 0
    losses: list[float | None] = []
    scales: list[float] = []  # the loss scale each step's gradients carried
    skipped: list[dict[str, Any]] = []
    batches = task.train_batches(seed)
    if saved is not None:
        model.load_state_dict(saved["model"])
        if len(saved["optimizers"]) != len(optimizers):
            raise UsageError(f"checkpoint holds {len(saved['optimizers'])} optimizer states, the task builds {len(optimizers)}")
        for optimizer, state in zip(optimizers, saved["optimizers"]):
            optimizer.load_state_dict(state)
        engine.load_state_dict(saved["engine"])
        start = int(saved["step"])
        losses = list(saved["history"]["losses"])
        scales = list(saved["history"]["loss_scales"])
        skipped = list(saved["history"]["skipped"])
        # Replay the data stream to where the checkpoint stopped, then restore the RNGs
        # (after the replay, in case the task's iterator draws from the global RNG).
        batches = itertools.islice(batches, int(saved["batches_consumed"]), None)
    first = next(batches, None)
    if first is not None:
        batches = itertools.chain([first], batches)
    numerics.start(saved["numerics"] if saved is not None else None, first, start)
    if saved is not None:
        # After the replay and the FLOP count, in case they draw from the global RNG.
        checkpoint.set_rng_state(saved["rng"])

    times: list[float] = []
    status, diagnosis = "completed", None
    nonfinite_run = 0
    model.train()
    wall = time.perf_counter()
    step = start
    for step in range(start + 1, steps + 1):
        t0 = time.perf_counter()
        numerics.before_window(step)
        for _ in range(accumulate):
            try:
                batch = next(batches)
            except StopIteration:
                raise UsageError(f"task {task.name!r}: train_batches ran out of data at step {step}; it must yield at least steps x accumulate batches") from None
            numerics.add_batch(batch)
            with engine.autocast():
                loss = task.loss(model, batch)
            engine.backward(loss)
            result = engine.step()
        localization = numerics.after_step(step, result)
        times.append(time.perf_counter() - t0)
        losses.append(result.loss)
        scales.append(result.loss_scale)
        if result.skipped:
            skipped.append({"step": step, "reason": result.reason, "loss_scale": result.loss_scale})
        if on_step is not None:
            on_step(StepEvent(step, steps, result, times[-1], len(skipped), localization))

        nonfinite_run = nonfinite_run + 1 if result.reason == NONFINITE_LOSS else 0
        where = f"; {localization['message'].splitlines()[0]}" if localization else ""
        if result.scale_floor_hit:
            status = "diverged"
            diagnosis = (f"gradients overflow at the minimum loss scale {policy.scaler.min_scale:g} (step {step}): "
                         f"the loss scale cannot back off further{where}; keep that module in fp32 (--keep-fp32), "
                         "use --controller adaptive, or bf16")
        elif nonfinite_run >= MAX_CONSECUTIVE_NONFINITE_LOSS:
            status = "diverged"
            diagnosis = (f"the forward pass produced a non-finite loss {nonfinite_run} steps in a row (last at step {step}); "
                         f"this is not a loss-scale problem{where}; keep that module in fp32 (--keep-fp32), "
                         "use --controller adaptive, or bf16")
        if checkpoint_dir is not None and (
            status != "completed" or step == steps or (checkpoint_every and step % checkpoint_every == 0)
        ):
            _save(checkpoint_dir, task, policy, config, step, model, optimizers, engine,
                  {"losses": losses, "loss_scales": scales, "skipped": skipped}, numerics)
        if status != "completed":
            break
    wall = time.perf_counter() - wall
    numerics.close()

    metrics: dict[str, float] = {}
    if task.evaluate is not None and status == "completed":
        model.eval()
        with torch.no_grad(), engine.autocast():
            metrics = {k: float(v) for k, v in task.evaluate(model).items()}
        model.train()

    finite = [l for l in losses if l is not None]
    result = {
        "schema": TRAIN_SCHEMA,
        "task": task.name,
        "status": status,
        "diagnosis": diagnosis,
        "policy": engine.effective_policy(),
        "policy_spec": policy.to_dict(),
        "steps": step,
        "requested_steps": steps,
        "resumed_from_step": start if saved is not None else None,
        "accumulate": accumulate,
        "clip_grad_norm": clip_grad_norm,
        "seed": seed,
        "optimizer_steps": step - len(skipped),
        "skipped_steps": skipped,
        "first_loss": finite[0] if finite else None,
        "final_loss": finite[-1] if finite else None,
        "losses": losses,
        "loss_scales": scales,
        "eval": metrics,
        "loss_scale": engine.loss_scale,
        "step_time_s": statistics.median(times) if times else None,
        "step_times_s": times,
        "wall_time_s": wall,
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        **numerics.report(),
        "environment": environment(device),
    }
    if run_dir is not None:
        jsonio.write_atomic(Path(run_dir) / TRAIN_FILE, jsonio.dumps(result))
    return result


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be an integer >= 1, got {value!r}")


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _open_checkpoint_dir(directory: str | Path | None, resume: bool, task: Task, policy: Policy,
                         config: dict[str, Any]) -> dict[str, Any] | None:
    if directory is None:
        if resume:
            raise UsageError("resume needs a checkpoint directory (--checkpoint-dir DIR)")
        return None
    directory = checkpoint.prepare_dir(directory)
    path = checkpoint.checkpoint_path(directory)
    if not resume:
        if path.exists():
            raise UsageError(
                f"{str(directory)!r} already holds a checkpoint; pass --resume to continue it, or choose an empty directory"
            )
        return None
    if not path.exists():
        raise UsageError(f"nothing to resume: no checkpoint in {str(directory)!r} (expected {path.name})")
    saved = checkpoint.load(path)
    if saved.get("task") != task.name:
        raise UsageError(f"checkpoint {str(path)!r} is of task {saved.get('task')!r}, not {task.name!r}")
    if saved.get("policy") != policy.to_dict():
        was = saved.get("policy", {}).get("mode")
        raise UsageError(
            f"checkpoint {str(path)!r} was written under policy {was!r} (with its rules and scaler settings); "
            f"resume with the same policy (asked: {policy.mode!r})"
        )
    if saved.get("config") != config:
        raise UsageError(f"checkpoint {str(path)!r} was written with {saved.get('config')}; resume with the same settings, not {config}")
    return saved


def _save(directory: str | Path, task: Task, policy: Policy, config: dict[str, Any], step: int,
          model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], engine: Engine,
          history: dict[str, list[Any]], numerics: RunNumerics) -> None:
    checkpoint.save(directory, {
        "task": task.name,
        "policy": policy.to_dict(),
        "config": config,
        "step": step,
        "batches_consumed": step * engine.accumulate,
        "model": model.state_dict(),
        "optimizers": [o.state_dict() for o in optimizers],
        "engine": engine.state_dict(),
        "rng": checkpoint.rng_state(),
        "history": history,
        "numerics": numerics.state_dict(),
    })
