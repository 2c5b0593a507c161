"""Emulated fp16/fp8 versus fp32 and native fp16 on this machine (DESIGN.md, Performance:
emulated <= 3x the fp32 step).

The lm recipe (default config) trains one step per round under each mode on the same
batch, order rotated: fp32, emulate:fp16-mixed, emulate:fp8-mixed, and native fp16-mixed.
Native fp16 is tens of times slower on CPUs without AVX512-FP16, so it runs only in the
first --native-rounds measured rounds (and one warm-up round). Ratios are per round to the
fp32 step of the same round (and, for the emulated modes, to the native fp16 step of the
same round); median and 95% CI (benchmarks/_stats.py).

    python benchmarks/emulation.py [--quick | --smoke] [--rounds 60] [--native-rounds 8] [--json emulation.json]
"""

from __future__ import annotations

import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

import mixprec
from mixprec.environment import cpu_has_fast_fp16
from mixprec.recipes import RECIPES
from mixprec.recipes.lm import lm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import _stats  # noqa: E402

MODES = ["fp32", "emulate:fp16-mixed", "emulate:fp8-mixed", "fp16-mixed"]
NATIVE = "fp16-mixed"


def markdown(doc: dict[str, Any]) -> str:
    head = f"lm ({doc['config_name']}), fp32 step {_common.fmt_ms(doc['fp32_step_s_median'])}\n\n"
    rows = []
    for r in doc["results"]:
        target = "" if r["target"] is None else "<= 3: " + ("met" if r["meets_target"] else "MISSED")
        rows.append([r["mode"], r["rounds"], _common.fmt_ms(r["step_s_median"]), _common.fmt_ci(r["ratio_to_fp32"], 2),
                     _common.fmt_ci(r.get("ratio_to_native_fp16"), 3), target])
    return head + _common.table(["mode", "rounds", "step", "x fp32 [95% CI]", "x native fp16 [95% CI]", "target"],
                                rows, right=(1, 2)) + "\n"


def main() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--native-rounds", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    warnings.simplefilter("ignore")  # the fp16-on-CPU warning is what this benchmark measures
    size = _common.size(args)
    n = _common.rounds(args)
    slow_native = not cpu_has_fast_fp16()
    native = args.native_rounds if args.native_rounds is not None else \
        (n if not slow_native else {"full": 8, "quick": 4, "smoke": 1}[size])
    warmup = 1 if size == "smoke" else args.warmup
    kwargs = dict(RECIPES["lm"].tiny) if size == "smoke" else {}
    task = lm(**kwargs)

    steps = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = task.build_model()
        engine = mixprec.Engine(mode)
        engine.setup(model, task.build_optimizer(model))

        def step(batch, model=model, engine=engine) -> None:
            with engine.autocast():
                loss = task.loss(model, batch)
            engine.backward(loss)
            engine.step()

        steps[mode] = step

    # Native fp16 runs in the first warm-up round and the first `native` measured rounds.
    def only(r: int) -> list[str]:
        return MODES if (r == 0 or warmup <= r < warmup + native) else MODES[:3]

    times = _stats.interleave(steps, task.train_batches(0), n, warmup, only=only)
    # The rounds that ran native fp16 are the first len(times[NATIVE]) measured rounds.
    k = len(times[NATIVE])
    rows = []
    for mode in MODES[1:]:
        base = times["fp32"][:len(times[mode])]
        row = {"mode": mode, "rounds": len(times[mode]), "step_s_median": statistics.median(times[mode]),
               "ratio_to_fp32": _stats.ratio(times[mode], base),
               "target": 3.0 if mode.startswith("emulate:") else None}
        if mode != NATIVE:
            row["ratio_to_native_fp16"] = _stats.ratio(times[mode][:k], times[NATIVE])
        row["meets_target"] = None if row["target"] is None else row["ratio_to_fp32"]["median"] <= row["target"]
        rows.append(row)
    doc = _common.document("mixprec.bench.emulation/2", args, config_name="tiny" if size == "smoke" else "defaults",
                           config=kwargs, native_fp16_is_slow_here=slow_native,
                           fp32_step_s_median=statistics.median(times["fp32"]), results=rows)
    _common.write(doc, args.json)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
