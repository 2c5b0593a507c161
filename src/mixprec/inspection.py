"""`mixprec inspect RUN_DIR`: what a run's monitor saw and what its controller did."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixprec.environment import environment
from mixprec.errors import UsageError
from mixprec.monitor import load_records, render_summary, summarize
from mixprec.runs.numerics import MONITOR_FILE
from mixprec.runs.train import TRAIN_FILE

INSPECT_SCHEMA = "mixprec.inspect/1"


def inspect_run(run_dir: str | Path, top: int = 5) -> dict[str, Any]:
    run_dir = Path(run_dir)
    stream, result_file = run_dir / MONITOR_FILE, run_dir / TRAIN_FILE
    if not run_dir.is_dir() or not (stream.exists() or result_file.exists()):
        raise UsageError(f"{str(run_dir)!r} is not a run dir: expected {MONITOR_FILE} and {TRAIN_FILE} "
                         "(written by `mixprec train --run-dir DIR`)")
    train: dict[str, Any] = {}
    if result_file.exists():
        try:
            train = json.loads(result_file.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"{str(result_file)!r} is not valid JSON: {exc}") from None
    records = load_records(stream) if stream.exists() else []
    return {
        "schema": INSPECT_SCHEMA,
        "run_dir": str(run_dir),
        "task": train.get("task"),
        "status": train.get("status"),
        "diagnosis": train.get("diagnosis"),
        "policy": train.get("policy"),
        "controller": train.get("controller"),
        "samples": len(records),
        "summary": summarize(records, top=top) if records else None,
        "localizations": train.get("localizations", []),
        "decisions": train.get("decisions", []),
        "skipped_steps": train.get("skipped_steps", []),
        "environment": environment(),
    }


def render_inspection(report: dict[str, Any]) -> str:
    policy = report.get("policy") or {}
    lines = [f"run {report['run_dir']}: task {report.get('task')}, {policy.get('mode', '?')}, "
             f"controller {report.get('controller') or 'static'}, status {report.get('status')}, "
             f"{report['samples']} monitor samples"]
    if report.get("diagnosis"):
        lines.append(f"  diagnosis: {report['diagnosis']}")
    if report.get("summary"):
        lines += ["", render_summary(report["summary"])]
    locs = report.get("localizations") or []
    if locs:
        lines += ["", f"non-finite steps ({len(locs)}):"]
        lines += [f"  step {loc['step']} ({loc['reason']}): {loc['message']}" for loc in locs[:20]]
        if len(locs) > 20:
            lines.append(f"  ... and {len(locs) - 20} more (see --json)")
    decisions = report.get("decisions") or []
    lines += ["", f"controller decisions ({len(decisions)}):" if decisions else "controller decisions: none"]
    for d in decisions[:50]:
        lines.append(f"  step {d['step']:>6}  {d['module']:<32} {d['from_format']:>5} -> {d['to_format']:<5} {d['reason']}")
    if len(decisions) > 50:
        lines.append(f"  ... and {len(decisions) - 50} more (see --json)")
    return "\n".join(lines)
