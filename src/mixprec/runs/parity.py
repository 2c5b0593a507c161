"""The parity table: every recipe verified against fp32, one row per recipe and precision.

In the spirit of Micikevicius et al., *Mixed Precision Training* (ICLR 2018), Table 1:
fp32 versus mixed-precision results per model, across domains, regenerated on the user's
machine. For each recipe, :func:`verify_all` trains the fp32 reference and the fp32 noise
floor (seed + 1) once, then each candidate precision from the same initial weights and data
(:func:`mixprec.runs.verify.verify_many`), and keeps the recipe's own metric
(``RecipeInfo.metric_key``), the verdict, the interleaved speed-up and the memory ratio.

A candidate this hardware runs slowly is verified emulated and says so: when the probe
measures its format's matmuls below ``probe.SLOW_RATIO`` x fp32 (or cannot run them), the
row's ``executed_as`` is ``emulate:<mode>`` (fp16/fp8 numerics rounded in software, see
:mod:`mixprec.emulation`) and ``emulated`` is true; its speed-up is that of the emulation,
not a claim about the format. ``emulate="never"`` runs every candidate natively.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from mixprec import probe as probe_mod
from mixprec.environment import environment
from mixprec.errors import UsageError
from mixprec.policy import Policy, normalize_mode, parse_policy
from mixprec.recipes import RECIPES, get_recipe
from mixprec.runs.verify import verify_many

PARITY_SCHEMA = "mixprec.verify-all/1"
DEFAULT_PRECISIONS = ("bf16-mixed", "fp16-mixed")
PARITY_PRECISIONS = ("bf16-mixed", "fp16-mixed", "fp8-mixed")
# Interleaved timing rounds per candidate: enough at the defaults that the speed-up's 95% CI
# is a few percent wide (8 rounds gave bert 0.93x in one run and 1.27x in the next).
TIMING_ROUNDS = {"default": 30, "tiny": 4}
_PROBE_FORMAT = {"bf16-mixed": "bf16", "fp16-mixed": "fp16", "fp8-mixed": "fp8_e4m3"}
EMULATE_CHOICES = ("auto", "always", "never")


def parse_precisions(text: str | Sequence[str] | None) -> list[str]:
    items = DEFAULT_PRECISIONS if text is None else text.split(",") if isinstance(text, str) else text
    out = []
    for item in items:
        mode = normalize_mode(item.strip()) if isinstance(item, str) else item
        if mode not in PARITY_PRECISIONS:
            raise UsageError(f"parity precision {item!r} is not one verify --all compares; valid: "
                             f"{', '.join(PARITY_PRECISIONS)}")
        if mode not in out:
            out.append(mode)
    if not out:
        raise UsageError(f"no precisions given; valid: {', '.join(PARITY_PRECISIONS)}")
    return out


def parse_recipes(text: str | Sequence[str] | None) -> list[str]:
    names = list(RECIPES) if text is None else [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    for name in names:
        get_recipe(name)  # a UsageError listing the valid ones
    if not names:
        raise UsageError(f"no recipes given; valid: {', '.join(RECIPES)}")
    return list(dict.fromkeys(names))


def execution_plan(precisions: Sequence[str], probe_doc: dict[str, Any], emulate: str = "auto"
                   ) -> dict[str, dict[str, Any]]:
    """For each precision: the policy string that runs (``mode`` or ``emulate:mode``) and why."""
    if emulate not in EMULATE_CHOICES:
        raise UsageError(f"emulate must be one of {', '.join(EMULATE_CHOICES)}, got {emulate!r}")
    plan = {}
    for mode in precisions:
        entry = probe_doc["matmul"].get(_PROBE_FORMAT[mode], {})
        ratio = entry.get("ratio_to_fp32")
        slow = not entry.get("available") or (ratio or 0.0) < probe_mod.SLOW_RATIO
        emulated = emulate == "always" or (emulate == "auto" and slow)
        if not entry.get("available"):
            why = f"{_PROBE_FORMAT[mode]} cannot run here ({entry.get('reason')})"
        else:
            why = f"{_PROBE_FORMAT[mode]} matmuls run at {ratio:.3g}x fp32 here (probe)"
        plan[mode] = {"executed_as": f"emulate:{mode}" if emulated else mode, "emulated": emulated,
                      "probe_ratio": ratio, "why": why}
    return plan


def verify_all(recipes: Sequence[str] | str | None = None, precisions: Sequence[str] | str | None = None, *,
               size: str = "default", steps: int | None = None, seed: int = 0, emulate: str = "auto",
               device: str = "cpu", probe_doc: dict[str, Any] | None = None,
               report_dir: str | Path | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Verify every recipe (or ``recipes``) in every precision against fp32 with the noise
    floor; return a ``mixprec.verify-all/1`` document (:func:`render_markdown` makes the table).

    ``size="tiny"`` builds each recipe with its ``RecipeInfo.tiny`` arguments for
    ``tiny_steps`` steps (seconds each; for tests and a first look); ``steps`` overrides the
    recipes' own step counts. With ``report_dir`` every pair's HTML report is written to
    ``report_dir/<recipe>-<precision>/`` next to the table (``results.md``, ``index.html``).
    """
    names = parse_recipes(recipes)
    modes = parse_precisions(precisions)
    if size not in ("default", "tiny"):
        raise UsageError(f"size must be 'default' or 'tiny', got {size!r}")
    say = log or (lambda line: None)
    doc_probe = probe_doc if probe_doc is not None else probe_mod.probe(device)
    plan = execution_plan(modes, doc_probe, emulate)
    rows: list[dict[str, Any]] = []
    wall = time.perf_counter()
    for name in names:
        info = get_recipe(name)
        task = info.factory(**(info.tiny if size == "tiny" else {}))
        n_steps = steps if steps is not None else info.tiny_steps if size == "tiny" else info.verify_steps
        say(f"{name}: fp32 reference, fp32 noise floor, then "
            + ", ".join(plan[m]["executed_as"] for m in modes) + f" ({n_steps} steps each)")
        t0 = time.perf_counter()
        policies = [candidate_policy(info, plan[m]["executed_as"]) for m in modes]
        docs = verify_many(task, policies, steps=n_steps, seed=seed, noise_floor=True, device=device,
                           timing_steps=TIMING_ROUNDS[size])
        row = _row(info, docs, modes, plan)
        for mode, policy in zip(modes, policies):
            row["candidates"][mode]["scaler"] = dict(info.scaler) if info.scaler and policy.loss_scaling else None
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        for mode, cand in row["candidates"].items():
            say(f"  {mode}{' (emulated)' if cand['emulated'] else ''}: {cand['verdict']}, {info.metric_key} "
                f"{_num(cand['value'])} vs fp32 {_num(row['reference_value'])}")
        if report_dir is not None:
            from mixprec.report import write_report

            for mode, verify_doc in zip(modes, docs):
                sub = Path(report_dir) / f"{name}-{mode}"
                sub.mkdir(parents=True, exist_ok=True)
                write_report(verify_doc, sub)
                row["candidates"][mode]["report"] = f"{sub.name}/report.html"
    doc = {
        "schema": PARITY_SCHEMA,
        "size": size,
        "seed": seed,
        "precisions": modes,
        "execution": plan,
        "verdict": "PASS" if all(c["verdict"] == "PASS" for r in rows for c in r["candidates"].values()) else "FAIL",
        "rows": rows,
        "probe": {"bf16_ratio_to_fp32": doc_probe["matmul"].get("bf16", {}).get("ratio_to_fp32"),
                  "measured_at": doc_probe.get("measured_at")},
        "wall_time_s": time.perf_counter() - wall,
        "finished_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": None,
        "environment": environment(device),
    }
    if report_dir is not None:
        write_table(doc, report_dir)
    return doc


