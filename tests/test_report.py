"""The verify report: self-contained HTML with embedded plots, report files, re-rendering.

The browser test renders the page in headless Chromium (installed by .ci/run when apt is
there; skipped otherwise): a screenshot, and a DOM dump of a copy of the page whose inline
script counts the images that actually decoded.
"""

from __future__ import annotations

import base64
import copy
import html
import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from mixprec import jsonio
from mixprec.errors import UsageError
from mixprec.recipes.lm import lm
from mixprec.report import CSP, render_html, rerender, write_report
from mixprec.runs.verify import render_markdown, verify
from tasks.planted import overflow_task

pytestmark = pytest.mark.filterwarnings("ignore:fp16 on this CPU")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
XSS = "<script>alert(1)</script>"
DATA_PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fp16 on this CPU")
        return fn()


@pytest.fixture(scope="module")
def pass_doc() -> dict:
    doc = _quiet(lambda: verify(lm(n_layer=1, d_model=32, n_head=2, seq_len=32, batch_size=4), "bf16-mixed",
                                steps=12, noise_floor=True))
    assert doc["verdict"] == "PASS", doc["reasons"]
    return json.loads(jsonio.dumps(doc))  # what report.json holds


@pytest.fixture(scope="module")
def fail_doc() -> dict:
    doc = _quiet(lambda: verify(overflow_task(), "fp16-mixed", steps=12))
    assert doc["verdict"] == "FAIL", doc["reasons"]
    return json.loads(jsonio.dumps(doc))


@pytest.fixture(scope="module")
def pass_html(pass_doc: dict) -> str:
    return render_html(pass_doc)


@pytest.fixture(scope="module")
def fail_html(fail_doc: dict) -> str:
    return render_html(fail_doc)


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(b64, validate=True) for b64 in DATA_PNG.findall(page)]


def _assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert "@import" not in page and "url(" not in page
    assert "http://" not in page and "https://" not in page
    for attr, value in re.findall(r"""\b(src|href)\s*=\s*["']?([^"'\s>]*)""", page, flags=re.I):
        assert value.startswith("data:image/png;base64,"), (attr, value[:80])
    assert f'content="{CSP}"' in page  # the browser may fetch nothing but data: images


def test_html_is_self_contained_with_the_verdict_and_decodable_plots(pass_doc, pass_html):
    _assert_self_contained(pass_html)
    assert 'class="verdict pass"' in pass_html and '<div class="badge">PASS</div>' in pass_html
    for reason in pass_doc["reasons"]:
        assert f"<li>{html.escape(reason)}</li>" in pass_html
    images = _images(pass_html)
    assert len(images) >= 3  # loss curves + noise floor, loss scale, weight divergence
    assert all(png.startswith(PNG_MAGIC) and len(png) > 2000 for png in images)
    assert "fp32 noise floor" in pass_html
    for name in pass_doc["comparison"]["metrics"]:
        assert f"<code>{name}</code>" in pass_html
    assert "speedup" in pass_html and "bf16-mixed" in pass_html


def test_fail_page_shows_the_diagnosis_and_localizations(fail_doc, fail_html):
    _assert_self_contained(fail_html)
    assert 'class="verdict fail"' in fail_html and '<div class="badge">FAIL</div>' in fail_html
    assert html.escape(fail_doc["reasons"][0]) in fail_html
    assert "<h2>Localizations</h2>" in fail_html
    first = fail_doc["candidate_run"]["localizations"][0]["message"]
    assert html.escape(first) in fail_html and "blamed <code>amp</code>" in fail_html
    assert f"{len(fail_doc['candidate_run']['skipped_steps'])} skipped steps" in fail_html
    assert "candidate stopped at step" in fail_html  # its weights are not the final ones
    assert len(_images(fail_html)) >= 3


def test_task_and_module_strings_are_escaped(pass_doc):
    doc = copy.deepcopy(pass_doc)
    doc["task"] = "task " + XSS
    doc["reasons"].append("reason " + XSS)
    doc["comparison"]["weights"][XSS] = 0.5
    doc["comparison"]["metrics"][XSS] = {"reference": 1.0, "other": 1.0, "rel": 0.0}
    run = doc["candidate_run"]
    run["diagnosis"] = "diagnosis " + XSS
    run["skipped_steps"] = [{"step": 3, "reason": XSS, "loss_scale": 1.0}]
    run["decisions"] = [{"step": 4, "module": XSS, "from_format": "bf16", "to_format": "fp32", "reason": XSS}]
    run["localizations"] = [{"step": 3, "reason": "nonfinite_loss", "blamed": XSS, "message": "first in " + XSS}]
    run["monitor"] = {"summary": {"samples": 1, "format": "fp16", "steps": [1, 1],
                                  "overflow_risk": [{"module": XSS, "type": XSS, "amax": 1e5, "ratio": 1.5, "step": 1}],
                                  "underflow": [], "grad_underflow": [{"param": XSS, "underflow": 0.1, "step": 1}],
                                  "nonfinite": []}}
    page = render_html(doc)
    assert XSS not in page and "<script" not in page
    assert page.count(html.escape(XSS)) >= 10
    assert "<title>mixprec verify: PASS \u2014 task &lt;script&gt;" in page
    assert len(_images(page)) >= 4  # a decision timeline too, with the planted name as a tick label


