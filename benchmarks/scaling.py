"""How the lm recipe's step time grows as the model widens and the sequence lengthens.

From the recipe's defaults (2 layers, d_model 256, 4 heads, seq_len 128, batch 16), width
doubles twice (d_model 256 -> 512 -> 1024) and, separately, the sequence length doubles
twice (128 -> 256 -> 512). At each point the precisions are timed interleaved (one step
of each per round, order rotated, warm-up first; benchmarks/_stats.py): median step time,
step time relative to the first point, achieved matmul throughput (FLOPs of one step,
counted by torch.utils.flop_counter, over the median step time) and the speed-up of each
precision over fp32 (median per-round ratio, 95% CI).

Precisions: fp32 and bf16-mixed, and fp16-mixed where this hardware runs fp16 fast (a CPU
with AVX512-FP16, or a GPU); on other CPUs native fp16 is tens of times slower (see
benchmarks/emulation.py) and is left out here.

    python benchmarks/scaling.py [--quick | --smoke] [--rounds 60] [--json scaling.json]

(--quick: 8 rounds after one warm-up round per point, but 60 rounds after 3 warm-up rounds
at the base point: the recipe's defaults, where the bf16 speed-up is a claim.)
"""

from __future__ import annotations

import inspect
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import mixprec
from mixprec.environment import cpu_has_fast_fp16
from mixprec.recipes.lm import lm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import _stats  # noqa: E402

# The recipe's own defaults, read from its signature so the two cannot drift apart.
BASE = {k: inspect.signature(lm).parameters[k].default
        for k in ("n_layer", "n_head", "d_model", "seq_len", "batch_size")}
SMOKE_BASE = dict(n_layer=1, n_head=2, d_model=16, seq_len=16, batch_size=4)


def points(base: dict[str, int]) -> list[tuple[str, dict[str, int]]]:
    out = [("base", dict(base))]
    for axis in ("d_model", "seq_len"):
        for k in (2, 4):
            out.append((f"{axis} x{k}", {**base, axis: base[axis] * k}))
    return out


def step_flops(task: mixprec.Task) -> int:
    """Matmul FLOPs of one training step (forward + backward), fp32."""
    torch.manual_seed(0)
    model = task.build_model()
    batch = next(task.train_batches(0))
    with FlopCounterMode(display=False) as counter:
        task.loss(model, batch).backward()
    return int(counter.get_total_flops())


def measure(config: dict[str, int], precisions: list[str], rounds: int, warmup: int) -> dict[str, Any]:
    task = lm(**config)
    steps = {}
    for precision in precisions:
        torch.manual_seed(0)
        model = task.build_model()
        engine = mixprec.Engine(precision)
        engine.setup(model, task.build_optimizer(model))

        def step(batch, model=model, engine=engine) -> None:
            with engine.autocast():
                loss = task.loss(model, batch)
            engine.backward(loss)
            engine.step()

        steps[precision] = step
    times = _stats.interleave(steps, task.train_batches(0), rounds, warmup)
    flops = step_flops(task)
    out = {"config": config, "flops_per_step": flops, "rounds": rounds, "precisions": {}}
    for precision in precisions:
        median = statistics.median(times[precision])
        out["precisions"][precision] = {
            "step_s": _stats.summary(times[precision]), "tflops": flops / median / 1e12,
            "speedup_over_fp32": None if precision == "fp32" else _stats.ratio(times["fp32"], times[precision])}
    return out


def markdown(doc: dict[str, Any]) -> str:
    precisions = doc["precisions"]
    rows = []
    base = doc["points"][0]["precisions"]
    for pt in doc["points"]:
        c = pt["config"]
        cells = [pt["name"], c["d_model"], c["seq_len"], f"{pt['flops_per_step'] / 1e9:.2f}"]
        for precision in precisions:
            r = pt["precisions"][precision]
            grow = r["step_s"]["median"] / base[precision]["step_s"]["median"]
            cells.append(f"{_common.fmt_ms(r['step_s']['median'])} (x{grow:.2f}), {r['tflops'] * 1e3:.3g} GFLOP/s")
        for precision in precisions[1:]:
            cells.append(_common.fmt_ci(pt["precisions"][precision]["speedup_over_fp32"], 2))
        rows.append(cells)
    head = ["point", "d_model", "seq_len", "GFLOP/step", *[f"{p} step (x base), throughput" for p in precisions],
            *[f"{p} speed-up over fp32 [95% CI]" for p in precisions[1:]]]
    note = "" if not doc.get("left_out") else f"\nLeft out: {doc['left_out']}\n"
    c = doc["points"][0]["config"]
    counts = ", ".join(f"{pt['name']} {pt['rounds']}" for pt in doc["points"])
    return (f"lm, {c['n_layer']} layers, {c['n_head']} heads, batch {c['batch_size']}; rounds: {counts}\n\n"
            + _common.table(head, rows, right=(1, 2, 3)) + "\n" + note)


def main() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    size = _common.size(args)
    n = _common.rounds(args, full=60, quick=8, smoke=2)
    warmup = 1 if size == "smoke" else 3
    precisions = ["fp32", "bf16-mixed"]
    left_out = None
    if cpu_has_fast_fp16():
        precisions.append("fp16-mixed")
    else:
        left_out = "fp16-mixed: this CPU has no AVX512-FP16/AMX-FP16, native fp16 is tens of times slower"
    results = []
    for name, config in points(SMOKE_BASE if size == "smoke" else BASE):
        # The base point is the recipe's default size, where the bf16 speed-up is a claim
        # (DESIGN.md): it gets at least 60 rounds; it is also the cheapest point.
        rounds = n if size == "smoke" or name != "base" else max(n, 60)
        # --quick: the other points show how cost grows (context, not a claim); one warm-up
        # round each keeps run_all within its 10 minutes (the d_model x4 step takes 2 s).
        point_warmup = 1 if size == "quick" and name != "base" else warmup
        print(f"{name}: {config}, {rounds} rounds ...", file=sys.stderr, flush=True)
        results.append({"name": name, **measure(config, precisions, rounds, point_warmup)})
    doc = _common.document("mixprec.bench.scaling/1", args, precisions=precisions, left_out=left_out, points=results)
    _common.write(doc, args.json)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
