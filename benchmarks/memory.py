"""Peak memory per precision per recipe, and what each byte per parameter is for.

1. Peak memory: every recipe in ``mixprec.recipes.RECIPES`` (whatever this checkout has),
   built with its RecipeInfo defaults, trains 2 steps through mixprec's engine under each
   precision, each (recipe, precision) in a fresh process (benchmarks/_common.py): on CPU
   the peak resident set of that process (VmHWM) and its rise over the resident set before
   the model was built (the libraries and the recipe's data are already loaded then); on
   CUDA ``torch.cuda.max_memory_allocated``. Two steps, so the second forward runs with the
   optimizer state already allocated.
2. Bytes per parameter: ``mixprec.memory.measure_memory`` on the lm recipe counts the
   tensors themselves, per precision: weights, fp32 master weights (the true modes),
   gradients and optimizer state (AdamW: two fp32 moments), and the activations saved for
   backward in one forward pass.

    python benchmarks/memory.py [--quick | --smoke] [--recipes lm,bert] [--json memory.json]

(--smoke: the lm recipe only, tiny.)

Native fp16 on a CPU without AVX512-FP16 is slow; its 2 steps can take a while for the
larger recipes (each run stops after --timeout seconds and says so).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch

import mixprec
from mixprec.environment import cpu_has_fast_fp16
from mixprec.memory import measure_memory
from mixprec.recipes import RECIPES
from mixprec.task import build_optimizers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

PEAK_PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "fp8-mixed")
BREAKDOWN_PRECISIONS = ("fp32", "bf16-mixed", "bf16-true", "fp16-mixed", "fp16-true", "fp8-mixed")
PRELOAD = ("torch", "mixprec", "mixprec.engine", "mixprec.recipes", "transformers", "torchao.float8")


def peak_run(recipe: str, precision: str, tiny: bool, device: str) -> dict[str, Any]:
    """In a fresh process: build the recipe, reset the peak, train 2 steps, read the peak."""
    warnings.simplefilter("ignore")
    info = RECIPES[recipe]
    task = info.factory(**(info.tiny if tiny else {}))
    batches = task.train_batches(0)
    first = [next(batches), next(batches)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = _common.rss_now()
    reset = _common.reset_peak_rss()
    torch.manual_seed(0)
    model = task.build_model().to(device)
    engine = mixprec.Engine(precision, device=device)
    engine.setup(model, *build_optimizers(task, model))
    for batch in first:
        with engine.autocast():
            loss = task.loss(model, batch)
        engine.backward(loss)
        engine.step()
    peak = _common.peak_rss()
    out = {"peak_rss_bytes": peak, "rss_start_bytes": start, "peak_reset": reset,
           "rss_rise_bytes": None if start is None else peak - start,
           "parameters": sum(p.numel() for p in model.parameters())}
    if device == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def breakdown(tiny: bool, device: str) -> list[dict[str, Any]]:
    info = RECIPES["lm"]
    task = info.factory(**(info.tiny if tiny else {}))
    rows = []
    for precision in BREAKDOWN_PRECISIONS:
        try:
            m = measure_memory(task, precision, device=device)
        except Exception as exc:  # noqa: BLE001 - a precision this machine cannot run: say why
            rows.append({"precision": precision, "error": f"{type(exc).__name__}: {exc}"})
            continue
        n = m["parameters"]
        rows.append({"precision": precision, "parameters": n,
                     **{k: m[f"{k}_bytes"] / n for k in ("weights", "master_weights", "grads", "optimizer_state",
                                                         "state")},
                     "activation_bytes": m["activation_bytes"], "step": m["step"]})
    return rows


def markdown(doc: dict[str, Any]) -> str:
    cuda = doc["environment"]["device"].startswith("cuda")
    what = "torch.cuda.max_memory_allocated" if cuda else "peak RSS (rise over the process before the model)"
    out = [f"Peak memory of 2 training steps, fresh process per run: {what}.\n"]
    rows = []
    for recipe, per in doc["peak"].items():
        cells = [recipe]
        for precision in doc["peak_precisions"]:
            r = per.get(precision) or {}
            if "error" in r:
                cells.append(f"n/a ({r['error'][:90]})")
            elif cuda:
                cells.append(_common.fmt_bytes(r.get("cuda_max_allocated_bytes")))
            else:
                cells.append(f"{_common.fmt_bytes(r['peak_rss_bytes'])} ({_common.fmt_bytes(r['rss_rise_bytes'])})")
        rows.append(cells)
    out.append(_common.table(["recipe", *doc["peak_precisions"]], rows))
    out.append("")
    out.append(f"Bytes per parameter, lm recipe ({doc['breakdown_config']}, "
               f"{doc['breakdown'][0].get('parameters', 0):,} parameters), counted from the tensors:\n")
    rows = []
    for r in doc["breakdown"]:
        if "error" in r:
            rows.append([r["precision"], "n/a", "", "", "", "", r["error"][:80]])
            continue
        rows.append([r["precision"], f"{r['weights']:.1f}", f"{r['master_weights']:.1f}", f"{r['grads']:.1f}",
                     f"{r['optimizer_state']:.1f}", f"{r['state']:.1f}", _common.fmt_bytes(r["activation_bytes"])])
    out.append(_common.table(["precision", "weights", "master weights", "gradients", "optimizer state",
                              "total B/param", "activations (one step)"], rows, right=(1, 2, 3, 4, 5, 6)))
    return "\n".join(out) + "\n"


def main() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--recipes", default=None, help="comma-separated (default: every recipe here)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run (default 120, quick 60)")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    size = _common.size(args)
    tiny = size == "smoke"
    recipes = args.recipes.split(",") if args.recipes else ["lm"] if tiny else list(RECIPES)
    timeout = args.timeout or {"full": 120.0, "quick": 60.0, "smoke": 60.0}[size]
    peak: dict[str, dict[str, Any]] = {}
    # --quick on a CPU where native fp16 is slow: fp16-mixed holds the same bytes as bf16-mixed
    # (2-byte activations, fp32 weights, gradients and moments) and its steps take seconds
    # each here, so it is not run again; the table says so.
    skip_fp16 = size == "quick" and args.device == "cpu" and not cpu_has_fast_fp16()
    for recipe in recipes:
        peak[recipe] = {}
        for precision in PEAK_PRECISIONS:
            if skip_fp16 and precision == "fp16-mixed":
                peak[recipe][precision] = {"error": "not run with --quick (slow fp16 here; same bytes as bf16-mixed)"}
                continue
            print(f"{recipe} {precision} ...", file=sys.stderr, flush=True)
            peak[recipe][precision] = _common.fresh_process(peak_run, recipe, precision, tiny, args.device,
                                                            timeout=timeout, preload=PRELOAD)
    doc = _common.document("mixprec.bench.memory/1", args, args.device, steps=2, peak_precisions=list(PEAK_PRECISIONS),
                           peak=peak, breakdown_config="tiny" if tiny else "defaults",
                           breakdown=breakdown(tiny, args.device))
    _common.write(doc, args.json)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
