"""Sensitivity, autotune and `--precision auto`, and the probe/autotune CLI."""

from __future__ import annotations

import json
import warnings

import pytest

import mixprec
from mixprec.autotune import autotune, keep_list, parse_candidates, render_autotune
from mixprec.recipes.lm import lm
from mixprec.sensitivity_analysis import render_sensitivity, sensitivity
from tasks.planted import overflow_task

pytestmark = pytest.mark.filterwarnings("ignore:fp16 on this CPU")


def fake_probe(**ratios: float) -> dict:
    """A probe document with the given matmul ratios to fp32 (None: unavailable)."""
    matmul = {"fp32": {"available": True, "ratio_to_fp32": 1.0}}
    for fmt, ratio in ratios.items():
        matmul[fmt] = ({"available": False, "ratio_to_fp32": None, "reason": "not on this machine"} if ratio is None
                       else {"available": True, "ratio_to_fp32": ratio})
    return {"fingerprint": "test", "matmul": matmul, "recommended": "bf16-mixed", "why": "test", "fast": [],
            "slow": [], "pitfalls": []}


def test_sensitivity_ranks_the_planted_module_first():
    doc = sensitivity(overflow_task(), "fp16", batches=2)
    assert doc["schema"] == "mixprec.sensitivity/1"
    first = doc["modules"][0]
    assert first["module"] == "amp" and first["finite"] is False and first["range_ratio"] > 1
    rest = {r["module"]: r for r in doc["modules"][1:]}
    assert rest["amp.linear"]["finite"] and rest["amp.linear"]["grad_cosine"] > 0.999
    assert rest["fc1"]["output_sqnr_db"] > 40
    assert "amp" in render_sensitivity(doc)


def test_sensitivity_native_bf16_runs_every_module():
    doc = sensitivity(lm(n_layer=1, d_model=32, n_head=2, seq_len=32, batch_size=4), "bf16", batches=1)
    assert doc["emulated"] is False  # this CPU has fast bf16
    assert {r["module"] for r in doc["modules"]} >= {"lm_head", "blocks.0.attn", "blocks.0.attn.qkv"}
    assert all(r["finite"] and 0.99 < r["grad_cosine"] <= 1.0 for r in doc["modules"])


def test_keep_list_takes_the_innermost_failing_modules():
    rows = [
        {"module": "block", "finite": False, "range_ratio": 2.0, "loss_rel_change": None},
        {"module": "block.fc", "finite": False, "range_ratio": 2.0, "loss_rel_change": None},
        {"module": "amp", "finite": True, "range_ratio": 3.0, "loss_rel_change": 0.0},
        {"module": "amp.linear", "finite": True, "range_ratio": 0.1, "loss_rel_change": 0.0},
        {"module": "head", "finite": True, "range_ratio": 0.1, "loss_rel_change": 0.5},
        {"module": "ok", "finite": True, "range_ratio": 0.1, "loss_rel_change": 0.001},
    ]
    assert keep_list(rows, budget=0.02) == ["amp", "block.fc", "head"]


def test_autotune_with_fp16_only_keeps_exactly_the_planted_module(tmp_path):
    doc = autotune(overflow_task(), candidates="fp16-mixed", probe_doc=fake_probe(fp16=0.03), confirm_steps=20)
    assert doc["chosen"] == "fp16-mixed"
    assert doc["candidates"][0]["keep_fp32"] == ["amp"]
    assert doc["policy"]["rules"] == [{"match": "amp", "format": "fp32"}]
    assert doc["candidates"][0]["confirmation"]["passed"]
    policy = mixprec.Policy.from_dict(doc["policy"])
    policy.save(tmp_path / "p.yaml")
    assert mixprec.Policy.from_file(tmp_path / "p.yaml") == policy
    assert "fp16-mixed" in render_autotune(doc) and "amp" in render_autotune(doc)


def test_autotune_prefers_bf16_over_fp16_that_the_probe_measured_slow(monkeypatch):
    # Timing is the machine's business (and noisy on a shared one); the decision logic is
    # tested with fixed timings: fp16 is never timed because the probe measured it slow.
    import mixprec.autotune as tune

    timed = []
    monkeypatch.setattr(tune, "measure_speedup",
                        lambda task, policy, *a: timed.append(policy.mode) or (0.10, 0.07, 1.43))
    task = lm(n_layer=1, d_model=32, n_head=2, seq_len=32, batch_size=4)
    doc = autotune(task, candidates="bf16-mixed,fp16-mixed", probe_doc=fake_probe(bf16=2.8, fp16=0.03),
                   confirm_steps=10)
    rows = {r["mode"]: r for r in doc["candidates"]}
    assert "slow on this hardware" in rows["fp16-mixed"]["why"] and rows["fp16-mixed"]["speedup"] is None
    assert timed == ["bf16-mixed"]
    assert doc["chosen"] == "bf16-mixed" and "1.43x fp32" in doc["why"]


