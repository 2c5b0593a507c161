"""Speed-up of each precision over fp32 per recipe, against this hardware's ceiling.

The speed-ups are verify's own measurements (``mixprec verify --all --json
docs/results.json``: fp32 and the candidate trained step by step interleaved on the same
batches, median ratio): this script reads that document, it does not time anything. The
ceiling is what ``mixprec probe`` measures for the format's matmuls against fp32 here (a
whole training step also does non-matmul work, so it gains at most that). A precision
verify ran *emulated* (the hardware runs it slowly) has the emulation's speed, not the
format's: it is shown and marked, not compared with a ceiling.

    python benchmarks/speedup.py [--results docs/results.json] [--probe probe.json] [--json speedup.json]
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mixprec import probe as probe_mod

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FORMAT = {"bf16-mixed": "bf16", "fp16-mixed": "fp16", "fp8-mixed": "fp8_e4m3", "tf32": "tf32"}
TARGET_SPEEDUP = 1.6  # bf16-mixed on the lm recipe, CPU with AVX512_BF16 (DESIGN.md)
TARGET_OF_CEILING = 0.8


def ceilings(probe_doc: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for fmt, m in probe_doc.get("matmul", {}).items():
        out[fmt] = {"available": bool(m.get("available")), "tflops": m.get("tflops"),
                    "ratio_to_fp32": m.get("ratio_to_fp32"), "size": m.get("size"),
                    "extrapolated": m.get("extrapolated"), "reason": m.get("reason")}
    return out


def rows_from(results: dict[str, Any], ceiling: dict[str, Any], bf16_cpu: bool) -> list[dict[str, Any]]:
    rows = []
    for r in results.get("rows", []):
        for mode, c in (r.get("candidates") or {}).items():
            fmt = FORMAT.get(mode, "")
            if fmt == "fp8_e4m3" and c.get("fp8_linears") == 0:
                fmt = "bf16"  # torchao converted no layer: the run was bf16-mixed, so is its ceiling
            cap = (ceiling.get(fmt) or {}).get("ratio_to_fp32")
            speedup = c.get("speedup")
            row = {"recipe": r.get("recipe"), "domain": r.get("domain"), "precision": mode, "ceiling_format": fmt,
                   "executed_as": c.get("executed_as", mode), "emulated": bool(c.get("emulated")),
                   "speedup": speedup, "ceiling": None if c.get("emulated") else cap,
                   "fraction_of_ceiling": None if c.get("emulated") or not speedup or not cap else speedup / cap}
            if r.get("recipe") == "lm" and mode == "bf16-mixed" and bf16_cpu and not c.get("emulated"):
                row["targets"] = {"speedup >= 1.6": None if speedup is None else speedup >= TARGET_SPEEDUP,
                                  "fraction of ceiling >= 0.8": None if row["fraction_of_ceiling"] is None
                                  else row["fraction_of_ceiling"] >= TARGET_OF_CEILING}
            rows.append(row)
    return rows


def markdown(doc: dict[str, Any]) -> str:
    out = []
    probe = doc["probe"]
    cells = []
    for fmt, m in doc["ceiling"].items():
        if m["available"]:
            cells.append([fmt, f"{m['tflops']:.3g}", f"{m['ratio_to_fp32']:.2f}" if m["ratio_to_fp32"] else "n/a",
                          f"{m['size']}" + (" (smaller: slow here)" if m.get("extrapolated") else "")])
        else:
            cells.append([fmt, "n/a", "n/a", (m.get("reason") or "")[:70]])
    out.append(f"Matmul ceiling (`mixprec probe`, measured {probe.get('measured_at')}"
               + (", cached" if probe.get("cached") else "") + "):\n")
    out.append(_common.table(["format", "TFLOP/s", "x fp32", "size n (n x n x n)"], cells, right=(1, 2)))
    out.append("")
    src = doc["results_source"]
    if src.get("missing"):
        out.append(f"Per-recipe speed-ups: {src['missing']}\n")
        return "\n".join(out)
    out.append(f"Per-recipe speed-ups from `{src['path']}` (verify --all, size {src.get('size')}, file written "
               f"{src.get('modified')}, probe of that run measured {src.get('probe_measured_at')}, "
               f"on {src.get('device_name')}):\n")
    rows = []
    for r in doc["rows"]:
        target = "; ".join(f"{k}: {'met' if v else 'MISSED' if v is not None else 'n/a'}"
                           for k, v in (r.get("targets") or {}).items())
        rows.append([r["recipe"], r["precision"] + (" (emulated)" if r["emulated"] else ""),
                     "n/a" if r["speedup"] is None else f"{r['speedup']:.2f}x",
                     "-" if r["ceiling"] is None else f"{r['ceiling']:.2f}x"
                     + (f" ({r['ceiling_format']}: no layer ran fp8)" if r.get("ceiling_format") == "bf16"
                        and r["precision"] == "fp8-mixed" else ""),
                     "-" if r["fraction_of_ceiling"] is None else f"{r['fraction_of_ceiling']:.0%}", target])
    out.append(_common.table(["recipe", "precision", "speed-up over fp32", "matmul ceiling", "of ceiling", "target"],
                             rows, right=(2, 3, 4)))
    return "\n".join(out) + "\n"


def main() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--results", default=str(REPO / "docs" / "results.json"))
    p.add_argument("--probe", default=None, metavar="FILE", help="a `mixprec probe --json` document (default: probe)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.probe:
        probe_doc = json.loads(Path(args.probe).read_text())
    else:
        probe_doc = probe_mod.probe(args.device, quick=args.smoke)
    ceiling = ceilings(probe_doc)
    flags = probe_doc.get("environment", {}).get("cpu_flags") or []
    bf16_cpu = probe_doc.get("environment", {}).get("device") == "cpu" and \
        ("avx512_bf16" in flags or "amx_bf16" in flags)
    path = Path(args.results)
    source: dict[str, Any] = {"path": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)}
    rows: list[dict[str, Any]] = []
    results = None
    if path.exists():
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            source["missing"] = f"{path} is not JSON ({exc}); re-run `mixprec verify --all --json {path}`"
    else:
        source["missing"] = f"{path} not found: this table needs `mixprec verify --all --json docs/results.json`"
    if results is not None:
        if results.get("schema") != "mixprec.verify-all/1":
            source["missing"] = f"{path} is a {results.get('schema')!r} document, not mixprec.verify-all/1"
        else:
            env = results.get("environment") or {}
            source.update(size=results.get("size"), command=results.get("command"),
                          probe_measured_at=(results.get("probe") or {}).get("measured_at"),
                          device_name=env.get("device_name"), torch=env.get("torch"),
                          modified=datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
                          .isoformat(timespec="seconds"))
            rows = rows_from(results, ceiling, bf16_cpu)
    doc = _common.document("mixprec.bench.speedup/1", args, args.device, results_source=source,
                           probe={k: probe_doc.get(k) for k in ("measured_at", "cached", "fingerprint", "why")},
                           ceiling=ceiling, rows=rows)
    _common.write(doc, args.json)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
