"""The train run: a Task under a Policy for N optimizer steps, with checkpoints and resume.

Knows nothing of argparse: the CLI parses, calls :func:`train`, prints and exits.

With ``strategy="ddp"`` or ``"fsdp"`` the same run goes data parallel under torchrun (see
:mod:`mixprec.distributed`): each rank trains on its slice of every global batch, rank 0
alone writes the run dir, TensorBoard and ``train.json``, and checkpoints are sharded
DCP checkpoints (:mod:`mixprec.dist_checkpoint`). When torchrun restarts the workers
(``--max-restarts``) and the checkpoint dir holds a checkpoint, the run resumes from it.
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

from mixprec import checkpoint, distributed, jsonio
from mixprec.engine import NONFINITE_LOSS, Engine, StepResult
from mixprec.environment import environment, resolve_device
from mixprec.errors import UsageError
from mixprec.policy import Policy, parse_policy
from mixprec.runs.numerics import MONITOR_FILE, RunNumerics
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
    strategy: str = "none",
) -> dict[str, Any]:
    """Train ``task`` under ``policy``; return the ``mixprec.train/1`` result document.

    ``steps`` counts optimizer steps (each consumes ``accumulate`` batches). With
    ``checkpoint_dir`` a checkpoint is written every ``checkpoint_every`` steps and at the
    end; ``resume`` continues from it bit-exactly.

    The monitor samples every ``monitor_every`` steps (default ``monitor.DEFAULT_EVERY``;
    0 turns it off) and on every step that goes non-finite, which it localizes to a module.
    ``run_dir`` receives the monitor's JSONL stream, ``tensorboard`` event files. The
    policy's controller (``static`` by default) acts on what the monitor saw.

    ``strategy`` ``"ddp"``/``"fsdp"``: data parallel over the torchrun process group (a
    1-rank group without torchrun); the task's batches are global batches, split by rows
    across ranks. Every rank returns the document; only rank 0 writes files other than
    the checkpoint shards.
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
    distributed.check_strategy(strategy)
    if strategy == "fsdp" and policy.controller.name != "static":
        raise UsageError(f"controller {policy.controller.name!r} changes precision per module during training; under "
                         "--strategy fsdp each module's parameter dtype is fixed by fully_shard: use the static "
                         "controller, or --strategy ddp")
    if strategy != "none" and policy.mode_info.kind == "true" and checkpoint_dir is not None:
        raise UsageError(f"--checkpoint-dir with --strategy {strategy} and {policy.mode!r} is not supported: the optimizer "
                         "holds fp32 master copies outside the model, which distributed checkpoints do not map; use "
                         "bf16-mixed or fp16-mixed (fp32 parameters) for distributed runs with checkpoints")
    config = {"seed": seed, "accumulate": accumulate, "clip_grad_norm": clip_grad_norm}
    dist_info, device = distributed.init(strategy, device)
    try:
        return _train(task, policy, dist_info, config, steps=steps, accumulate=accumulate,
                      clip_grad_norm=clip_grad_norm, seed=seed, device=device, checkpoint_dir=checkpoint_dir,
                      checkpoint_every=checkpoint_every, resume=resume, monitor_every=monitor_every,
                      monitor_formats=monitor_formats, run_dir=run_dir, tensorboard=tensorboard, on_step=on_step,
                      grad_observer=grad_observer)
    finally:
        distributed.shutdown(dist_info)


