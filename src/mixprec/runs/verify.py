"""Training verification: a candidate policy against an fp32 reference, with a verdict.

Both runs start from the same initial weights and see the same batches in the same order
(``train`` seeds the model and the data stream from ``seed``). Compared: the loss curves
step by step, the final loss (mean over the last fifth of the steps), the final weights
per module (relative divergence), and every ``evaluate`` metric. With ``noise_floor`` a
third run, the reference under ``seed + 1`` (other initial weights, other data order),
measures how far two fp32 runs drift apart anyway, and the verdict is relative to it:
the candidate passes when its final-loss difference is within ``noise_multiple`` times
fp32's own (and its metrics within that multiple of fp32's metric drift, or the absolute
tolerance, whichever is larger). Without it, the absolute tolerances apply. A candidate
that diverges fails, with the monitor's diagnosis.

Gradients: at ``GRADIENT_SNAPSHOTS`` evenly spaced steps the engine hands both runs'
unscaled, unclipped gradients to an observer; per module, the cosine similarity and the
relative norm difference are reported (``comparison.gradients``). Memory: the tensor bytes of
one training step of each (:mod:`mixprec.memory`: training state and activations saved for
backward), not the process's peak RSS, which one process cannot split per run. Inference verification is :mod:`mixprec.runs.inference`; the HTML
report :mod:`mixprec.report`.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from mixprec import checkpoint
from mixprec.environment import environment
from mixprec.errors import UsageError
from mixprec.monitor import load_records
from mixprec.policy import Policy, parse_policy
from mixprec.runs.train import train
from mixprec.task import Task

VERIFY_SCHEMA = "mixprec.verify/1"
MIN_STEPS = 10  # fewer steps leave no tail to compare
DEFAULT_LOSS_TOLERANCE = 0.02  # relative difference of the final loss
DEFAULT_METRIC_TOLERANCE = 0.02  # relative difference of each evaluate() metric
DEFAULT_NOISE_MULTIPLE = 3.0


def verify(task: Task, candidate: Policy | str, *, reference: Policy | str = "fp32", steps: int = 60, seed: int = 0,
           noise_floor: bool = False, loss_tolerance: float = DEFAULT_LOSS_TOLERANCE,
           metric_tolerance: float = DEFAULT_METRIC_TOLERANCE, noise_multiple: float = DEFAULT_NOISE_MULTIPLE,
           timing_steps: int = 20, device: str = "cpu", **train_kwargs: Any) -> dict[str, Any]:
    """Run ``task`` under ``reference`` and ``candidate``; return a ``mixprec.verify/1`` document.

    The speed figure comes from ``timing_steps`` extra steps of each, interleaved step by
    step on the same batches (the training runs themselves run one after the other, so
    their step times carry warm-up and machine noise)."""
    return verify_many(task, [candidate], reference=reference, steps=steps, seed=seed, noise_floor=noise_floor,
                       loss_tolerance=loss_tolerance, metric_tolerance=metric_tolerance,
                       noise_multiple=noise_multiple, timing_steps=timing_steps, device=device, **train_kwargs)[0]


def verify_many(task: Task, candidates: list[Policy | str], *, reference: Policy | str = "fp32", steps: int = 60,
                seed: int = 0, noise_floor: bool = False, loss_tolerance: float = DEFAULT_LOSS_TOLERANCE,
                metric_tolerance: float = DEFAULT_METRIC_TOLERANCE, noise_multiple: float = DEFAULT_NOISE_MULTIPLE,
                timing_steps: int = 20, device: str = "cpu", **train_kwargs: Any) -> list[dict[str, Any]]:
    """:func:`verify` for several candidates against one reference: the reference run (and
    the noise-floor run) happen once and every candidate is compared with them."""
    ref_policy = parse_policy(reference)
    cand_policies = [parse_policy(c) for c in candidates]
    if not cand_policies:
        raise UsageError("verify needs at least one candidate precision")
    for cand_policy in cand_policies:
        if cand_policy == ref_policy:
            raise UsageError(f"the candidate equals the reference ({ref_policy.mode}): nothing to verify; "
                             "give another --precision or --reference")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < MIN_STEPS:
        raise UsageError(f"verify needs steps >= {MIN_STEPS} to compare the end of the loss curves, got {steps!r}")
    for name, value in (("loss_tolerance", loss_tolerance), ("metric_tolerance", metric_tolerance),
                        ("noise_multiple", noise_multiple)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UsageError(f"{name} must be a number > 0, got {value!r}")

    docs = []
    with tempfile.TemporaryDirectory(prefix="mixprec-verify-") as tmp:
        ref = _run(task, ref_policy, steps, seed, device, Path(tmp) / "ref", train_kwargs)
        noise = None
        if noise_floor:
            noise = _compare(ref, _run(task, ref_policy, steps, seed + 1, device, Path(tmp) / "noise", train_kwargs))
        for i, cand_policy in enumerate(cand_policies):
            cand = _run(task, cand_policy, steps, seed, device, Path(tmp) / f"cand{i}",
                        {"monitor_every": max(1, steps // GRADIENT_SNAPSHOTS), **train_kwargs,
                         "run_dir": Path(tmp) / f"cand{i}-run"})
            comparison = _compare(ref, cand)
            verdict, reasons = _verdict(cand["result"], comparison, noise, loss_tolerance, metric_tolerance,
                                        noise_multiple)
            r, c = ref["result"], cand["result"]
            docs.append({
                "schema": VERIFY_SCHEMA,
                "task": task.name,
                "reference": r["policy"],
                "candidate": c["policy"],
                "steps": steps,
                "seed": seed,
                "verdict": verdict,
                "reasons": reasons,
                "tolerances": {"loss": loss_tolerance, "metric": metric_tolerance, "noise_multiple": noise_multiple,
                               "mode": "noise_floor" if noise_floor else "absolute"},
                "losses": {"reference": r["losses"], "candidate": c["losses"]},
                "comparison": comparison,
                "noise_floor": noise,
                "speed": _speed(task, ref_policy, cand_policy, c, seed, device, timing_steps),
                "memory": _memory(task, ref_policy, cand_policy, seed, device),
                "candidate_run": {**{k: c.get(k) for k in ("status", "diagnosis", "skipped_steps", "localizations",
                                                           "decisions", "loss_scales", "monitor")},
                                  "monitor_ranges": monitor_ranges(cand["records"])},
                "environment": environment(device),
            })
            del cand  # its gradients and weights are large; the next candidate needs the room
    return docs


GRADIENT_SNAPSHOTS = 10  # steps at which per-module gradients are compared


def _run(task: Task, policy: Policy, steps: int, seed: int, device: str, directory: Path,
         kwargs: dict[str, Any]) -> dict[str, Any]:
    every = max(1, steps // GRADIENT_SNAPSHOTS)
    grads: dict[int, dict[str, torch.Tensor]] = {}
    weights: dict[int, dict[str, torch.Tensor]] = {}

    def observe(step: int, named: dict[str, torch.Tensor]) -> None:
        if step == 1 or step % every == 0:
            g_parts: dict[str, list[torch.Tensor]] = {}
            w_parts: dict[str, list[torch.Tensor]] = {}
            for name, p in named.items():
                module = name.rpartition(".")[0] or name
                grad = p.grad.detach()
                grad = grad.to_dense() if grad.is_sparse else grad  # nn.Embedding(sparse=True)
                g_parts.setdefault(module, []).append(grad.float().flatten().cpu())
                w_parts.setdefault(module, []).append(p.detach().float().flatten().cpu())
            grads[step] = {m: torch.cat(parts) for m, parts in g_parts.items()}
            weights[step] = {m: torch.cat(parts) for m, parts in w_parts.items()}

    result = train(task, policy, steps=steps, seed=seed, device=device, checkpoint_dir=directory,
                   grad_observer=observe, **kwargs)
    state = checkpoint.load(directory / checkpoint.CHECKPOINT_NAME)
    run_dir = kwargs.get("run_dir")
    records = load_records(Path(run_dir) / "monitor.jsonl") if run_dir and (Path(run_dir) / "monitor.jsonl").exists() else []
    return {"result": result, "model": state["model"], "grads": grads, "weights": weights, "records": records}


def monitor_ranges(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per module and sampled step: output amax / the target format's max, and the fraction of
    non-zero outputs below its smallest normal (the report's heatmaps)."""
    from mixprec.formats import get_format

    records = [r for r in records if not r.get("replay")]
    if not records:
        return None
    fmt = records[0]["formats"][0]
    fmt_max = get_format(fmt).max
    modules = list(records[0]["modules"])
    ratio = [[(r["modules"].get(m, {}).get("amax") or 0.0) / fmt_max if r["modules"].get(m, {}).get("amax") is not None
              else None for r in records] for m in modules]
    under = [[r["modules"].get(m, {}).get("formats", {}).get(fmt, {}).get("underflow") for r in records] for m in modules]
    return {"format": fmt, "steps": [r["step"] for r in records], "modules": modules, "range_ratio": ratio,
            "underflow": under}


