"""Run every benchmark and regenerate docs/benchmarks.md from what this run measured.

    python benchmarks/run_all.py --quick          # what docs/benchmarks.md shows (< 10 min, 2 cores)
    python benchmarks/run_all.py                  # the full sizes (longer)
    python benchmarks/run_all.py --smoke --out /tmp/b   # seconds-scale check that it all runs
    python benchmarks/run_all.py --render-only    # re-render from benchmarks/results/ (after gpu.sh)

Each benchmark runs in its own process (a fresh interpreter: no state carried from one to
the next, and Accelerate's one-per-process state is respected) with the same size flag,
writes its JSON into --out, and its own ``markdown(doc)`` renders its table here, so the
document and the scripts cannot disagree. The GPU section comes from OUT/gpu.json when
``benchmarks/gpu.sh`` has written one on a GPU. A script that fails is reported in the
document, and run_all exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import _common  # noqa: E402

from mixprec.environment import environment  # noqa: E402
from mixprec.jsonio import dumps, write_atomic  # noqa: E402

# (name, script, extra arguments): the order they run in.
SCRIPTS = [
    ("speedup", "speedup.py", ["--probe", "{out}/probe.json", "--results", "{results}"]),
    ("peers", "peers.py", []),
    ("overhead", "overhead.py", []),
    ("monitor_overhead", "monitor_overhead.py", []),
    ("emulation", "emulation.py", []),
    ("autotune_cost", "autotune_cost.py", []),
    ("memory", "memory.py", []),
    ("scaling", "scaling.py", []),
]


def run(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """(exit code, wall seconds, CPU seconds of the process and its children)."""
    import resource

    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return rc, time.perf_counter() - t0, (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)


def load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- the claims, read from the documents ---------------------------------------------------
def targets(docs: dict[str, Any], bf16_cpu: bool) -> list[list[str]]:
    rows: list[list[str]] = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else "met" if ok else "**MISSED**"

    peers = docs.get("peers")
    if peers:
        for g in peers["results"]:
            for peer, s in g["mixprec_versus"].items():
                where = f"peers: {g['model']}, {g['precision']}, {g['rounds']} rounds"
                ok = (s["median"] <= 1.02) if peer == "torch.amp" else (s["ci95"][0] <= 1.0)
                name = "mixprec step <= 1.02x hand-written torch.amp loop" if peer == "torch.amp" \
                    else f"mixprec no slower than {peer}"
                rows.append([name, _common.fmt_ci(s), verdict(ok if _common.judgeable(s) else None), where])
    overhead = docs.get("overhead")
    if overhead:
        for r in overhead["results"]:
            c = r["config"]
            rows.append(["mixprec step <= 1.02x hand-written torch.amp loop", _common.fmt_ci(r["ratio"]),
                         verdict(r["meets_target"]),
                         f"overhead: lm {c['n_layer']}L d{c['d_model']} T{c['seq_len']}, {r['mode']}, "
                         f"{r['rounds']} rounds"])
    scaling, probe = docs.get("scaling"), docs.get("probe")
    ceiling = None
    if probe:
        bf16 = probe.get("matmul", {}).get("bf16", {})
        ceiling = bf16.get("ratio_to_fp32") if bf16.get("available") else None
    if scaling and "bf16-mixed" in scaling["precisions"]:
        base = scaling["points"][0]
        s = base["precisions"]["bf16-mixed"]["speedup_over_fp32"]
        where = f"scaling: lm defaults, {base['rounds']} rounds"
        if bf16_cpu:
            rows.append(["bf16-mixed >= 1.6x over fp32 on the lm recipe (AVX512_BF16 CPU)", _common.fmt_ci(s, 2),
                         verdict(s["median"] >= 1.6), where])
        if ceiling:
            frac = s["median"] / ceiling
            rows.append(["bf16-mixed speed-up >= 80% of the bf16/fp32 matmul ceiling",
                         f"{frac:.0%} ({s['median']:.2f}x of {ceiling:.2f}x)", verdict(frac >= 0.8),
                         where + "; ceiling: probe"])
            # Context, not a second chance: the probe's ceiling is measured on 2048^3 matmuls,
            # so the widest scaling point shows how close a model with large matmuls gets.
            wide = max(scaling["points"], key=lambda pt: pt["config"]["d_model"])
            if wide is not base:
                w = wide["precisions"]["bf16-mixed"]["speedup_over_fp32"]
                frac = w["median"] / ceiling
                rows.append(["(context) the same at the widest scaling point",
                             f"{frac:.0%} ({w['median']:.2f}x of {ceiling:.2f}x)", verdict(frac >= 0.8),
                             f"scaling: lm d_model {wide['config']['d_model']}, {wide['rounds']} rounds"])
    speedup = docs.get("speedup")
    if speedup:
        for r in speedup.get("rows", []):
            for name, ok in (r.get("targets") or {}).items():
                value = f"{r['speedup']:.2f}x" if "1.6" in name else \
                    ("n/a" if r["fraction_of_ceiling"] is None else f"{r['fraction_of_ceiling']:.0%}")
                rows.append([f"bf16-mixed {name} on the lm recipe", value, verdict(ok), "verify --all (docs/results.json)"])
    monitor = docs.get("monitor_overhead")
    if monitor:
        r = monitor["results"][-1]
        c = monitor["config"]
        rows.append(["monitor <= 1.03x at its default interval", _common.fmt_ci(r["ratio"]), verdict(r["meets_target"]),
                     f"monitor_overhead: lm {c['n_layer']}L d{c['d_model']}, {monitor['rounds']} rounds"])
    emulation = docs.get("emulation")
    if emulation:
        for r in emulation["results"]:
            if r["target"] is not None:
                rows.append([f"{r['mode']} <= 3x fp32", _common.fmt_ci(r["ratio_to_fp32"], 2),
                             verdict(r["meets_target"]), f"emulation: lm defaults, {r['rounds']} rounds"])
    return rows


def position(peers: dict[str, Any]) -> list[str]:
    """Plain sentences: where mixprec stands against each peer, per model and precision."""
    lines = []
    for g in peers["results"]:
        parts = []
        for peer, s in g["mixprec_versus"].items():
            lo, hi = s["ci95"]
            if not _common.judgeable(s):
                parts.append(f"not compared with {peer} ({s['rounds']} round(s): too few to tell)")
                continue
            word = "faster than" if hi < 1 else "slower than" if lo > 1 else "level with"
            level = "95%" if s.get("ci_level", 1) >= 0.95 else f"{s['ci_level']:.0%}"
            parts.append(f"{word} {peer} ({s['median']:.3f}x its step time, {level} CI [{lo:.3f}, {hi:.3f}])")
        skipped = [f"{r['peer']} did not run ({r['skipped']})" for r in g["rows"] if "skipped" in r]
        lines.append(f"- {g['model']}, {g['precision']}: mixprec is " + "; ".join(parts)
                     + (". " + "; ".join(skipped) if skipped else "") + ".")
    return lines


# -- the document --------------------------------------------------------------------------
METHOD = {
    "speedup": "Per-recipe speed-up of each precision over fp32, as `mixprec verify --all` measured it (fp32 and the "
               "candidate trained step by step interleaved on the same batches), next to the ceiling the probe "
               "measures for the format's matmuls here. A whole step also does non-matmul work, so it gains at most "
               "the ceiling. A precision verify ran emulated has the emulation's speed, not the format's.",
    "peers": "The same model and data, from the same initial weights, trained by (a) the hand-written torch.amp loop, "
             "(b) Hugging Face Accelerate, (c) Lightning Fabric and (d) mixprec, all clipping at norm 1.0. Per "
             "precision the four are timed in one process, one step of each per round, order rotated, after 5 "
             "warm-up rounds; ratios are per round, median with a 95% order-statistic CI. Native fp16 on a CPU "
             "without AVX512-FP16 is timed with a few rounds only (it is tens of times slower). Peak memory: 2 steps "
             "of each peer in a fresh process (peak RSS, and its rise over the process before the model was "
             "built). `params = (a)`: the peer's weights after the timed rounds equal the hand-written loop's "
             "bitwise, so it did the same arithmetic. Fabric clips over the optimizer's parameters in "
             "parameter-group order, not the model's: where a recipe has several groups (lm: decayed matrices, "
             "then the rest) its gradient norm sums in another order and its weights differ in the last bits.",
    "overhead": "The engine against the hand-written torch.amp loop on larger lm configurations (a step of 100 ms "
                "or more), one step of each per round, alternating which goes first.",
    "monitor_overhead": "The train run's own code path with the numerics monitor: not attached (`plain`), attached "
                        "but not sampling (`unarmed`), sampling every step (`armed`); the default interval's ratio "
                        "is derived, r_unarmed + (r_armed - r_unarmed) / interval, with a bootstrap CI from the same "
                        "resampled rounds.",
    "emulation": "fp32, emulated fp16 and fp8 (software rounding of matmul inputs and outputs, fp32 arithmetic) and "
                 "native fp16, one step each per round on the same batch; native fp16 only in the first rounds.",
    "autotune_cost": "`mixprec.autotune` on the lm recipe with its default settings, on the cached probe; then the "
                     "training run it tuned (the recipe's verify_steps steps under the chosen policy). Break-even: "
                     "autotune's seconds over the per-step saving autotune itself measured.",
    "memory": "Every recipe in this checkout at its defaults, 2 steps through the engine per precision, each in a "
              "fresh process (CPU: peak RSS, in brackets its rise over the process before the model was built; "
              "GPU: torch.cuda.max_memory_allocated). Then the bytes per parameter of the lm recipe's training "
              "state, counted from the tensors (`mixprec.memory`).",
    "scaling": "The lm recipe's step time as width and sequence length double from the defaults, the precisions "
               "interleaved at each point; throughput is the step's counted matmul FLOPs over its median time.",
}
TITLES = {
    "speedup": "Speed-up per recipe against the hardware ceiling",
    "peers": "Side by side with the peers",
    "overhead": "Engine overhead versus the hand-written torch.amp loop",
    "monitor_overhead": "Monitor overhead",
    "emulation": "Emulated fp16/fp8 versus fp32 and native fp16",
    "autotune_cost": "Autotune's own cost",
    "memory": "Memory",
    "scaling": "Scaling: width and sequence length",
}


def machine(env: dict[str, Any]) -> str:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    flags = ", ".join(env.get("cpu_flags") or []) or "none of the precision flags"
    return (f"{env.get('cpu_model')} ({usable} usable cores; {flags}), {env.get('gpu_model') or 'no GPU'}; "
            f"torch {env.get('torch')}, Python {env.get('python')}, mixprec {env.get('mixprec')}, "
            f"{env.get('threads')} threads; {env.get('platform')}")


def render(docs: dict[str, Any], meta: dict[str, Any]) -> str:
    env = meta["environment"]
    load0, load1 = meta["load_before"], meta["load_after"]
    cores = meta["cores"]
    # Only the load before counts: the load after includes this run's own benchmarks.
    busy = load0 is not None and load0 > 0.5 * cores
    out = ["# Benchmarks", "",
           "<!-- Generated by benchmarks/run_all.py from this run's JSON; edit the scripts, not this file. -->", "",
           "Claims are ratios measured side by side in one process, on the same model and data, against what a "
           "user would otherwise use; absolute times are context. Every table below comes from one run of",
           "", f"    {meta['command']}", "",
           f"on {meta['date']} ({meta['seconds'] / 60:.1f} minutes), size `{meta['size']}`. "
           f"Machine: {machine(env)}. Load average (1 min) {_load(load0)} before and {_load(load1)} after "
           "(after includes this run's own work)"
           + (" — **the machine was busy while this ran; the timings are noisier than they should be**." if busy
              else "."), "",
           "House rules (benchmarks/_stats.py): the compared runs are interleaved in one process, one step of each "
           "per round on the same batch with the order rotated, after warm-up rounds; a claim is the median of the "
           "per-round ratios with its 95% confidence interval (order statistics of the median; a bootstrap for "
           "derived quantities). Each script prints its table last and writes JSON with `--json`; "
           f"this run's JSON is in `{meta['out']}`.", ""]
    if meta["failed"]:
        out += ["**Failed in this run:** " + ", ".join(f"`{n}` (exit {rc}, see `{meta['out']}/{n}.log`)"
                                                     for n, rc in meta["failed"]), ""]
    peers = docs.get("peers")
    out += ["## Where mixprec stands", ""]
    if peers:
        out += ["Step time of mixprec against each peer at the same precision (a ratio below 1 is mixprec "
                "faster; \"level with\" means the 95% CI contains 1):", "", *position(peers), ""]
    out += ["## Targets", "", "Measured in this run; a miss is reported, not hidden.", "",
            _common.table(["target", "measured (median [95% CI])", "verdict", "where"],
                          targets(docs, meta["bf16_cpu"])), ""]
    for name, _, _ in SCRIPTS:
        out += [f"## {TITLES[name]}", "", METHOD[name], ""]
        doc = docs.get(name)
        if doc is None:
            out += [f"Not measured in this run (`{name}` failed or was skipped).", ""]
            continue
        module = importlib.import_module(name)
        out += [f"`{doc.get('command', '').replace(str(REPO) + '/', '')}`", "", module.markdown(doc).rstrip(), ""]
    out += ["## The GPU run", "",
            "`bash benchmarks/gpu.sh` runs `mixprec probe` and then the lm recipe at 12 layers, d_model 768, "
            "seq_len 1024, batch 16 in fp32, tf32, bf16-mixed, fp16-mixed and fp8-mixed on one GPU: tokens/s, "
            "model FLOP utilization against the probe's measured bf16 peak and the datasheet's, peak memory "
            "and energy per step (NVML). On a machine without a GPU it runs a tiny configuration and skips the "
            "GPU-only parts.", ""]
    gpu = meta.get("gpu")
    if gpu is not None and str(gpu["environment"].get("device", "")).startswith("cuda"):
        import gpu_lm

        out += [f"Measured {gpu.get('date', 'at the time of its file')} on **{gpu['device_name']}**, torch "
                f"{gpu['environment'].get('torch')}:", "", gpu_lm.markdown(gpu).rstrip(), ""]
    else:
        out += ["Not yet run on a GPU: no `gpu.json` from a CUDA device in `" + meta["out"] + "`.", ""]
    return "\n".join(out).rstrip() + "\n"


def _load(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def measure(args: argparse.Namespace, size: str, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the probe and every script; (docs by name, meta)."""
    flag = {"smoke": ["--smoke"], "quick": ["--quick"], "full": []}[size]
    only = set(args.only.split(",")) if args.only else None
    py = sys.executable
    env_doc = environment()
    meta: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/run_all.py", *sys.argv[1:]]), "size": size,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "environment": env_doc,
        "load_before": _common.cpu_load(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count() or 1,
        "out": str(out.relative_to(REPO)) if out.resolve().is_relative_to(REPO) else str(out),
        "bf16_cpu": bool({"avx512_bf16", "amx_bf16"} & set(env_doc.get("cpu_flags") or [])), "failed": [],
        "scripts": {}}
    t_all = time.perf_counter()

    print("probe ...", file=sys.stderr, flush=True)
    probe_args = ["--quick"] if size == "smoke" else ["--refresh"]
    rc, secs, cpu = run([py, "-m", "mixprec", "probe", *probe_args, "--json", str(out / "probe.json")],
                        out / "probe.log")
    meta["scripts"]["probe"] = {"rc": rc, "seconds": secs, "cpu_seconds": cpu}
    if rc:
        meta["failed"].append(("probe", rc))
    docs: dict[str, Any] = {"probe": load(out, "probe")}
    for name, script, extra in SCRIPTS:
        if only is not None and name not in only:
            continue
        cmd = [py, str(HERE / script), *flag, "--json", str(out / f"{name}.json"),
               *[a.format(out=out, results=args.results) for a in extra]]
        print(f"{name} ...", file=sys.stderr, flush=True)
        (out / f"{name}.json").unlink(missing_ok=True)
        rc, secs, cpu = run(cmd, out / f"{name}.log")
        meta["scripts"][name] = {"rc": rc, "seconds": secs, "cpu_seconds": cpu}
        print(f"{name}: exit {rc}, {secs:.0f} s", file=sys.stderr, flush=True)
        if rc:
            meta["failed"].append((name, rc))
        docs[name] = load(out, name) if rc == 0 else None
    meta["seconds"] = time.perf_counter() - t_all
    meta["load_after"] = _common.cpu_load()
    return docs, meta


