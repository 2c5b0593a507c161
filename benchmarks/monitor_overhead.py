"""Monitor overhead on the lm recipe (DESIGN.md, Performance: <= 1.03 at the default interval).

Three copies of the same model train on the same batches through the train run's own
code path (engine + RunNumerics: hooks, per-step RNG snapshot for replay, sampling):

    plain     the engine, no monitor
    unarmed   monitor attached, never sampled (what 49 of 50 steps cost at the default)
    armed     monitor sampling every step (collect + JSON-able record each step)

Each round times one step of each, rotating the order. Per-round ratios to `plain`, median
and 95% CI (benchmarks/_stats.py). The default interval's ratio is derived from the two
measured ones, r_default = r_unarmed + (r_armed - r_unarmed) / every, with a bootstrap CI
over the same resampled rounds (an every-50 run cannot be measured step-paired in 60
rounds: the median would never see its sampled steps).

    python benchmarks/monitor_overhead.py [--quick | --smoke] [--rounds 60] [--json monitor_overhead.json]

--quick measures the lm recipe's default size (2 layers, d 256, T 128); the full size is
4 layers, d 256, T 256. The monitor's per-module cost is a larger share of a smaller step,
so the quick size is the harder case for the target.
"""

from __future__ import annotations

import inspect
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

import mixprec
from mixprec.monitor import DEFAULT_EVERY
from mixprec.recipes.lm import lm
from mixprec.runs.numerics import RunNumerics

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import _stats  # noqa: E402

CONFIGS = {"full": dict(n_layer=4, d_model=256, n_head=4, seq_len=256, batch_size=16),
           # the recipe's defaults, read from its signature so the two cannot drift apart
           "quick": {k: inspect.signature(lm).parameters[k].default
                     for k in ("n_layer", "d_model", "n_head", "seq_len", "batch_size")},
           "smoke": dict(n_layer=1, d_model=32, n_head=2, seq_len=32, batch_size=4)}
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


def markdown(doc: dict[str, Any]) -> str:
    c = doc["config"]
    head = (f"lm {c['n_layer']} layers, d {c['d_model']}, T {c['seq_len']}, batch {c['batch_size']}, {doc['mode']}, "
            f"plain step {_common.fmt_ms(doc['plain_step_s_median'])}, {doc['rounds']} rounds\n\n")
    rows = []
    for r in doc["results"]:
        target = "" if r["target"] is None else f"<= {r['target']:.2f}: " + ("met" if r["meets_target"] else "MISSED")
        rows.append([r["variant"], _common.fmt_ci(r["ratio"]), target])
    return head + _common.table(["variant", "x plain [95% CI]", "target"], rows) + "\n"


def main() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    size = _common.size(args)
    config = CONFIGS[size]
    n = _common.rounds(args)
    warmup = 1 if size == "smoke" else args.warmup

    task = lm(**config)
    # `unarmed` samples only at a step it never reaches; `armed` every step.
    loops = {"plain": Loop(task, None), "unarmed": Loop(task, 10**9), "armed": Loop(task, 1)}
    times = _stats.interleave({k: loop.step for k, loop in loops.items()}, task.train_batches(0), n, warmup)

    ratios = {k: [t / b for t, b in zip(times[k], times["plain"])] for k in ("unarmed", "armed")}

    def default(idx: list[int]) -> float:
        u = statistics.median(ratios["unarmed"][i] for i in idx)
        a = statistics.median(ratios["armed"][i] for i in idx)
        return u + (a - u) / DEFAULT_EVERY

    med = {k: statistics.median(v) for k, v in ratios.items()}
    derived = med["unarmed"] + (med["armed"] - med["unarmed"]) / DEFAULT_EVERY
    lo, hi = _stats.bootstrap(default, n)
    rows = [("unarmed (hooks, no sample)", _stats.summary(ratios["unarmed"]), None),
            ("armed (every step)", _stats.summary(ratios["armed"]), None),
            (f"default (every {DEFAULT_EVERY}), derived",
             {"median": derived, "ci95": [lo, hi], "ci_level": 0.95, "rounds": n, "ci_method": "bootstrap"}, 1.03)]
    doc = _common.document(
        "mixprec.bench.monitor_overhead/2", args, mode=MODE, config=config, rounds=n, warmup=warmup,
        default_every=DEFAULT_EVERY, plain_step_s_median=statistics.median(times["plain"]),
        results=[{"variant": v, "ratio": s, "target": t, "meets_target": None if t is None else s["median"] <= t}
                 for v, s, t in rows])
    _common.write(doc, args.json)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
