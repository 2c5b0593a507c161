"""What autotune itself costs: seconds, and as a fraction of the training run it tuned.

``mixprec.autotune.autotune`` runs on the lm recipe (defaults) with its default settings
(sensitivity, timed steps interleaved with fp32, a confirmation run against fp32), on the
probe measured beforehand (the probe is cached per machine; its own time is reported
separately). Then the run it tuned: ``mixprec.runs.train.train`` of the recipe for its
``verify_steps`` steps under the chosen policy, timed end to end. Reported: autotune's
wall time, the training run's, their ratio, and the break-even point: how many training
steps the chosen policy must run before its per-step saving (autotune's own fp32 and
candidate step times) pays autotune back.

    python benchmarks/autotune_cost.py [--quick | --smoke] [--json autotune_cost.json]
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

from mixprec import probe as probe_mod
from mixprec.autotune import autotune
from mixprec.policy import Policy
from mixprec.recipes import RECIPES
from mixprec.runs.train import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def markdown(doc: dict[str, Any]) -> str:
    be = doc["break_even_steps"]
    rows = [[doc["recipe"], doc["chosen"], f"{doc['autotune_s']:.1f} s", f"{doc['probe_s']:.1f} s"
             + (" (cached)" if doc["probe_cached"] else ""),
             f"{doc['train_s']:.1f} s ({doc['train_steps']} steps)", f"{doc['fraction_of_training']:.2f}",
             "never (no faster policy chosen)" if be is None else f"{be:,.0f} steps"]]
    return _common.table(["recipe", "chosen", "autotune", "probe", "training run it tuned",
                          "autotune / training", "break-even"], rows, right=(2, 3, 4, 5)) + "\n"


def main() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    smoke = _common.size(args) == "smoke"
    info = RECIPES["lm"]
    task = info.factory(**(info.tiny if smoke else {}))
    steps = 5 if smoke else info.verify_steps
    settings = dict(timing_steps=3, confirm_steps=3, sensitivity_batches=1) if smoke else {}

    t0 = time.perf_counter()
    probe_doc = probe_mod.probe(args.device, quick=smoke)
    probe_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    tuned = autotune(task, device=args.device, probe_doc=probe_doc, **settings)
    autotune_s = time.perf_counter() - t0

    policy = Policy.from_dict(tuned["policy"])
    t0 = time.perf_counter()
    train(task, policy, steps=steps, device=args.device)
    train_s = time.perf_counter() - t0

    chosen = next((c for c in tuned["candidates"] if c["mode"] == tuned["chosen"]), None)
    saving = None if chosen is None else chosen["fp32_step_time_s"] - chosen["step_time_s"]
    doc = _common.document(
        "mixprec.bench.autotune_cost/1", args, args.device, recipe="lm", config="tiny" if smoke else "defaults",
        settings=settings or "defaults", chosen=tuned["chosen"], why=tuned["why"], probe_s=probe_s,
        probe_cached=bool(probe_doc.get("cached")), autotune_s=autotune_s, train_s=train_s, train_steps=steps,
        fraction_of_training=autotune_s / train_s,
        step_saving_s=saving, break_even_steps=autotune_s / saving if saving and saving > 0 else None,
        candidates=[{k: c.get(k) for k in ("mode", "speedup", "accepted", "why")} for c in tuned["candidates"]])
    _common.write(doc, args.json)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
