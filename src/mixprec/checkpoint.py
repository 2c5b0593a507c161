"""Checkpoints: atomic writes, safe loads, RNG state capture.

A checkpoint directory holds one ``last.pt``, replaced atomically (write a temp file in
the same directory, fsync it, rename over, fsync the directory), so a process killed at
any moment leaves either the previous or the new checkpoint, never half of one. Loading
uses ``torch.load(weights_only=True)``: everything saved is tensors and plain containers.

Distributed runs (``--strategy ddp|fsdp``) write sharded checkpoints instead; see
:mod:`mixprec.dist_checkpoint`.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixprec.errors import UsageError

CHECKPOINT_FORMAT = "mixprec.checkpoint/1"
CHECKPOINT_NAME = "last.pt"
_TMP_PREFIX = ".last.pt.tmp-"


def checkpoint_path(directory: str | Path) -> Path:
    return Path(directory) / CHECKPOINT_NAME


def prepare_dir(directory: str | Path) -> Path:
    """Create ``directory`` if needed and prove it is writable, before any training runs."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=_TMP_PREFIX):
            pass
    except OSError as exc:
        raise UsageError(f"checkpoint dir {str(path)!r} is not writable: {exc.strerror or exc}") from None
    return path


def save(directory: str | Path, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` as the directory's checkpoint."""
    directory = Path(directory)
    target = save_file(checkpoint_path(directory), payload, prefix=_TMP_PREFIX)
    _remove_stale_temps(directory)
    return target


def save_file(target: str | Path, payload: dict[str, Any], prefix: str | None = None) -> Path:
    """Atomically write ``payload`` (tensors and plain containers) to ``target`` in the
    mixprec checkpoint format: temp file in the same directory, fsync, rename, fsync the
    directory. :func:`load` reads it back."""
    target = Path(target)
    directory = target.parent
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix or f".{target.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(directory)  # make the rename itself durable
    return target


def write_text_atomic(target: str | Path, text: str) -> Path:
    """Atomically replace ``target`` with ``text``: temp file, fsync, rename, fsync the directory."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def fsync_dir(directory: str | Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_stale_temps(directory: Path) -> None:
    # Left behind by a process killed mid-write; never a complete checkpoint.
    for stale in directory.glob(_TMP_PREFIX + "*"):
        stale.unlink(missing_ok=True)


def load(path: str | Path) -> dict[str, Any]:
    """Load and check a mixprec checkpoint; UsageError for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no checkpoint at {str(path)!r}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            # torch's own message suggests weights_only=False: advice not to pass on.
            raise UsageError(f"checkpoint {str(path)!r} is corrupt or not a torch checkpoint: it holds objects "
                             "other than tensors and plain containers, which safe (weights_only) loading refuses") from None
        raise UsageError(f"checkpoint {str(path)!r} is corrupt or not a torch checkpoint: {exc}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(f"checkpoint {str(path)!r} is corrupt or not a torch checkpoint: {first}") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise UsageError(f"{str(path)!r} is not a mixprec checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    return data


def rng_state() -> dict[str, Any]:
    """torch, Python and numpy RNG states, in a form ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
