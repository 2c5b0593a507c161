"""Checkpoints of distributed runs, through ``torch.distributed.checkpoint`` (DCP).

Layout of a checkpoint directory written by a ``--strategy ddp|fsdp`` run::

    DIR/last.dist.json                 the pointer: {"format", "path", "step", "world_size", ...}
    DIR/dist/step-00000010-a0/         one complete checkpoint (DCP directory):
        .metadata, __<rank>_0.distcp   model + optimizer state (sharded under FSDP,
                                       written once under DDP: DCP dedups replicas)
        meta.pt                        rank 0: task, policy, config, step, batches consumed,
                                       engine (loss scaler) and numerics/controller state,
                                       history (a mixprec checkpoint file: weights_only)
        rng-<rank>.pt                  each rank's torch/Python/numpy RNG states

Atomic: every rank writes into ``DIR/dist/.tmp-step-...``; after a barrier rank 0 renames
it to its final name, fsyncs, then replaces the pointer atomically and only then deletes
older checkpoints. A process killed at any moment leaves the pointer on a complete
checkpoint. The suffix ``-a<restart>`` keeps a restarted attempt from colliding with a
half-finished directory of the attempt it replaced.

Model and optimizer go through ``torch.distributed.checkpoint.state_dict``
(``get_model_state_dict``/``get_optimizer_state_dict`` and the ``set_*`` counterparts), so
the keys are the model's own parameter names (no DDP ``module.`` prefix) and a checkpoint
can be loaded with a different number of ranks, and from DDP into FSDP or back, as far
as DCP reshards (it does for both). RNG states are restored exactly when the number of
ranks is unchanged; otherwise rank r takes rank ``r % saved_world_size``'s.

Safe loading (invariant 6): DCP stores its ``.metadata`` as a Python pickle, which torch's
``FileSystemReader`` loads with plain ``pickle.load``. mixprec reads it through a
restricted unpickler instead: only DCP's own metadata classes, torch dtypes, layouts,
memory formats and ``torch.Size`` may appear, anything else is refused with a
UsageError. Tensor data is raw bytes, DCP's non-tensor values are read with
``weights_only=True``, and so are mixprec's own files.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from mixprec import checkpoint
from mixprec.distributed import DistInfo, barrier
from mixprec.errors import UsageError

DIST_FORMAT = "mixprec.dist-checkpoint/1"
POINTER_NAME = "last.dist.json"
SUBDIR = "dist"
_TMP = ".tmp-"


class _MetadataUnpickler(pickle.Unpickler):
    _ALLOWED_MODULES = ("torch.distributed.checkpoint",)
    _ALLOWED = {("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("builtins", "set"),
                ("builtins", "frozenset"), ("torch", "Size"),
                ("torch.serialization", "_get_layout")}  # name -> torch layout, as weights_only allows

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(self._ALLOWED_MODULES) or (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a DCP metadata file")


def _safe_reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            meta_path = self._get_metadata_path(kwargs.get("rank"))
            try:
                with self.fs.create_stream(meta_path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as exc:
                raise UsageError(f"distributed checkpoint {str(path)!r}: unsafe or corrupt .metadata ({exc})") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def pointer_path(directory: str | Path) -> Path:
    return Path(directory) / POINTER_NAME


def exists(directory: str | Path) -> bool:
    return pointer_path(directory).is_file()


def _read_pointer(directory: Path) -> dict[str, Any]:
    path = pointer_path(directory)
    try:
        pointer = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"distributed checkpoint pointer {str(path)!r} is unreadable: {exc}") from None
    if not isinstance(pointer, dict) or pointer.get("format") != DIST_FORMAT or not isinstance(pointer.get("path"), str):
        raise UsageError(f"{str(path)!r} is not a mixprec distributed checkpoint pointer (format {DIST_FORMAT!r})")
    return pointer


def checkpoint_dir(directory: str | Path) -> Path:
    """The complete DCP directory the pointer names."""
    directory = Path(directory)
    pointer = _read_pointer(directory)
    path = directory / SUBDIR / pointer["path"]
    if not (path / "meta.pt").is_file():
        raise UsageError(f"distributed checkpoint {str(path)!r} named by {POINTER_NAME} is missing or incomplete")
    return path


def load_meta(directory: str | Path) -> dict[str, Any]:
    """The run's metadata (task, policy, config, step, engine/numerics state, history)."""
    return checkpoint.load(checkpoint_dir(directory) / "meta.pt")


