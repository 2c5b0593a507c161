"""What this machine's hardware does fast, and what it does badly.

``probe(device)`` times a square matmul in each format (fp32, tf32, bf16, fp16 and fp8
e4m3 through ``torch._scaled_mm``) and a large fp32 copy, and turns the numbers into
plain-language findings: which formats are fast or slow here, the pitfalls, what the
hardware lacks and which mode to train in. Nothing about which format is fast is assumed:
every finding comes from a measurement (the CPU flags only explain *why*).

Measurement, per format:

1. run once untimed at ``n0 / 2`` (library start-up), time one call there and one at
   ``n0 = min(256, size)`` (after an untimed warm-up): their ratio is how much one call
   grows per doubling of ``n`` (8 when compute-bound, less while per-call overhead
   dominates; clamped to [2, 8]);
2. walk up a doubling ladder towards the requested size, timing one call per rung (the
   new size's warm-up), and stop before a rung whose estimated cost
   (``(repeats + 1) * growth * last_time``) would exceed the per-format time budget
   (4 s, 0.7 s with ``quick``; less if earlier formats overran a 17 s / 3.5 s total);
3. time ``repeats`` calls at the rung reached and report the median (stopping early,
   after at least one, past twice the budget). Throughput is ``2 n^3 / median``.

So a format that is very slow on this machine is measured at a smaller ``n`` and its
throughput there is reported as its throughput (``"extrapolated": true``, with both
``size`` and ``requested_size``). That is a lower bound: big matmuls are usually at least
as efficient as small ones. It keeps a full probe under ~20 s on a 2-core CPU and a quick
one under ~5 s.

fp8 is timed as the raw ``torch._scaled_mm`` kernel with per-tensor scales (1.0) and a
bf16 output; the casts to fp8 are not timed. Before it is timed, its result is checked
against an fp32 matmul of the same fp8 values, so "available" means "works and is right".

Results are cached as JSON in ``<cache_dir>/probe-<fingerprint>.json``; the fingerprint
hashes what decides the numbers (device type and name, CPU model and flags, torch
version, thread count). A cached result is reused (``"cached": true``) when its
fingerprint matches and it was measured at least as thoroughly as asked (same size
request, at least as many repeats, and not quick unless quick was asked); ``refresh=True``
always re-measures. A corrupt cache file is ignored and rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from mixprec.environment import environment, resolve_device
from mixprec.errors import UsageError
from mixprec.jsonio import dumps, write_atomic

__all__ = [
    "SCHEMA",
    "MATMUL_FORMATS",
    "FAST_RATIO",
    "SLOW_RATIO",
    "probe",
    "analyze",
    "fingerprint",
    "default_cache_dir",
    "render_probe",
]

SCHEMA = "mixprec.probe/1"
# Bump when the measurement method changes so that old cache files stop matching.
_METHOD_VERSION = 1

MATMUL_FORMATS: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16", "fp8_e4m3")
FAST_RATIO = 1.2  # ratio_to_fp32 >= this: "fast"
SLOW_RATIO = 0.5  # ratio_to_fp32 < this: "slow"
# A mixed mode must beat fp32 matmuls by this much to be recommended: autocast's casts
# cost time that a raw matmul timing does not see.
_MIN_GAIN = 1.1
# bf16 is preferred over fp16 unless fp16 is this much faster (bf16 needs no loss scaling).
_FP16_OVER_BF16 = 1.1

# Modes the recommendation chooses from, and the matmul format that decides each.
_MODES: tuple[tuple[str, str], ...] = (("bf16-mixed", "bf16"), ("fp16-mixed", "fp16"), ("fp32", "fp32"))

# What each thing in "lacks" means, for render_probe and for readers of the JSON.
FEATURES: dict[str, str] = {
    "avx512_bf16": "AVX512_BF16: bf16 dot-product instructions (fast bf16 matmul on CPU)",
    "amx_bf16": "AMX-BF16: matrix tiles for bf16 (several times faster bf16 matmul)",
    "avx512_fp16": "AVX512-FP16: native fp16 arithmetic (without it fp16 matmul is emulated, "
                   "~30x slower than fp32)",
    "amx_fp16": "AMX-FP16: matrix tiles for fp16",
    "cuda": "a CUDA GPU: no tf32 tensor cores, no fast fp8 matmul",
    "tf32_tensor_cores": "tf32 tensor cores (NVIDIA Ampere, sm_80, or newer)",
    "bf16_tensor_cores": "bf16 tensor cores (NVIDIA Ampere, sm_80, or newer)",
    "fp8_tensor_cores": "fp8 tensor cores (NVIDIA Ada/Hopper, sm_89, or newer)",
}
_CPU_FEATURES: tuple[str, ...] = ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")
_FLAG_LABEL = {"avx512_bf16": "AVX512_BF16", "amx_bf16": "AMX-BF16", "avx512_fp16": "AVX512-FP16",
               "amx_fp16": "AMX-FP16"}
_FORMAT_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
_LABEL = {"fp8_e4m3": "fp8 matmul (_scaled_mm)"}


@dataclass(frozen=True)
class _Plan:
    size: int  # requested matmul size
    repeats: int
    budget_s: float  # per-format time budget for the ladder + timed repeats
    total_s: float  # all matmul measurements together (the bandwidth copy comes on top)
    bandwidth_bytes: int  # size of the buffer copied for the bandwidth measurement


def _plan(dev: torch.device, size: int | None, repeats: int, quick: bool) -> _Plan:
    cuda = dev.type == "cuda"
    if size is None:
        size = (4096 if quick else 8192) if cuda else (1024 if quick else 2048)
    mb = (256 if quick else 1024) if cuda else (64 if quick else 256)
    return _Plan(
        size=size,
        repeats=min(repeats, 3) if quick else repeats,
        budget_s=0.7 if quick else 4.0,
        total_s=3.5 if quick else 17.0,
        bandwidth_bytes=mb * 2**20,
    )


# ---------------------------------------------------------------------------- timing


def _time_calls(fn: Callable[[], object], repeats: int, device: torch.device,
                budget_s: float | None = None) -> list[float]:
    """Seconds for each of ``repeats`` calls of ``fn`` (stopping early, after at least one
    call, once ``budget_s`` is spent). On CUDA each call is bracketed by events and
    synchronized, so it is the kernel time, not the launch time."""
    times: list[float] = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if budget_s is not None and sum(times) > budget_s:
            break
    return times


class _Unavailable(Exception):
    """This format cannot run here; the message says why."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