def main() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--out", default=None, help="where the JSON and logs go (default benchmarks/results)")
    p.add_argument("--md", default=None, help="the Markdown document (default docs/benchmarks.md; "
                                              "with --smoke OUT/benchmarks.md)")
    p.add_argument("--results", default=str(REPO / "docs" / "results.json"), help="verify --all's document")
    p.add_argument("--only", default=None, help="comma-separated subset of: " + ", ".join(n for n, _, _ in SCRIPTS))
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: re-render the document from OUT's JSON (e.g. after gpu.sh wrote OUT/gpu.json)")
    args = p.parse_args()
    out = Path(args.out) if args.out else HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        try:
            meta = json.loads((out / "run_all.json").read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"run_all: --render-only needs {out / 'run_all.json'} from an earlier run ({exc})")
        failed = {n for n, _ in meta["failed"]}
        docs = {n: None if n in failed else load(out, n) for n in ["probe", *(n for n, _, _ in SCRIPTS)]}
        size = meta["size"]
    else:
        size = _common.size(args)
        docs, meta = measure(args, size, out)
    md = Path(args.md) if args.md else out / "benchmarks.md" if size == "smoke" else REPO / "docs" / "benchmarks.md"
    meta["gpu"] = load(out, "gpu")

    text = render(docs, meta)
    timing = _common.table(["script", "wall seconds", "CPU seconds", "exit"],
                           [[n, f"{s['seconds']:.0f}", f"{s['cpu_seconds']:.0f}", s["rc"]]
                            for n, s in meta["scripts"].items()], right=(1, 2, 3))
    text += ("\n## This run\n\nSeconds per script (wall time, including its imports; CPU time of the script "
             "and the processes it started, where they were waited for):\n\n" + timing + "\n")
    md.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(md, text)
    summary = {**{k: v for k, v in meta.items() if k != "gpu"}, "schema": "mixprec.bench.run_all/1",
               "markdown": str(md), "targets": targets(docs, meta["bf16_cpu"])}
    write_atomic(out / "run_all.json", dumps(summary))
    if args.json:
        write_atomic(args.json, dumps(summary))
    print(text)
    print(f"wrote {md} and {out}/run_all.json ({meta['seconds']:.0f} s of measurement)", file=sys.stderr)
    return 1 if meta["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
