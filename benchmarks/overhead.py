"""Engine overhead versus the hand-written torch.amp loop (DESIGN.md, Performance: <= 1.02).

The same lm-recipe model and the same batches are trained twice in this process: once by
the loop a PyTorch user writes by hand (autocast + GradScaler + unscale_ + clip_grad_norm_
+ step + update), once by mixprec's engine. Each round times one optimizer step of each,
back to back, alternating which goes first; the claim is the median of the per-round
ratios engine/raw, with its 95% confidence interval (benchmarks/_stats.py). The two models
must end bitwise equal (invariant 2): the same arithmetic was done.

    python benchmarks/overhead.py [--quick | --smoke] [--rounds 60] [--json overhead.json]

Sizes: each precision uses an lm config whose step takes >= 100 ms here. fp16 matmuls on
CPUs without AVX512-FP16 are tens of times slower than fp32, so fp16 runs a smaller model
(and, with --quick, fewer rounds: 30 bf16, 12 fp16). benchmarks/peers.py measures the same
ratio at the recipe's default size with 60 rounds, next to Accelerate and Fabric.
"""

from __future__ import annotations

import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

import mixprec
from mixprec.recipes.lm import lm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import _stats  # noqa: E402

CONFIGS = {
    "bf16-mixed": dict(n_layer=4, d_model=256, n_head=4, seq_len=256, batch_size=16),
    "fp16-mixed": dict(n_layer=2, d_model=128, n_head=4, seq_len=128, batch_size=8),
}
SMOKE = dict(n_layer=1, d_model=32, n_head=2, seq_len=32, batch_size=4)
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


def measure(mode: str, config: dict, rounds: int, warmup: int) -> dict[str, Any]:
    task = lm(**config)
    loops = {"raw": RawLoop(task, mode), "engine": EngineLoop(task, mode)}
    times = _stats.interleave({n: loop.step for n, loop in loops.items()}, task.train_batches(0), rounds, warmup)
    same = all(torch.equal(a, b) for a, b in zip(loops["raw"].model.parameters(), loops["engine"].model.parameters()))
    ratio = _stats.ratio(times["engine"], times["raw"])
    return {"mode": mode, "config": config, "rounds": rounds, "warmup": warmup,
            "raw_step_s_median": statistics.median(times["raw"]),
            "engine_step_s_median": statistics.median(times["engine"]),
            "ratio": ratio, "target": 1.02, "meets_target": ratio["median"] <= 1.02,
            "parameters_bitwise_equal": same}


def markdown(doc: dict[str, Any]) -> str:
    rows = []
    for r in doc["results"]:
        c = r["config"]
        rows.append([r["mode"], f"{c['n_layer']} layers, d {c['d_model']}, T {c['seq_len']}, batch {c['batch_size']}",
                     r["rounds"], _common.fmt_ms(r["raw_step_s_median"]), _common.fmt_ms(r["engine_step_s_median"]),
                     _common.fmt_ci(r["ratio"]), "met" if r["meets_target"] else "MISSED",
                     "yes" if r["parameters_bitwise_equal"] else "NO"])
    return _common.table(["mode", "lm config", "rounds", "raw step", "engine step", "engine/raw [95% CI]",
                          "target <= 1.02", "params equal"], rows, right=(2, 3, 4)) + "\n"


def main() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--modes", default="bf16-mixed,fp16-mixed")
    args = p.parse_args()
    warnings.simplefilter("ignore")  # the fp16-on-CPU warning is the point of the smaller fp16 config
    size = _common.size(args)
    results = []
    for mode in args.modes.split(","):
        config = SMOKE if size == "smoke" else CONFIGS[mode]
        slow = mode == "fp16-mixed"
        # --quick: fewer rounds; benchmarks/peers.py makes the 60-round claim at the recipe's size.
        n = _common.rounds(args, full=60, quick=12 if slow else 30, smoke=2)
        results.append(measure(mode, config, n, 1 if size == "smoke" else args.warmup))
    doc = _common.document("mixprec.bench.overhead/2", args, results=results)
    _common.write(doc, args.json)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
