"""Monitor overhead on the lm recipe (DESIGN.md, Performance: <= 1.03 at the default interval).

Three copies of the same model train on the same batches through the train run's own
code path (engine + RunNumerics: hooks, per-step RNG snapshot for replay, sampling):

    plain     the engine, no monitor
    unarmed   monitor attached, never sampled (what 49 of 50 steps cost at the default)
    armed     monitor sampling every step (collect + JSON-able record each step)

Each round times one step of each, rotating the order. Per-round ratios to `plain`, median
and bootstrap 95% CI. The default interval's ratio is derived from the two measured ones,
r_default = r_unarmed + (r_armed - r_unarmed) / every, with its CI from the same bootstrap
resamples (an every-50 run cannot be measured step-paired in 60 rounds: the median would
never see its sampled steps).

    python benchmarks/monitor_overhead.py [--rounds 60] [--json monitor_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch

import mixprec
from mixprec.environment import environment
from mixprec.monitor import DEFAULT_EVERY
from mixprec.recipes.lm import lm
from mixprec.runs.numerics import RunNumerics

CONFIG = dict(n_layer=4, d_model=256, n_head=4, seq_len=256, batch_size=16)
MODE = "bf16-mixed"


class Loop:
    def __init__(self, task: mixprec.Task, every: int | None) -> None:
        torch.manual_seed(0)
        self.task = task
        self.model = task.build_model()
        opt = task.build_optimizer(self.model)
        self.engine = mixprec.Engine(MODE, clip_grad_norm=1.0)
        self.engine.setup(self.model, opt)
        self.numerics = None
        if every is not None:
            self.numerics = RunNumerics(task, self.model, self.engine, mixprec.Policy(MODE), every=every,
                                        formats=None, run_dir=None, tensorboard=None)
            self.numerics.start(None, None)
        self.step_no = 0

    def step(self, batch) -> None:
        self.step_no += 1
        if self.numerics is not None:
            self.numerics.before_window(self.step_no)
            self.numerics.add_batch(batch)
        with self.engine.autocast():
            loss = self.task.loss(self.model, batch)
        self.engine.backward(loss)
        result = self.engine.step()
        if self.numerics is not None:
            self.numerics.after_step(self.step_no, result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args()

    task = lm(**CONFIG)
    # `unarmed` samples only at a step it never reaches; `armed` every step.
    loops = {"plain": Loop(task, None), "unarmed": Loop(task, 10**9), "armed": Loop(task, 1)}
    names = list(loops)
    times: dict[str, list[float]] = {n: [] for n in names}
    batches = task.train_batches(0)
    for r in range(args.warmup + args.rounds):
        batch = next(batches)
        order = names[r % 3:] + names[:r % 3]
        for name in order:
            t0 = time.perf_counter()
            loops[name].step(batch)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    ratios = {n: [t / p for t, p in zip(times[n], times["plain"])] for n in ("unarmed", "armed")}
    rng = random.Random(0)
    boot: dict[str, list[float]] = {"unarmed": [], "armed": [], "default": []}
    idx = range(args.rounds)
    for _ in range(2000):
        pick = rng.choices(idx, k=args.rounds)
        u = statistics.median(ratios["unarmed"][i] for i in pick)
        a = statistics.median(ratios["armed"][i] for i in pick)
        boot["unarmed"].append(u)
        boot["armed"].append(a)
        boot["default"].append(u + (a - u) / DEFAULT_EVERY)
    ci = {k: (sorted(v)[50], sorted(v)[1949]) for k, v in boot.items()}
    med_u, med_a = statistics.median(ratios["unarmed"]), statistics.median(ratios["armed"])
    rows = [
        ("unarmed (hooks, no sample)", med_u, ci["unarmed"], None),
        ("armed (every step)", med_a, ci["armed"], None),
        (f"default (every {DEFAULT_EVERY}), derived", med_u + (med_a - med_u) / DEFAULT_EVERY, ci["default"], 1.03),
    ]
    doc = {
        "schema": "mixprec.bench.monitor_overhead/1",
        "command": " ".join(["python", *sys.argv]),
        "mode": MODE, "config": CONFIG, "rounds": args.rounds, "warmup": args.warmup,
        "default_every": DEFAULT_EVERY,
        "plain_step_s_median": statistics.median(times["plain"]),
        "results": [{"variant": v, "ratio_median": m, "ratio_ci95": list(c), "target": t,
                     "meets_target": None if t is None else m <= t} for v, m, c, t in rows],
        "environment": environment(),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    print(f"lm L{CONFIG['n_layer']} d{CONFIG['d_model']} T{CONFIG['seq_len']} B{CONFIG['batch_size']}, {MODE}, "
          f"plain step {doc['plain_step_s_median'] * 1e3:.1f} ms, {args.rounds} rounds")
    print(f"{'variant':<32} {'ratio':>7} {'95% CI':>17} {'target':>7}")
    for v, m, c, t in rows:
        print(f"{v:<32} {m:>7.3f} {'[%.3f, %.3f]' % c:>17} {'' if t is None else ('<=%.2f ' % t) + ('yes' if m <= t else 'NO'):>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
