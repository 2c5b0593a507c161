"""Data-parallel training under torchrun: DDP or FSDP2, one policy, the same verdicts.

mixprec has no launcher of its own. ``torchrun`` (torch.distributed elastic) starts one
process per rank and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous
variables); :func:`init` reads them and joins the process group::

    torchrun --nproc-per-node 2 -m mixprec train lm --strategy ddp --precision bf16-mixed

Strategies
    ``none`` (default): one process. Under torchrun with ``WORLD_SIZE > 1`` this is an
    error (every rank would train its own copy and write the same files).
    ``ddp``: :class:`torch.nn.parallel.DistributedDataParallel`; gradients are averaged
    across ranks; accumulation windows use ``no_sync`` on the micro-batches that do not
    end the window.
    ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``); see :func:`shard_model` for
    how the policy maps to ``MixedPrecisionPolicy``. Accumulation windows turn gradient
    reduction off on the non-boundary micro-batches (``set_requires_gradient_sync``).
    ``ddp``/``fsdp`` without torchrun (``WORLD_SIZE`` unset or 1) run in one process as a
    1-rank group (no port, no rendezvous): the same code path, handy to resume a
    distributed checkpoint on one machine or to debug.

Backends: gloo on CPU, nccl on CUDA with the device ``cuda:LOCAL_RANK``.

Restarts (``torchrun --max-restarts K``): export ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
    for torchrun. By default torchrun's c10d rendezvous shares its TCPStore with the
    workers, and a restarted worker can read the previous attempt's gloo/nccl addresses and
    fail to connect (torch issue #135712; seen here with torch 2.13 and gloo); with the
    variable set, every attempt gets a fresh store.

Data: every rank reads the task's batches (``train_batches(seed)`` yields GLOBAL
    batches) and trains on its contiguous slice of rows: rank r of W takes rows
    ``[r*B/W, (r+1)*B/W)`` of every tensor in the batch (tensors in tuples, lists, dicts,
    sliced along dim 0; other values pass unchanged). A batch whose size is not divisible
    by W is a usage error. So ``--batch-size`` is the global batch, the same command
    trains the same model whatever W is (2 ranks x B/2 rows = 1 rank x B rows, up to
    floating-point summation order), and a checkpoint's data position (batches consumed =
    steps x accumulate) means the same thing for any W, so resuming with another number of
    ranks continues the same data stream. Caveat: BatchNorm statistics are per rank
    (DDP broadcasts rank 0's buffers at each forward; nothing syncs the batch statistics).
    The loss must be a mean over equally many rows per rank (the usual mean reduction)
    for the averaged gradient to equal the global batch's.

Agreement: at each optimizer step the engine all-reduces one small tensor holding every
    optimizer's found-inf flag, the window's non-finite-loss flag and its mean loss (and,
    under FSDP without clipping, the squared local gradient norm), before its one host
    sync: every rank steps or skips together and the loss scale is identical everywhere.

Randomness: every rank seeds with ``seed`` (identical initial weights, which FSDP needs);
    after the model is built, rank r > 0 reseeds with ``seed + r`` so dropout masks differ
    across ranks, while rank 0 (and so a 1-rank run) continues the single-process stream.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from mixprec.errors import UsageError

STRATEGIES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: strategy, rank, world size, backend."""

    strategy: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    created_group: bool = False  # this module created the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "world_size": self.world_size, "backend": self.backend}


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun)."""
    return _env_int("RANK", 0)


def launch_world_size() -> int:
    return _env_int("WORLD_SIZE", 1)


def restart_count() -> int:
    """How many times torchrun restarted the workers (``TORCHELASTIC_RESTART_COUNT``)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if strategy == "none" and launch_world_size() > 1:
        raise UsageError(
            f"this process is rank {launch_rank()} of WORLD_SIZE={launch_world_size()} launched by torchrun, but the "
            "strategy is 'none': every rank would train its own copy; pass --strategy ddp or --strategy fsdp")
    return strategy