def _speed(task: Task, ref: Policy, cand: Policy, cand_result: dict[str, Any], seed: int, device: str,
           steps: int) -> dict[str, Any]:
    from mixprec.autotune import interleaved_step_times
    from mixprec.stats import ratio

    if ref.mode != "fp32" or cand_result["status"] != "completed":
        return {"reference_step_s": None, "candidate_step_s": None, "speedup": None, "speedup_ci95": None,
                "rounds": 0, "method": "not measured (reference is not fp32, or the candidate diverged)"}
    ref_times, cand_times = interleaved_step_times(task, cand, steps, seed, device)
    speed = ratio(ref_times, cand_times)
    return {"reference_step_s": statistics.median(ref_times), "candidate_step_s": statistics.median(cand_times),
            "speedup": speed["median"], "speedup_ci95": speed["ci95"], "rounds": steps,
            "method": f"median per-round ratio of {steps} steps each, interleaved on the same batches "
                      "(95% CI: order statistics of the median)"}


def _memory(task: Task, ref: Policy, cand: Policy, seed: int, device: str) -> dict[str, Any]:
    """Training-state and activation bytes of one step of each (mixprec.memory)."""
    from mixprec.memory import measure_memory

    r, c = measure_memory(task, ref, seed=seed, device=device), measure_memory(task, cand, seed=seed, device=device)

    def ratio(key: str) -> float | None:
        return c[key] / r[key] if r.get(key) else None

    return {"reference": r, "candidate": c, "state_ratio": ratio("state_bytes"),
            "activation_ratio": ratio("activation_bytes"), "method": "bytes of the tensors of one training step"}


