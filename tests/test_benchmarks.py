"""The benchmarks under benchmarks/ run, and write the documents they promise.

These are not timing tests: the numbers of a --smoke run mean nothing. They check that every
script runs end to end (through ``run_all.py --smoke``, and ``gpu.sh --smoke`` on this CPU,
skipping what needs a GPU), that each JSON has its schema and shape, and that every ratio
in it is a finite positive number. The peers benchmark must work with Accelerate and
Lightning Fabric missing (CI installs only ``.[dev]``) and, where they are installed, run
them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import _stats  # noqa: E402

SCRIPTS = ["speedup", "peers", "overhead", "monitor_overhead", "emulation", "autotune_cost", "memory", "scaling"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # the probe's cache: not the user's
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    env["PYTHON"] = sys.executable
    return env


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _ratio_ok(s: dict) -> bool:
    lo, hi = s["ci95"]
    return _positive(s["median"]) and _positive(lo) and _positive(hi) and lo <= s["median"] <= hi


# -- the statistics ------------------------------------------------------------------------
def test_median_ci_is_the_order_statistic_interval():
    xs = list(range(1, 61))  # n = 60: ranks 22 and 39 (97.3%; 23 and 38 would be 94.8%)
    lo, hi, coverage = _stats.median_ci(xs)
    assert (lo, hi) == (22, 39) and 0.95 <= coverage < 0.98
    lo, hi, coverage = _stats.median_ci([3.0, 1.0, 2.0])  # too few values: [min, max], and says so
    assert (lo, hi) == (1.0, 3.0) and coverage < 0.95
    s = _stats.ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert s["median"] == 2.0 and s["ci95"] == [2.0, 2.0] and s["rounds"] == 3
    with pytest.raises(ValueError):
        _stats.ratio([1.0], [1.0, 2.0])


def test_interleave_rotates_the_order_and_skips_warmup():
    seen: list[tuple[int, str]] = []
    steps = {n: (lambda b, n=n: seen.append((b, n))) for n in "abc"}
    times = _stats.interleave(steps, iter(range(100)), rounds=3, warmup=1)
    assert [len(v) for v in times.values()] == [3, 3, 3]
    assert [n for _, n in seen] == list("abc" "bca" "cab" "abc")
    assert all(b == r for r, chunk in enumerate([seen[i:i + 3] for i in range(0, 12, 3)]) for b, _ in chunk)
    only = _stats.interleave(steps, iter(range(100)), rounds=2, warmup=0, only=lambda r: "ab" if r == 0 else "a")
    assert len(only["a"]) == 2 and len(only["b"]) == 1 and only["c"] == []


def test_bootstrap_brackets_the_statistic():
    data = [1.0, 1.1, 0.9, 1.05, 0.95] * 8
    lo, hi = _stats.bootstrap(lambda idx: statistics.median(data[i] for i in idx), len(data))
    assert lo <= statistics.median(data) <= hi


# -- the peers without the peers' libraries --------------------------------------------------
def test_peers_skip_a_missing_library(monkeypatch):
    import peers

    monkeypatch.setitem(peers.LIBRARY, "accelerate", "no_such_module_for_mixprec_tests")
    monkeypatch.setitem(peers.LIBRARY, "fabric", "no_such_module_for_mixprec_tests")
    group = peers.measure("lm", "bf16-mixed", rounds=2, warmup=1, smoke=True, device="cpu", with_memory=False)
    rows = {r["peer"]: r for r in group["rows"]}
    assert "not installed" in rows["accelerate"]["skipped"] and "not installed" in rows["fabric"]["skipped"]
    assert _ratio_ok(rows["mixprec"]["ratio_to_torch_amp"])
    assert rows["mixprec"]["params_equal_to_torch_amp"]  # invariant 2: the same arithmetic
    assert set(group["mixprec_versus"]) == {"torch.amp"}
    text = peers.markdown({"models": ["lm"], "results": [group]})
    assert "skipped" in text and "mixprec / torch.amp" in text


# -- every script, through run_all --------------------------------------------------------------
@pytest.mark.timeout(900)
def test_run_all_smoke_runs_every_script(tmp_path):
    results = tmp_path / "results.json"  # a minimal verify --all document for the speed-up table
    results.write_text(json.dumps({
        "schema": "mixprec.verify-all/1", "size": "tiny", "environment": {"device_name": "test"},
        "probe": {"measured_at": "2026-01-01T00:00:00+00:00"},
        "rows": [{"recipe": "lm", "domain": "language model", "candidates": {
            "bf16-mixed": {"speedup": 1.3, "emulated": False, "executed_as": "bf16-mixed"},
            "fp16-mixed": {"speedup": 0.8, "emulated": True, "executed_as": "emulate:fp16-mixed"}}}]}))
    out = tmp_path / "out"
    before = (REPO / "docs" / "benchmarks.md").read_bytes() if (REPO / "docs" / "benchmarks.md").exists() else None
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--smoke", "--out", str(out),
                           "--results", str(results)], cwd=REPO, env=_env(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = (REPO / "docs" / "benchmarks.md").read_bytes() if (REPO / "docs" / "benchmarks.md").exists() else None
    assert before == after, "--smoke must not rewrite docs/benchmarks.md"

    docs = {name: json.loads((out / f"{name}.json").read_text()) for name in SCRIPTS}
    for name, doc in docs.items():
        assert doc["schema"].startswith("mixprec.bench."), name
        assert doc["size"] == "smoke" and doc["environment"]["torch"] and doc["command"], name

    peers = docs["peers"]
    have = {p: importlib.util.find_spec(m) is not None for p, m in (("accelerate", "accelerate"),
                                                                      ("fabric", "lightning_fabric"))}
    for group in peers["results"]:
        assert group["model"] in ("lm", "bert") and group["precision"] in ("fp32", "bf16-mixed", "fp16-mixed")
        for row in group["rows"]:
            if "skipped" in row:
                assert row["peer"] in ("accelerate", "fabric") and row["skipped"]
                if not have[row["peer"]]:
                    assert "not installed" in row["skipped"]
                continue
            assert _ratio_ok(row["ratio_to_torch_amp"]) and _positive(row["step_s"]["median"])
        ran = {r["peer"] for r in group["rows"] if "skipped" not in r}
        assert {"torch.amp", "mixprec"} <= ran
        if group["precision"] != "fp16-mixed":  # where installed, the peers ran
            assert {p for p, ok in have.items() if ok} <= ran
        assert all(_ratio_ok(s) for s in group["mixprec_versus"].values())
    mem = [r["memory"] for g in peers["results"] for r in g["rows"] if "memory" in r]
    assert mem and all(_positive(m["peak_rss_bytes"]) for m in mem)

    for r in docs["overhead"]["results"]:
        assert _ratio_ok(r["ratio"]) and r["parameters_bitwise_equal"]
    assert all(_ratio_ok(r["ratio"]) for r in docs["monitor_overhead"]["results"])
    for r in docs["emulation"]["results"]:
        assert _ratio_ok(r["ratio_to_fp32"])
        if r["mode"].startswith("emulate:"):
            assert _ratio_ok(r["ratio_to_native_fp16"])
    a = docs["autotune_cost"]
    assert _positive(a["autotune_s"]) and _positive(a["train_s"]) and _positive(a["fraction_of_training"])
    m = docs["memory"]
    assert all(_positive(r["peak_rss_bytes"]) for per in m["peak"].values() for r in per.values() if "error" not in r)
    by_mode = {r["precision"]: r for r in m["breakdown"]}
    assert by_mode["fp32"]["weights"] == 4.0 and by_mode["bf16-true"]["master_weights"] == 4.0
    for pt in docs["scaling"]["points"]:
        assert _positive(pt["flops_per_step"])
        for prec, r in pt["precisions"].items():
            assert _positive(r["step_s"]["median"]) and (prec == "fp32" or _ratio_ok(r["speedup_over_fp32"]))
    assert len(docs["scaling"]["points"]) == 5
    s = docs["speedup"]
    assert s["rows"][0]["recipe"] == "lm" and s["rows"][1]["emulated"] and s["rows"][1]["ceiling"] is None

    md = (out / "benchmarks.md").read_text()
    for title in ("Where mixprec stands", "Targets", "Side by side with the peers", "Monitor overhead", "Memory",
                  "Scaling", "Autotune", "The GPU run", "python benchmarks/run_all.py --smoke"):
        assert title in md, title
    assert json.loads((out / "run_all.json").read_text())["failed"] == []


# -- the GPU script on a CPU ------------------------------------------------------------------
@pytest.mark.timeout(600)
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_sh_smoke_on_cpu(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--smoke", "--out", str(out)], cwd=REPO,
                          env=_env(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "gpu_probe.json").read_text())["schema"] == "mixprec.probe/1"
    doc = json.loads((out / "gpu.json").read_text())
    assert doc["schema"] == "mixprec.bench.gpu_lm/1" and _positive(doc["flops_per_step"])
    rows = {r["precision"]: r for r in doc["results"]}
    assert set(rows) == {"fp32", "tf32", "bf16-mixed", "fp16-mixed", "fp8-mixed"}
    if not doc["environment"]["device"].startswith("cuda"):
        assert "skipped" in rows["tf32"] and "skipped" in rows["fp8-mixed"]
    for name in ("fp32", "bf16-mixed"):
        assert _positive(rows[name]["tokens_per_s"]) and _positive(rows[name]["mfu_measured_peak"])
    assert "| precision |" in (out / "gpu.md").read_text()
    bad = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--nonsense"], cwd=REPO, env=_env(tmp_path),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--nonsense" in bad.stderr