def candidate_policy(info: Any, executed_as: str) -> Policy:
    """The policy ``executed_as`` names, with the recipe's own loss-scaler settings
    (``RecipeInfo.scaler``) when the mode scales the loss."""
    policy = parse_policy(executed_as)
    if info.scaler and policy.loss_scaling:
        policy = replace(policy, scaler=replace(policy.scaler, **info.scaler))
    return policy


def _shown(mode: str, c: dict[str, Any]) -> str:
    """The precision cell: the mode, and how it ran when that is not the plain mode."""
    fp8 = c.get("fp8_linears")
    notes = (["emulated"] if c["emulated"] else []) + (
        [] if fp8 is None else [f"{fp8} of {fp8 + c.get('fp8_skipped', 0)} linears in fp8"]) + [
        f"{k.replace('_', ' ')} {v:g}" if isinstance(v, (int, float)) else f"{k.replace('_', ' ')} {v}"
        for k, v in (c.get("scaler") or {}).items()]
    return f"{mode} ({'; '.join(notes)})" if notes else mode


def _row(info: Any, docs: list[dict[str, Any]], modes: list[str], plan: dict[str, dict[str, Any]]) -> dict[str, Any]:
    key = info.metric_key
    first = docs[0]
    ref_value = first["comparison"]["metrics"].get(key, {}).get("reference")
    noise = first["noise_floor"] or {}
    noise_metric = (noise.get("metrics") or {}).get(key, {})
    row: dict[str, Any] = {
        "recipe": info.name, "domain": info.domain, "metric": key, "higher_is_better": info.higher_is_better,
        "expected_fp32": list(info.expected_fp32) if info.expected_fp32 else None,
        "steps": first["steps"], "reference_value": ref_value,
        "noise_floor": {"value": noise_metric.get("other"), "difference": _diff(noise_metric.get("other"), ref_value),
                        "relative": noise_metric.get("rel"),
                        "final_loss_relative": (noise.get("final_loss") or {}).get("rel")},
        "candidates": {},
    }
    for mode, d in zip(modes, docs):
        m = d["comparison"]["metrics"].get(key, {})
        mem = d["memory"]
        total = lambda side: (mem[side]["state_bytes"] or 0) + (mem[side]["activation_bytes"] or 0)  # noqa: E731
        row["candidates"][mode] = {
            "executed_as": plan[mode]["executed_as"], "emulated": plan[mode]["emulated"],
            "value": m.get("other"), "difference": _diff(m.get("other"), ref_value), "relative": m.get("rel"),
            "final_loss_relative": d["comparison"]["final_loss"]["rel"],
            "verdict": d["verdict"], "reasons": d["reasons"],
            "speedup": d["speed"]["speedup"], "speedup_ci95": d["speed"].get("speedup_ci95"),
            "memory_ratio": total("candidate") / total("reference") if total("reference") else None,
            "activation_ratio": mem["activation_ratio"], "state_ratio": mem["state_ratio"],
            "skipped_steps": len(d["candidate_run"]["skipped_steps"] or []),
        }
        if "fp8_modules" in d["candidate"]:  # how much of the model fp8 actually covered
            row["candidates"][mode]["fp8_linears"] = len(d["candidate"]["fp8_modules"])
            row["candidates"][mode]["fp8_skipped"] = len(d["candidate"].get("fp8_skipped") or {})
    return row


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3g}"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _speed(c: dict[str, Any]) -> str:
    ci = c.get("speedup_ci95")
    return _ratio(c["speedup"]) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and c["speedup"] is not None else "")


