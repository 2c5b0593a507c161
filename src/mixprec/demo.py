"""`mixprec demo`: the main job, end to end, with no arguments and no network.

On the default recipe (``lm``, a byte-level GPT on Python's own standard library):

1. **probe** the hardware (cached per machine): which formats run fast here;
2. **autotune** the mixed modes (``bf16-mixed``, ``fp16-mixed``, ``fp8-mixed``) within a
   2% relative loss budget: formats the probe measured slow are rejected untimed, the
   rest are timed step by step against fp32, interleaved on the same batches, and the
   fastest is confirmed by a short training comparison;
3. **verify** the chosen precision against fp32 over ``steps`` steps, with the noise
   floor (a second fp32 run under another seed says how far two fp32 runs drift apart
   anyway, and the candidate must stay within 3x that);
4. print **one table**: what was chosen and why, the speed-up, the memory, the loss and
   metric differences against fp32 and against the noise floor, and the verdict; write
   the report (``report.json``, ``report.md`` and ``report.html`` of the verification,
   :mod:`mixprec.report`, and ``demo.json``, the whole ``mixprec.demo/1`` document).

Which precision is verified. The demo's point is to show what mixed precision buys and
what it costs, so it always verifies a mixed mode:

* autotune chose one: that policy, keep-list included (``source: "autotune"``);
* autotune found nothing faster than fp32 for this model: the probe's recommended mode
  (``"probe"``), and the table says that autotune did not find it faster for this model;
* the probe recommends fp32 too: ``bf16-mixed`` (``"default"``), which every machine can
  run, to show its numerics.

In the last two cases the verdict is about the numerics only, and ``recommendation``
stays fp32: mixprec never claims a speed-up it did not measure. A chosen mode that fails
verification is not recommended either.

Speed. The speed-up is autotune's: one fp32 step and one candidate step per round on the
same batch, alternating the order, median of the per-round ratios, all in one process, so
slow drift of a shared machine cancels. (Verify's own step times, from separate runs, are
in ``verify.speed`` but not in the table.) A mode autotune did not time is timed the
same way here.

Memory, measured from the tensors themselves rather than the process:

* *training state*: the bytes of the parameters, their gradients (right after
  ``backward``), the optimizer's state (after its first step) and, in the ``*-true``
  modes, the fp32 master weights; per parameter that is 16 B for fp32 + AdamW, and the
  same for the mixed modes, which keep fp32 weights: mixed precision saves no state;
* *activations*: the bytes of the tensors autograd saves for backward in one forward pass
  on one training batch (hooked with ``torch.autograd.graph.saved_tensors_hooks``, each
  storage counted once, parameters excluded; the low-precision weight copies autocast
  saves are included, since they are real extra memory). This is where mixed precision
  saves memory.
* on CUDA also the allocator's peak during one whole step (``torch.cuda.max_memory_allocated``
  after a reset).

The process's peak RSS is not reported per mode: one process has one peak, set by
whichever run used most, and torch's own libraries dominate it at this model size.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mixprec import autotune as autotune_mod
from mixprec import jsonio
from mixprec import probe as probe_mod
from mixprec.memory import measure_memory
from mixprec.report import prepare_report_dir, write_report
from mixprec.environment import environment, resolve_device
from mixprec.errors import UsageError
from mixprec.policy import Policy, Rule
from mixprec.runs import verify as verify_mod
from mixprec.task import Task

__all__ = ["DEMO_SCHEMA", "DEFAULT_STEPS", "QUICK_STEPS", "QUICK_TASK_ARGS", "measure_memory", "render_demo",
           "run_demo"]

DEMO_SCHEMA = "mixprec.demo/1"
TASK_NAME = "lm"
CANDIDATES = ("bf16-mixed", "fp16-mixed", "fp8-mixed")
BUDGET = 0.02  # autotune's relative loss budget
# Verify steps. At 60 steps the lm loss is still falling steeply and two fp32 seeds differ
# by ~4% (so the check would tolerate ~12%); by 100 they differ by ~0.3-1%, a real test.
DEFAULT_STEPS = 100
QUICK_STEPS = 12
# Autotune settings: (interleaved timing rounds, confirmation steps, sensitivity batches).
DEFAULT_TUNING = (20, 30, 2)
QUICK_TUNING = (3, 10, 1)
# quick=True trains this tiny lm unless task_args say otherwise (they are merged over it).
QUICK_TASK_ARGS: dict[str, Any] = {"n_layer": 1, "d_model": 32, "n_head": 2, "seq_len": 32, "batch_size": 4}
# Files the demo writes into report_dir (report.html only when mixprec.report exists).
REPORT_FILES = ("report.json", "report.md", "report.html", "demo.json")


def run_demo(*, steps: int | None = None, quick: bool = False, report_dir: str | Path | None = "mixprec-demo",
             task_args: dict[str, Any] | None = None, device: str = "cpu",
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Probe, autotune, verify and measure the default recipe; return a ``mixprec.demo/1`` document.

    ``steps``: verify steps (default 100; 12 with ``quick``). ``quick``: the quick probe,
    short autotune runs and, unless ``task_args`` override them, the tiny lm of
    ``QUICK_TASK_ARGS``. ``report_dir``: where the report goes (new, empty, or an earlier
    mixprec report; ``None`` writes nothing). ``log``: called with one line per phase.
    """
    from mixprec.taskref import load_task

    say = log or (lambda line: None)
    if steps is None:
        steps = QUICK_STEPS if quick else DEFAULT_STEPS
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < verify_mod.MIN_STEPS:
        raise UsageError(f"demo steps must be an integer >= {verify_mod.MIN_STEPS} (verify compares the last fifth "
                         f"of the loss curves), got {steps!r}")
    if task_args is not None and not isinstance(task_args, dict):
        raise UsageError(f"task_args must be a dict of keyword arguments for the lm recipe, got {task_args!r}")
    dev = resolve_device(device)
    directory = prepare_report_dir(report_dir) if report_dir is not None else None  # fail before the work
    args = {**(QUICK_TASK_ARGS if quick else {}), **(task_args or {})}
    task = load_task(TASK_NAME, args)
    timing_steps, confirm_steps, sensitivity_batches = QUICK_TUNING if quick else DEFAULT_TUNING
    durations: dict[str, float] = {}
    started = time.perf_counter()

    # 1. probe
    t0 = time.perf_counter()
    say("probe: measuring what this machine does fast (cached per machine) ...")
    doc_probe = probe_mod.probe(str(dev), quick=quick)
    durations["probe_s"] = time.perf_counter() - t0
    say(f"probe: recommends {doc_probe['recommended']}: {doc_probe['why']}"
        + (" [cached]" if doc_probe.get("cached") else ""))

    # 2. autotune (and how busy other processes kept the machine meanwhile: CPU timings
    # taken while other work competes for the cores are not to be trusted)
    t0 = time.perf_counter()
    watch = probe_mod._OtherLoad()
    watch.start()
    tuned = autotune_mod.autotune(task, candidates=list(CANDIDATES), budget=BUDGET, timing_steps=timing_steps,
                                  confirm_steps=confirm_steps, sensitivity_batches=sensitivity_batches,
                                  device=str(dev), probe_doc=doc_probe, log=lambda line: say(f"autotune: {line}"))
    durations["autotune_s"] = time.perf_counter() - t0
    say(f"autotune: chose {tuned['chosen']}: {tuned['why']}")
    candidate, chosen = _pick_candidate(tuned, doc_probe)

    # speed: autotune's interleaved timing of the verified mode (timed here if it was not)
    t0 = time.perf_counter()
    speed = _speed(task, tuned, candidate, timing_steps, str(dev), say)
    durations["speed_s"] = time.perf_counter() - t0
    other = watch.stop() if dev.type == "cpu" else None
    threads = torch.get_num_threads()
    speed["other_cpu_load"] = other
    speed["busy"] = bool(other is not None and other + threads > len(watch.cpus) + 0.25)
    if speed["busy"]:
        say(f"speed: other processes used {other:.1f} of {len(watch.cpus)} CPUs while timing: the speed-up is unreliable")

    # memory, measured from the tensors of one step in each mode
    t0 = time.perf_counter()
    say(f"memory: one step each of fp32 and {candidate.mode}, counting tensors ...")
    memory = {"reference": measure_memory(task, "fp32", device=str(dev)),
              "candidate": measure_memory(task, candidate, device=str(dev))}
    durations["memory_s"] = time.perf_counter() - t0

    # 3. verify against fp32, with the noise floor
    t0 = time.perf_counter()
    say(f"verify: {candidate.mode} against fp32 over {steps} steps, plus fp32 under seed 1 (noise floor) ...")
    verified = verify_mod.verify(task, candidate, steps=steps, noise_floor=True, device=str(dev))
    durations["verify_s"] = time.perf_counter() - t0
    say(f"verify: {verified['verdict']}")

    verdict = verified["verdict"]
    chosen["recommendation"] = candidate.mode if chosen["source"] == "autotune" and verdict == "PASS" else "fp32"
    doc: dict[str, Any] = {
        "schema": DEMO_SCHEMA,
        "task": {"name": task.name, "args": args, "parameters": memory["reference"]["parameters"]},
        "settings": {"steps": steps, "quick": quick, "budget": BUDGET, "candidates": list(CANDIDATES),
                     "timing_steps": timing_steps, "confirm_steps": confirm_steps,
                     "sensitivity_batches": sensitivity_batches, "noise_multiple": verify_mod.DEFAULT_NOISE_MULTIPLE},
        "probe": {k: doc_probe.get(k) for k in ("fingerprint", "cached", "cache_file", "measured_at", "recommended",
                                                 "why", "fast", "slow", "pitfalls")}
                 | {"matmul_tflops": {f: m.get("tflops") for f, m in doc_probe["matmul"].items()},
                    "matmul_ratio": {f: m.get("ratio_to_fp32") for f, m in doc_probe["matmul"].items()}},
        "autotune": tuned,
        "chosen": chosen,
        "speed": speed,
        "memory": memory,
        "accuracy": _accuracy(verified),
        "verdict": verdict,
        "reasons": verified["reasons"],
        "summary": _summary(chosen, speed, verdict),
        "verify": verified,
        "report": None,
        "durations": durations,
        "environment": environment(dev),
    }
    if directory is not None:
        t0 = time.perf_counter()
        doc["report"] = _write_reports(directory, verified, say)
        durations["report_s"] = time.perf_counter() - t0
    durations["total_s"] = time.perf_counter() - started
    doc = json.loads(jsonio.dumps(doc))  # strict JSON, as written
    if directory is not None:
        jsonio.write_atomic(directory / "demo.json", jsonio.dumps(doc))
    return doc


