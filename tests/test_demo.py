"""`mixprec demo` (mixprec.demo.run_demo): probe -> autotune -> verify -> one table and a report."""

from __future__ import annotations

import json

import pytest
import torch

import mixprec.probe
from mixprec.autotune import TUNABLE
from mixprec.demo import DEMO_SCHEMA, _pick_candidate, measure_memory, prepare_report_dir, render_demo, run_demo
from mixprec.errors import UsageError
from mixprec.recipes.lm import lm

pytestmark = pytest.mark.filterwarnings("ignore:fp16 on this CPU")

TINY = {"n_layer": 1, "d_model": 32, "n_head": 2, "seq_len": 32, "batch_size": 4}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The probe and autotune cache (probe.default_cache_dir) in a temp dir, not the user's."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mixprec.probe, "default_cache_dir", lambda: path)
        yield path


@pytest.fixture(scope="module")
def demo(cache_dir, tmp_path_factory):
    report = tmp_path_factory.mktemp("demo") / "report"
    return run_demo(quick=True, report_dir=report, task_args=TINY), report


def test_quick_demo_runs_end_to_end(demo, cache_dir):
    doc, report = demo
    assert doc["schema"] == DEMO_SCHEMA
    assert {"mixprec", "torch", "python", "device_name", "threads"} <= set(doc["environment"])
    assert doc["task"]["name"] == "lm" and doc["task"]["args"] == TINY
    assert doc["chosen"]["mode"] in ("fp32", *TUNABLE)
    assert doc["chosen"]["verified"] in TUNABLE  # always a mixed mode: that is the demo's point
    assert doc["chosen"]["source"] in ("autotune", "probe", "default")
    assert doc["verify"]["candidate"]["mode"] == doc["chosen"]["verified"]
    assert doc["verdict"] in ("PASS", "FAIL") and doc["verdict"] == doc["verify"]["verdict"]
    assert doc["verify"]["noise_floor"] is not None
    assert doc["speed"]["speedup"] is not None and doc["speed"]["speedup"] > 0
    # The probe's cache went to the patched directory, not the user's.
    assert list(cache_dir.glob("probe-*.json"))


def test_quick_demo_writes_the_report(demo):
    doc, report = demo
    for name in ("report.json", "report.md", "demo.json"):
        assert (report / name).is_file(), name
    assert json.loads((report / "report.json").read_text())["schema"] == "mixprec.verify/1"
    assert json.loads((report / "demo.json").read_text())["schema"] == DEMO_SCHEMA
    assert doc["report"]["markdown"] == str(report / "report.md")
    try:
        from mixprec.report import write_report  # noqa: F401
    except ImportError:
        assert doc["report"]["html"] is None and doc["report"]["html_error"]
    else:
        assert (report / "report.html").is_file() and doc["report"]["html"] == str(report / "report.html")


def test_render_demo_is_one_table_with_the_verdict(demo):
    doc, report = demo
    text = render_demo(doc)
    assert doc["verdict"] in text and "fp32" in text and doc["chosen"]["verified"] in text
    for row in ("step time", "weights+grads+optimizer", "activations saved", "final loss", "val_loss", "verdict"):
        assert row in text, row
    assert str(report / "report.md") in text
    failed = dict(doc, verdict="FAIL", reasons=["final loss differs by 9.00% from the reference"])
    assert "FAIL" in render_demo(failed) and "9.00%" in render_demo(failed)
    busy = dict(doc, speed=dict(doc["speed"], busy=True, other_cpu_load=1.5))
    assert "machine busy" in render_demo(busy)


def test_memory_is_counted_from_the_tensors():
    task = lm(**TINY)
    fp32 = measure_memory(task, "fp32")
    bf16 = measure_memory(task, "bf16-mixed")
    # fp32 AdamW: 4 B weights + 4 B grads + 8 B moments per parameter (plus a step counter).
    assert 16.0 <= fp32["state_bytes_per_parameter"] < 16.1
    assert bf16["state_bytes"] == fp32["state_bytes"]  # mixed keeps fp32 weights: no saving
    assert 0 < bf16["activation_bytes"] < fp32["activation_bytes"]
    assert fp32["batch_shape"] == [4, 32] and fp32["step"] == "stepped"


def test_memory_counts_optimizer_state_when_fp16_skips_its_first_steps():
    # A loss of 1e4 overflows fp16 at the initial scale of 2**16: the first steps skip, and
    # the optimizer's moments appear only once a step is taken (they must still be counted).
    from mixprec import Task

    def build_model():
        torch.manual_seed(0)
        return torch.nn.Linear(16, 16)

    task = Task(name="overflow", build_model=build_model,
                build_optimizer=lambda m: torch.optim.Adam(m.parameters()),
                train_batches=lambda seed: iter(lambda: torch.ones(4, 16), None),
                loss=lambda model, x: model(x).float().square().mean() * 1e4)
    fp32 = measure_memory(task, "fp32")
    doc = measure_memory(task, "emulate:fp16-mixed")
    assert doc["step"] == "stepped" and doc["skipped_before_stepping"] >= 1
    assert doc["optimizer_state_bytes"] == fp32["optimizer_state_bytes"] > 0


def _tuned(chosen, rows):
    return {"chosen": chosen, "why": "test", "candidates": rows,
            "policy": {"schema": "mixprec.policy/1", "mode": chosen, "rules": [{"match": "lm_head", "format": "fp32"}]}}


def test_the_demo_verifies_a_mixed_mode_even_when_autotune_keeps_fp32():
    bf16 = {"mode": "bf16-mixed", "keep_fp32": ["lm_head"], "speedup": 0.9, "why": "no faster than fp32 (0.90x)"}
    policy, chosen = _pick_candidate(_tuned("bf16-mixed", [bf16]), {"recommended": "bf16-mixed"})
    assert policy.mode == "bf16-mixed" and chosen["source"] == "autotune" and [str(r) for r in policy.rules] == ["lm_head"]

    policy, chosen = _pick_candidate(_tuned("fp32", [bf16]), {"recommended": "bf16-mixed"})
    assert policy.mode == "bf16-mixed" and chosen["source"] == "probe" and chosen["mode"] == "fp32"
    assert [str(r) for r in policy.rules] == ["lm_head"]  # autotune's keep-list for that mode
    assert "did not find bf16-mixed faster" in chosen["note"] and "0.90x" in chosen["note"]

    policy, chosen = _pick_candidate(_tuned("fp32", []), {"recommended": "fp32"})
    assert policy.mode == "bf16-mixed" and chosen["source"] == "default" and not policy.rules


def test_bad_input_is_refused_before_any_work(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds other files"):
        run_demo(quick=True, report_dir=tmp_path, task_args=TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(UsageError, match="steps"):
        run_demo(steps=5, report_dir=tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_an_earlier_report_directory_may_be_reused(tmp_path):
    (tmp_path / "demo.json").write_text(json.dumps({"schema": DEMO_SCHEMA}))
    (tmp_path / "report.html").write_text("<html></html>")
    assert prepare_report_dir(tmp_path) == tmp_path
    (tmp_path / "demo.json").write_text(json.dumps({"schema": "something else"}))
    with pytest.raises(UsageError):
        prepare_report_dir(tmp_path)
