"""The ``environment`` block every mixprec JSON document carries, and CPU capability facts.

Results are only comparable with the machine and versions that produced them, so every
report records them. Nothing here changes state; the /proc/cpuinfo parse is cached.
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

import torch

from mixprec.errors import UsageError

__all__ = ["environment", "cpu_flags", "cpu_model", "cpu_has_fast_fp16", "cpu_has_fast_bf16",
           "PRECISION_CPU_FLAGS"]

# CPU flags that decide which low-precision formats run fast on this CPU.
PRECISION_CPU_FLAGS: tuple[str, ...] = (
    "avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile",
)


def _parse_cpuinfo(text: str) -> tuple[str | None, frozenset[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo text."""
    model: str | None = None
    flags: frozenset[str] | None = None
    for raw in text.splitlines():
        key, sep, value = raw.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip() or None
        elif key in ("flags", "Features") and flags is None:  # "Features" on ARM
            flags = frozenset(value.split())
        if model is not None and flags is not None:
            break
    return model, flags or frozenset()


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str | None, frozenset[str]]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return _parse_cpuinfo(f.read())
    except OSError:  # not Linux, or /proc not mounted
        return None, frozenset()


def cpu_model() -> str:
    """CPU model name: /proc/cpuinfo on Linux, else ``platform.processor()``."""
    return _cpuinfo()[0] or platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    """The precision-relevant CPU flags present, in ``PRECISION_CPU_FLAGS`` order."""
    present = _cpuinfo()[1]
    return [f for f in PRECISION_CPU_FLAGS if f in present]


def cpu_has_fast_fp16() -> bool:
    """fp16 matmuls are only fast on CPUs with AVX512-FP16 or AMX-FP16 (else ~30x slower)."""
    flags = cpu_flags()
    return "avx512_fp16" in flags or "amx_fp16" in flags


def cpu_has_fast_bf16() -> bool:
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _mixprec_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("mixprec")
    except importlib.metadata.PackageNotFoundError:
        # Source checkout on PYTHONPATH: imported lazily, since mixprec/__init__ may import us.
        import mixprec

        return str(getattr(mixprec, "__version__", "unknown"))


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"invalid device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda":
        # Say so rather than silently describing the CPU (invariant 1).
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} requested but CUDA is not available")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"device {device!r} requested but only {torch.cuda.device_count()} "
                "CUDA device(s) exist"
            )
        dev = torch.device("cuda", index)
    return dev


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Versions and hardware for the JSON ``environment`` block (JSON-serializable)."""
    dev = resolve_device(device)
    cpu = cpu_model()
    gpu: str | None = None
    if dev.type == "cuda":
        gpu = torch.cuda.get_device_name(dev)
    elif torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    if dev.type == "cpu":
        device_name = cpu
    elif dev.type == "cuda":
        device_name = gpu
    else:
        device_name = str(dev)
    return {
        "mixprec": _mixprec_version(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(dev),
        "device_name": device_name,
        "cpu_model": cpu,
        "gpu_model": gpu,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