def _train(task: Task, policy: Policy, dist_info: distributed.DistInfo, config: dict[str, Any], *, steps: int,
           accumulate: int, clip_grad_norm: float | None, seed: int, device: torch.device,
           checkpoint_dir: str | Path | None, checkpoint_every: int | None, resume: bool,
           monitor_every: int | None, monitor_formats: list[str] | None, run_dir: str | Path | None,
           tensorboard: str | Path | None, on_step: Callable[[StepEvent], None] | None,
           grad_observer: Callable[[int, dict[str, torch.Tensor]], None] | None) -> dict[str, Any]:
    rank, world, main = dist_info.rank, dist_info.world_size, dist_info.is_main
    if checkpoint_dir is not None and not resume and distributed.restart_count() > 0 \
            and _has_checkpoint(checkpoint_dir, dist_info):
        resume = True  # torchrun restarted the workers: continue from the last checkpoint
    # Only rank 0 refuses a run dir that already holds a run: the others may look after it started writing.
    check_numerics_options(policy, monitor_every, monitor_formats, run_dir, tensorboard, resume or not main)
    saved = _open_checkpoint_dir(checkpoint_dir, resume, task, policy, config, dist_info)
    if not main:
        run_dir = tensorboard = None

    _seed_everything(seed)
    model = task.build_model().to(device)
    if rank > 0:
        _seed_everything(seed + rank)  # different dropout masks per rank; rank 0 keeps the 1-process stream
    optimizers = build_optimizers(task, model)
    engine = Engine(policy, accumulate=accumulate, clip_grad_norm=clip_grad_norm, device=device,
                    strategy=dist_info.strategy)
    wrapped = engine.setup(model, *optimizers)[0]  # DDP wrapper, or the FSDP-sharded model itself
    engine.grad_observer = grad_observer  # verify compares gradients through it
    numerics = RunNumerics(task, model, engine, policy, every=monitor_every, formats=monitor_formats,
                           run_dir=run_dir, tensorboard=tensorboard, dist=dist_info)

    start = 0
    losses: list[float | None] = []
    scales: list[float] = []  # the loss scale each step's gradients carried
    skipped: list[dict[str, Any]] = []
    batches = task.train_batches(seed)
    saved_rng = None
    if saved is not None and dist_info.enabled:
        from mixprec import dist_checkpoint

        saved_rng = dist_checkpoint.load(checkpoint_dir, dist_info, model, optimizers, saved)
    elif saved is not None:
        model.load_state_dict(saved["model"])
        if len(saved["optimizers"]) != len(optimizers):
            raise UsageError(f"checkpoint holds {len(saved['optimizers'])} optimizer states, the task builds {len(optimizers)}")
        for optimizer, state in zip(optimizers, saved["optimizers"]):
            optimizer.load_state_dict(state)
        saved_rng = saved["rng"]
    if saved is not None:
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
        first = distributed.shard_batch(first, rank, world)  # a batch that does not split fails here, early
    if saved is None and distributed.restart_count() > 0 and run_dir is not None:
        (Path(run_dir) / MONITOR_FILE).unlink(missing_ok=True)  # written by the attempt torchrun replaced
    numerics.start(saved["numerics"] if saved is not None else None, first, start)
    if saved is not None:
        # After the replay and the FLOP count, in case they draw from the global RNG.
        checkpoint.set_rng_state(saved_rng)

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
                batch = distributed.shard_batch(next(batches), rank, world)
            except StopIteration:
                raise UsageError(f"task {task.name!r}: train_batches ran out of data at step {step}; it must yield at least steps x accumulate batches") from None
            numerics.add_batch(batch)
            with engine.autocast():
                loss = task.loss(wrapped, batch)
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
                  {"losses": losses, "loss_scales": scales, "skipped": skipped}, numerics, dist_info)
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
        "distributed": dist_info.to_dict() if dist_info.enabled else None,
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
    if run_dir is not None:  # None on ranks other than 0
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


def _has_checkpoint(directory: str | Path, dist_info: distributed.DistInfo) -> bool:
    from mixprec import dist_checkpoint

    return (dist_checkpoint.exists(directory) if dist_info.enabled
            else checkpoint.checkpoint_path(directory).exists())


def _open_checkpoint_dir(directory: str | Path | None, resume: bool, task: Task, policy: Policy,
                         config: dict[str, Any], dist_info: distributed.DistInfo) -> dict[str, Any] | None:
    from mixprec import dist_checkpoint

    if directory is None:
        if resume:
            raise UsageError("resume needs a checkpoint directory (--checkpoint-dir DIR)")
        return None
    directory = checkpoint.prepare_dir(directory)
    single, dist_pointer = checkpoint.checkpoint_path(directory), dist_checkpoint.pointer_path(directory)
    path = dist_pointer if dist_info.enabled else single
    if not resume:
        if single.exists() or dist_pointer.exists():
            raise UsageError(
                f"{str(directory)!r} already holds a checkpoint; pass --resume to continue it, or choose an empty directory"
            )
        return None
    if not path.exists():
        other = single if dist_info.enabled else dist_pointer
        if other.exists():
            was = "a distributed run (--strategy ddp|fsdp)" if other == dist_pointer else "a single-process run"
            hint = ("resume it with --strategy ddp or fsdp (under torchrun, or as one process)"
                    if other == dist_pointer else "resume it with --strategy none")
            raise UsageError(f"the checkpoint in {str(directory)!r} was written by {was}; {hint}")
        raise UsageError(f"nothing to resume: no checkpoint in {str(directory)!r} (expected {path.name})")
    saved = dist_checkpoint.load_meta(directory) if dist_info.enabled else checkpoint.load(path)
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
          history: dict[str, list[Any]], numerics: RunNumerics, dist_info: distributed.DistInfo) -> None:
    if dist_info.enabled:
        from mixprec import dist_checkpoint

        dist_checkpoint.save(directory, dist_info, {
            "task": task.name,
            "policy": policy.to_dict(),
            "config": config,
            "step": step,
            "batches_consumed": step * engine.accumulate,
            "engine": engine.state_dict(),
            "history": history,
            "numerics": numerics.state_dict(),
        }, model, optimizers, attempt=distributed.restart_count())
        return
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
