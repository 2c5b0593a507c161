"""Autotune: the fastest policy whose error stays within a budget, from measurements.

For each candidate mode, in order:

1. the probe (cached per machine) says whether the hardware runs the mode's format at all
   and how fast its matmuls are against fp32; a format the probe measured slow (below
   ``probe.SLOW_RATIO`` x fp32) is rejected without timing it, unless it is the only
   candidate;
2. sensitivity (one module at a time in the format, the rest fp32) gives the keep-list:
   every module that goes non-finite, whose fp32 output range exceeds the format's max,
   or whose loss change exceeds the budget; innermost modules only (a container is kept
   when its own code is the problem, not a child);
3. a short timed run of the task under the mode plus keep-list, interleaved step by step
   with fp32 on the same batches, gives the speed ratio that is real for this model
   (casts and small matmuls included).

The fastest accepted candidate is confirmed by a short training comparison against fp32
(same seed and batches): the relative difference of the mean loss over the last steps must
stay within the budget; if it does not, the next fastest is confirmed instead.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from mixprec import probe as probe_mod
from mixprec.environment import environment
from mixprec.errors import UsageError
from mixprec.jsonio import dumps, write_atomic
from mixprec.policy import Policy, Rule, normalize_mode
from mixprec.runs.train import train
from mixprec.sensitivity_analysis import sensitivity
from mixprec.task import Task, build_optimizers

AUTOTUNE_SCHEMA = "mixprec.autotune/1"
DEFAULT_CANDIDATES = ("bf16-mixed", "fp16-mixed", "fp8-mixed")
# What autotune may pick: the mixed modes (the true modes trade accuracy for memory, a
# different question) and their emulated study forms are not speed candidates.
TUNABLE = ("bf16-mixed", "fp16-mixed", "fp8-mixed")
_PROBE_FORMAT = {"bf16-mixed": "bf16", "fp16-mixed": "fp16", "fp8-mixed": "fp8_e4m3"}
_SENSITIVITY_FORMAT = {"bf16-mixed": "bf16", "fp16-mixed": "fp16", "fp8-mixed": "fp8_e4m3"}


def parse_candidates(text: str | list[str] | tuple[str, ...] | None) -> list[str]:
    items = DEFAULT_CANDIDATES if text is None else text.split(",") if isinstance(text, str) else text
    out = []
    for item in items:
        mode = normalize_mode(item)
        if mode not in TUNABLE:
            raise UsageError(f"autotune candidate {item!r} is not one it can choose; valid: {', '.join(TUNABLE)}")
        if mode not in out:
            out.append(mode)
    if not out:
        raise UsageError(f"no autotune candidates given; valid: {', '.join(TUNABLE)}")
    return out


def autotune(task: Task, *, candidates: list[str] | str | None = None, budget: float = 0.02,
             timing_steps: int = 6, confirm_steps: int = 30, sensitivity_batches: int = 2, seed: int = 0,
             device: str = "cpu", probe_doc: dict[str, Any] | None = None,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Choose a policy for ``task``; returns a ``mixprec.autotune/1`` document whose
    ``policy`` (a Policy dict) is the choice and ``candidates`` says why for each."""
    modes = parse_candidates(candidates)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise UsageError(f"budget must be a number > 0 (a relative loss error, e.g. 0.02), got {budget!r}")
    for name, value in (("timing_steps", timing_steps), ("confirm_steps", confirm_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 3:
            raise UsageError(f"{name} must be an integer >= 3, got {value!r}")
    say = log or (lambda line: None)
    doc_probe = probe_doc if probe_doc is not None else probe_mod.probe(device)
    say(f"probe: {doc_probe.get('why') or doc_probe.get('recommended')}")

    fp32_times: list[float] = []
    rows: list[dict[str, Any]] = []
    for mode in modes:
        row: dict[str, Any] = {"mode": mode, "keep_fp32": [], "speedup": None, "accepted": False}
        rows.append(row)
        entry = doc_probe["matmul"].get(_PROBE_FORMAT[mode], {})
        row["probe_ratio"] = entry.get("ratio_to_fp32")
        if not entry.get("available"):
            row["why"] = (f"the hardware cannot run {_PROBE_FORMAT[mode]} here: {entry.get('reason')}; "
                          f"study its numerics with --precision emulate:{mode}")
            continue
        if (row["probe_ratio"] or 0) < probe_mod.SLOW_RATIO and len(modes) > 1:
            row["why"] = (f"{_PROBE_FORMAT[mode]} matmuls run at {row['probe_ratio']:.2g}x fp32 here (probe): "
                          "slow on this hardware, not timed")
            continue
        fmt = _SENSITIVITY_FORMAT[mode]
        say(f"{mode}: sensitivity of every module to {fmt} ...")
        sens = sensitivity(task, fmt, batches=sensitivity_batches, seed=seed, device=device)
        keep = keep_list(sens["modules"], budget)
        row["keep_fp32"] = keep
        finite_rows = [r for r in sens["modules"] if r["finite"] and r["module"] not in keep]
        row["max_module_loss_change"] = max((r["loss_rel_change"] for r in finite_rows), default=0.0)
        row["sensitivity_emulated"] = sens["emulated"]
        policy = Policy(mode, rules=tuple(Rule(match=m) for m in keep))
        say(f"{mode}: timing {timing_steps} steps with fp32 kept for {', '.join(keep) or 'nothing'} ...")
        fp32_t, t, speedup = measure_speedup(task, policy, timing_steps, seed, device)
        fp32_times.append(fp32_t)
        row["step_time_s"], row["fp32_step_time_s"], row["speedup"] = t, fp32_t, speedup
        if len(modes) > 1 and (row["speedup"] is None or row["speedup"] < 1.0):
            # With one candidate the user asked for that mode: the keep-list is the answer.
            row["why"] = f"no faster than fp32 for this model ({row['speedup'] or 0:.2f}x)"
            continue
        row["accepted"] = True
        row["why"] = f"{row['speedup']:.2f}x fp32" + (f", fp32 kept for {', '.join(keep)}" if keep else "")

    chosen, confirmation = None, None
    for row in sorted((r for r in rows if r["accepted"]), key=lambda r: -(r["speedup"] or 0)):
        say(f"{row['mode']}: confirming against fp32 over {confirm_steps} steps ...")
        policy = Policy(row["mode"], rules=tuple(Rule(match=m) for m in row["keep_fp32"]))
        confirmation = confirm(task, policy, confirm_steps, seed, device, budget)
        row["confirmation"] = confirmation
        if confirmation["passed"]:
            chosen = (row, policy)
            break
        row["accepted"] = False
        row["why"] = f"confirmation failed: {confirmation['why']}"
    if chosen is None:
        policy = Policy("fp32")
        reason = "no candidate was faster than fp32 within the budget: fp32"
    else:
        row, policy = chosen
        reason = f"{row['mode']}: {row['why']}; confirmed within {budget:g} of fp32's loss"
    return {
        "schema": AUTOTUNE_SCHEMA,
        "task": task.name,
        "budget": budget,
        "fp32_step_time_s": statistics.median(fp32_times) if fp32_times else None,
        "candidates": rows,
        "chosen": policy.mode,
        "policy": policy.to_dict(),
        "why": reason,
        "probe": {k: doc_probe.get(k) for k in ("fingerprint", "recommended", "why", "fast", "slow", "pitfalls")},
        "environment": environment(device),
    }


def keep_list(rows: list[dict[str, Any]], budget: float) -> list[str]:
    """The smallest set of modules to keep in fp32: the innermost ones that fail."""
    def fails(r: dict[str, Any]) -> bool:
        return (not r["finite"]) or (r["range_ratio"] or 0.0) > 1.0 or (r["loss_rel_change"] or 0.0) > budget

    failing = {r["module"] for r in rows if fails(r)}
    return sorted(m for m in failing if not any(o != m and o.startswith(m + ".") for o in failing))


def measure_speedup(task: Task, policy: Policy, steps: int, seed: int, device: str) -> tuple[float, float, float]:
    """(fp32 step s, candidate step s, speedup): one step of each per round on the same
    batch, order alternating, after one warm-up round; speedup = median per-round ratio."""
    ref, cand = interleaved_step_times(task, policy, steps, seed, device)
    ratios = [a / b for a, b in zip(ref, cand)]
    return statistics.median(ref), statistics.median(cand), statistics.median(ratios)


def interleaved_step_times(task: Task, policy: Policy, steps: int, seed: int, device: str
                           ) -> tuple[list[float], list[float]]:
    """Per-round step seconds of fp32 and ``policy`` (see :func:`measure_speedup`)."""
    import torch

    from mixprec.engine import Engine

    loops = []
    for p in (Policy("fp32"), policy):
        torch.manual_seed(seed)
        model = task.build_model().to(device)
        engine = Engine(p, device=device)
        engine.setup(model, *build_optimizers(task, model))
        loops.append((model, engine))
    times: list[list[float]] = [[], []]
    batches = task.train_batches(seed)
    for r in range(steps + 1):
        batch = next(batches)
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            model, engine = loops[i]
            t0 = time.perf_counter()
            with engine.autocast():
                loss = task.loss(model, batch)
            engine.backward(loss)
            engine.step()
            if r:
                times[i].append(time.perf_counter() - t0)
    return times[0], times[1]


def confirm(task: Task, policy: Policy, steps: int, seed: int, device: str, budget: float) -> dict[str, Any]:
    """Train fp32 and ``policy`` from the same seed on the same batches; compare the mean
    loss over the last fifth of the steps."""
    ref = train(task, "fp32", steps=steps, seed=seed, device=device, monitor_every=0)
    cand = train(task, policy, steps=steps, seed=seed, device=device, monitor_every=0)
    tail = max(3, steps // 5)
    if cand["status"] != "completed" or len(cand["skipped_steps"]) > steps // 10:
        return {"passed": False, "why": f"the run {cand['status']} with {len(cand['skipped_steps'])} skipped steps",
                "steps": steps}
    ref_loss = statistics.mean(l for l in ref["losses"][-tail:] if l is not None)
    cand_loss = statistics.mean(l for l in cand["losses"][-tail:] if l is not None)
    rel = abs(cand_loss - ref_loss) / max(abs(ref_loss), 1e-12)
    return {"passed": rel <= budget, "steps": steps, "fp32_loss": ref_loss, "loss": cand_loss,
            "relative_difference": rel,
            "why": f"mean loss of the last {tail} steps differs by {rel:.2%} from fp32 (budget {budget:.2%})"}


def render_autotune(doc: dict[str, Any]) -> str:
    fp32 = doc["fp32_step_time_s"]
    lines = [f"autotune {doc['task']}: budget {doc['budget']:g} (relative loss error)"
             + (f", fp32 step {fp32 * 1e3:.1f} ms" if fp32 else ""),
             f"{'candidate':<12} {'probe':>6} {'speedup':>8} {'keep fp32':<28} {'verdict':<9} why"]
    for r in doc["candidates"]:
        probe_ratio = "-" if r.get("probe_ratio") is None else f"{r['probe_ratio']:.2f}x"
        speed = "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
        keep = ", ".join(r["keep_fp32"]) or "-"
        verdict = "chosen" if r["mode"] == doc["chosen"] else "accepted" if r["accepted"] else "rejected"
        lines.append(f"{r['mode']:<12} {probe_ratio:>6} {speed:>8} {keep[:28]:<28} {verdict:<9} {r.get('why', '')}")
    lines.append(f"chosen: {doc['why']}")
    return "\n".join(lines)


# -- `--precision auto`: autotune once per task and machine --------------------------------
def cache_key(task_spec: str, task_args: dict[str, Any], fingerprint: str, candidates: list[str], budget: float) -> str:
    blob = json.dumps([task_spec, task_args, fingerprint, candidates, budget], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_autotune(task: Task, task_spec: str, task_args: dict[str, Any], *, device: str = "cpu",
                    cache_dir: str | Path | None = None, refresh: bool = False,
                    log: Callable[[str], None] | None = None, **kwargs: Any) -> dict[str, Any]:
    """:func:`autotune`, cached by task (spec and arguments), machine and settings."""
    doc_probe = probe_mod.probe(device, cache_dir=cache_dir)
    candidates = parse_candidates(kwargs.pop("candidates", None))
    budget = kwargs.get("budget", 0.02)
    key = cache_key(task_spec, task_args, doc_probe["fingerprint"], candidates, budget)
    path = Path(cache_dir) if cache_dir is not None else probe_mod.default_cache_dir()
    path = path / f"autotune-{key}.json"
    if path.exists() and not refresh:
        try:
            doc = json.loads(path.read_text())
            if doc.get("schema") == AUTOTUNE_SCHEMA:
                doc["cached"] = str(path)
                return doc
        except json.JSONDecodeError:
            pass  # a corrupt cache entry is measured again
    doc = autotune(task, candidates=candidates, device=device, probe_doc=doc_probe, log=log, **kwargs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, dumps(doc))
    except OSError:
        pass  # caching is an optimization
    doc["cached"] = None
    return doc


__all__ = ["AUTOTUNE_SCHEMA", "DEFAULT_CANDIDATES", "autotune", "cached_autotune", "keep_list",
           "parse_candidates", "render_autotune"]
