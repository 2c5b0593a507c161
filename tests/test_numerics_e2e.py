"""Monitor, localization and controllers through the train run and the CLI (issue 3's tests)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import mixprec
from mixprec import checkpoint
from mixprec.cli import main
from mixprec.monitor import load_records
from tasks.planted import nan_task, overflow_task, underflow_task

pytestmark = pytest.mark.filterwarnings("ignore:fp16 on this CPU")


def _train(task, policy, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mixprec.train(task, policy, **kwargs)


def test_static_fp16_stops_naming_the_overflowing_module(tmp_path, capsys):
    rc = main(["train", "tasks.planted:overflow_task", "--precision", "fp16-mixed", "--steps", "40",
               "--no-progress", "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr()
    assert rc == 1
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["status"] == "diverged"
    assert doc["localizations"][0]["forward"]["module"] == "amp"
    assert "`amp` (Amplifier, float16)" in doc["diagnosis"]
    assert "DIVERGED" in out.out and "`amp`" in out.out
    assert doc["steps"] < 40  # stopped instead of training on


def test_adaptive_fp16_demotes_exactly_that_module_and_matches_fp32():
    steps = 60
    reference = _train(overflow_task(), "fp32", steps=steps)
    adaptive = _train(overflow_task(), mixprec.policy_from_options("fp16-mixed", controller="adaptive"), steps=steps)
    assert adaptive["status"] == "completed"
    demoted = [(d["module"], d["to_format"]) for d in adaptive["decisions"]]
    assert demoted == [("amp", "fp32")]
    assert len(adaptive["skipped_steps"]) <= 3
    assert abs(adaptive["eval"]["accuracy"] - reference["eval"]["accuracy"]) <= 0.01
    assert adaptive["policy"]["controller_fp32_modules"] == ["amp"]
    assert adaptive["policy"]["modules"]["amp.linear"] == "fp32"
    assert adaptive["policy"]["modules"]["fc1"] == "autocast:fp16"
    assert 0 < adaptive["low_precision_flop_share"] < 1


def test_monitor_summary_ranks_the_planted_module_first():
    # bf16 does not overflow, but measured against fp16 the amplifier is the risk.
    result = _train(overflow_task(), "bf16-mixed", steps=12, monitor_every=4, monitor_formats=["fp16"])
    risk = result["monitor"]["summary"]["overflow_risk"]
    assert result["monitor"]["formats"] == ["bf16", "fp16"]
    assert risk[0]["module"] == "amp"
    assert result["status"] == "completed" and not result["skipped_steps"]


def test_underflowing_gradients_reported_and_fixed_by_loss_scaling():
    unscaled = mixprec.Policy.from_dict({"mode": "fp16-mixed", "scaler": {"enabled": False}})
    plain = _train(underflow_task(), unscaled, steps=40, monitor_every=10)
    assert min(row["underflow"] for row in plain["monitor"]["summary"]["grad_underflow"]) > 0.9

    reference = _train(underflow_task(), "fp32", steps=40)
    scaled = _train(underflow_task(), "fp16-mixed", steps=40, monitor_every=10)
    assert scaled["status"] == "completed" and not scaled["skipped_steps"]
    assert max(row["underflow"] for row in scaled["monitor"]["summary"]["grad_underflow"]) < 0.1
    assert scaled["eval"]["mse"] == pytest.approx(reference["eval"]["mse"], rel=0.01)


@pytest.mark.parametrize("depth", [0, 4, 9])
def test_localization_names_the_planted_nan_at_any_depth(depth):
    result = _train(nan_task(depth=depth, from_step=3), "bf16-mixed", steps=6, monitor_every=1000)
    assert result["status"] == "diverged"
    first = result["localizations"][0]
    assert first["step"] == 3  # an unsampled step: localized by replay
    assert first["forward"]["module"] == str(2 * depth)  # the PoisonAfter module's index
    assert first["forward"]["type"] == "PoisonAfter"


def test_warmup_decision_sequence():
    policy = mixprec.Policy.from_dict({"mode": "bf16-mixed", "controller": {"name": "warmup", "warmup_steps": 3}})
    result = _train(overflow_task(gain=1.0), policy, steps=6)
    assert [(d["step"], d["module"], d["from_format"], d["to_format"]) for d in result["decisions"]] == [
        (0, "*", "bf16", "fp32"), (3, "*", "fp32", "bf16")]
    assert result["policy"]["all_fp32"] is False


def test_progressive_starts_in_fp32_and_promotes_least_risky_first():
    policy = mixprec.Policy.from_dict({"mode": "bf16-mixed", "controller": {
        "name": "progressive", "promote_every": 2, "promote_fraction": 0.25}})
    result = _train(overflow_task(gain=1.0), policy, steps=12, monitor_every=1)
    start = [d for d in result["decisions"] if d["step"] == 0]
    assert {d["module"] for d in start} == {"fc1", "amp.linear", "norm", "head"}
    assert all(d["to_format"] == "fp32" for d in start)
    promotions = [d for d in result["decisions"] if d["to_format"] == "bf16"]
    assert promotions and promotions[0]["step"] == 2
    assert len(promotions) == 4  # all four promoted by the end
    assert result["policy"]["controller_fp32_modules"] == []


def test_controller_state_survives_checkpoint_and_resume(tmp_path):
    policy = mixprec.policy_from_options("fp16-mixed", controller="adaptive")
    kwargs = dict(monitor_every=5)
    full = _train(overflow_task(), policy, steps=16, checkpoint_dir=tmp_path / "full", **kwargs)
    _train(overflow_task(), policy, steps=7, checkpoint_dir=tmp_path / "cut", **kwargs)
    resumed = _train(overflow_task(), policy, steps=16, checkpoint_dir=tmp_path / "cut", resume=True, **kwargs)
    assert resumed["decisions"] == full["decisions"]
    assert resumed["policy"]["controller_fp32_modules"] == ["amp"]
    a, b = checkpoint.load(tmp_path / "full" / "last.pt"), checkpoint.load(tmp_path / "cut" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert json.dumps(resumed["losses"]) == json.dumps(full["losses"])  # NaN-aware equality


def test_run_dir_jsonl_tensorboard_and_inspect(tmp_path, capsys):
    run_dir, tb = tmp_path / "run", tmp_path / "tb"
    rc = main(["train", "tasks.planted:overflow_task", "--precision", "fp16-mixed", "--controller", "adaptive",
               "--steps", "10", "--monitor-every", "5", "--run-dir", str(run_dir), "--tensorboard", str(tb),
               "--no-progress"])
    assert rc == 0
    records = load_records(run_dir / "monitor.jsonl")
    assert [r["step"] for r in records] == [1, 5, 10]  # step 1 (skipped, sampled) then every 5
    assert all(r["schema"] == "mixprec.monitor/1" for r in records)
    assert list(tb.iterdir()), "no TensorBoard event files"
    capsys.readouterr()

    assert main(["inspect", str(run_dir), "--json", str(tmp_path / "inspect.json")]) == 0
    text = capsys.readouterr().out
    assert "amp" in text and "controller decisions (1)" in text
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["schema"] == "mixprec.inspect/1"
    assert report["decisions"][0]["module"] == "amp"


def test_a_fresh_run_refuses_an_existing_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["train", "tasks.planted:overflow_task", "--steps", "2", "--run-dir", str(run_dir), "--no-progress"]
    assert main(args) == 0
    before = (run_dir / "monitor.jsonl").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and len(err.strip().splitlines()) == 1
    assert (run_dir / "monitor.jsonl").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--controller", "adaptive", "--precision", "bf16-true"], "needs fp16-mixed or bf16-mixed"),
    (["--controller", "adaptive", "--precision", "fp16-mixed", "--monitor-every", "0"], "needs it"),
    (["--controller", "sometimes"], "invalid choice: 'sometimes'"),
    (["--monitor-every", "-1"], "expected an integer >= 0"),
    (["--monitor-formats", "fp12"], "fp12"),
])
def test_bad_numerics_flags_exit_2(args, message, invoke):
    rc, _, err = invoke(["train", "tasks.planted:overflow_task", "--steps", "2", "--no-progress", *args])
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_inspect_of_a_directory_that_is_no_run_dir(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "is not a run dir" in capsys.readouterr().err
