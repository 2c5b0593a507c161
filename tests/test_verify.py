"""Training verification against an fp32 reference (the first part of issue 5)."""

from __future__ import annotations

import json
import warnings

import pytest

import mixprec
from mixprec.jsonio import json_safe
from mixprec.recipes.lm import lm
from mixprec.runs.verify import render_markdown, render_verify, verify
from tasks.planted import overflow_task

TINY = dict(n_layer=1, d_model=64, n_head=2, seq_len=64, batch_size=8)
pytestmark = pytest.mark.filterwarnings("ignore:fp16 on this CPU")


def test_bf16_passes_on_the_lm_recipe_with_the_noise_floor():
    doc = verify(lm(**TINY), "bf16-mixed", steps=30, noise_floor=True)
    assert doc["schema"] == "mixprec.verify/1" and doc["verdict"] == "PASS", doc["reasons"]
    assert doc["tolerances"]["mode"] == "noise_floor"
    floor = doc["noise_floor"]["final_loss"]["rel"]
    assert floor is not None and floor > 0  # two fp32 runs do drift apart
    assert doc["comparison"]["final_loss"]["rel"] < floor  # bf16 drifts less than that
    assert "seed-to-seed" in doc["reasons"][0]
    assert set(doc["comparison"]["metrics"]) == {"val_loss", "perplexity"}
    json.dumps(json_safe(doc), allow_nan=False)  # strict JSON
    assert "PASS" in render_verify(doc) and "# mixprec verify: PASS" in render_markdown(doc)


def test_static_fp16_fails_naming_the_planted_module():
    doc = verify(overflow_task(), "fp16-mixed", steps=20)
    assert doc["verdict"] == "FAIL"
    assert "`amp`" in doc["reasons"][0]
    assert doc["candidate_run"]["localizations"][0]["forward"]["module"] == "amp"


def test_same_arithmetic_gives_zero_difference():
    # fp32 with a power-of-two loss scale does exactly fp32's arithmetic: a different policy, same bits.
    scaled = mixprec.Policy.from_dict({"mode": "fp32", "scaler": {"enabled": True}})
    doc = verify(lm(**TINY), scaled, steps=12)
    assert doc["verdict"] == "PASS"
    assert doc["comparison"]["final_loss"]["rel"] == 0.0
    assert doc["comparison"]["max_step_rel"] == 0.0
    assert all(v == 0.0 for v in doc["comparison"]["weights"].values())
    grads = doc["comparison"]["gradients"]
    assert all(v == 0.0 for row in grads["rel_norm_diff"] for v in row)  # the very same gradients
    assert grads["min_cosine"] == pytest.approx(1.0, abs=1e-12)


def test_gradient_agreement_is_sampled_per_module():
    doc = verify(lm(**TINY), "bf16-mixed", steps=20)
    mem = doc["memory"]
    assert mem["state_ratio"] == 1.0  # mixed precision keeps fp32 weights, grads, optimizer state
    assert 0.3 < mem["activation_ratio"] < 1.0  # bf16 activations are saved for backward
    grads = doc["comparison"]["gradients"]
    assert grads["steps"][0] == 1 and grads["steps"][-1] == 20 and len(grads["steps"]) == 11
    assert {"lm_head", "blocks.0.attn.qkv", "tok_emb"} <= set(grads["modules"])
    assert all(len(row) == len(grads["steps"]) for row in grads["cosine"])
    assert 0.99 < grads["min_cosine"] < 1.0  # bf16 rounds: close to fp32's gradients, not equal
    weights = doc["comparison"]["weights_over_steps"]
    assert weights["steps"] == grads["steps"]
    assert all(row[0] == 0.0 for row in weights["rel_divergence"])  # the same initial weights
    qkv = weights["rel_divergence"][weights["modules"].index("blocks.0.attn.qkv")]
    assert 0 < qkv[1] < qkv[-1] < 0.1  # drifting apart slowly, as rounding accumulates


def test_absolute_tolerance_can_fail():
    doc = verify(lm(**TINY), "bf16-mixed", steps=12, loss_tolerance=1e-9, metric_tolerance=1e-9)
    assert doc["verdict"] == "FAIL" and "beyond" in doc["reasons"][0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(candidate="fp32"), "equals the reference"),
    (dict(candidate="bf16-mixed", steps=5), "steps >= 10"),
    (dict(candidate="bf16-mixed", loss_tolerance=0), "loss_tolerance must be a number > 0"),
])
def test_bad_input(kwargs, message):
    candidate = kwargs.pop("candidate")
    with pytest.raises(mixprec.UsageError, match=message):
        verify(lm(**TINY), candidate, **kwargs)


def test_cli_verify_writes_the_report_and_exit_codes(tmp_path, invoke):
    tiny = [a for k, v in TINY.items() if k != "batch_size" for a in ("--task-arg", f"{k}={v}")]
    rc, out, err = invoke(["verify", *tiny, "--precision", "bf16", "--steps", "12", "--report", str(tmp_path / "r"),
                           "--json", str(tmp_path / "v.json")])
    assert rc == 0, err
    assert "-> PASS" in out
    assert json.loads((tmp_path / "r" / "report.json").read_text())["verdict"] == "PASS"
    assert (tmp_path / "r" / "report.md").read_text().startswith("# mixprec verify: PASS")
    rc, out, _ = invoke(["verify", "tasks.planted:overflow_task", "--precision", "fp16-mixed", "--steps", "12"])
    assert rc == 1 and "FAIL" in out and "`amp`" in out


def test_cli_verify_refuses_a_foreign_report_dir(tmp_path, invoke):
    (tmp_path / "notes.txt").write_text("mine")
    rc, _, err = invoke(["verify", "--precision", "bf16-mixed", "--steps", "12", "--report", str(tmp_path)])
    assert rc == 2 and "holds other files (notes.txt)" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "notes.txt").read_text() == "mine"
    rc, _, err = invoke(["verify", "--precision", "fp32", "--steps", "12"])
    assert rc == 2 and "equals the reference" in err