# -- choosing what to verify --------------------------------------------------------------
def _row(tuned: dict[str, Any], mode: str) -> dict[str, Any] | None:
    return next((r for r in tuned["candidates"] if r["mode"] == mode), None)


def _pick_candidate(tuned: dict[str, Any], doc_probe: dict[str, Any]) -> tuple[Policy, dict[str, Any]]:
    """The mixed policy to verify, and the ``chosen`` block saying where it came from."""
    if tuned["chosen"] != "fp32":
        policy = Policy.from_dict(tuned["policy"])
        return policy, {"mode": tuned["chosen"], "why": tuned["why"], "verified": policy.mode,
                        "verified_policy": policy.to_dict(), "source": "autotune", "note": None}
    recommended = doc_probe.get("recommended")
    if recommended in autotune_mod.TUNABLE:
        mode, source = recommended, "probe"
        row = _row(tuned, mode)
        if row is not None and row.get("speedup") is not None:
            measured = f" ({row['speedup']:.2f}x fp32, timed interleaved)"
        elif row is not None and row.get("why"):
            measured = f" ({row['why']})"
        else:
            measured = ""
        note = (f"autotune did not find {mode} faster than fp32 for this model{measured}; the probe recommends it, "
                "so it is verified anyway to show its numerics")
    else:
        mode, source = "bf16-mixed", "default"
        note = ("neither the probe nor autotune found a mode faster than fp32 on this machine; verifying bf16-mixed "
                "anyway to show what it would cost in accuracy")
    row = _row(tuned, mode)
    keep = row["keep_fp32"] if row else []
    policy = Policy(mode, rules=tuple(Rule(match=m) for m in keep))
    return policy, {"mode": "fp32", "why": tuned["why"], "verified": mode, "verified_policy": policy.to_dict(),
                    "source": source, "note": note}