def test_monitor_rankings_become_tables(pass_doc):
    summary = {"samples": 3, "format": "fp16", "steps": [1, 3],
               "overflow_risk": [{"module": "amp", "type": "Amplifier", "amax": 65472.0, "ratio": 0.9995, "step": 1}],
               "underflow": [{"module": "act", "type": "GELU", "underflow": 0.0017, "step": 3}],
               "grad_underflow": [], "nonfinite": [{"module": "amp", "type": "Amplifier", "records": 3,
                                                    "first_step": 1, "max_nonfinite": 2141}]}
    for key, value in (("candidate_run", None), ("monitor_summary", summary)):
        doc = copy.deepcopy(pass_doc)
        if key == "candidate_run":
            doc["candidate_run"]["monitor"] = {"every": 1, "formats": ["fp16"], "samples": 3, "summary": summary}
        else:
            doc["monitor_summary"] = value
        page = render_html(doc)
        assert "Overflow risk (activation amax / fp16 max)" in page
        assert '<span class="bad">0.9995</span>' in page  # near the format's max
        assert "<td><code>act</code></td><td>GELU</td><td class=num>0.17%</td>" in page
        assert "monitor rankings: not measured" not in page


def test_missing_parts_degrade_to_not_measured():
    minimal = {"schema": "mixprec.verify/1", "verdict": "FAIL", "reasons": ["something"]}
    page = render_html(minimal)
    _assert_self_contained(page)
    assert '<div class="badge">FAIL</div>' in page and "not measured" in page
    assert _images(page) == []
    sparse = {**minimal, "task": "t", "steps": 10, "losses": {"reference": [2.0, 1.5, None], "candidate": [None] * 3},
              "comparison": {"per_step": [{"abs": None, "rel": None}] * 3, "weights": {"a": None},
                             "final_loss": {"reference": 1.5, "other": None, "rel": None}, "metrics": {}},
              "noise_floor": None, "speed": {"speedup": None},
              "candidate_run": {"status": "diverged", "loss_scales": [None, None], "skipped_steps": None,
                                "decisions": None, "localizations": [{"message": None}]}}
    page = render_html(sparse)
    assert len(_images(page)) == 1  # only the reference's loss curve has anything to draw
    assert "loss scale: not measured" in page and "<code>a</code>" in page
    with pytest.raises(UsageError, match="JSON object"):
        render_html(["not", "a", "doc"])  # type: ignore[arg-type]


def test_write_report_and_rerender_round_trip(pass_doc, pass_html, tmp_path):
    paths = write_report(pass_doc, tmp_path / "rep")
    assert set(paths) == {"json", "md", "html"}
    assert [p.name for p in paths.values()] == ["report.json", "report.md", "report.html"]
    assert json.loads(paths["json"].read_text()) == pass_doc
    assert paths["md"].read_text() == render_markdown(pass_doc)
    assert paths["html"].read_text() == pass_html
    paths["md"].unlink()
    paths["html"].write_text("stale")
    again = rerender(tmp_path / "rep")
    assert again == {"md": paths["md"], "html": paths["html"]}
    assert paths["md"].read_text() == render_markdown(pass_doc)
    assert paths["html"].read_text() == pass_html  # the plots render the same from report.json
    assert not [p.name for p in (tmp_path / "rep").iterdir() if p.name.startswith(".")]  # no temp files left


def test_rerender_refuses_what_is_not_a_verify_report(tmp_path):
    with pytest.raises(UsageError, match=r"report\.json does not exist"):
        rerender(tmp_path)
    bad = tmp_path / "report.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match=r"report\.json is not JSON"):
        rerender(tmp_path)
    bad.write_text(json.dumps({"schema": "mixprec.train/1"}))
    with pytest.raises(UsageError, match=r"report\.json is not a verify report: schema 'mixprec\.train/1'"):
        rerender(tmp_path)
    bad.write_text("[1, 2]")
    with pytest.raises(UsageError, match="not a verify report"):
        rerender(tmp_path)
    bad.write_text(json.dumps({"schema": "mixprec.verify/1", "verdict": "PASS"}))
    with pytest.raises(UsageError, match="incomplete verify report"):
        rerender(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # nothing half-written


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
COUNT_IMAGES = ("<script>window.addEventListener('load', function () {"
                "var all = Array.prototype.slice.call(document.images);"
                "var ok = all.filter(function (i) { return i.complete && i.naturalWidth > 0; });"
                "document.title = 'IMAGES ' + ok.length + '/' + all.length; });</script>")


def _chromium(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / "profile"
    profile.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(tmp)}  # crash reports and caches stay in tmp
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)


def test_headless_chromium_renders_the_page(pass_doc, tmp_path):
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium not installed (.ci/run installs it with apt-get)")
    from PIL import Image

    page = write_report(pass_doc, tmp_path / "rep")["html"]
    shot = tmp_path / "shot.png"
    proc = _chromium(exe, tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", page.resolve().as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 50_000
    with Image.open(shot) as im:
        assert im.size == (1200, 2400)
        rgb = im.convert("RGB")
        colors = rgb.getcolors(maxcolors=1 << 20)
        assert colors is None or len(colors) > 200  # text, tables and plots, not a blank page
        top = rgb.crop((0, 0, 1200, 250))
        green = sum(n for n, (r, g, b) in top.getcolors(maxcolors=1 << 20) or []
                    if abs(r - 0x1a) < 12 and abs(g - 0x7f) < 12 and abs(b - 0x37) < 12)
        assert green > 3000  # the PASS badge is drawn, big and green, at the top

    # Every embedded image decodes in the browser: a copy whose inline script counts them.
    text = page.read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace(CSP, CSP + "; script-src 'unsafe-inline'").replace("</head>", COUNT_IMAGES + "</head>", 1))
    proc = _chromium(exe, tmp_path, "--dump-dom", probe.resolve().as_uri())
    counted = re.search(r"<title>IMAGES (\d+)/(\d+)</title>", proc.stdout)
    assert counted, (proc.stdout[:500], proc.stderr[-2000:])
    loaded, total = map(int, counted.groups())
    assert total == len(_images(text)) >= 3 and loaded == total