def render_markdown(doc: dict[str, Any]) -> str:
    """The parity table (one row per recipe and precision) with its legend."""
    lines = ["| recipe | domain | metric | fp32 | precision | value | difference | fp32 noise floor | verdict "
             "| speedup | memory |", "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for row in doc["rows"]:
        arrow = "↑" if row["higher_is_better"] else "↓"
        for mode, c in row["candidates"].items():
            shown = _shown(mode, c)
            lines.append(
                f"| {row['recipe']} | {row['domain']} | {row['metric']} {arrow} | {_num(row['reference_value'])} "
                f"| {shown} | {_num(c['value'])} | {_signed(c['difference'])} "
                f"| {_signed(row['noise_floor']['difference'])} | {c['verdict']} | {_speed(c)} "
                f"| {_ratio(c['memory_ratio'])} |")
    return "\n".join(lines) + "\n"


def render_legend(doc: dict[str, Any]) -> str:
    plan = doc["execution"]
    parts = [f"- **{mode}** ran as `{p['executed_as']}`: {p['why']}." for mode, p in plan.items()]
    return "\n".join([
        "- **difference**: candidate minus fp32, same initial weights and data order. **fp32 noise floor**: "
        "fp32 under seed+1 minus fp32 (how far two fp32 runs land apart anyway); a candidate passes when its "
        "final loss and metrics are within 3x that drift (or 2% relative, whichever is larger).",
        f"- **speedup**: fp32 step time / candidate step time: the median per-round ratio of "
        f"{TIMING_ROUNDS.get(doc.get('size', 'default'), 'n')} rounds (one step of each on the same batch, order "
        "alternating) with its 95% CI; docs/benchmarks.md has the 60-round figures. **memory**: "
        "tensor bytes of one training step (weights, gradients, optimizer state, master weights and activations "
        "saved for backward), candidate / fp32.",
        "- An emulated precision rounds to its format in software: its numerics are the format's, its speed is "
        "the emulation's, not the format's.",
        *(["- fp8-mixed (torchao float8 training) converts the `nn.Linear` layers whose sizes are multiples of 16; "
            "everything else (convolutions, the other linears) runs bf16-mixed. \"0 of 0 linears in fp8\" is a "
            "convolutional model that trained as bf16-mixed."] if any("fp8" in m for m in doc["precisions"]) else []),
        *parts,
    ]) + "\n"


def render_document(doc: dict[str, Any]) -> str:
    """The whole ``results.md``: where and how it was measured, the table, its legend."""
    env = doc["environment"]
    flags = ", ".join(env.get("cpu_flags") or []) or "none detected"
    machine = env.get("gpu_model") or f"{env.get('cpu_model')} CPU, {env.get('threads')} threads ({flags})"
    lines = [
        f"# mixprec parity table: {doc['verdict']}", "",
        f"Measured {doc.get('finished_at') or 'n/a'} on {machine}; torch {env.get('torch')}, Python {env.get('python')}, "
        f"mixprec {env.get('mixprec')}. Every recipe at its {'tiny test size' if doc['size'] == 'tiny' else 'defaults'}, "
        f"seed {doc['seed']}; {doc['wall_time_s'] / 60:.1f} minutes in all.", "",
        f"Command: `{doc.get('command') or 'mixprec verify --all'}`", "",
        render_markdown(doc), render_legend(doc),
    ]
    outside = [r for r in doc["rows"] if outside_expected(r)]
    lines += ["- **fp32 against its documented range** (`mixprec recipes`): "
              + ("every recipe's fp32 value is inside its range." if not outside else
                 "outside for " + ", ".join(f"{r['recipe']} ({_num(r['reference_value'])}, documented "
                                           f"{r['expected_fp32'][0]:g}-{r['expected_fp32'][1]:g})" for r in outside)
                 + "."), ""]
    fails = [(r["recipe"], m, c) for r in doc["rows"] for m, c in r["candidates"].items() if c["verdict"] != "PASS"]
    if fails:
        lines += ["## Failures", ""] + [f"- {recipe} {mode}: " + "; ".join(c["reasons"]) for recipe, mode, c in fails]
    return "\n".join(lines) + "\n"


def outside_expected(row: dict[str, Any]) -> bool:
    """The row's fp32 value is known and lies outside the recipe's documented fp32 range."""
    rng, value = row.get("expected_fp32"), row.get("reference_value")
    return bool(rng) and value is not None and not rng[0] <= value <= rng[1]


def render_summary(doc: dict[str, Any]) -> str:
    lines = [f"verify --all: {len(doc['rows'])} recipes x {len(doc['precisions'])} precisions -> {doc['verdict']} "
             f"({doc['wall_time_s']:.0f} s)", "", render_markdown(doc)]
    fails = [(r["recipe"], m, c) for r in doc["rows"] for m, c in r["candidates"].items() if c["verdict"] != "PASS"]
    for recipe, mode, c in fails:
        lines.append(f"FAIL {recipe} {mode}: " + "; ".join(c["reasons"]))
    return "\n".join(lines)


def write_table(doc: dict[str, Any], report_dir: str | Path) -> dict[str, Path]:
    """``results.md``, ``results.json`` and an ``index.html`` linking each pair's report."""
    import html

    from mixprec import jsonio

    directory = Path(report_dir)
    directory.mkdir(parents=True, exist_ok=True)
    md = directory / "results.md"
    jsonio.write_atomic(md, render_document(doc))
    jsonio.write_atomic(directory / "results.json", jsonio.dumps(doc))
    cells = []
    for row in doc["rows"]:
        for mode, c in row["candidates"].items():
            link = f'<a href="{html.escape(c["report"])}">report</a>' if c.get("report") else ""
            cells.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
                row["recipe"], row["domain"], row["metric"], _num(row["reference_value"]),
                _shown(mode, c), _num(c["value"]), _signed(c["difference"]),
                _signed(row["noise_floor"]["difference"]), c["verdict"], _speed(c),
                _ratio(c["memory_ratio"]))) + f"<td>{link}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("recipe", "domain", "metric", "fp32", "precision", "value", "difference",
                                             "fp32 noise floor", "verdict", "speedup", "memory", ""))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>mixprec parity: {doc['verdict']}</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
            f"<h1>mixprec parity table: {doc['verdict']}</h1><table><tr>{head}</tr>{''.join(cells)}</table>"
            f"</body></html>")
    index = directory / "index.html"
    jsonio.write_atomic(index, page)
    return {"md": md, "html": index}