def _speed(task: Task, tuned: dict[str, Any], policy: Policy, timing_steps: int, device: str,
           say: Callable[[str], None]) -> dict[str, Any]:
    row = _row(tuned, policy.mode)
    same_policy = row is not None and sorted(row["keep_fp32"]) == sorted(r.match for r in policy.rules if r.match)
    if row is not None and row.get("speedup") is not None and same_policy:
        fp32_s, cand_s, ratio, source = row["fp32_step_time_s"], row["step_time_s"], row["speedup"], "autotune"
    else:
        say(f"speed: autotune did not time {policy.mode}; timing {timing_steps} rounds interleaved with fp32 ...")
        fp32_s, cand_s, ratio = autotune_mod.measure_speedup(task, policy, timing_steps, 0, device)
        source = "demo"
    return {"reference_step_s": fp32_s, "candidate_step_s": cand_s, "speedup": ratio, "rounds": timing_steps,
            "method": "interleaved: one fp32 and one candidate step per round on the same batch, order alternating; "
                      "median of the per-round ratios", "timed_by": source}


# -- memory -------------------------------------------------------------------------------
# -- accuracy -----------------------------------------------------------------------------
def _signed(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return (a - b) / max(abs(b), 1e-12)


def _accuracy(v: dict[str, Any]) -> dict[str, Any]:
    """Candidate versus fp32 and versus the noise floor, with the limits verify applied."""
    multiple = v["tolerances"]["noise_multiple"]
    comp, noise = v["comparison"], v["noise_floor"] or {}
    fl = comp["final_loss"]
    floor = (noise.get("final_loss") or {}).get("rel")
    out: dict[str, Any] = {
        "final_loss": {"reference": fl["reference"], "candidate": fl["other"], "rel": fl["rel"],
                       "signed_rel": _signed(fl["other"], fl["reference"]), "noise_floor": floor,
                       "limit": max(multiple * floor, 1e-6) if floor is not None else v["tolerances"]["loss"],
                       "tail_steps": max(3, v["steps"] // 5)},
        "max_step_rel": comp["max_step_rel"],
        "metrics": {},
    }
    for name, m in comp["metrics"].items():
        m_floor = (noise.get("metrics") or {}).get(name, {}).get("rel")
        limit = v["tolerances"]["metric"] if m_floor is None else max(v["tolerances"]["metric"], multiple * m_floor)
        out["metrics"][name] = {"reference": m["reference"], "candidate": m["other"], "rel": m["rel"],
                                "signed_rel": _signed(m["other"], m["reference"]), "noise_floor": m_floor,
                                "limit": limit}
    return out


def _summary(chosen: dict[str, Any], speed: dict[str, Any], verdict: str) -> str:
    mode, sp = chosen["verified"], speed["speedup"]
    faster = f"{sp:.2f}x fp32's speed" if sp is not None else "speed not measured"
    if speed.get("busy"):
        faster += ", measured on a busy machine"
    if verdict != "PASS":
        return f"{mode} ({faster}) does not match fp32 over this run: train in fp32"
    if chosen["source"] == "autotune":
        return f"train in {mode}: {faster}, matching fp32 within the noise floor"
    return f"{mode} matches fp32 within the noise floor but was not faster here ({faster}): train in fp32 on this machine"


# -- report -------------------------------------------------------------------------------
def _write_reports(directory: Path, verified: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    """The verification's report.json, report.md and report.html (mixprec.report)."""
    paths = write_report(verified, directory)
    return {"directory": str(directory), "json": str(paths["json"]), "markdown": str(paths["md"]),
            "html": str(paths["html"]), "html_error": None, "demo": str(directory / "demo.json")}


# -- the table ----------------------------------------------------------------------------
def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB" if n < 10 * 2**20 else f"{n / 2**20:.1f} MiB"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.1f} ms"


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    digits = 3 if 0 < abs(x) < 1e-4 else 2  # -0.001%, not -0.00%
    return f"{x:+.{digits}%}" if signed else f"{x:.{digits}%}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}" if abs(x) < 100 else f"{x:.4g}"


def render_demo(doc: dict[str, Any]) -> str:
    """The demo's one table (and, under it, where the report is)."""
    mode = doc["chosen"]["verified"]
    chosen, speed, mem, acc = doc["chosen"], doc["speed"], doc["memory"], doc["accuracy"]
    ref_m, cand_m = mem["reference"], mem["candidate"]
    env = doc["environment"]
    head = (f"mixprec demo: {doc['task']['name']} ({doc['task']['parameters'] / 1e6:.2f} M parameters), "
            f"{doc['settings']['steps']} verify steps, on {env.get('device_name')} ({env.get('device')}, "
            f"{env.get('threads')} threads)" + (", quick" if doc["settings"]["quick"] else ""))

    label = {"autotune": "chosen by autotune", "probe": "probe's pick", "default": "shown anyway"}[chosen["source"]]
    why = chosen["why"] if chosen["source"] == "autotune" else chosen["note"]
    fmt = autotune_mod._PROBE_FORMAT.get(mode)
    tflops, ratios = doc["probe"]["matmul_tflops"], doc["probe"]["matmul_ratio"]
    rows: list[list[str]] = [["", "fp32", mode, f"{mode} vs fp32"],
                             ["precision", "reference", label, why]]
    if fmt and tflops.get("fp32") and tflops.get(fmt):
        rows.append(["matmul throughput (probe)", f"{tflops['fp32']:.3g} TFLOP/s", f"{tflops[fmt]:.3g} TFLOP/s",
                     f"{ratios[fmt]:.2f}x ({fmt} raw matmul; a whole step gains less)"])
    sp = speed["speedup"]
    rows.append(["step time (interleaved)", _ms(speed["reference_step_s"]), _ms(speed["candidate_step_s"]),
                 "-" if sp is None else f"{sp:.2f}x {'faster' if sp >= 1 else 'fp32, slower'} "
                 f"(median of {speed['rounds']} interleaved rounds, same batches)"])
    if speed.get("busy"):
        rows.append(["", "", "", f"(machine busy: other processes used {speed['other_cpu_load']:.1f} CPUs while "
                                 "timing; the speed-up is unreliable, run again when idle)"])
    rows.append(["weights+grads+optimizer", _mib(ref_m["state_bytes"]), _mib(cand_m["state_bytes"]),
                 f"{ref_m['state_bytes_per_parameter']:.1f} vs {cand_m['state_bytes_per_parameter']:.1f} B/param"
                 + (": mixed keeps fp32 weights, no saving" if mode.endswith("-mixed") else "")])
    shape = "x".join(map(str, cand_m["batch_shape"])) if cand_m.get("batch_shape") else "one"
    act_ratio = cand_m["activation_bytes"] / ref_m["activation_bytes"] if ref_m["activation_bytes"] else None
    rows.append(["activations saved for bwd", _mib(ref_m["activation_bytes"]), _mib(cand_m["activation_bytes"]),
                 ("-" if act_ratio is None else f"{act_ratio:.2f}x") + f" (one batch of {shape})"])
    if ref_m.get("cuda_peak_bytes") is not None:
        rows.append(["CUDA peak, one step", _mib(ref_m["cuda_peak_bytes"]), _mib(cand_m["cuda_peak_bytes"]),
                     f"{cand_m['cuda_peak_bytes'] / max(ref_m['cuda_peak_bytes'], 1):.2f}x"])
    fl = acc["final_loss"]
    rows.append([f"final loss (last {fl['tail_steps']} steps)", _num(fl["reference"]), _num(fl["candidate"]),
                 f"{_pct(fl['signed_rel'], True)} (fp32 seed-to-seed {_pct(fl['noise_floor'])}, "
                 f"limit {_pct(fl['limit'])})"])
    for name, m in acc["metrics"].items():
        rows.append([f"{name} (eval)", _num(m["reference"]), _num(m["candidate"]),
                     f"{_pct(m['signed_rel'], True)} (fp32 seed-to-seed {_pct(m['noise_floor'])}, "
                     f"limit {_pct(m['limit'])})"])
    rows.append(["verdict", "", doc["verdict"], doc["summary"]])

    widths = [max(len(r[i]) for r in rows) for i in range(3)]

    def line(cells: list[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0]), cells[1].rjust(widths[1]), cells[2].rjust(widths[2]),
                          cells[3]]).rstrip()

    out = [head, "", line(rows[0]), "  ".join("-" * w for w in widths) + "  " + "-" * len(rows[0][3]),
           *(line(r) for r in rows[1:])]
    if doc["verdict"] != "PASS":
        out += [f"  - {r}" for r in doc["reasons"]]
    rep = doc.get("report")
    if rep:
        extra = ", ".join(Path(p).name for p in (rep["json"], rep.get("html"), rep["demo"]) if p)
        out += ["", f"report: {rep['markdown']} (also {extra})"]
        if rep.get("html") is None and rep.get("html_error"):
            out.append(f"  ({rep['html_error']})")
    total = doc["durations"].get("total_s")
    if total is not None:
        out.append(f"took {total:.0f} s (probe {doc['durations']['probe_s']:.0f} s"
                   + (" cached" if doc["probe"].get("cached") else "")
                   + f", autotune {doc['durations']['autotune_s']:.0f} s, verify {doc['durations']['verify_s']:.0f} s)")
    return "\n".join(out)