@contextlib.contextmanager
def _fp32_matmul_precision(dev: torch.device, precision: str) -> Iterator[None]:
    """Run fp32 matmuls on ``dev`` in ``precision`` ("ieee" or "tf32"), whatever the user
    set globally, and restore the setting afterwards."""
    backend = torch.backends.cuda.matmul if dev.type == "cuda" else torch.backends.mkldnn.matmul
    if hasattr(backend, "fp32_precision"):
        old = backend.fp32_precision
        backend.fp32_precision = precision
        try:
            yield
        finally:
            backend.fp32_precision = old
    elif dev.type == "cuda":  # torch before the fp32_precision API
        old_flag = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old_flag
    else:
        yield


def _matmul_maker(fmt: str, dev: torch.device) -> Callable[[int], Callable[[], object]]:
    """``make(n)`` building inputs of size ``n`` and returning the call to time.
    Raises ``_Unavailable`` when the format cannot run on ``dev``."""
    if fmt == "tf32":
        if dev.type != "cuda":
            raise _Unavailable("tf32 is a CUDA tensor-core mode; CPU fp32 matmuls always run "
                               "in full fp32")
        cap = torch.cuda.get_device_capability(dev)
        if cap < (8, 0):
            raise _Unavailable(f"tf32 needs an NVIDIA Ampere (sm_80) or newer GPU; this one is "
                               f"sm_{cap[0]}{cap[1]}")

    if fmt in ("fp32", "tf32", "bf16", "fp16"):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(fmt, torch.float32)

        def make(n: int) -> Callable[[], object]:
            a = torch.randn(n, n, device=dev).to(dtype)
            b = torch.randn(n, n, device=dev).to(dtype)
            return lambda: torch.mm(a, b)

        return make

    if fmt == "fp8_e4m3":
        if not hasattr(torch, "_scaled_mm"):
            raise _Unavailable(f"torch {torch.__version__} has no torch._scaled_mm")
        e4m3 = torch.float8_e4m3fn
        one = torch.ones((), device=dev, dtype=torch.float32)

        def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            a = torch.randn(n, n, device=dev).to(e4m3)
            b = torch.randn(n, n, device=dev).to(e4m3).t()  # column-major, as _scaled_mm wants
            return a, b

        def call(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

        # Does it run at all, and is the answer right? (64 is a multiple of 16, as CUDA needs.)
        a, b = inputs(64)
        try:
            got = call(a, b).float()
        except Exception as exc:  # noqa: BLE001 - any failure means "unavailable", with why
            raise _Unavailable(_first_line(exc)) from exc
        ref = a.float() @ b.float()
        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        if not math.isfinite(err) or err > 0.05:
            raise _Unavailable(f"torch._scaled_mm runs but returns wrong results here "
                               f"(relative error {err:.3g} versus an fp32 matmul)")

        def make(n: int) -> Callable[[], object]:
            a, b = inputs(n)
            return lambda: call(a, b)

        return make

    raise UsageError(f"unknown matmul format {fmt!r}; valid: {', '.join(MATMUL_FORMATS)}")


def _unavailable(reason: str, size: int) -> dict[str, Any]:
    return {"available": False, "tflops": None, "seconds_median": None, "size": None,
            "requested_size": size, "extrapolated": False, "repeats": 0,
            "ratio_to_fp32": None, "reason": reason}


def _growth(before: float, after: float) -> float:
    return min(8.0, max(2.0, after / before)) if before > 0 else 8.0


def _measure_matmul(fmt: str, dev: torch.device, plan: _Plan, budget_s: float) -> dict[str, Any]:
    precision = "tf32" if fmt == "tf32" and dev.type == "cuda" else "ieee"
    target = plan.size
    with _fp32_matmul_precision(dev, precision):
        try:
            make = _matmul_maker(fmt, dev)
            # Growth of one call's time per doubling of n: 8 when compute-bound, less
            # while fixed per-call overhead dominates. Measured at n0/2 -> n0, then rung
            # by rung; clamped to [2, 8] so that an estimate is never wildly optimistic.
            n = min(256, target)
            half = make(max(n // 2, 16))
            half()  # untimed: one-time library and allocator start-up
            t_half = _time_calls(half, 1, dev)[0]
            del half
            fn = make(n)
            fn()  # untimed warm-up at n
            last = _time_calls(fn, 1, dev)[0]
            growth = _growth(t_half, last)
            while n < target:
                nxt = min(2 * n, target)
                estimate = last * growth ** (math.log2(nxt / n))
                if estimate * (plan.repeats + 1) > budget_s:
                    break
                del fn
                fn = make(nxt)
                t = _time_calls(fn, 1, dev)[0]  # warm-up at the new size
                growth = _growth(last, t) if nxt == 2 * n else growth
                last, n = t, nxt
            times = _time_calls(fn, plan.repeats, dev, budget_s=2 * budget_s)
        except _Unavailable as exc:
            return _unavailable(str(exc), target)
        except Exception as exc:  # noqa: BLE001 - report the truth rather than crash
            return _unavailable(_first_line(exc), target)
    median = statistics.median(times)
    tflops = 2.0 * n**3 / median / 1e12 if median > 0 else None
    return {"available": tflops is not None, "tflops": tflops, "seconds_median": median,
            "size": n, "requested_size": target, "extrapolated": n < target,
            "repeats": len(times), "ratio_to_fp32": None,
            "reason": None if tflops is not None else "timing resolution too coarse"}


def _measure_bandwidth(dev: torch.device, plan: _Plan) -> dict[str, Any]:
    """GB/s of an fp32 copy: (bytes read + bytes written) / median time."""
    numel = plan.bandwidth_bytes // 4
    src = torch.ones(numel, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: touches every page
    times = _time_calls(lambda: dst.copy_(src), max(plan.repeats, 3), dev)
    median = statistics.median(times)
    return {"memory_bandwidth_gbs": 2 * src.nbytes / median / 1e9 if median > 0 else None,
            "memory_bandwidth_buffer_mb": src.nbytes // 2**20}


# ------------------------------------------------------------------------ fingerprint


def _fingerprint_of(env: Mapping[str, Any]) -> str:
    key = {
        "method": _METHOD_VERSION,
        "device_type": str(env["device"]).split(":")[0],
        "device_name": env["device_name"],
        "cpu_model": env["cpu_model"],
        "gpu_model": env["gpu_model"] if str(env["device"]).startswith("cuda") else None,
        "cpu_flags": sorted(env["cpu_flags"]),
        "torch": env["torch"],
        "threads": env["threads"],
    }
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint(device: str = "cpu") -> str:
    """A stable 16-hex-digit hash of what decides the probe's numbers on ``device``."""
    return _fingerprint_of(environment(device))


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mixprec``, else ``~/.cache/mixprec``."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "mixprec"


# --------------------------------------------------------------------------- analysis


def _times(ratio: float) -> str:
    """A speed ratio for prose: 38x, 2.4x."""
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"


def _versus(ratio: float) -> str:
    """'2.4x faster' / '38x slower' (than fp32)."""
    return f"{_times(ratio)} faster" if ratio >= 1 else f"{_times(1 / ratio)} slower"


def analyze(
    matmul: Mapping[str, Mapping[str, Any]],
    *,
    device_type: str = "cpu",
    cpu_flags: Iterable[str] = (),
    cpu_arch: str = "x86_64",
    cuda_available: bool = False,
    gpu_capability: tuple[int, int] | None = None,
    other_load: float | None = None,
    cpus: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Findings from matmul measurements (a pure function: no hardware is touched).

    ``matmul`` maps format name -> ``{"available", "tflops", "ratio_to_fp32", "reason", ...}``.
    ``other_load`` (CPU cores other processes kept busy while the probe ran), ``cpus``
    (cores usable here) and ``threads`` (the probe's) flag a machine that other work was
    competing for, which makes CPU timings unreliable.
    Returns ``fast``, ``slow``, ``pitfalls``, ``lacks``, ``recommended`` and ``why``.
    """
    flags = set(cpu_flags)
    where = "this GPU" if device_type == "cuda" else "this CPU"
    x86 = cpu_arch.lower() in ("x86_64", "amd64", "i386", "i686", "x86")

    def ratio(fmt: str) -> float | None:
        m = matmul.get(fmt) or {}
        r = m.get("ratio_to_fp32")
        return float(r) if m.get("available") and r is not None else None

    fast = [f for f in matmul if f != "fp32" and (ratio(f) or 0.0) >= FAST_RATIO]
    slow = [f for f in matmul if ratio(f) is not None and ratio(f) < SLOW_RATIO]

    # Recommendation: the fastest of fp32 / bf16-mixed / fp16-mixed by matmul throughput.
    def tflops(fmt: str) -> float | None:
        m = matmul.get(fmt) or {}
        return m.get("tflops") if m.get("available") else None

    fp32_t = tflops("fp32")
    recommended, why = "fp32", "fp32 matmuls were not measured, so nothing can be faster"
    if fp32_t:
        candidates = {mode: ratio(fmt) for mode, fmt in _MODES[:2] if ratio(fmt) is not None}
        best = max(candidates, key=lambda m: candidates[m], default=None)
        if best == "fp16-mixed" and "bf16-mixed" in candidates and \
                candidates["fp16-mixed"] < _FP16_OVER_BF16 * candidates["bf16-mixed"]:
            best = "bf16-mixed"  # near-tie: bf16 needs no loss scaling
        if best is not None and candidates[best] >= _MIN_GAIN:
            fmt = dict(_MODES)[best]
            others = ", ".join(f"{f} is {_versus(ratio(f))}" for f in ("bf16", "fp16")
                               if f != fmt and ratio(f) is not None)
            recommended = best
            why = (f"{fmt} matmuls run {_versus(candidates[best])} than fp32 here "
                   f"({tflops(fmt):.3g} vs {fp32_t:.3g} TFLOP/s)"
                   + (f"; {others}" if others else ""))
        elif best is not None:
            fmt = dict(_MODES)[best]
            why = (f"no low-precision format is meaningfully faster than fp32 here "
                   f"(best: {fmt} at {_times(candidates[best])} fp32; needs >= {_MIN_GAIN}x)")
        else:
            why = "neither bf16 nor fp16 matmuls ran here"

    pitfalls: list[str] = []
    for fmt, m in matmul.items():
        if fmt == "fp32":
            continue
        label = _LABEL.get(fmt, fmt)
        if not m.get("available"):
            pitfalls.append(f"{label} unavailable on {where}: {m.get('reason') or 'unknown reason'}")
            continue
        r = ratio(fmt)
        if r is None:
            continue
        present = [_FLAG_LABEL[f] for f in _FORMAT_FLAGS.get(fmt, ()) if f in flags]
        missing = [_FLAG_LABEL[f] for f in _FORMAT_FLAGS.get(fmt, ()) if f not in flags]
        if r < SLOW_RATIO:
            because = f" (no {'/'.join(missing)})" if device_type == "cpu" and x86 and flags \
                and missing and not present else ""
            own_mode = {"bf16": "bf16-mixed", "fp16": "fp16-mixed"}.get(fmt)
            alternative = recommended if recommended != own_mode else "fp32"
            pitfalls.append(f"{label} on {where}: {_times(1 / r)} slower than fp32{because} "
                            f"- use {alternative}")
        elif r >= FAST_RATIO:
            because = f" ({'/'.join(present)})" if device_type == "cpu" and present else \
                " (tensor cores)" if device_type == "cuda" else ""
            pitfalls.append(f"{label} runs {_times(r)} faster than fp32 here{because}")
        else:
            pitfalls.append(f"{label} runs at only {r:.2f}x fp32 here: no speed-up, it saves "
                            "memory, not time")

    if other_load is not None and cpus and threads and other_load + threads > cpus + 0.25:
        pitfalls.append(f"the machine was busy while probing (other processes used "
                        f"{other_load:.1f} of {cpus} CPUs; the probe ran {threads} threads): "
                        "timings may be off by a lot; re-run with refresh when it is idle")

    lacks: list[str] = []
    if device_type == "cpu":
        if x86 and flags:  # no flags at all: /proc/cpuinfo unreadable, so nothing to claim
            lacks += [f for f in _CPU_FEATURES if f not in flags]
        if not cuda_available:
            lacks.append("cuda")
    elif device_type == "cuda" and gpu_capability is not None:
        if tuple(gpu_capability) < (8, 0):
            lacks += ["tf32_tensor_cores", "bf16_tensor_cores"]
        if tuple(gpu_capability) < (8, 9):
            lacks.append("fp8_tensor_cores")

    return {"fast": fast, "slow": slow, "pitfalls": pitfalls, "lacks": lacks,
            "recommended": recommended, "why": why}


# ------------------------------------------------------------------------------ probe


def _cpu_ticks(cpus: Iterable[int]) -> int | None:
    """Busy clock ticks (user+nice+system+irq+softirq+steal) of ``cpus``, from /proc/stat."""
    wanted = {f"cpu{i}" for i in cpus}
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total, seen = 0, 0
    for line in lines:
        name, *fields = line.split()
        if name in wanted and len(fields) >= 8:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
            total += user + nice + system + irq + softirq + steal
            seen += 1
    return total if seen else None


class _OtherLoad:
    """CPU cores that *other* processes (or the hypervisor, as steal time) kept busy
    between ``start()`` and ``stop()``: the CPUs' busy time minus this process's."""

    def __init__(self) -> None:
        try:
            self.cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.cpus = list(range(os.cpu_count() or 1))
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def start(self) -> None:
        self.t0, self.ticks0, self.own0 = time.monotonic(), _cpu_ticks(self.cpus), _own_cpu()

    def stop(self) -> float | None:
        ticks, wall = _cpu_ticks(self.cpus), time.monotonic() - self.t0
        if ticks is None or self.ticks0 is None or wall <= 0:
            return None
        busy = (ticks - self.ticks0) / self.hz
        return max(0.0, (busy - (_own_cpu() - self.own0)) / wall)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _settings(size: int | None, repeats: int, quick: bool) -> dict[str, Any]:
    return {"size": size, "repeats": repeats, "quick": quick}


def _reusable(doc: Any, fp: str, wanted: dict[str, Any]) -> bool:
    """A cached document answers this request: same fingerprint, measured at least as
    thoroughly (same size request, >= repeats, not quick unless quick was asked)."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or doc.get("fingerprint") != fp:
        return False
    have = doc.get("settings")
    if not isinstance(have, dict) or not isinstance(doc.get("matmul"), dict):
        return False
    return (have.get("size") == wanted["size"]
            and isinstance(have.get("repeats"), int) and have["repeats"] >= wanted["repeats"]
            and (not have.get("quick") or wanted["quick"]))


def _read_cache(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None  # missing or corrupt: measure and rewrite


def probe(
    device: str = "cpu",
    *,
    size: int | None = None,
    repeats: int = 5,
    cache_dir: str | Path | None = None,
    refresh: bool = False,
    quick: bool = False,
) -> dict[str, Any]:
    """Measure (or load from the cache) what ``device`` does fast and badly.

    ``size``: the matmul size to aim for (default: 2048 on CPU, 8192 on CUDA; half that
    with ``quick``); slow formats are measured smaller (see the module docstring).
    ``repeats``: timed calls per measurement (at most 3 with ``quick``).
    Returns the ``mixprec.probe/1`` document (JSON-able, strict).
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise UsageError(f"repeats must be a positive integer, got {repeats!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 16):
        raise UsageError(f"size must be an integer >= 16, got {size!r}")
    dev = resolve_device(device)
    env = environment(dev)
    fp = _fingerprint_of(env)
    wanted = _settings(size, repeats, quick)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"probe-{fp}.json"

    if not refresh:
        cached = _read_cache(path)
        if _reusable(cached, fp, wanted):
            cached["cached"] = True
            cached["cache_file"] = str(path)
            return cached

    started = time.perf_counter()
    watch = _OtherLoad()
    watch.start()
    plan = _plan(dev, None if size is None else size - size % 16, repeats, quick)
    device_ctx = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with device_ctx, torch.no_grad():
        matmul = {}
        for i, fmt in enumerate(MATMUL_FORMATS):
            # Each format gets its budget, less if earlier ones overran the total.
            remaining = plan.total_s - (time.perf_counter() - started)
            share = remaining / (len(MATMUL_FORMATS) - i)
            matmul[fmt] = _measure_matmul(fmt, dev, plan, max(0.05, min(plan.budget_s, share)))
        bandwidth = _measure_bandwidth(dev, plan)
    other_load = watch.stop()
    fp32_t = matmul["fp32"]["tflops"] if matmul["fp32"]["available"] else None
    for m in matmul.values():
        if m["available"] and fp32_t:
            m["ratio_to_fp32"] = m["tflops"] / fp32_t
    matmul["fp32"]["ratio_to_fp32"] = 1.0 if fp32_t else None

    findings = analyze(
        matmul,
        device_type=dev.type,
        cpu_flags=env["cpu_flags"],
        cpu_arch=platform.machine() or "unknown",
        cuda_available=torch.cuda.is_available(),
        gpu_capability=torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None,
        other_load=other_load if dev.type == "cpu" else None,
        cpus=len(watch.cpus),
        threads=env["threads"],
    )
    notes = [
        f"{fmt} measured at n={m['size']} instead of {m['requested_size']} (too slow here to "
        f"time at full size); its TFLOP/s is flops/time at n={m['size']}, a lower bound"
        for fmt, m in matmul.items() if m["available"] and m["extrapolated"]
    ]
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "environment": env,
        "fingerprint": fp,
        "cached": False,
        "cache_file": None,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": wanted,
        "other_cpu_load": other_load,
        "matmul": matmul,
        **bandwidth,
        **findings,
        "notes": notes,
        "duration_s": time.perf_counter() - started,
    }
    doc = json.loads(dumps(doc))  # strict JSON (non-finite -> null), as the cache holds it
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(path, dumps(doc))
        doc["cache_file"] = str(path)
    except OSError as exc:
        warnings.warn(f"mixprec probe: could not write the cache file {path}: {exc}", stacklevel=2)
    return doc


# ----------------------------------------------------------------------------- render


def _ratio_cell(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.2f}" if r >= 0.1 else f"{r:.2g}"


def render_probe(doc: Mapping[str, Any]) -> str:
    """One terminal screen: formats table, bandwidth, pitfalls, what is lacking, advice."""
    env = doc.get("environment", {})
    head = (f"mixprec probe: {env.get('device_name', '?')} ({env.get('device', '?')}, "
            f"{env.get('threads', '?')} threads, torch {env.get('torch', '?')})")
    if doc.get("cached"):
        head += f"  [cached, measured {doc.get('measured_at', '?')}]"
    elif doc.get("duration_s") is not None:
        head += f"  [{doc['duration_s']:.1f} s]"
    lines = [head, ""]

    header = ["format", "available", "TFLOP/s", "x fp32", "size", "note"]
    rows = []
    for fmt, m in doc.get("matmul", {}).items():
        if m.get("available"):
            size = f"{m['size']}" + ("*" if m.get("extrapolated") else "")
            rows.append([fmt, "yes", f"{m['tflops']:.3g}",
                         _ratio_cell(m.get("ratio_to_fp32")),
                         size, ""])
        else:
            reason = str(m.get("reason") or "")
            rows.append([fmt, "no", "-", "-", "-", reason if len(reason) <= 60 else reason[:57] + "..."])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {0, 1, 5}

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines += [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]
    if any(m.get("extrapolated") and m.get("available") for m in doc.get("matmul", {}).values()):
        lines.append("* measured at a smaller size (too slow here for the full size); "
                     "TFLOP/s = flops/time there")
    lines.append("")
    gbs = doc.get("memory_bandwidth_gbs")
    lines.append(f"memory bandwidth: {gbs:.1f} GB/s (fp32 copy of "
                 f"{doc.get('memory_bandwidth_buffer_mb', '?')} MB, read+write)"
                 if gbs is not None else "memory bandwidth: not measured")
    lines.append(f"fast here: {', '.join(doc.get('fast') or []) or 'none'}    "
                 f"slow here: {', '.join(doc.get('slow') or []) or 'none'}")
    if doc.get("pitfalls"):
        lines += ["", "pitfalls:", *(f"  - {p}" for p in doc["pitfalls"])]
    if doc.get("lacks"):
        lines += ["", "this machine lacks:", *(f"  - {FEATURES.get(f, f)}" for f in doc["lacks"])]
    lines += ["", f"recommended: {doc.get('recommended', '?')} - {doc.get('why', '')}"]
    return "\n".join(lines)