def test_autotune_rejects_a_candidate_slower_than_fp32_for_this_model(monkeypatch):
    import mixprec.autotune as tune

    monkeypatch.setattr(tune, "measure_speedup", lambda task, policy, *a: (0.10, 0.12, 0.83))
    task = lm(n_layer=1, d_model=32, n_head=2, seq_len=32, batch_size=4)
    doc = autotune(task, candidates="bf16-mixed,fp16-mixed", probe_doc=fake_probe(bf16=2.8, fp16=0.03))
    assert doc["chosen"] == "fp32"
    assert "no faster than fp32" in doc["candidates"][0]["why"]


def test_measure_speedup_is_interleaved_and_positive():
    from mixprec.autotune import measure_speedup

    fp32_s, cand_s, speedup = measure_speedup(lm(n_layer=1, d_model=32, n_head=2, seq_len=32, batch_size=4),
                                              mixprec.Policy("bf16-mixed"), 3, 0, "cpu")
    assert fp32_s > 0 and cand_s > 0 and speedup > 0


def test_autotune_rejects_what_the_hardware_cannot_run():
    doc = autotune(overflow_task(), candidates="fp8-mixed", probe_doc=fake_probe(fp8_e4m3=None), confirm_steps=5)
    assert doc["chosen"] == "fp32"
    assert "cannot run fp8_e4m3" in doc["candidates"][0]["why"]


@pytest.mark.parametrize("bad, message", [("fp12", "unknown precision 'fp12'"), ("fp16-true", "not one it can choose"),
                                          ("", "no autotune candidates")])
def test_bad_candidates(bad, message):
    with pytest.raises(mixprec.UsageError, match=message):
        parse_candidates(bad if bad else [])


def test_bad_budget_and_diverging_fp32_task():
    with pytest.raises(mixprec.UsageError, match="budget must be a number > 0"):
        autotune(overflow_task(), budget=-1, probe_doc=fake_probe(bf16=2.0))
    with pytest.raises(mixprec.UsageError, match="not finite in fp32"):
        sensitivity(overflow_task(gain=float("inf")), "bf16")


def test_cli_autotune_writes_a_policy_train_loads(tmp_path, invoke, monkeypatch):
    import mixprec.probe as probe_mod

    monkeypatch.setattr(probe_mod, "probe", lambda *a, **k: fake_probe(fp16=0.03))
    out = tmp_path / "policy.yaml"
    rc, text, err = invoke(["autotune", "tasks.planted:overflow_task", "--candidates", "fp16-mixed", "-o", str(out),
                            "--json", str(tmp_path / "tune.json")])
    assert rc == 0, err
    assert "chosen: fp16-mixed" in text
    assert json.loads((tmp_path / "tune.json").read_text())["schema"] == "mixprec.autotune/1"
    rc, text, err = invoke(["train", "tasks.planted:overflow_task", "--policy", str(out), "--steps", "5", "--no-progress"])
    assert rc == 0, err
    assert "fp16-mixed, fp32: amp" in text


def test_cli_precision_auto_runs_autotune_first_and_says_so(tmp_path, invoke, monkeypatch):
    import mixprec.probe as probe_mod

    monkeypatch.setattr(probe_mod, "probe", lambda *a, **k: fake_probe(fp16=0.03))
    monkeypatch.setattr(probe_mod, "default_cache_dir", lambda: tmp_path)
    args = ["train", "tasks.planted:overflow_task", "--precision", "auto", "--candidates", "fp16-mixed",
            "--steps", "5", "--no-progress", "--json", str(tmp_path / "out.json")]
    rc, text, err = invoke(args)
    assert rc == 0, err
    assert "precision auto -> fp16-mixed, fp32: amp" in text
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["policy"]["mode"] == "fp16-mixed" and doc["policy"]["fp32_modules"] == ["amp"]
    rc, text, _ = invoke(args)  # second time: from the cache
    assert rc == 0 and "autotune result cached in" in text


def test_cli_probe_json(tmp_path, invoke, monkeypatch):
    import mixprec.probe as probe_mod

    monkeypatch.setattr(probe_mod, "default_cache_dir", lambda: tmp_path)
    rc, text, err = invoke(["probe", "--quick", "--json", "-"])
    assert rc == 0, err
    doc = json.loads(text)
    assert doc["schema"] == "mixprec.probe/1" and doc["matmul"]["fp32"]["ratio_to_fp32"] == 1.0
    assert "environment" in doc and doc["recommended"]


@pytest.mark.parametrize("args, message", [
    (["autotune", "lm", "--budget", "0"], "expected a finite number > 0"),
    (["autotune", "lm", "--candidates", "fp12"], "unknown precision 'fp12'"),
    (["train", "--precision", "auto", "--candidates", "fp16-true", "--steps", "1"], "not one it can choose"),
])
def test_bad_autotune_flags_exit_2(args, message, invoke):
    rc, _, err = invoke(args)
    assert rc == 2 and message in err and "Traceback" not in err
