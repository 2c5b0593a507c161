"""Emulated fp16/fp8 versus fp32 and native fp16 on this machine (DESIGN.md, Performance:
emulated <= 3x the fp32 step).

The lm recipe (default config) trains one step per round under each mode on the same
batch, order rotated: fp32, emulate:fp16-mixed, emulate:fp8-mixed, and (fewer rounds: it
is tens of times slower on CPUs without AVX512-FP16) native fp16-mixed. Ratios are per
round to the fp32 step of the same round; median and bootstrap 95% CI.

    python benchmarks/emulation.py [--rounds 60] [--native-rounds 8] [--json emulation.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings

import torch

import mixprec
from mixprec.environment import environment
from mixprec.recipes.lm import lm

MODES = ["fp32", "emulate:fp16-mixed", "emulate:fp8-mixed", "fp16-mixed"]


def ci(values: list[float], n: int = 2000) -> tuple[float, float]:
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--native-rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the fp16-on-CPU warning is what this benchmark measures

    task = lm()
    loops = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = task.build_model()
        engine = mixprec.Engine(mode)
        engine.setup(model, task.build_optimizer(model))
        loops[mode] = (model, engine)

    def step(mode: str, batch) -> float:
        model, engine = loops[mode]
        t0 = time.perf_counter()
        with engine.autocast():
            loss = task.loss(model, batch)
        engine.backward(loss)
        engine.step()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {m: [] for m in MODES}
    fp32_in_native_rounds: list[float] = []
    batches = task.train_batches(0)
    for r in range(args.warmup + args.rounds):
        batch = next(batches)
        # Native fp16 runs in one warm-up round and the first --native-rounds measured ones.
        with_native = r == 0 or args.warmup <= r < args.warmup + args.native_rounds
        modes = MODES if with_native else MODES[:3]
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        measured = {m: step(m, batch) for m in order}
        if r >= args.warmup:
            for m, t in measured.items():
                times[m].append(t)
            if "fp16-mixed" in measured:
                fp32_in_native_rounds.append(measured["fp32"])

    rows = []
    for mode in MODES[1:]:
        base = fp32_in_native_rounds if mode == "fp16-mixed" else times["fp32"][: len(times[mode])]
        ratios = [t / b for t, b in zip(times[mode], base)]
        lo, hi = ci(ratios)
        target = 3.0 if mode.startswith("emulate:") else None
        rows.append({"mode": mode, "rounds": len(ratios), "step_s_median": statistics.median(times[mode]),
                     "ratio_to_fp32_median": statistics.median(ratios), "ratio_ci95": [lo, hi], "target": target,
                     "meets_target": None if target is None else statistics.median(ratios) <= target})
    doc = {"schema": "mixprec.bench.emulation/1", "command": " ".join(["python", *sys.argv]),
           "fp32_step_s_median": statistics.median(times["fp32"]), "results": rows, "environment": environment()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    print(f"lm (default config), fp32 step {doc['fp32_step_s_median'] * 1e3:.1f} ms")
    print(f"{'mode':<22} {'rounds':>6} {'step ms':>9} {'x fp32':>8} {'95% CI':>17} {'target':>9}")
    for r in rows:
        target = "" if r["target"] is None else f"<=3 {'yes' if r['meets_target'] else 'NO'}"
        print(f"{r['mode']:<22} {r['rounds']:>6} {r['step_s_median'] * 1e3:>9.1f} {r['ratio_to_fp32_median']:>8.2f} "
              f"{'[%.2f, %.2f]' % tuple(r['ratio_ci95']):>17} {target:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
