"""Controllers: pure decision logic driven by hand-made StepResults and monitor records."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch

from mixprec.controller import (
    AdaptiveController,
    Controller,
    Decision,
    ProgressiveController,
    WarmupController,
    make_controller,
)
from mixprec.engine import NONFINITE_GRAD, NONFINITE_LOSS, StepResult
from mixprec.errors import UsageError
from mixprec.policy import ControllerConfig

FP16_MAX = 65504.0
MODULES = ["embed", "blocks.0.attn", "blocks.0.mlp", "head"]
RISKY = 4e4  # > 0.5 x fp16 max (32752)
CALM = 10.0


def ok(step: int) -> StepResult:
    return StepResult("stepped", step)


def skip(step: int, reason: str = NONFINITE_GRAD) -> StepResult:
    return StepResult("skipped", step, reason=reason)


def entry(amax, *, overflow=0.0, nonfinite=0, input_amax=1.0, underflow=0.0, flush=0.0, fmt="fp16") -> dict:
    return {"type": "Linear", "dtype": "float16", "amax": amax, "mean_abs": None if amax is None else amax / 10,
            "nonfinite": nonfinite, "input_amax": input_amax, "order": 0,
            "formats": {fmt: {"underflow": underflow, "flush": flush, "overflow": overflow}}}


def record(step: int, **modules) -> dict:
    """A monitor record; keyword names use '__' for '.' (blocks__0__attn -> blocks.0.attn)."""
    return {"schema": "mixprec.monitor/1", "step": step, "loss_scale": 65536.0,
            "modules": {name.replace("__", "."): (e if isinstance(e, dict) else entry(e)) for name, e in modules.items()},
            "params": {}}


def controller(name: str, low: str = "fp16", modules=MODULES, **settings) -> Controller:
    ctrl = make_controller(ControllerConfig(name=name, **settings), low, modules)
    ctrl.start()
    return ctrl


def calm_steps(ctrl: Controller, first: int, last: int) -> list[Decision]:
    out = []
    for s in range(first, last + 1):
        out += ctrl.after_step(s, ok(s), None, None)
    return out


# -- static and warmup -------------------------------------------------------------------------


def test_static_never_decides():
    ctrl = make_controller(ControllerConfig(), "fp16", MODULES)
    assert type(ctrl) is Controller and ctrl.name == "static"
    assert ctrl.start() == []
    for s in range(1, 40):
        result = skip(s) if s % 3 == 0 else ok(s)
        rec = record(s, head=RISKY, embed=entry(None, overflow=0.5)) if s % 2 else None
        assert ctrl.after_step(s, result, rec, "head" if s % 3 == 0 else None) == []
    assert ctrl.decisions == [] and ctrl.fp32_modules == frozenset() and not ctrl.all_fp32


@pytest.mark.parametrize("low", ["fp16", "bf16"])
def test_warmup_two_decisions_and_flip(low):
    ctrl = make_controller(ControllerConfig(name="warmup", warmup_steps=3), low, MODULES)
    assert isinstance(ctrl, WarmupController)
    assert not ctrl.all_fp32
    first = ctrl.start()
    assert first == [Decision(0, "*", low, "fp32", "warm-up: first 3 steps in fp32")]
    assert ctrl.all_fp32
    assert ctrl.after_step(1, ok(1), None, None) == [] and ctrl.all_fp32
    assert ctrl.after_step(2, skip(2), record(2, head=RISKY), "head") == [] and ctrl.all_fp32
    over = ctrl.after_step(3, ok(3), None, None)
    assert over == [Decision(3, "*", "fp32", low, "warm-up over")]
    assert not ctrl.all_fp32
    assert calm_steps(ctrl, 4, 30) == []
    assert ctrl.decisions == first + over
    assert ctrl.fp32_modules == frozenset()
    assert over[0].to_dict() == {"step": 3, "module": "*", "from_format": "fp32", "to_format": low,
                                 "reason": "warm-up over"}


def test_accumulated_results_are_not_steps():
    ctrl = controller("warmup", warmup_steps=2)
    assert ctrl.after_step(1, ok(1), None, None) == []
    # an accumulation call in between reports the last finished step again: ignored
    assert ctrl.after_step(1, StepResult("accumulated", 1), record(1, head=RISKY), "head") == []
    assert ctrl.after_step(2, ok(2), None, None) == [Decision(2, "*", "fp32", "fp16", "warm-up over")]


# -- adaptive ----------------------------------------------------------------------------------


def test_adaptive_blamed_skip_demotes_exactly_that_module():
    ctrl = controller("adaptive")
    assert isinstance(ctrl, AdaptiveController)
    assert ctrl.decisions == [] and ctrl.fp32_modules == frozenset()
    got = ctrl.after_step(1, skip(1, NONFINITE_LOSS), None, "blocks.0.mlp")
    assert got == [Decision(1, "blocks.0.mlp", "fp16", "fp32", "non-finite output localized here at step 1")]
    assert ctrl.fp32_modules == {"blocks.0.mlp"}
    assert ctrl.decisions == got
    # a name inside a candidate maps to that candidate
    got = ctrl.after_step(2, skip(2), None, "blocks.0.attn.out_proj")
    assert [(d.module, d.to_format) for d in got] == [("blocks.0.attn", "fp32")]
    assert ctrl.fp32_modules == {"blocks.0.mlp", "blocks.0.attn"}


def test_adaptive_unblamed_or_unknown_blame_demotes_nothing():
    ctrl = controller("adaptive")
    assert ctrl.after_step(1, skip(1), None, None) == []
    assert ctrl.after_step(2, skip(2, NONFINITE_LOSS), None, None) == []
    assert ctrl.after_step(3, skip(3), None, "not_a_candidate") == []
    assert ctrl.after_step(4, skip(4), None, "blocks.0") == []  # a parent is not a candidate either
    assert ctrl.fp32_modules == frozenset() and ctrl.decisions == []


def test_adaptive_hysteresis():
    ctrl = controller("adaptive", hysteresis=2)
    assert ctrl.after_step(1, ok(1), record(1, head=RISKY, embed=CALM), None) == []  # one spike: no
    assert ctrl.after_step(2, ok(2), record(2, head=CALM), None) == []  # calm: resets
    assert ctrl.after_step(3, ok(3), record(3, head=RISKY), None) == []
    assert ctrl.after_step(4, ok(4), None, None) == []  # unsampled steps do not break the streak
    got = ctrl.after_step(5, ok(5), record(5, head=RISKY), None)
    assert got == [Decision(5, "head", "fp16", "fp32", "amax 4.0e+04 > 0.5 x fp16 max on 2 consecutive samples")]
    assert ctrl.fp32_modules == {"head"}


def test_adaptive_overflow_fraction_and_nonfinite_are_risky_but_propagated_input_is_not():
    ctrl = controller("adaptive", hysteresis=2)
    for s in (1, 2):
        got = ctrl.after_step(s, ok(s), record(s, embed=entry(None, overflow=1e-3),
                                               head=entry(float("inf"), nonfinite=5),
                                               blocks__0__mlp=entry(float("nan"), nonfinite=9,
                                                                    input_amax=float("inf"))), None)
    assert {d.module for d in got} == {"embed", "head"}
    assert "overflow fp16" in next(d.reason for d in got if d.module == "embed")
    assert "non-finite output" in next(d.reason for d in got if d.module == "head")
    assert ctrl.fp32_modules == {"embed", "head"}  # blocks.0.mlp only received inf from upstream


def test_adaptive_threshold_uses_the_low_formats_max():
    ctrl = controller("adaptive", low="bf16", hysteresis=1)
    # 4e4 is near fp16's max but tiny for bf16 (~3.4e38)
    assert ctrl.after_step(1, ok(1), record(1, head=entry(RISKY, fmt="bf16")), None) == []
    got = ctrl.after_step(2, ok(2), record(2, head=entry(2e38, fmt="bf16")), None)
    assert [d.module for d in got] == ["head"] and got[0].from_format == "bf16"


def test_adaptive_grad_underflow_alone_demotes_nothing():
    ctrl = controller("adaptive", hysteresis=1)
    for s in range(1, 30):
        rec = record(s, **{m.replace(".", "__"): entry(1e-6, underflow=0.9, flush=0.6) for m in MODULES})
        rec["params"] = {"head.weight": {"grad_underflow": 0.95, "grad_amax": 1e-9}}
        result = skip(s) if s % 4 == 0 else ok(s)  # the scaler's own overflow skips, unblamed
        assert ctrl.after_step(s, result, rec, None) == []
    assert ctrl.decisions == []


def test_adaptive_repromotes_after_cooldown():
    ctrl = controller("adaptive", cooldown_steps=5)
    ctrl.after_step(1, ok(1), None, None)
    assert [d.module for d in ctrl.after_step(2, skip(2), None, "head")] == ["head"]
    assert calm_steps(ctrl, 3, 6) == []
    assert ctrl.fp32_modules == {"head"}
    assert ctrl.after_step(7, ok(7), record(7, head=CALM), None) == [
        Decision(7, "head", "fp32", "fp16", "stable for 5 steps")]
    assert ctrl.fp32_modules == frozenset()


def test_adaptive_cooldown_backs_off_exponentially():
    ctrl = controller("adaptive", cooldown_steps=4, cooldown_growth=2.0, max_demotions=5)
    promotions, s = [], 0
    for _ in range(3):
        s += 1
        assert [d.to_format for d in ctrl.after_step(s, skip(s), None, "embed")] == ["fp32"]
        demoted_at = s
        while True:
            s += 1
            got = ctrl.after_step(s, ok(s), None, None)
            if got:
                assert got[0].to_format == "fp16"
                promotions.append(s - demoted_at)
                break
            assert s < 200
    assert promotions == [4, 8, 16]


def test_adaptive_blame_while_in_fp32_restarts_the_cooldown():
    ctrl = controller("adaptive", cooldown_steps=5)
    ctrl.after_step(1, skip(1), None, "head")
    assert calm_steps(ctrl, 2, 3) == []
    assert ctrl.after_step(4, skip(4), None, "head") == []  # already fp32: not demoted twice
    assert calm_steps(ctrl, 5, 8) == []
    assert [d.step for d in ctrl.after_step(9, ok(9), None, None)] == [9]
    assert [d.to_format for d in ctrl.decisions] == ["fp32", "fp16"]


def test_adaptive_cap_stays_fp32_logged_once():
    ctrl = controller("adaptive", cooldown_steps=2, max_demotions=2)
    ctrl.after_step(1, skip(1), None, "head")
    assert [d.step for d in calm_steps(ctrl, 2, 3)] == [3]  # re-promoted
    final = ctrl.after_step(4, skip(4), None, "head")
    assert len(final) == 1 and final[0].to_format == "fp32"
    assert final[0].reason.endswith("demoted 2 times: stays fp32")
    assert calm_steps(ctrl, 5, 500) == []
    assert ctrl.after_step(501, skip(501), None, "head") == []
    assert ctrl.after_step(502, ok(502), record(502, head=CALM), None) == []
    assert ctrl.fp32_modules == {"head"}
    assert sum("stays fp32" in d.reason for d in ctrl.decisions) == 1
    assert len(ctrl.decisions) == 3


def test_adaptive_no_repromotion_while_amax_is_still_high():
    ctrl = controller("adaptive", cooldown_steps=3, hysteresis=2)
    ctrl.after_step(1, ok(1), record(1, head=RISKY), None)
    assert [d.module for d in ctrl.after_step(2, ok(2), record(2, head=RISKY), None)] == ["head"]
    for s in range(3, 12):  # still observed in fp32, still near overflow: stays
        assert ctrl.after_step(s, ok(s), record(s, head=RISKY), None) == []
    assert ctrl.after_step(12, ok(12), None, None) == []
    assert ctrl.fp32_modules == {"head"}
    assert ctrl.after_step(13, ok(13), record(13, head=CALM), None) == [
        Decision(13, "head", "fp32", "fp16", "stable for 11 steps")]


# -- progressive -------------------------------------------------------------------------------


PROG_MODULES = ["a", "b", "c", "d", "e"]


def test_progressive_starts_in_fp32_and_promotes_least_risky_first():
    ctrl = make_controller(ControllerConfig(name="progressive", promote_every=3, promote_fraction=0.4),
                           "fp16", PROG_MODULES)
    assert isinstance(ctrl, ProgressiveController)
    first = ctrl.start()
    assert first == [Decision(0, m, "fp16", "fp32", "progressive: start in fp32") for m in PROG_MODULES]
    assert ctrl.fp32_modules == set(PROG_MODULES)
    # c is never observed; d is above the threshold (0.5 x fp16 max)
    assert ctrl.after_step(1, ok(1), record(1, a=1e4, b=100.0, d=5e4, e=10.0), None) == []
    assert ctrl.after_step(2, ok(2), None, None) == []
    got = ctrl.after_step(3, ok(3), None, None)
    assert [(d.module, d.from_format, d.to_format) for d in got] == [("e", "fp32", "fp16"), ("b", "fp32", "fp16")]
    assert got[0].reason.startswith("stable for 3 steps")
    assert ctrl.fp32_modules == {"a", "c", "d"}
    assert calm_steps(ctrl, 4, 5) == []
    assert [d.module for d in ctrl.after_step(6, ok(6), None, None)] == ["a", "c"]  # observed before unobserved
    assert "not observed" in ctrl.decisions[-1].reason
    assert calm_steps(ctrl, 7, 15) == []  # d stays while its risk is high
    assert ctrl.fp32_modules == {"d"}
    ctrl.after_step(16, ok(16), record(16, d=1.0), None)  # its risk falls
    assert calm_steps(ctrl, 17, 17) == []
    assert [d.module for d in ctrl.after_step(18, ok(18), None, None)] == ["d"]
    assert ctrl.fp32_modules == frozenset()
    assert len(ctrl.decisions) == 5 + 5


def test_progressive_ties_by_forward_order_and_fraction_rounds_up():
    ctrl = make_controller(ControllerConfig(name="progressive", promote_every=2, promote_fraction=0.3),
                           "bf16", PROG_MODULES)
    ctrl.start()
    ctrl.after_step(1, ok(1), record(1, e=5.0, c=5.0), None)
    got = ctrl.after_step(2, ok(2), None, None)  # ceil(0.3 * 5) = 2
    assert [d.module for d in got] == ["c", "e"]
    assert [d.module for d in ctrl.after_step(3, ok(3), None, None) + ctrl.after_step(4, ok(4), None, None)] \
        == ["a", "b"]


def test_progressive_skip_resets_the_stable_counter():
    ctrl = controller("progressive", modules=PROG_MODULES, promote_every=3, promote_fraction=0.2)
    assert ctrl.after_step(1, ok(1), None, None) == []
    assert ctrl.after_step(2, skip(2), None, None) == []  # unblamed skip: nothing demoted, count restarts
    assert calm_steps(ctrl, 3, 4) == []
    assert [d.module for d in ctrl.after_step(5, ok(5), None, None)] == ["a"]
    assert calm_steps(ctrl, 6, 7) == []
    assert [d.module for d in ctrl.after_step(8, ok(8), None, None)] == ["b"]


def test_progressive_blamed_promoted_module_is_demoted_back():
    ctrl = controller("progressive", modules=PROG_MODULES, promote_every=2, promote_fraction=0.2,
                      cooldown_steps=11)
    calm_steps(ctrl, 1, 2)
    assert ctrl.fp32_modules == {"b", "c", "d", "e"}
    got = ctrl.after_step(3, skip(3), None, "a")
    assert got == [Decision(3, "a", "fp16", "fp32", "non-finite output localized here at step 3")]
    # promotions go on with the others; a waits out its cool-down (11 steps) before it is eligible
    promoted = [(d.step, d.module) for d in calm_steps(ctrl, 4, 13)]
    assert promoted == [(5, "b"), (7, "c"), (9, "d"), (11, "e")]  # round at 13: nothing eligible
    assert ctrl.fp32_modules == {"a"}
    assert calm_steps(ctrl, 14, 14) == []  # cooled at 14, but the next round is at 15
    assert [(d.step, d.module) for d in calm_steps(ctrl, 15, 15)] == [(15, "a")]


# -- resume ------------------------------------------------------------------------------------


def events(n: int, seed: int) -> list[tuple[int, StepResult, dict | None, str | None]]:
    rng = random.Random(seed)
    out = []
    for s in range(1, n + 1):
        r = rng.random()
        blamed = rng.choice(MODULES + ["blocks.0.attn.q", "elsewhere"]) if r < 0.05 else None
        result = skip(s, rng.choice([NONFINITE_GRAD, NONFINITE_LOSS])) if blamed or r < 0.12 else ok(s)
        rec = None
        if rng.random() < 0.4:
            rec = record(s, **{m.replace(".", "__"): (rng.choice([RISKY, CALM, CALM, 3e3, 3e3, None, float("inf")]))
                               for m in MODULES if rng.random() < 0.8})
        out.append((s, result, rec, blamed))
    return out


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    return json.loads(json.dumps(loaded))  # plain containers only, or this raises


@pytest.mark.parametrize("name", ["warmup", "adaptive", "progressive"])
def test_state_dict_roundtrip_gives_identical_future_decisions(name):
    cfg = ControllerConfig(name=name, warmup_steps=150, cooldown_steps=7, max_demotions=6, hysteresis=2,
                           promote_every=5, promote_fraction=0.25)
    evs = events(300, seed=len(name))
    whole = make_controller(cfg, "fp16", MODULES)
    whole.start()
    trace_whole = [(whole.after_step(s, r, rec, b), whole.fp32_modules, whole.all_fp32) for s, r, rec, b in evs]
    assert len(whole.decisions) >= 2  # the sequence exercised the controller
    for mid in (40, 120, 201):
        first = make_controller(cfg, "fp16", MODULES)
        first.start()
        for s, result, rec, blamed in evs[:mid]:
            first.after_step(s, result, rec, blamed)
        resumed = make_controller(cfg, "fp16", MODULES)
        resumed.load_state_dict(roundtrip(first.state_dict()))
        assert resumed.decisions == first.decisions
        assert resumed.fp32_modules == first.fp32_modules and resumed.all_fp32 == first.all_fp32
        with pytest.raises(ValueError, match="increase"):  # it knows where it was
            resumed.after_step(mid, ok(mid), None, None)
        trace_resumed = [(resumed.after_step(s, r, rec, b), resumed.fp32_modules, resumed.all_fp32)
                         for s, r, rec, b in evs[mid:]]
        assert trace_resumed == trace_whole[mid:], f"resumed at step {mid}"
        assert resumed.decisions == whole.decisions
        assert resumed.state_dict() == whole.state_dict()
        if name != "warmup":
            assert any(d.step > mid for d in whole.decisions)


def test_load_state_dict_rejects_a_mismatch():
    saved = controller("adaptive").state_dict()
    with pytest.raises(UsageError, match="modules"):
        make_controller(ControllerConfig(name="adaptive"), "fp16", MODULES[:2]).load_state_dict(saved)
    with pytest.raises(UsageError, match="name"):
        make_controller(ControllerConfig(name="progressive"), "fp16", MODULES).load_state_dict(saved)
    with pytest.raises(UsageError, match="low_format"):
        make_controller(ControllerConfig(name="adaptive"), "bf16", MODULES).load_state_dict(saved)


# -- bad input and call order ------------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    {"name": "bogus"}, {"warmup_steps": 0}, {"cooldown_steps": -1}, {"max_demotions": 2.5}, {"hysteresis": True},
    {"promote_every": "3"}, {"cooldown_growth": 1.0}, {"overflow_threshold": 0.0}, {"overflow_threshold": 1.5},
    {"promote_fraction": 0.0}, {"promote_fraction": 2},
])
def test_bad_config_is_rejected(settings):
    with pytest.raises(UsageError):
        ControllerConfig(**settings)


def test_bad_arguments_and_call_order():
    cfg = ControllerConfig(name="adaptive")
    with pytest.raises(UsageError, match="format"):
        make_controller(cfg, "fp17", MODULES)
    with pytest.raises(UsageError, match="twice"):
        make_controller(cfg, "fp16", ["a", "a"])
    with pytest.raises(TypeError):
        make_controller({"name": "adaptive"}, "fp16", MODULES)
    ctrl = make_controller(cfg, "fp16", MODULES)
    with pytest.raises(RuntimeError, match="start"):
        ctrl.after_step(1, ok(1), None, None)
    ctrl.start()
    with pytest.raises(RuntimeError, match="already"):
        ctrl.start()
    ctrl.after_step(1, ok(1), None, None)
    with pytest.raises(ValueError, match="increase"):
        ctrl.after_step(1, ok(1), None, None)


def test_no_low_format_means_nothing_to_decide():
    for name in ("warmup", "adaptive", "progressive"):
        ctrl = controller(name, low="fp32", warmup_steps=2)
        assert ctrl.decisions == [] and not ctrl.all_fp32 and ctrl.fp32_modules == frozenset()
        assert ctrl.after_step(1, skip(1), record(1, head=entry(1e39, fmt="fp32")), "head") == []


def test_malformed_records_are_ignored():
    ctrl = controller("adaptive", hysteresis=1)
    for s, rec in enumerate([{}, {"modules": None}, {"modules": {"head": None}}, {"modules": {"head": {}}},
                             {"modules": {"head": {"amax": "big", "formats": {"fp16": None}}}},
                             {"modules": {"head": {"amax": None, "formats": {}}}}, "junk"], start=1):
        assert ctrl.after_step(s, ok(s), rec, None) == []
    assert ctrl.decisions == []