def _model_and_optim_state(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizers:
        state["optim"] = get_optimizer_state_dict(model, list(optimizers))
    return state


def save(directory: str | Path, info: DistInfo, meta: dict[str, Any], model: nn.Module,
         optimizers: Sequence[torch.optim.Optimizer], attempt: int = 0) -> Path:
    """Collectively write a checkpoint of ``model`` and ``optimizers`` with ``meta``.

    Optimizers that have not stepped yet (every step so far skipped) are left out: reading
    their state would make ``get_optimizer_state_dict`` initialize it with a zero step,
    which would change what the next real step does (invariant 3).
    """
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    root = directory / SUBDIR
    name = f"step-{int(meta['step']):08d}-a{attempt}"
    tmp, final = root / (_TMP + name), root / name
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(_TMP + "*"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    stepped = [i for i, o in enumerate(optimizers) if o.state]
    state = _model_and_optim_state(model, [optimizers[i] for i in stepped])
    dcp.save(state, checkpoint_id=str(tmp))
    checkpoint.save_file(tmp / f"rng-{info.rank}.pt", {"rng": checkpoint.rng_state()})
    if info.is_main:
        checkpoint.save_file(tmp / "meta.pt", {**meta, "world_size": info.world_size, "strategy": info.strategy,
                                               "optimizers_with_state": stepped})
    barrier()
    if info.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        checkpoint.fsync_dir(root)
        checkpoint.write_text_atomic(pointer_path(directory), json.dumps({
            "format": DIST_FORMAT, "path": name, "step": int(meta["step"]), "world_size": info.world_size,
            "strategy": info.strategy}) + "\n")
        for old in root.iterdir():
            if old.name != name and old.is_dir() and old.name.startswith("step-"):
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(directory: str | Path, info: DistInfo, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
         meta: dict[str, Any]) -> dict[str, Any]:
    """Collectively load the model and optimizer state into ``model``/``optimizers`` (already
    set up, wrapped or sharded); return this rank's saved RNG state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = checkpoint_dir(directory)
    stepped = [int(i) for i in meta.get("optimizers_with_state", range(len(optimizers)))]
    if any(i >= len(optimizers) for i in stepped):
        raise UsageError(f"checkpoint {str(path)!r} holds optimizer states the task does not build")
    subset = [optimizers[i] for i in stepped]
    state = _model_and_optim_state(model, subset)
    try:
        dcp.load(state, storage_reader=_safe_reader(path))
    except Exception as exc:  # DCP raises CheckpointException / RuntimeError on mismatched keys or shapes
        text = str(exc)
        unsafe = re.search(r"unsafe or corrupt \.metadata \([^)]*\)", text)
        if unsafe:
            raise UsageError(f"distributed checkpoint {str(path)!r}: {unsafe.group(0)}") from None
        first = (text.strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UsageError(f"distributed checkpoint {str(path)!r} does not fit this model/optimizer: {first}") from None
    set_model_state_dict(model, state["model"])
    if subset:
        set_optimizer_state_dict(model, subset, state["optim"])
    saved_world = int(meta.get("world_size", 1))
    rng = path / f"rng-{info.rank}.pt"
    if not rng.is_file():
        rng = path / f"rng-{info.rank % saved_world}.pt"
    return checkpoint.load(rng)["rng"]


def load_model_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict of the checkpoint in ``directory``, in one
    process with no process group: for comparing runs, exporting or inspecting."""
    return dict(load_full_state_dict(directory)["model"])


def load_full_state_dict(directory: str | Path) -> dict[str, Any]:
    """Everything DCP holds in the checkpoint (``{"model": ..., "optim": ...}``), unsharded,
    in one process: what ``dcp_to_torch_save`` produces, read through the safe reader."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # as dcp_to_torch_save

    if dist.is_available() and dist.is_initialized():
        raise UsageError("load_full_state_dict reads a checkpoint in one process; call it outside a process group")
    path = checkpoint_dir(directory)
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=_safe_reader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state
