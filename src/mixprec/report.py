"""Verify reports: JSON (machine), Markdown (terminal, PRs) and one self-contained HTML page.

- :func:`render_html` turns a ``mixprec.verify/1`` document into a single HTML file: the
  verdict and its reasons, a summary table, and plots (loss curves and their per-step
  difference against the fp32 noise floor, the loss scale with skipped steps, per-module
  weight divergence, controller decisions) embedded as ``data:image/png;base64`` images,
  plus the monitor's overflow/underflow rankings and the localizations. No network: no
  external scripts, styles, fonts or images, and a Content-Security-Policy that forbids
  fetching anything. Every string that comes from the task or its model (task name,
  module names, reasons, messages) is HTML-escaped.
- :func:`write_report` writes ``report.json``, ``report.md`` and ``report.html`` into a
  directory; :func:`rerender` rebuilds the Markdown and HTML from a saved ``report.json``
  (``mixprec report DIR``).

Plots use matplotlib's object API (``Figure`` + the Agg canvas), never pyplot's global
state, so rendering is safe inside a process that uses matplotlib for anything else.
Missing or null parts of the document are skipped or shown as "not measured".
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

from mixprec import jsonio
from mixprec.errors import UsageError

REPORT_FILES = {"json": "report.json", "md": "report.md", "html": "report.html"}
MAX_BARS = 40  # weight-divergence bars shown; the largest ones when a model has more modules
MAX_DECISION_ROWS = 200
MAX_LOCALIZATIONS = 50
OVERFLOW_WARN_RATIO = 0.5  # amax at half the format's max or more: shown in red

_REF_COLOR, _CAND_COLOR, _NOISE_COLOR, _BAD_COLOR = "#555555", "#1f6fd1", "#f0a030", "#d62728"

# A strict policy: the page may show its own inline styles and data: images, nothing else.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_STYLE = """
:root { --pass: #1a7f37; --fail: #cf222e; --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, "DejaVu Sans", sans-serif; }
main { max-width: 980px; margin: 0 auto; padding: 24px 20px 40px; }
h1 { font-size: 20px; margin: 0; font-weight: 600; }
h2 { font-size: 17px; margin: 0 0 10px; font-weight: 600; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px; margin: 0 0 16px; }
.verdict { display: flex; gap: 20px; align-items: flex-start; border-width: 2px; }
.verdict.pass { border-color: var(--pass); background: #f0fff4; }
.verdict.fail { border-color: var(--fail); background: #fff5f5; }
.badge { font-size: 44px; font-weight: 800; letter-spacing: 2px; color: #fff; padding: 6px 22px;
         border-radius: 8px; line-height: 1.2; flex: none; }
.pass .badge { background: var(--pass); }
.fail .badge { background: var(--fail); }
.unknown .badge { background: var(--muted); }
.verdict ul { margin: 8px 0 0; padding-left: 20px; }
.sub { color: var(--muted); margin: 2px 0 0; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 13px; }
code { background: #eff1f3; padding: 1px 5px; border-radius: 4px; }
pre { background: #f6f8fa; border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; margin: 4px 0 0;
      white-space: pre-wrap; word-break: break-word; }
table { border-collapse: collapse; width: 100%; margin: 4px 0 8px; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv th { width: 30%; background: none; font-weight: 500; color: var(--muted); }
.bad { color: var(--fail); font-weight: 600; }
.good { color: var(--pass); font-weight: 600; }
.note { color: var(--muted); font-size: 13px; margin: 4px 0 0; }
figure { margin: 8px 0 4px; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
h3 { font-size: 14px; margin: 14px 0 4px; font-weight: 600; }
ol.locs { padding-left: 22px; margin: 0; }
ol.locs li { margin-bottom: 10px; }
details summary { cursor: pointer; color: var(--muted); }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 8px; }
"""


# ----------------------------------------------------------------------------- helpers


def _e(value: Any) -> str:
    """Any value as escaped HTML text."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _fmt(x: Any, digits: int = 4) -> str:
    v = _num(x)
    return "n/a" if v is None else f"{v:.{digits}g}"


def _pct(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "n/a"
    if v == 0:
        return "0%"
    if abs(v) < 1e-4:
        return f"{v * 100:.2g}%"
    return f"{v:.2%}"


def _dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def _mode(policy: Any) -> str:
    if isinstance(policy, dict):
        return str(policy.get("mode", "?"))
    return "?" if policy is None else str(policy)


def _plain(text: Any, limit: int = 48) -> str:
    """A string safe for matplotlib text: no mathtext ($ escaped), bounded length."""
    s = str(text)
    if len(s) > limit:
        s = s[: limit - 1] + "\u2026"
    return s.replace("\\", "\\\\").replace("$", r"\$")


def _steps(n: int) -> list[int]:
    return list(range(1, n + 1))


def _series(values: Iterable[Any]) -> list[float]:
    """Numbers with None/non-finite as NaN (a gap in a matplotlib line)."""
    out = []
    for v in values:
        n = _num(v)
        out.append(math.nan if n is None else n)
    return out


def _figure(width: float = 8.0, height: float = 3.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _style_axes(ax) -> None:
    ax.grid(True, color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _img(b64: str, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{b64}">{cap}</figure>'


def _log_worthy(values: Iterable[float]) -> bool:
    pos = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return len(pos) >= 2 and max(pos) / min(pos) > 100


# ----------------------------------------------------------------------------- plots


def _plot_losses(doc: dict[str, Any]) -> str | None:
    losses = _dict(doc.get("losses"))
    ref, cand = _series(_list(losses.get("reference"))), _series(_list(losses.get("candidate")))
    if not any(math.isfinite(v) for v in ref + cand):
        return None
    per_step = [s if isinstance(s, dict) else {} for s in _list(_dict(doc.get("comparison")).get("per_step"))]
    diff = _series(s.get("abs") for s in per_step)
    noise = _dict(doc.get("noise_floor"))
    noise_diff = _series(s.get("abs") if isinstance(s, dict) else None for s in _list(noise.get("per_step")))
    show_diff = any(math.isfinite(v) for v in diff + noise_diff)
    n = max(len(ref), len(cand), int(_num(doc.get("steps")) or 0))

    fig = _figure(8.0, 4.6 if show_diff else 3.0)
    if show_diff:
        ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    else:
        ax, ax2 = fig.subplots(1, 1), None
    ref_label = f"reference ({_plain(_mode(doc.get('reference')))})"
    cand_label = f"candidate ({_plain(_mode(doc.get('candidate')))})"
    if ref:
        ax.plot(_steps(len(ref)), ref, color=_REF_COLOR, linewidth=3.0, alpha=0.55, label=ref_label)
    if cand:
        ax.plot(_steps(len(cand)), cand, color=_CAND_COLOR, linewidth=1.3, linestyle="--", label=cand_label)
    bad = [i + 1 for i, v in enumerate(cand) if not math.isfinite(v)]
    if len(cand) < n and _dict(doc.get("candidate_run")).get("status") not in (None, "completed"):
        ax.axvline(len(cand), color=_BAD_COLOR, linewidth=1, linestyle=":")
        ax.annotate("candidate stopped", (len(cand), 1), xycoords=("data", "axes fraction"), xytext=(4, -12),
                    textcoords="offset points", color=_BAD_COLOR, fontsize=8)
    for j, s in enumerate(bad):
        ax.axvspan(s - 0.5, s + 0.5, color=_BAD_COLOR, alpha=0.15, linewidth=0,
                   label="non-finite candidate loss" if j == 0 else None)
    ax.set_ylabel("loss")
    ax.legend(fontsize=8, frameon=False, loc="upper right")
    _style_axes(ax)
    if ax2 is not None:
        if any(math.isfinite(v) for v in noise_diff):
            xs = _steps(len(noise_diff))
            floor = [v if math.isfinite(v) else 0.0 for v in noise_diff]
            ax2.fill_between(xs, 0, floor, color=_NOISE_COLOR, alpha=0.25, linewidth=0)
            ax2.plot(xs, noise_diff, color=_NOISE_COLOR, linewidth=1.2, label="fp32 noise floor (seed + 1)")
        if any(math.isfinite(v) for v in diff):
            ax2.plot(_steps(len(diff)), diff, color=_CAND_COLOR, linewidth=1.4, marker="o", markersize=2.5,
                     label="|candidate \u2212 reference|")
        if _log_worthy(diff + noise_diff):
            ax2.set_yscale("log")
        else:
            ax2.set_ylim(bottom=0)
        ax2.set_ylabel("|\u0394 loss|")
        ax2.legend(fontsize=8, frameon=False, loc="best")
        _style_axes(ax2)
        ax2.set_xlabel("step")
    else:
        ax.set_xlabel("step")
    ax.set_xlim(0.5, max(n, 1) + 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


def _plot_loss_scale(run: dict[str, Any], steps: int) -> str | None:
    scales = _series(_list(run.get("loss_scales")))
    if not any(math.isfinite(v) for v in scales):
        return None
    skipped = [s for s in _list(run.get("skipped_steps")) if isinstance(s, dict) and _num(s.get("step")) is not None]
    finite = [v for v in scales if math.isfinite(v)]
    fig = _figure(8.0, 2.2 if max(finite) == min(finite) and not skipped else 3.0)
    ax = fig.subplots()
    xs = _steps(len(scales))
    ax.step(xs, scales, where="mid", color=_CAND_COLOR, linewidth=1.5, label="loss scale")
    if skipped:
        by_reason: dict[str, list[tuple[float, float]]] = {}
        for s in skipped:
            step = _num(s.get("step"))
            y = _num(s.get("loss_scale"))
            if y is None and 1 <= step <= len(scales) and math.isfinite(scales[int(step) - 1]):
                y = scales[int(step) - 1]
            if y is not None:
                by_reason.setdefault(str(s.get("reason") or "skipped"), []).append((step, y))
        markers = ["x", "v", "D", "s", "^"]
        for i, (reason, pts) in enumerate(sorted(by_reason.items())):
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=_BAD_COLOR, marker=markers[i % len(markers)],
                       s=40, zorder=3, label=f"skipped: {_plain(reason, 30)} ({len(pts)})")
    if min(finite) > 0:
        ax.set_yscale("log", base=2)
        if max(finite) == min(finite):
            ax.set_ylim(min(finite) / 4, max(finite) * 4)
    ax.set_xlim(0.5, max(len(scales), steps) + 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("step")
    ax.set_ylabel("loss scale")
    ax.legend(fontsize=8, frameon=False, loc="best")
    _style_axes(ax)
    return _png(fig)


def _plot_weights(weights: dict[str, Any]) -> tuple[str | None, str]:
    values = [(k, _num(v)) for k, v in weights.items()]
    measured = [(k, v) for k, v in values if v is not None]
    if not measured:
        return None, ""
    note = ""
    if len(measured) > MAX_BARS:
        keep = {k for k, _ in sorted(measured, key=lambda kv: -kv[1])[:MAX_BARS]}
        note = f"the {MAX_BARS} largest of {len(measured)} modules, in model order"
        measured = [(k, v) for k, v in measured if k in keep]
    height = min(max(2.2, 0.24 * len(measured) + 1.0), 11.0)
    fig = _figure(8.0, height)
    ax = fig.subplots()
    names = [_plain(k) for k, _ in measured]
    vals = [v for _, v in measured]
    top = sorted(vals, reverse=True)[:3] if len(vals) > 6 else []
    colors = [_BAD_COLOR if v in top and v > 0 else _CAND_COLOR for v in vals]
    ys = list(range(len(vals)))
    ax.barh(ys, vals, color=colors, height=0.7)
    ax.set_yticks(ys, names, fontsize=8)
    ax.invert_yaxis()
    if _log_worthy(vals) and min(vals) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("relative L2 distance of final weights (candidate vs reference)")
    _style_axes(ax)
    ax.grid(False, axis="y")
    return _png(fig), note


def _plot_decisions(decisions: list[dict[str, Any]], steps: int) -> str | None:
    pts = [d for d in decisions if _num(d.get("step")) is not None]
    if not pts:
        return None
    modules: list[str] = []
    for d in pts:
        m = str(d.get("module"))
        if m not in modules:
            modules.append(m)
    shown = modules[:25]
    fig = _figure(8.0, min(max(2.0, 0.32 * len(shown) + 1.2), 9.0))
    ax = fig.subplots()
    fmts = sorted({str(d.get("to_format")) for d in pts})
    palette = ["#d62728", "#1f6fd1", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for i, fmt in enumerate(fmts):
        sel = [d for d in pts if str(d.get("to_format")) == fmt and str(d.get("module")) in shown]
        ax.scatter([_num(d["step"]) for d in sel], [shown.index(str(d.get("module"))) for d in sel],
                   color=palette[i % len(palette)], s=60, marker="D", zorder=3, label=f"to {_plain(fmt, 16)}")
        for d in sel:
            ax.annotate(f"{_plain(d.get('from_format'), 10)}\u2192{_plain(d.get('to_format'), 10)}",
                        (_num(d["step"]), shown.index(str(d.get("module")))), xytext=(6, 4),
                        textcoords="offset points", fontsize=7, color="#333333")
    ax.set_yticks(range(len(shown)), [_plain(m) for m in shown], fontsize=8)
    ax.set_ylim(len(shown) - 0.5, -0.7)
    last = max([steps] + [_num(d["step"]) for d in pts])
    ax.set_xlim(0.5, last + 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("step")
    if len(fmts) > 1:
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _style_axes(ax)
    return _png(fig)


# ----------------------------------------------------------------------------- sections


def _verdict_section(doc: dict[str, Any]) -> str:
    verdict = str(doc.get("verdict") or "UNKNOWN").upper()
    cls = {"PASS": "pass", "FAIL": "fail"}.get(verdict, "unknown")
    reasons = _list(doc.get("reasons"))
    items = "".join(f"<li>{_e(r)}</li>" for r in reasons) or "<li>no reasons recorded</li>"
    sub = (f"task <code>{_e(doc.get('task', '?'))}</code>: <code>{_e(_mode(doc.get('candidate')))}</code> against "
           f"<code>{_e(_mode(doc.get('reference')))}</code>, {_e(doc.get('steps', '?'))} steps, "
           f"seed {_e(doc.get('seed', '?'))}")
    return (f'<section class="verdict {cls}"><div class="badge">{_e(verdict)}</div>'
            f'<div><h1>mixprec verify</h1><p class="sub">{sub}</p><ul>{items}</ul></div></section>')


def _summary_section(doc: dict[str, Any]) -> str:
    tol = _dict(doc.get("tolerances"))
    comp = _dict(doc.get("comparison"))
    noise = doc.get("noise_floor") if isinstance(doc.get("noise_floor"), dict) else None
    run = _dict(doc.get("candidate_run"))
    speed = _dict(doc.get("speed"))

    def row(k: str, v: str) -> str:
        return f"<tr><th>{k}</th><td>{v}</td></tr>"

    mode = tol.get("mode")
    tol_text = "not recorded" if not tol else (
        f"{_e(mode)} (loss {_e(_fmt(tol.get('loss')))}, metrics {_e(_fmt(tol.get('metric')))}"
        + (f", noise multiple {_e(_fmt(tol.get('noise_multiple')))}" if mode == "noise_floor" else "") + ")")
    status = run.get("status")
    status_html = ("not measured" if status is None
                   else f'<span class="{"good" if status == "completed" else "bad"}">{_e(status)}</span>')
    skipped = run.get("skipped_steps")
    sp = _num(speed.get("speedup"))
    speed_text = "not measured" if sp is None else (
        f"<b>{sp:.2f}x</b> (candidate {_ms(speed.get('candidate_step_s'))} vs reference "
        f"{_ms(speed.get('reference_step_s'))} per step; {_e(speed.get('method') or 'separate runs in one process')})")
    kv = [
        row("task", f"<code>{_e(doc.get('task', '?'))}</code>"),
        row("candidate", f"<code>{_e(_mode(doc.get('candidate')))}</code>" + _policy_extra(doc.get("candidate"))),
        row("reference", f"<code>{_e(_mode(doc.get('reference')))}</code>"),
        row("steps / seed", f"{_e(doc.get('steps', '?'))} / {_e(doc.get('seed', '?'))}"),
        row("tolerance", tol_text),
        row("candidate run", status_html + (f"; {len(skipped)} skipped steps" if isinstance(skipped, list) else "")),
        row("speedup", speed_text),
    ]
    diagnosis = run.get("diagnosis")
    if diagnosis and not any(str(diagnosis) in str(r) for r in _list(doc.get("reasons"))):
        kv.append(row("diagnosis", _e(diagnosis)))

    noise_col = noise is not None
    head = ("<tr><th>quantity</th><th class=num>reference</th><th class=num>candidate</th>"
            "<th class=num>relative difference</th>" + ("<th class=num>fp32 noise floor</th>" if noise_col else "")
            + "</tr>")
    rows = []
    fl = comp.get("final_loss")
    if isinstance(fl, dict):
        nf = _dict(noise.get("final_loss")).get("rel") if noise_col else None
        rows.append(_qrow("final loss (mean of the last fifth)", fl, nf, noise_col))
    metrics = _dict(comp.get("metrics"))
    noise_metrics = _dict(noise.get("metrics")) if noise_col else {}
    for name, m in metrics.items():
        if isinstance(m, dict):
            rows.append(_qrow(f"metric <code>{_e(name)}</code>", m, _dict(noise_metrics.get(name)).get("rel"),
                              noise_col))
    if "max_step_rel" in comp:
        nm = noise.get("max_step_rel") if noise_col else None
        rows.append(f"<tr><td>largest per-step loss difference</td><td class=num></td><td class=num></td>"
                    f"<td class=num>{_pct(comp.get('max_step_rel'))}</td>"
                    + (f"<td class=num>{_pct(nm)}</td>" if noise_col else "") + "</tr>")
    table = (f"<table>{head}{''.join(rows)}</table>" if rows
             else '<p class="note">comparison: not measured</p>')
    if not metrics and "metrics" in comp:
        table += '<p class="note">the task has no evaluate(): metrics not measured</p>'
    return (f'<section><h2>Summary</h2><table class="kv">{"".join(kv)}</table>'
            f"<h3>Reference vs candidate</h3>{table}</section>")


def _policy_extra(policy: Any) -> str:
    p = _dict(policy)
    bits = []
    if p.get("fp32_modules"):
        bits.append("fp32: " + ", ".join(f"<code>{_e(m)}</code>" for m in _list(p["fp32_modules"])[:10]))
    if p.get("controller") and p.get("controller") != "static":
        bits.append(f"controller {_e(p['controller'])}")
    if "loss_scaling" in p:
        bits.append("loss scaling " + ("on" if p["loss_scaling"] else "off"))
    return (" <span class=note>(" + "; ".join(bits) + ")</span>") if bits else ""


def _ms(x: Any) -> str:
    v = _num(x)
    return "n/a" if v is None else f"{v * 1e3:.2f} ms"


def _qrow(label: str, q: dict[str, Any], noise_rel: Any, noise_col: bool) -> str:
    return (f"<tr><td>{label}</td><td class=num>{_fmt(q.get('reference'))}</td>"
            f"<td class=num>{_fmt(q.get('other'))}</td><td class=num>{_pct(q.get('rel'))}</td>"
            + (f"<td class=num>{_pct(noise_rel)}</td>" if noise_col else "") + "</tr>")


def _loss_section(doc: dict[str, Any]) -> str:
    b64 = _plot_losses(doc)
    if b64 is None:
        return "<section><h2>Loss curves</h2><p class=note>loss curves: not measured</p></section>"
    if isinstance(doc.get("noise_floor"), dict):
        cap = ("Top: the loss of both runs (same initial weights, same batches). Bottom: their per-step absolute "
               "difference; the shaded band is how far two fp32 runs with another seed drift apart anyway.")
    else:
        cap = ("Top: the loss of both runs (same initial weights, same batches). Bottom: their per-step absolute "
               "difference. fp32 noise floor: not measured (run verify with <code>--noise-floor</code>).")
    return f"<section><h2>Loss curves</h2>{_img(b64, 'loss curves', cap)}</section>"


def _scale_section(doc: dict[str, Any]) -> str:
    run = _dict(doc.get("candidate_run"))
    b64 = _plot_loss_scale(run, int(_num(doc.get("steps")) or 0))
    skipped = [s for s in _list(run.get("skipped_steps")) if isinstance(s, dict)]
    if b64 is None:
        body = "<p class=note>loss scale: not measured</p>"
    else:
        scaling = _dict(doc.get("candidate")).get("loss_scaling")
        cap = ("The dynamic loss scale the candidate used at each step; red marks are skipped steps."
               if scaling is not False else "Loss scaling is off for this policy: the scale stays 1.")
        body = _img(b64, "loss scale", cap)
    if skipped:
        rows = "".join(f"<tr><td class=num>{_e(s.get('step'))}</td><td>{_e(s.get('reason'))}</td>"
                       f"<td class=num>{_fmt(s.get('loss_scale'))}</td></tr>" for s in skipped[:MAX_DECISION_ROWS])
        more = (f"<p class=note>and {len(skipped) - MAX_DECISION_ROWS} more</p>"
                if len(skipped) > MAX_DECISION_ROWS else "")
        body += (f"<details><summary>{len(skipped)} skipped steps</summary><table><tr><th class=num>step</th>"
                 f"<th>reason</th><th class=num>loss scale</th></tr>{rows}</table>{more}</details>")
    elif "skipped_steps" in run:
        body += "<p class=note>no skipped steps</p>"
    return f"<section><h2>Loss scale</h2>{body}</section>"


def _weights_section(doc: dict[str, Any]) -> str:
    weights = _dict(_dict(doc.get("comparison")).get("weights"))
    if not weights:
        return "<section><h2>Weight divergence</h2><p class=note>weight divergence: not measured</p></section>"
    b64, note = _plot_weights(weights)
    unmeasured = [k for k, v in weights.items() if _num(v) is None]
    n_measured = len(weights) - len(unmeasured)
    cap = ("Relative L2 distance between the candidate's and the reference's final weights, per module"
           + (f" ({_e(note)})" if note else "") + ("; the three largest in red." if n_measured > 6 else "."))
    run = _dict(doc.get("candidate_run"))
    if run.get("status") not in (None, "completed"):
        stopped = len(_list(_dict(doc.get("losses")).get("candidate"))) or "?"
        cap += (f' <span class="bad">The candidate stopped at step {_e(stopped)}: its weights are from that step, '
                "the reference's from the last one.</span>")
    body = _img(b64, "weight divergence per module", cap) if b64 else ""
    if unmeasured:
        body += ("<p class=note>not measured (no finite value): "
                 + ", ".join(f"<code>{_e(k)}</code>" for k in unmeasured[:30])
                 + (f" and {len(unmeasured) - 30} more" if len(unmeasured) > 30 else "") + "</p>")
    rows = "".join(f"<tr><td><code>{_e(k)}</code></td><td class=num>{_fmt(v, 3)}</td></tr>"
                   for k, v in sorted(weights.items(), key=lambda kv: -(_num(kv[1]) or -1)))
    body += (f"<details><summary>all {len(weights)} modules</summary><table><tr><th>module</th>"
             f"<th class=num>relative divergence</th></tr>{rows}</table></details>")
    return f"<section><h2>Weight divergence</h2>{body}</section>"


def _plot_gradient_heatmap(grads: dict[str, Any]) -> str | None:
    """Modules x sampled steps, colour = 1 - cosine of the two runs' gradients (log scale)."""
    steps, modules, cosine = _list(grads.get("steps")), _list(grads.get("modules")), _list(grads.get("cosine"))
    if not steps or not modules or len(cosine) != len(modules):
        return None
    import numpy as np
    from matplotlib.colors import LogNorm

    rows = modules[:MAX_BARS]
    data = np.array([[np.nan if _num(v) is None else max(1.0 - float(v), 1e-9) for v in row]
                     for row in cosine[:MAX_BARS]], dtype=float)
    fig = _figure(8.0, min(max(2.4, 0.22 * len(rows) + 1.2), 11.0))
    ax = fig.subplots()
    finite = data[np.isfinite(data)]
    norm = LogNorm(vmin=max(float(finite.min()), 1e-9), vmax=max(float(finite.max()), 1e-8)) if finite.size else None
    im = ax.imshow(data, aspect="auto", cmap="magma_r", norm=norm, interpolation="nearest")
    ax.set_yticks(range(len(rows)), [_plain(m) for m in rows], fontsize=7)
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
    ax.set_xlabel("step")
    fig.colorbar(im, ax=ax, label="1 - gradient cosine (candidate vs reference)")
    return _png(fig)


def _plot_memory(memory: dict[str, Any]) -> str | None:
    ref, cand = _dict(memory.get("reference")), _dict(memory.get("candidate"))
    keys = [("state_bytes", "training state"), ("activation_bytes", "activations saved for backward")]
    if not all(_num(ref.get(k)) is not None and _num(cand.get(k)) is not None for k, _ in keys):
        return None
    fig = _figure(8.0, 2.4)
    ax = fig.subplots()
    ys = list(range(len(keys)))
    h = 0.38
    ax.barh([y - h / 2 for y in ys], [ref[k] / 2**20 for k, _ in keys], height=h, color=_REF_COLOR,
            label=f"reference ({_plain(ref.get('mode', 'fp32'))})")
    ax.barh([y + h / 2 for y in ys], [cand[k] / 2**20 for k, _ in keys], height=h, color=_CAND_COLOR,
            label=f"candidate ({_plain(cand.get('mode', '?'))})")
    ax.set_yticks(ys, [label for _, label in keys])
    ax.invert_yaxis()
    ax.set_xlabel("MiB (tensor bytes of one training step)")
    ax.legend(loc="lower right", fontsize=8)
    _style_axes(ax)
    return _png(fig)


def _memory_section(doc: dict[str, Any]) -> str:
    memory = _dict(doc.get("memory"))
    b64 = _plot_memory(memory)
    if b64 is None:
        return "<section><h2>Memory</h2><p class=note>memory: not measured</p></section>"
    cap = (f"Activations saved for backward: {_fmt(memory.get('activation_ratio'), 3)}x the reference's; training "
           f"state (weights, gradients, optimizer state, master weights): {_fmt(memory.get('state_ratio'), 3)}x. "
           "Counted from the tensors of one step, not the process's peak.")
    return f"<section><h2>Memory</h2>{_img(b64, 'memory per run', cap)}</section>"


def _gradients_section(doc: dict[str, Any]) -> str:
    grads = _dict(_dict(doc.get("comparison")).get("gradients"))
    b64 = _plot_gradient_heatmap(grads)
    if b64 is None:
        return "<section><h2>Gradient agreement</h2><p class=note>per-module gradients: not measured</p></section>"
    worst = _num(grads.get("min_cosine"))
    cap = ("Per module (rows) and sampled step (columns): 1 minus the cosine similarity of the candidate's and the "
           "reference's unscaled, unclipped gradients; darker is worse, blank is non-finite."
           + (f" Lowest cosine: {worst:.6f}." if worst is not None else ""))
    return f"<section><h2>Gradient agreement</h2>{_img(b64, 'gradient cosine heatmap', cap)}</section>"


def _monitor_summary(doc: dict[str, Any]) -> dict[str, Any] | None:
    for source in (doc.get("monitor_summary"), _dict(doc.get("candidate_run")).get("monitor")):
        if not isinstance(source, dict):
            continue
        summary = source.get("summary") if isinstance(source.get("summary"), dict) else source
        if any(isinstance(summary.get(k), list) for k in ("overflow_risk", "underflow", "grad_underflow", "nonfinite")):
            return summary
    return None


def _plot_ranges(ranges: dict[str, Any]) -> str | None:
    """Two heatmaps, modules x sampled steps: output amax / format max, and underflow fraction."""
    steps, modules = _list(ranges.get("steps")), _list(ranges.get("modules"))
    ratio, under = _list(ranges.get("range_ratio")), _list(ranges.get("underflow"))
    if not steps or not modules or len(ratio) != len(modules) or len(under) != len(modules):
        return None
    import numpy as np
    from matplotlib.colors import LogNorm

    rows = modules[:MAX_BARS]
    r = np.array([[np.nan if _num(v) is None or _num(v) <= 0 else float(v) for v in row] for row in ratio[:MAX_BARS]])
    u = np.array([[np.nan if _num(v) is None else float(v) for v in row] for row in under[:MAX_BARS]])
    fig = _figure(9.0, min(max(2.8, 0.2 * len(rows) + 1.4), 12.0))
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    fr = r[np.isfinite(r)]
    im1 = ax1.imshow(r, aspect="auto", cmap="magma_r", interpolation="nearest",
                     norm=LogNorm(vmin=max(float(fr.min()), 1e-12), vmax=max(float(fr.max()), 1e-11)) if fr.size else None)
    im2 = ax2.imshow(u, aspect="auto", cmap="viridis_r", vmin=0.0, vmax=max(float(np.nanmax(u)) if np.isfinite(u).any() else 1.0, 1e-6),
                     interpolation="nearest")
    fmt = _plain(ranges.get("format", "?"))
    for ax, title in ((ax1, f"output amax / {fmt} max"), (ax2, f"fraction below {fmt} min normal")):
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
        ax.set_xlabel("step")
    ax1.set_yticks(range(len(rows)), [_plain(m) for m in rows], fontsize=7)
    fig.colorbar(im1, ax=ax1)
    fig.colorbar(im2, ax=ax2)
    return _png(fig)


def _monitor_section(doc: dict[str, Any]) -> str:
    s = _monitor_summary(doc)
    if s is None:
        return ("<section><h2>Overflow and underflow</h2><p class=note>monitor rankings: not measured "
                "(the candidate ran without the numerics monitor)</p></section>")
    fmt = _e(s.get("format", "fp16"))
    steps = s.get("steps")
    span = f", steps {_e(steps[0])}\u2013{_e(steps[1])}" if isinstance(steps, list) and len(steps) == 2 else ""
    parts = [f"<p class=note>{_e(s.get('samples', '?'))} sampled steps{span}; target format {fmt}</p>"]
    heat = _plot_ranges(_dict(_dict(doc.get("candidate_run")).get("monitor_ranges")))
    if heat is not None:
        parts.append(_img(heat, "per-module range heatmaps",
                          "The candidate's monitor, per module (rows) and sampled step (columns): how close each "
                          "module's output came to the format's max (left; 1 is overflow), and the share of its "
                          "non-zero outputs below the smallest normal (right)."))

    def table(title: str, header: list[str], rows: list[list[str]], num: set[int]) -> None:
        parts.append(f"<h3>{title}</h3>")
        if not rows:
            parts.append("<p class=note>none</p>")
            return
        h = "".join(f"<th{' class=num' if i in num else ''}>{c}</th>" for i, c in enumerate(header))
        body = "".join("<tr>" + "".join(f"<td{' class=num' if i in num else ''}>{c}</td>" for i, c in enumerate(r))
                       + "</tr>" for r in rows)
        parts.append(f"<table><tr>{h}</tr>{body}</table>")

    def entries(key: str) -> list[dict[str, Any]]:
        return [e for e in _list(s.get(key)) if isinstance(e, dict)]

    def ratio(e: dict[str, Any]) -> str:
        r = _num(e.get("ratio"))
        text = _fmt(r, 4)
        return f'<span class="bad">{text}</span>' if r is not None and r >= OVERFLOW_WARN_RATIO else text

    table(f"Overflow risk (activation amax / {fmt} max)", ["module", "type", "amax", "ratio", "step"],
          [[f"<code>{_e(e.get('module'))}</code>", _e(e.get("type")), _fmt(e.get("amax"), 3), ratio(e),
            _e(e.get("step"))] for e in entries("overflow_risk")], {2, 3, 4})
    table(f"Underflow (non-zero outputs below {fmt} min normal)", ["module", "type", "fraction", "step"],
          [[f"<code>{_e(e.get('module'))}</code>", _e(e.get("type")), _pct(e.get("underflow")), _e(e.get("step"))]
           for e in entries("underflow")], {2, 3})
    table(f"Gradient underflow (scaled gradients below {fmt} min normal)", ["parameter", "fraction", "step"],
          [[f"<code>{_e(e.get('param'))}</code>", _pct(e.get("underflow")), _e(e.get("step"))]
           for e in entries("grad_underflow")], {1, 2})
    table("Non-finite outputs", ["module", "type", "samples", "first step", "max count"],
          [[f"<code>{_e(e.get('module'))}</code>", _e(e.get("type")), _e(e.get("records")), _e(e.get("first_step")),
            _e(e.get("max_nonfinite"))] for e in entries("nonfinite")], {2, 3, 4})
    return f"<section><h2>Overflow and underflow</h2>{''.join(parts)}</section>"


def _decisions_section(doc: dict[str, Any]) -> str:
    decisions = [d for d in _list(_dict(doc.get("candidate_run")).get("decisions")) if isinstance(d, dict)]
    if not decisions:
        return ""
    b64 = _plot_decisions(decisions, int(_num(doc.get("steps")) or 0))
    rows = "".join(f"<tr><td class=num>{_e(d.get('step'))}</td><td><code>{_e(d.get('module'))}</code></td>"
                   f"<td>{_e(d.get('from_format'))} \u2192 {_e(d.get('to_format'))}</td><td>{_e(d.get('reason'))}</td></tr>"
                   for d in decisions[:MAX_DECISION_ROWS])
    more = (f"<p class=note>and {len(decisions) - MAX_DECISION_ROWS} more</p>"
            if len(decisions) > MAX_DECISION_ROWS else "")
    fig = _img(b64, "controller decisions", "When the controller moved a module to another format.") if b64 else ""
    return (f"<section><h2>Controller decisions</h2>{fig}<table><tr><th class=num>step</th><th>module</th>"
            f"<th>change</th><th>reason</th></tr>{rows}</table>{more}</section>")


def _localizations_section(doc: dict[str, Any]) -> str:
    locs = [l for l in _list(_dict(doc.get("candidate_run")).get("localizations")) if isinstance(l, dict)]
    if not locs:
        return ""
    items = []
    for loc in locs[:MAX_LOCALIZATIONS]:
        head = f"step {_e(loc.get('step', '?'))}"
        if loc.get("reason"):
            head += f" ({_e(loc['reason'])})"
        if loc.get("blamed"):
            head += f": blamed <code>{_e(loc['blamed'])}</code>"
        items.append(f"<li>{head}<pre>{_e(loc.get('message') or 'no message')}</pre></li>")
    more = (f"<p class=note>and {len(locs) - MAX_LOCALIZATIONS} more in report.json</p>"
            if len(locs) > MAX_LOCALIZATIONS else "")
    return (f"<section><h2>Localizations</h2><p class=note>Where the first non-finite value appeared, replaying the "
            f"failed step.</p><ol class=locs>{''.join(items)}</ol>{more}</section>")


def _footer(doc: dict[str, Any]) -> str:
    env = _dict(doc.get("environment"))
    bits = [f"{k} {_e(env[k])}" for k in ("mixprec", "torch", "python") if env.get(k)]
    dev = env.get("device_name") or env.get("device")
    if dev:
        bits.append(f"device {_e(dev)}")
    sep = " \u00b7 "
    return f"<footer>{_e(doc.get('schema', ''))}{sep}{sep.join(bits) or 'environment not recorded'}</footer>"


# ----------------------------------------------------------------------------- public API


def render_html(doc: dict[str, Any]) -> str:
    """A ``mixprec.verify/1`` document as one self-contained HTML page (plots embedded)."""
    if not isinstance(doc, dict):
        raise UsageError(f"a verify report is a JSON object, got {type(doc).__name__}")
    verdict = str(doc.get("verdict") or "UNKNOWN")
    title = f"mixprec verify: {verdict} \u2014 {doc.get('task', '?')}"
    body = "".join([
        _verdict_section(doc), _summary_section(doc), _loss_section(doc), _scale_section(doc),
        _memory_section(doc), _gradients_section(doc), _weights_section(doc), _monitor_section(doc), _decisions_section(doc), _localizations_section(doc),
        _footer(doc),
    ])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head>\n<body><main>\n{body}\n</main></body></html>\n")


def prepare_report_dir(path: str | Path, force: bool = False) -> Path:
    """A report directory is new, empty, or an earlier mixprec report (it holds ``demo.json``
    or a mixprec ``report.json``); anything else is refused unless ``force``, so nothing else
    is overwritten by accident."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"report directory {str(path)!r} is a file, not a directory")
    if directory.is_dir() and not force and any(directory.iterdir()) and not _is_mixprec_report(directory):
        others = sorted(p.name for p in directory.iterdir())[:3]
        raise UsageError(f"report directory {str(path)!r} holds other files ({', '.join(others)}) and is not an "
                         "earlier mixprec report; choose a new or empty directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"report directory {str(path)!r} cannot be created: {exc.strerror or exc}") from None
    return directory


def _is_mixprec_report(directory: Path) -> bool:
    for name in ("demo.json", "report.json", "results.json"):
        try:
            doc = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if isinstance(doc, dict) and str(doc.get("schema", "")).startswith("mixprec."):
            return True
    return False


def write_report(doc: dict[str, Any], directory: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = jsonio.dumps(doc)
    rendered = _render(json.loads(text), "the verify document")  # exactly what rerender will see
    paths = {k: directory / name for k, name in REPORT_FILES.items()}
    jsonio.write_atomic(paths["json"], text)
    for kind, content in rendered.items():
        jsonio.write_atomic(paths[kind], content)
    return paths


def rerender(directory: str | Path) -> dict[str, Path]:
    """Rewrite report.md and report.html from ``directory``/report.json."""
    from mixprec.runs.verify import VERIFY_SCHEMA

    directory = Path(directory)
    path = directory / REPORT_FILES["json"]
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist: not a mixprec report directory "
                         "(write one with mixprec verify --report DIR)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not JSON: {exc}") from None
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema != VERIFY_SCHEMA:
        raise UsageError(f"{path} is not a verify report: schema {schema!r}, expected {VERIFY_SCHEMA!r}")
    rendered = _render(doc, path)
    paths = {k: directory / REPORT_FILES[k] for k in rendered}
    for kind, content in rendered.items():
        jsonio.write_atomic(paths[kind], content)
    return paths


def _render(doc: dict[str, Any], source: "Path | str") -> dict[str, str]:
    """Markdown and HTML for ``doc``; an incomplete document is a UsageError naming ``source``."""
    from mixprec.runs.verify import render_markdown

    try:
        return {"md": render_markdown(doc), "html": render_html(doc)}
    except (KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{source} is an incomplete verify report ({type(exc).__name__}: {exc})") from None