def init(strategy: str, device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join (or create) the process group for ``strategy``; return the info and the device
    this rank trains on (``cuda:LOCAL_RANK`` for CUDA under torchrun)."""
    check_strategy(strategy)
    if strategy == "none":
        return DistInfo(), device
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError(f"--strategy {strategy} needs torch.distributed, which this torch build lacks")
    local_rank = _env_int("LOCAL_RANK", 0)
    if device.type == "cuda" and launch_world_size() > 1:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    created = False
    if not dist.is_initialized():
        if backend == "gloo" and not dist.is_gloo_available():
            raise UsageError("--strategy on CPU needs the gloo backend, which this torch build lacks")
        if launch_world_size() > 1 or "MASTER_ADDR" in os.environ:
            try:
                dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10),
                                        **({"device_id": device} if device.type == "cuda" else {}))
            except RuntimeError as exc:
                if restart_count() > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                    raise UsageError(
                        f"joining the process group failed after torchrun restarted the workers ({str(exc)[:200]}); "
                        "torchrun shares its rendezvous store with the workers, and a restarted worker can read "
                        "the previous attempt's addresses (torch issue #135712): launch with "
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment") from None
                raise
        else:  # one process, no rendezvous: a 1-rank group on an in-memory store
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
    info = DistInfo(strategy, dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), created)
    return info, device


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if :func:`init` created it."""
    if info.created_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# -------------------------------------------------------------------------- data


def shard_batch(batch: Any, rank: int, world_size: int) -> Any:
    """Rank ``rank``'s contiguous slice (along dim 0) of every tensor in ``batch``."""
    if world_size == 1:
        return batch
    sizes: set[int] = set()
    _batch_sizes(batch, sizes)
    if not sizes:
        raise UsageError(f"a batch of type {type(batch).__name__} holds no tensors to split across {world_size} ranks")
    for size in sizes:
        if size % world_size:
            raise UsageError(f"batch size {size} is not divisible by the {world_size} ranks: every rank trains on "
                             f"an equal slice of the global batch; choose a batch size that is a multiple of {world_size}")
    return _slice(batch, rank, world_size)


def _batch_sizes(obj: Any, out: set[int]) -> None:
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            return
        out.add(obj.shape[0])
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _batch_sizes(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _batch_sizes(o, out)


def _slice(obj: Any, rank: int, world: int) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            return obj
        n = obj.shape[0] // world
        return obj[rank * n:(rank + 1) * n]
    if isinstance(obj, tuple):
        items = [_slice(o, rank, world) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_slice(o, rank, world) for o in obj]
    if isinstance(obj, dict):
        return {k: _slice(v, rank, world) for k, v in obj.items()}
    return obj


# -------------------------------------------------------------------------- wrapping


def require_group(strategy: str) -> tuple[int, int]:
    """(rank, world size) of the default process group; a clear error when there is none."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError(f"strategy {strategy!r} needs an initialized process group: call "
                         f"mixprec.distributed.init({strategy!r}, device) (or torch.distributed.init_process_group) "
                         "first, and launch with torchrun")
    return dist.get_rank(), dist.get_world_size()


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
    return DistributedDataParallel(model)


def shard_model(model: nn.Module, fp32_roots: Sequence[str], low_dtype: torch.dtype | None,
                device: torch.device) -> list[str]:
    """``fully_shard`` ``model`` for a policy; return the sharded units' names (root: '').

    Units, applied bottom-up: every module an fp32 rule pins (with
    ``MixedPrecisionPolicy(param_dtype=float32, reduce_dtype=float32)``: its parameters are
    gathered and its gradients reduced in fp32), then every element of an
    ``nn.ModuleList`` (transformer blocks, by convention) and finally the root, both with
    ``MixedPrecisionPolicy(param_dtype=low_dtype, reduce_dtype=float32)`` in the mixed modes
    (fp32 everywhere in the full modes). The sharded fp32 parameters are the master
    weights; the optimizer updates them shard by shard.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    low = MixedPrecisionPolicy(param_dtype=low_dtype, reduce_dtype=torch.float32) if low_dtype is not None else fp32
    roots = list(fp32_roots)

    def under_fp32(name: str) -> bool:
        return any(name == r or name.startswith(r + ".") for r in roots)

    units: list[tuple[str, Any]] = [(r, fp32) for r in roots]
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for i, _ in enumerate(module):
                child = f"{name}.{i}" if name else str(i)
                if not under_fp32(child) and any(True for _ in model.get_submodule(child).parameters()):
                    units.append((child, low))
    # Bottom-up: deeper modules first, so an fp32 island inside a block is its own unit.
    units.sort(key=lambda u: -u[0].count("."))
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for name, mp in units:
        fully_shard(model.get_submodule(name), mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=low)
    return [name for name, _ in units] + [""]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (an alias: in-place ops change the DTensor), else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None and type(t).__name__ == "DTensor" else t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
