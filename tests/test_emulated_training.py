"""Emulated low-precision training end to end: ``emulate:fp16-mixed`` flags the planted
overflow where native fp16 does (dtype propagation: ``linear(x) * 2e5`` overflows in the
emulated fp16 tensor as in the native one), the adaptive controller cures it by demoting
just that module, and the lm recipe trains under emulated fp16 and fp8.
"""

from __future__ import annotations

import math
import statistics
import warnings

import pytest

import mixprec
from mixprec.recipes.lm import lm
from tasks.planted import overflow_task

TINY_LM = dict(n_layer=1, d_model=32, n_head=2, seq_len=32, batch_size=4)


def _first_forward(result: dict) -> dict:
    locs = result["localizations"]
    assert locs, result["diagnosis"]
    return locs[0]["forward"]


def test_emulated_fp16_flags_the_planted_overflow_like_native_fp16():
    emulated = mixprec.train(overflow_task(), "emulate:fp16-mixed", steps=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 on a CPU without fast fp16 kernels
        native = mixprec.train(overflow_task(), "fp16-mixed", steps=40)

    for result in (emulated, native):
        assert result["status"] == "diverged", result["diagnosis"]
        assert result["steps"] < 40
        assert "amp" in result["diagnosis"]
    em, nat = _first_forward(emulated), _first_forward(native)
    assert em["module"] == nat["module"] == "amp"
    assert em["step"] == nat["step"] == 1
    assert em["input_nonfinite"] == nat["input_nonfinite"] == 0  # it arose in `amp`
    # The same elements overflow (up to the odd last-bit difference of the two matmuls).
    assert abs(em["output_nonfinite"] - nat["output_nonfinite"]) <= 0.01 * nat["output_nonfinite"]
    assert emulated["steps"] == native["steps"]


def test_adaptive_controller_demotes_exactly_the_overflowing_module():
    policy = mixprec.policy_from_options("emulate:fp16-mixed", controller="adaptive")
    result = mixprec.train(overflow_task(), policy, steps=40)
    assert result["status"] == "completed", result["diagnosis"]
    assert result["steps"] == 40
    assert [d["module"] for d in result["decisions"]] == ["amp"]
    assert result["decisions"][0]["to_format"] == "fp32"
    assert result["policy"]["controller_fp32_modules"] == ["amp"]
    assert _first_forward(result)["module"] == "amp"
    finite = [l for l in result["losses"] if l is not None and math.isfinite(l)]
    assert len(finite) >= 38 and finite[-1] < finite[0]


def _falling(losses: list) -> tuple[float, float]:
    assert all(l is not None and math.isfinite(l) for l in losses), losses
    return statistics.mean(losses[:5]), statistics.mean(losses[-5:])


def test_emulated_fp16_trains_the_tiny_lm():
    result = mixprec.train(lm(**TINY_LM), "emulate:fp16-mixed", steps=30)
    assert result["status"] == "completed", result["diagnosis"]
    assert not result["skipped_steps"]
    first, last = _falling(result["losses"])
    assert last < first - 0.5, (first, last)
    modules = result["policy"]["modules"]
    assert modules and set(modules.values()) == {"emulated:fp16"}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_emulated_fp8_trains_the_tiny_lm():
    result = mixprec.train(lm(**TINY_LM), "emulate:fp8-mixed", steps=20)
    assert result["status"] == "completed", result["diagnosis"]
    first, last = _falling(result["losses"])
    assert last < first - 0.3, (first, last)
