"""Engine overhead versus the hand-written torch.amp loop (DESIGN.md, Performance: <= 1.02).

The same lm-recipe model and the same batches are trained twice in this process: once by
the loop a PyTorch user writes by hand (autocast + GradScaler + unscale_ + clip_grad_norm_
+ step + update), once by mixprec's engine. Each round times one optimizer step of each,
back to back, alternating which goes first; the claim is the median of the per-round
ratios engine/raw, with a bootstrap 95% confidence interval of that median.

    python benchmarks/overhead.py [--rounds 60] [--json overhead.json]

Sizes: each precision uses an lm config whose step takes >= 100 ms here. fp16 matmuls on
CPUs without AVX512-FP16 are tens of times slower than fp32, so fp16 runs a smaller model.
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

CONFIGS = {
    "bf16-mixed": dict(n_layer=4, d_model=256, n_head=4, seq_len=256, batch_size=16),
    "fp16-mixed": dict(n_layer=2, d_model=128, n_head=4, seq_len=128, batch_size=8),
}
DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
CLIP = 1.0


class RawLoop:
    """The hand-written torch.amp loop."""

    def __init__(self, task: mixprec.Task, mode: str) -> None:
        torch.manual_seed(0)
        self.model = task.build_model()
        self.opt = task.build_optimizer(self.model)
        self.dtype = DTYPES[mode]
        self.scaler = torch.amp.GradScaler("cpu", enabled=self.dtype == torch.float16)
        self.task = task

    def step(self, batch) -> None:
        with torch.autocast("cpu", dtype=self.dtype):
            loss = self.task.loss(self.model, batch)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)


class EngineLoop:
    """The same loop through mixprec's engine."""

    def __init__(self, task: mixprec.Task, mode: str) -> None:
        torch.manual_seed(0)
        self.model = task.build_model()
        self.opt = task.build_optimizer(self.model)
        self.engine = mixprec.Engine(mode, clip_grad_norm=CLIP)
        self.engine.setup(self.model, self.opt)
        self.task = task

    def step(self, batch) -> None:
        with self.engine.autocast():
            loss = self.task.loss(self.model, batch)
        self.engine.backward(loss)
        self.engine.step()


def bootstrap_median_ci(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return medians[int(0.025 * n)], medians[int(0.975 * n) - 1]


def measure(mode: str, rounds: int, warmup: int) -> dict:
    config = CONFIGS[mode]
    task = lm(**config)
    loops = {"raw": RawLoop(task, mode), "engine": EngineLoop(task, mode)}
    batches = task.train_batches(0)
    times: dict[str, list[float]] = {"raw": [], "engine": []}
    for r in range(warmup + rounds):
        batch = next(batches)
        order = ["raw", "engine"] if r % 2 == 0 else ["engine", "raw"]  # rotate who goes first
        for name in order:
            t0 = time.perf_counter()
            loops[name].step(batch)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    # Same math, same data: the two models must still agree (bitwise, on CPU).
    same = all(torch.equal(a, b) for a, b in zip(loops["raw"].model.parameters(), loops["engine"].model.parameters()))
    ratios = [e / r for e, r in zip(times["engine"], times["raw"])]
    lo, hi = bootstrap_median_ci(ratios)
    return {
        "mode": mode,
        "config": config,
        "rounds": rounds,
        "warmup": warmup,
        "raw_step_s_median": statistics.median(times["raw"]),
        "engine_step_s_median": statistics.median(times["engine"]),
        "ratio_median": statistics.median(ratios),
        "ratio_ci95": [lo, hi],
        "target": 1.02,
        "meets_target": statistics.median(ratios) <= 1.02,
        "parameters_bitwise_equal": same,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--modes", default="bf16-mixed,fp16-mixed")
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the fp16-on-CPU warning is the point of the smaller fp16 config
    results = [measure(mode, args.rounds, args.warmup) for mode in args.modes.split(",")]
    doc = {"schema": "mixprec.bench.overhead/1", "command": " ".join(["python", *sys.argv]),
           "results": results, "environment": environment()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    print(f"{'mode':<12} {'config':<34} {'raw ms':>8} {'engine ms':>10} {'ratio':>7} {'95% CI':>15} {'<=1.02':>7} {'equal':>6}")
    for r in results:
        c = r["config"]
        cfg = f"L{c['n_layer']} d{c['d_model']} T{c['seq_len']} B{c['batch_size']}"
        print(f"{r['mode']:<12} {cfg:<34} {r['raw_step_s_median'] * 1e3:>8.1f} {r['engine_step_s_median'] * 1e3:>10.1f} "
              f"{r['ratio_median']:>7.3f} {'[%.3f, %.3f]' % tuple(r['ratio_ci95']):>15} "
              f"{'yes' if r['meets_target'] else 'NO':>7} {'yes' if r['parameters_bitwise_equal'] else 'NO':>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