def _tail_mean(losses: list[float | None]) -> float | None:
    tail = [l for l in losses[-max(3, len(losses) // 5):] if l is not None and math.isfinite(l)]
    return statistics.mean(tail) if tail else None


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return abs(a - b) / max(abs(b), 1e-12)


def _compare(ref: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    r, o = ref["result"], other["result"]
    per_step = []
    for a, b in zip(o["losses"], r["losses"]):
        ok = a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
        per_step.append({"abs": abs(a - b) if ok else None, "rel": _rel(a, b)})
    metrics = {k: {"reference": v, "other": o["eval"].get(k), "rel": _rel(o["eval"].get(k), v)}
               for k, v in r["eval"].items()}
    return {
        "final_loss": {"reference": _tail_mean(r["losses"]), "other": _tail_mean(o["losses"]),
                       "rel": _rel(_tail_mean(o["losses"]), _tail_mean(r["losses"]))},
        "max_step_rel": max((s["rel"] for s in per_step if s["rel"] is not None), default=None),
        "per_step": per_step,
        "metrics": metrics,
        "weights": _weight_divergence(ref["model"], other["model"]),
        "gradients": _gradient_agreement(ref["grads"], other["grads"]),
        "weights_over_steps": _weights_over_steps(ref["weights"], other["weights"]),
    }


def _weights_over_steps(ref: dict[int, dict[str, torch.Tensor]], other: dict[int, dict[str, torch.Tensor]]
                        ) -> dict[str, Any]:
    """Per module and sampled step: relative L2 distance of the weights entering that step."""
    steps = sorted(set(ref) & set(other))
    modules = [m for m in (ref[steps[0]] if steps else {}) if all(m in other[s] for s in steps)]
    rows = []
    for m in modules:
        row = []
        for s in steps:
            a, b = ref[s][m].double(), other[s][m].double()
            value = float((b - a).norm() / a.norm()) if float(a.norm()) > 0 else None
            row.append(value if value is None or math.isfinite(value) else None)
        rows.append(row)
    return {"steps": steps, "modules": modules, "rel_divergence": rows}


def _gradient_agreement(ref: dict[int, dict[str, torch.Tensor]], other: dict[int, dict[str, torch.Tensor]]
                        ) -> dict[str, Any]:
    """Per module and sampled step: cosine similarity of the two runs' (unscaled, unclipped)
    gradients and their relative norm difference |‖g‖ - ‖g_ref‖| / ‖g_ref‖."""
    steps = sorted(set(ref) & set(other))
    modules = [m for m in (ref[steps[0]] if steps else {}) if all(m in other[s] for s in steps)]
    cosine, rel_norm = [], []
    for m in modules:
        row_c, row_n = [], []
        for s in steps:
            a, b = ref[s][m].double(), other[s][m].double()
            ok = bool(torch.isfinite(b).all()) and float(a.norm()) > 0
            row_c.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)) if ok else None)
            row_n.append(abs(float(b.norm()) - float(a.norm())) / float(a.norm()) if ok else None)
        cosine.append(row_c)
        rel_norm.append(row_n)
    worst = [min((v for v in row if v is not None), default=None) for row in cosine]
    return {"steps": steps, "modules": modules, "cosine": cosine, "rel_norm_diff": rel_norm,
            "min_cosine": min((w for w in worst if w is not None), default=None)}


def _weight_divergence(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Relative L2 distance per module (parameters grouped by their module's name)."""
    groups: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, t in a.items():
        if name in b and t.is_floating_point():
            groups.setdefault(name.rpartition(".")[0] or name, []).append((t.double(), b[name].double()))
    out = {}
    for module, pairs in groups.items():
        num = sum(float((y - x).square().sum()) for x, y in pairs)
        den = sum(float(x.square().sum()) for x, _ in pairs)
        value = math.sqrt(num / den) if den > 0 else None
        out[module] = value if value is None or math.isfinite(value) else None
    return out


def _verdict(cand: dict[str, Any], comp: dict[str, Any], noise: dict[str, Any] | None, loss_tol: float,
             metric_tol: float, multiple: float) -> tuple[str, list[str]]:
    if cand["status"] != "completed":
        return "FAIL", [f"the candidate diverged: {cand['diagnosis']}"]
    reasons, failed = [], False
    diff = comp["final_loss"]["rel"]
    if noise is not None and noise["final_loss"]["rel"] is not None:
        floor = noise["final_loss"]["rel"]
        limit = max(multiple * floor, 1e-6)
        basis = f"{multiple:g}x fp32's seed-to-seed difference {floor:.2%}"
    else:
        limit, basis = loss_tol, "the absolute tolerance"
    if diff is None:
        failed = True
        reasons.append("the candidate's final loss is not finite")
    else:
        failed |= diff > limit
        reasons.append(f"final loss differs by {diff:.2%} from the reference "
                       f"({'within' if diff <= limit else 'beyond'} {limit:.2%}, {basis})")
    for name, m in comp["metrics"].items():
        m_limit = metric_tol
        if noise is not None and noise["metrics"].get(name, {}).get("rel") is not None:
            m_limit = max(metric_tol, multiple * noise["metrics"][name]["rel"])
        if m["rel"] is None:
            failed = True
            reasons.append(f"metric {name}: not finite in the candidate")
        else:
            failed |= m["rel"] > m_limit
            reasons.append(f"metric {name}: {m['other']:.4g} vs {m['reference']:.4g} ({m['rel']:.2%}, "
                           f"{'within' if m['rel'] <= m_limit else 'beyond'} {m_limit:.2%})")
    if not comp["metrics"]:
        reasons.append("the task has no evaluate(): metrics not compared")
    skipped = len(cand["skipped_steps"])
    if skipped:
        reasons.append(f"{skipped} skipped steps in the candidate")
    return ("FAIL" if failed else "PASS"), reasons


def render_verify(doc: dict[str, Any]) -> str:
    c = doc["comparison"]
    lines = [f"verify {doc['task']}: {doc['candidate']['mode']} against {doc['reference']['mode']}, "
             f"{doc['steps']} steps, seed {doc['seed']} -> {doc['verdict']}"]
    lines += [f"  - {r}" for r in doc["reasons"]]
    fl = c["final_loss"]
    if fl["reference"] is not None and fl["other"] is not None:
        lines.append(f"  final loss {fl['other']:.4f} vs {fl['reference']:.4f}; largest per-step difference "
                     + (f"{c['max_step_rel']:.2%}" if c["max_step_rel"] is not None else "n/a"))
    if doc["noise_floor"] is not None:
        nf = doc["noise_floor"]["final_loss"]["rel"]
        lines.append(f"  noise floor (fp32, seed {doc['seed'] + 1}): final loss differs by "
                     + (f"{nf:.2%}" if nf is not None else "n/a"))
    g = c.get("gradients") or {}
    if g.get("min_cosine") is not None:
        lines.append(f"  gradients: lowest per-module cosine {g['min_cosine']:.5f} over {len(g['steps'])} sampled steps")
    worst = sorted(((v, k) for k, v in c["weights"].items() if v is not None), reverse=True)[:3]
    if worst:
        lines.append("  largest weight divergence: " + ", ".join(f"{k} {v:.2e}" for v, k in worst))
    mem = doc.get("memory") or {}
    if mem.get("activation_ratio") is not None:
        lines.append(f"  memory: activations saved for backward {mem['activation_ratio']:.2f}x, training state "
                     f"{mem['state_ratio']:.2f}x the reference's (tensor bytes of one step)")
    sp = doc["speed"]["speedup"]
    if sp is not None:
        lines.append(f"  step time {doc['speed']['candidate_step_s'] * 1e3:.1f} ms vs "
                     f"{doc['speed']['reference_step_s'] * 1e3:.1f} ms ({sp:.2f}x"
                     + (" [{:.2f}, {:.2f}]".format(*ci) if (ci := doc["speed"].get("speedup_ci95")) else "")
                     + (f", {doc['speed']['rounds']} interleaved rounds)" if doc["speed"].get("rounds")
                        else ", interleaved)"))
    return "\n".join(lines)


def render_markdown(doc: dict[str, Any]) -> str:
    """The verify report as Markdown (terminal, PRs)."""
    lines = [f"# mixprec verify: {doc['verdict']}", "",
             f"Task `{doc['task']}`: `{doc['candidate']['mode']}` against `{doc['reference']['mode']}`, "
             f"{doc['steps']} steps, seed {doc['seed']}; tolerances: {doc['tolerances']['mode']} "
             f"(loss {doc['tolerances']['loss']:g}, metrics {doc['tolerances']['metric']:g}, noise multiple "
             f"{doc['tolerances']['noise_multiple']:g}).", ""]
    lines += [f"- {r}" for r in doc["reasons"]]
    lines += ["", "| metric | reference | candidate | relative difference |", "| --- | ---: | ---: | ---: |"]
    fl = doc["comparison"]["final_loss"]
    lines.append(f"| final loss (last fifth) | {_fmt(fl['reference'])} | {_fmt(fl['other'])} | {_pct(fl['rel'])} |")
    for name, m in doc["comparison"]["metrics"].items():
        lines.append(f"| {name} | {_fmt(m['reference'])} | {_fmt(m['other'])} | {_pct(m['rel'])} |")
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2%}"
