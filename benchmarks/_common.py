"""What every benchmark script shares: its flags, its JSON document, its Markdown table,
and peak memory of a fresh process.

Flags (every script): ``--json FILE`` writes the document; ``--quick`` is the size that
``run_all.py --quick`` documents (fewer secondary measurements, same rules for a claim);
``--smoke`` is seconds-long with tiny sizes and 2-3 rounds, only to show the script runs
(its numbers mean nothing); ``--rounds N`` overrides the number of measured rounds.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import resource
import sys
from typing import Any, Callable, Sequence

from mixprec.environment import environment
from mixprec.jsonio import dumps, write_atomic

__all__ = ["parser", "size", "rounds", "document", "write", "table", "fmt_ci", "fmt_ms", "fmt_bytes",
           "fresh_process", "rss_now", "peak_rss", "reset_peak_rss"]


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the size run_all.py --quick documents")
    g.add_argument("--smoke", action="store_true", help="seconds, tiny sizes, 2-3 rounds: does it run")
    p.add_argument("--rounds", type=int, default=None, help="measured rounds (default: by size)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the JSON document here")
    return p


def size(args: argparse.Namespace) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def rounds(args: argparse.Namespace, full: int = 60, quick: int = 60, smoke: int = 2) -> int:
    if args.rounds is not None:
        return args.rounds
    return {"full": full, "quick": quick, "smoke": smoke}[size(args)]


def document(schema: str, args: argparse.Namespace, device: str = "cpu", **fields: Any) -> dict[str, Any]:
    from datetime import datetime, timezone

    return {"schema": schema, "command": " ".join(["python", *sys.argv]), "size": size(args),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **fields,
            "environment": environment(device)}


def write(doc: dict[str, Any], path: str | None) -> None:
    if path:
        write_atomic(path, dumps(doc))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A Markdown table; columns whose index is in ``right`` are right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    out = ["| " + " | ".join(headers) + " |",
           "| " + " | ".join("---:" if i in right else "---" for i in range(len(headers))) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(out)


def fmt_ci(s: dict[str, Any] | None, digits: int = 3) -> str:
    """'1.002 [0.989, 1.014]' from a _stats.summary (or 'n/a')."""
    if not s:
        return "n/a"
    lo, hi = s["ci95"]
    text = f"{s['median']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
    return text + ("" if s.get("ci_level", 1) >= 0.95 else f" ({s['ci_level']:.0%} CI)")


MIN_CI_LEVEL = 0.85  # below this coverage (fewer than 4 rounds) a ratio supports no verdict


def judgeable(s: dict[str, Any]) -> bool:
    """Enough rounds behind this summary for its interval to carry a verdict."""
    return s.get("ci_level", 1) >= MIN_CI_LEVEL


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None or not math.isfinite(seconds) else f"{seconds * 1e3:.1f} ms"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# -- peak memory of a fresh process --------------------------------------------------------
# Each run executes in its own process, forked from a server process that has imported the
# libraries and done nothing else (multiprocessing's "forkserver"): nothing of an earlier
# run is in its heap, and it does not pay the imports again. The peak is the kernel's
# high-water mark of resident memory (VmHWM), reset when the run starts, so it is the run's
# own peak on top of the imported libraries (reported as ``rss_start_bytes``).

def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_now() -> int | None:
    return _status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(conn: Any, fn: Callable[..., dict[str, Any]], args: tuple) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


_CTX: Any = None


def fresh_process(fn: Callable[..., dict[str, Any]], *args: Any, timeout: float = 120.0,
                  preload: Sequence[str] = ("torch", "mixprec")) -> dict[str, Any]:
    """``fn(*args)`` (a module-level function returning a JSON-able dict) in a fresh process;
    {"error": why} if it raised or ran past ``timeout`` seconds."""
    global _CTX
    if _CTX is None:
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        _CTX = multiprocessing.get_context(method)
        if method == "forkserver":
            _CTX.set_forkserver_preload(list(preload))
    import time

    t0 = time.perf_counter()
    recv, send = _CTX.Pipe(duplex=False)
    proc = _CTX.Process(target=_child, args=(send, fn, args), daemon=True)
    proc.start()
    send.close()
    try:
        if recv.poll(timeout):
            status, value = recv.recv()
        else:
            status, value = "error", f"ran past {timeout:.0f} s"
    except EOFError:
        status, value = "error", "the process died"
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
    out = value if status == "ok" else {"error": value}
    out["seconds"] = time.perf_counter() - t0
    return out


def cpu_load() -> float | None:
    """The 1-minute load average (how busy the machine was), where the OS has one."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
