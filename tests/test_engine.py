"""The engine against the hand-written torch.amp loop, and the invariants it promises.

Invariant 2 (equivalence), 3 (a skipped step changes nothing), 4 (a non-finite loss is not
a scale problem), 5 (one host-device sync per step), master weights in the ``*-true``
modes, per-module fp32 rules, several optimizers with one scaler, state_dict round-trip
and bad input. Tiny models, fixed seeds; everything runs on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import math
import warnings
from unittest import mock

import pytest
import torch
from torch import nn

import mixprec
from mixprec import engine as engine_mod
from mixprec.engine import Engine, StepResult
from mixprec.environment import cpu_has_fast_fp16
from mixprec.policy import Policy, Rule, ScalerConfig

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _quiet_fp16_warning():
    # fp16 on a CPU without AVX512-FP16 warns (tested once, below); keep the rest quiet.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fp16.*", category=UserWarning)
        yield


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4))


def batches(n: int, seed: int = 1, batch: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 8, generator=g), torch.randn(batch, 4, generator=g)) for _ in range(n)]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return nn.functional.mse_loss(out.float(), y.float())


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(pa, pb))


def opt_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def assert_optimizer_state_equal(oa: torch.optim.Optimizer, ob: torch.optim.Optimizer) -> None:
    pa, pb = opt_params(oa), opt_params(ob)
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb):
        sa, sb = oa.state.get(x, {}), ob.state.get(y, {})
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert torch.equal(sa[k], sb[k]), f"optimizer state {k!r} differs"
            else:
                assert sa[k] == sb[k], f"optimizer state {k!r} differs"


def snapshot(engine_opt: torch.optim.Optimizer, model: nn.Module) -> dict:
    """Everything a skipped step must leave bitwise unchanged."""
    return {
        "model": [p.detach().clone() for p in model.parameters()],
        "opt_params": [p.detach().clone() for p in opt_params(engine_opt)],
        "state": {
            i: {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in engine_opt.state[p].items()}
            for i, p in enumerate(opt_params(engine_opt))
            if p in engine_opt.state
        },
    }


def assert_snapshot_equal(before: dict, after: dict) -> None:
    assert len(before["model"]) == len(after["model"])
    for a, b in zip(before["model"], after["model"]):
        assert torch.equal(a, b)
    for a, b in zip(before["opt_params"], after["opt_params"]):
        assert torch.equal(a, b)
    assert before["state"].keys() == after["state"].keys()
    for i in before["state"]:
        sa, sb = before["state"][i], after["state"][i]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert torch.equal(sa[k], sb[k]), f"optimizer state {k!r} of param {i} changed"
            else:
                assert sa[k] == sb[k]


# -- invariant 2: equivalence with the hand-written torch.amp loop -------------------------


def reference_loop(mode: str, accumulate: int, clip: float | None, steps: int, init_scale: float = 2.0**16,
                   growth_interval: int = 2000):
    dtype = DTYPES[mode.split("-")[0]]
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval,
                                  enabled=dtype == torch.float16)
    skipped = 0
    for i, (x, y) in enumerate(batches(steps * accumulate)):
        with torch.autocast("cpu", dtype=dtype):
            loss = loss_fn(model, x, y)
        scaler.scale(loss / accumulate if accumulate > 1 else loss).backward()
        if (i + 1) % accumulate == 0:
            scaler.unscale_(opt)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            skipped += scaler.get_scale() < before
    return model, opt, scaler, skipped


def engine_loop(mode: str, accumulate: int, clip: float | None, steps: int, init_scale: float = 2.0**16,
                growth_interval: int = 2000):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    policy = Policy(mode=mode, scaler=ScalerConfig(init_scale=init_scale, growth_interval=growth_interval))
    engine = Engine(policy, accumulate=accumulate, clip_grad_norm=clip)
    engine.setup(model, opt)
    results = []
    for x, y in batches(steps * accumulate):
        with engine.autocast():
            loss = loss_fn(model, x, y)
        engine.backward(loss)
        results.append(engine.step())
    return model, opt, engine, results


@pytest.mark.parametrize(
    "mode,accumulate,clip",
    list(itertools.product(["fp16-mixed", "bf16-mixed"], [1, 3], [None, 0.5])),
)
def test_equivalence_with_torch_amp_loop(mode, accumulate, clip):
    steps = 20
    ref_model, ref_opt, ref_scaler, _ = reference_loop(mode, accumulate, clip, steps)
    model, opt, engine, results = engine_loop(mode, accumulate, clip, steps)
    assert sum(r.action != "accumulated" for r in results) == steps
    assert any(r.stepped for r in results)
    assert params_equal(ref_model, model)
    assert_optimizer_state_equal(ref_opt, opt)
    assert engine.loss_scale == ref_scaler.get_scale()
    # The run really trained (so equality is not two untouched models).
    assert not params_equal(make_model(), model)


def test_equivalence_covers_skipped_steps_and_scale_backoff():
    # A huge initial scale overflows the fp16 activation gradients: the scale backs off
    # step by step, then training runs and (growth_interval=3) grows and overflows again.
    kw = dict(mode="fp16-mixed", accumulate=1, clip=None, steps=20, init_scale=2.0**24, growth_interval=3)
    ref_model, ref_opt, ref_scaler, ref_skipped = reference_loop(**kw)
    model, opt, engine, results = engine_loop(**kw)
    skipped = [r for r in results if r.skipped]
    assert len(skipped) >= 3 and any(r.stepped for r in results)
    assert len(skipped) == ref_skipped == engine.skipped_steps
    assert all(r.reason == engine_mod.NONFINITE_GRAD for r in skipped)
    assert all(r.next_loss_scale == r.loss_scale * 0.5 for r in skipped)
    assert params_equal(ref_model, model)
    assert_optimizer_state_equal(ref_opt, opt)
    assert engine.loss_scale == ref_scaler.get_scale()


@pytest.mark.parametrize("mode", ["fp16-mixed", "bf16-mixed"])
def test_equivalence_with_param_groups_out_of_model_order(mode):
    # The usual "no weight decay on biases and norms" groups list parameters in another
    # order than model.parameters(); the hand-written loop clips over model.parameters().
    def build():
        model = make_model()
        decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
        no_decay = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() == 2)]
        opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                                 {"params": decay[::-1], "weight_decay": 0.1}], lr=1e-2)
        return model, opt

    dtype = DTYPES[mode.split("-")[0]]
    data = batches(15, seed=11)
    ref, ref_opt = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=dtype == torch.float16)
    for x, y in data:
        with torch.autocast("cpu", dtype=dtype):
            loss = loss_fn(ref, x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(ref_opt)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3)
        scaler.step(ref_opt)
        scaler.update()
        ref_opt.zero_grad()

    model, opt = build()
    engine = Engine(Policy(mode=mode, scaler=ScalerConfig(init_scale=2.0**10)), clip_grad_norm=0.3)
    engine.setup(model, opt)
    for x, y in data:
        with engine.autocast():
            loss = loss_fn(model, x, y)
        engine.backward(loss)
        assert engine.step().stepped
    assert params_equal(ref, model)
    assert_optimizer_state_equal(ref_opt, opt)


def test_equivalence_with_init_scale_that_is_not_an_fp32_value():
    kw = dict(mode="fp16-mixed", accumulate=1, clip=None, steps=5, init_scale=100000.3)
    ref_model, ref_opt, ref_scaler, _ = reference_loop(**kw)
    model, opt, engine, _ = engine_loop(**kw)
    assert params_equal(ref_model, model)
    assert_optimizer_state_equal(ref_opt, opt)


# -- several models, losses and optimizers, one scaler (PyTorch's AMP recipe) --------------


def test_multiple_models_losses_optimizers_match_gradscaler_recipe():
    steps, init_scale, gi = 10, 2.0**20, 3

    def build():
        m0, m1 = make_model(0), make_model(1)
        o0 = torch.optim.AdamW(m0.parameters(), lr=1e-2)
        o1 = torch.optim.SGD(m1.parameters(), lr=1e-2, momentum=0.9)
        return m0, m1, o0, o1

    data = batches(steps, seed=5)

    m0, m1, o0, o1 = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=gi)
    for x, y in data:
        o0.zero_grad()
        o1.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out0, out1 = m0(x), m1(x)
            loss0 = nn.functional.mse_loss((2 * out0 + 3 * out1).float(), y)
            loss1 = nn.functional.mse_loss((3 * out0 - 5 * out1).float(), y)
        scaler.scale(loss0).backward(retain_graph=True)
        scaler.scale(loss1).backward()
        scaler.unscale_(o0)
        scaler.step(o0)
        scaler.step(o1)
        scaler.update()

    e0, e1, eo0, eo1 = build()
    engine = Engine(Policy(mode="fp16-mixed", scaler=ScalerConfig(init_scale=init_scale, growth_interval=gi)))
    engine.setup(e0, eo0)
    engine.setup(e1, eo1)
    results = []
    for x, y in data:
        with engine.autocast():
            out0, out1 = e0(x), e1(x)
            loss0 = nn.functional.mse_loss((2 * out0 + 3 * out1).float(), y)
            loss1 = nn.functional.mse_loss((3 * out0 - 5 * out1).float(), y)
        engine.backward(loss0, retain_graph=True)
        engine.backward(loss1)
        results.append(engine.step())

    assert all(len(r.optimizers_stepped) == 2 for r in results)
    assert any(r.skipped for r in results) and any(r.stepped for r in results)
    assert params_equal(m0, e0) and params_equal(m1, e1)
    assert_optimizer_state_equal(o0, eo0)
    assert_optimizer_state_equal(o1, eo1)
    assert engine.loss_scale == scaler.get_scale()


def test_multiple_optimizers_skip_only_the_one_that_overflowed():
    # GradScaler checks each optimizer's gradients separately: an overflow in model 1's
    # gradients skips optimizer 1 only (and the scale backs off once).
    def build():
        m0, m1 = make_model(0), make_model(1)
        return m0, m1, torch.optim.AdamW(m0.parameters(), lr=1e-2), torch.optim.AdamW(m1.parameters(), lr=1e-2)

    data = batches(6, seed=6)
    bad_step = 3

    def losses(m0, m1, x, y):
        return nn.functional.mse_loss(m0(x).float(), y), nn.functional.mse_loss(m1(x).float(), y)

    m0, m1, o0, o1 = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i, (x, y) in enumerate(data):
        with torch.autocast("cpu", dtype=torch.float16):
            l0, l1 = losses(m0, m1, x, y)
        scaler.scale(l0 + l1).backward()
        if i == bad_step:
            m1[3].weight.grad[0, 0] = float("inf")
        scaler.step(o0)
        scaler.step(o1)
        scaler.update()
        o0.zero_grad()
        o1.zero_grad()

    e0, e1, eo0, eo1 = build()
    engine = Engine(Policy(mode="fp16-mixed", scaler=ScalerConfig(init_scale=2.0**10)))
    engine.setup(e0, eo0)
    engine.setup(e1, eo1)
    for i, (x, y) in enumerate(data):
        with engine.autocast():
            l0, l1 = losses(e0, e1, x, y)
        engine.backward(l0 + l1)
        if i == bad_step:
            e1[3].weight.grad[0, 0] = float("inf")
        r = engine.step()
        if i == bad_step:
            assert r.optimizers_stepped == (True, False)
            assert r.next_loss_scale == r.loss_scale / 2
        else:
            assert r.optimizers_stepped == (True, True)
    assert params_equal(m0, e0) and params_equal(m1, e1)
    assert_optimizer_state_equal(o0, eo0)
    assert_optimizer_state_equal(o1, eo1)
    assert engine.loss_scale == scaler.get_scale() == 2.0**9


# -- invariant 3: a skipped step changes nothing -----------------------------------------


@pytest.mark.parametrize("mode", ["fp16-mixed", "bf16-mixed", "fp16-true"])
def test_skipped_step_changes_nothing(mode):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = Engine(Policy(mode=mode, scaler=ScalerConfig(init_scale=2.0**10)))
    engine.setup(model, opt)
    low = engine.policy.mode_info.kind == "true"
    inject_at = {3, 7, 8}
    factor = torch.ones(())
    # The gradient of one parameter is multiplied by `factor` (1 or inf) in backward.
    target = model[3].weight
    handle = target.register_hook(lambda g: g * factor.to(g.dtype))
    n_steps = 12
    stepped = 0
    for i, (x, y) in enumerate(batches(n_steps, seed=2)):
        factor.fill_(math.inf if i in inject_at else 1.0)
        if low:
            x = x.to(engine._plugin.dtype)
        before = snapshot(opt, model)
        scale = engine.loss_scale
        with engine.autocast():
            loss = loss_fn(model, x, y)
        engine.backward(loss)
        result = engine.step()
        after = snapshot(opt, model)
        if i in inject_at:
            assert result.action == "skipped", (i, result)
            assert result.reason == engine_mod.NONFINITE_GRAD
            assert result.optimizers_stepped == (False,)
            assert_snapshot_equal(before, after)
            if engine.scaler.enabled:
                assert engine.loss_scale == scale * engine.policy.scaler.backoff_factor
                assert result.next_loss_scale == engine.loss_scale and result.loss_scale == scale
            else:
                assert engine.loss_scale == scale == 1.0
        else:
            assert result.action == "stepped", (i, result)
            stepped += 1
            assert engine.loss_scale == scale
            assert not torch.equal(before["model"][-1], after["model"][-1]), "training did not continue"
        # The step count of the optimizer counts stepped steps only.
        steps_in_state = {float(s["step"]) for s in opt.state.values()}
        assert steps_in_state <= {float(stepped)}
        # Gradients are gone after every optimizer step, skipped or not.
        assert all(p.grad is None for p in model.parameters())
        assert all(p.grad is None for p in opt_params(opt))
    handle.remove()
    assert engine.skipped_steps == len(inject_at)
    assert engine.steps == n_steps
    assert stepped == n_steps - len(inject_at)


def test_skip_with_gradient_written_after_backward():
    # The other way to inject: write inf into .grad between backward and step.
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    engine = Engine(Policy(mode="fp16-mixed", scaler=ScalerConfig(init_scale=2.0**10)), clip_grad_norm=1.0)
    engine.setup(model, opt)
    for i, (x, y) in enumerate(batches(4, seed=3)):
        with engine.autocast():
            loss = loss_fn(model, x, y)
        engine.backward(loss)
        if i == 2:
            model[0].bias.grad[0] = float("nan")
        before = snapshot(opt, model)
        result = engine.step()
        if i == 2:
            assert result.skipped and result.reason == engine_mod.NONFINITE_GRAD
            assert_snapshot_equal(before, snapshot(opt, model))
            assert engine.loss_scale == 2.0**9
        else:
            assert result.stepped


# -- invariant 4: a non-finite loss does not move the scale ------------------------------


@pytest.mark.parametrize("mode", ["fp16-mixed", "bf16-mixed"])
def test_nonfinite_loss_skips_without_touching_scale(mode):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = Engine(Policy(mode=mode, scaler=ScalerConfig(init_scale=2.0**10, growth_interval=2000)))
    engine.setup(model, opt)
    nan_at = {2, 3, 4, 5}  # several in a row: the scale must not back off each time
    for i, (x, y) in enumerate(batches(8, seed=4)):
        scale = engine.loss_scale
        before = snapshot(opt, model)
        with engine.autocast():
            loss = loss_fn(model, x, y)
            if i in nan_at:
                loss = loss * float("nan")
        engine.backward(loss)
        result = engine.step()
        if i in nan_at:
            assert result.action == "skipped"
            assert result.reason == engine_mod.NONFINITE_LOSS
            assert engine.loss_scale == scale == result.loss_scale == result.next_loss_scale
            assert_snapshot_equal(before, snapshot(opt, model))
        else:
            assert result.action == "stepped"
    assert engine.loss_scale == (2.0**10 if mode == "fp16-mixed" else 1.0)


def test_nonfinite_loss_in_one_micro_batch_skips_the_window():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    engine = Engine(Policy(mode="fp16-mixed", scaler=ScalerConfig(init_scale=2.0**10)), accumulate=3)
    engine.setup(model, opt)
    actions = []
    for i, (x, y) in enumerate(batches(6, seed=4)):
        with engine.autocast():
            loss = loss_fn(model, x, y)
        if i == 1:
            loss = loss + float("inf")
        engine.backward(loss)
        r = engine.step()
        actions.append((r.action, r.reason))
    assert actions[2] == ("skipped", engine_mod.NONFINITE_LOSS)
    assert actions[5] == ("stepped", None)
    assert engine.loss_scale == 2.0**10


# -- master weights in the true modes ------------------------------------------------------


def one_weight_model() -> nn.Linear:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    return model


@pytest.mark.parametrize("mode", ["fp16-true", "bf16-true"])
def test_true_mode_master_weights_keep_small_updates(mode):
    lr, steps = 1e-4, 100
    dtype = DTYPES[mode.split("-")[0]]
    # Half an ulp at 1.0 (downwards) is 2**-12 in fp16 and 2**-9 in bf16: 1e-4 is below both.
    assert lr < torch.finfo(dtype).eps / 4
    x = torch.ones(1, 1, dtype=dtype)

    plain = one_weight_model().to(dtype)
    popt = torch.optim.SGD(plain.parameters(), lr=lr)
    for _ in range(steps):
        plain(x).sum().backward()
        popt.step()
        popt.zero_grad()
    assert plain.weight.item() == 1.0  # every update rounded away

    model = one_weight_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    engine = Engine(Policy(mode=mode, scaler=ScalerConfig(init_scale=2.0**10)))
    engine.setup(model, opt)
    assert model.weight.dtype == dtype
    results = []
    for _ in range(steps):
        with engine.autocast():
            loss = model(x).sum()
        engine.backward(loss)
        results.append(engine.step())
    n = sum(r.stepped for r in results)
    assert n == steps

    (master,) = opt_params(opt)
    assert master.dtype == torch.float32 and master is not model.weight
    expected = torch.ones(1, 1)
    for _ in range(n):  # SGD's update, in fp32: the gradient is exactly 1
        expected.add_(torch.ones(1, 1), alpha=-lr)
    assert torch.equal(master.detach(), expected)
    assert abs(master.item() - (1.0 - n * lr)) < 1e-5
    assert model.weight.dtype == dtype
    assert torch.equal(model.weight.detach(), master.detach().to(dtype))
    assert model.weight.item() < 1.0


def test_true_mode_requires_grad_and_gradients_land_on_masters():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    engine = Engine("bf16-true")
    model, opt = engine.setup(model, opt)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in opt_params(opt))
    x, y = batches(1)[0]
    with engine.autocast():
        loss = loss_fn(model, x.bfloat16(), y)
    engine.backward(loss)
    assert engine.step().stepped
    for p, m in zip(model.parameters(), opt_params(opt)):
        assert torch.equal(p.detach(), m.detach().bfloat16())


# -- per-module fp32 rules ------------------------------------------------------------------


def capture_output_dtypes(model: nn.Module) -> tuple[dict, list]:
    seen: dict[str, torch.dtype] = {}
    handles = [
        mod.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out.dtype))
        for name, mod in model.named_children()
    ]
    return seen, handles


def test_bf16_mixed_rules_keep_modules_in_fp32():
    rules = (Rule.parse("type:LayerNorm"), Rule.parse("3"))
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    engine = Engine(Policy(mode="bf16-mixed", rules=rules))
    engine.setup(model, opt)
    assert engine.fp32_modules == ["2", "3"]
    assert engine.effective_policy()["fp32_modules"] == ["2", "3"]
    seen, _ = capture_output_dtypes(model)
    inputs: dict[str, torch.Tensor] = {}
    model[3].register_forward_pre_hook(lambda mod, args: inputs.__setitem__("3", args[0]))
    x, y = batches(1)[0]
    with engine.autocast():
        out = model(x)
        loss = nn.functional.mse_loss(out, y)
    assert seen == {"0": torch.bfloat16, "1": torch.bfloat16, "2": torch.float32, "3": torch.float32}
    # Inside the island the Linear really computed in fp32, not autocast's bf16.
    assert inputs["3"].dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(out, model[3](inputs["3"]))
    engine.backward(loss)
    assert engine.step().stepped

    # Control: the same model without rules runs those modules in bf16.
    plain = make_model()
    seen_plain, _ = capture_output_dtypes(plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain(x)
    assert seen_plain["2"] == seen_plain["3"] == torch.bfloat16


def test_bf16_mixed_autocast_restored_after_island():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    engine = Engine(Policy(mode="bf16-mixed", rules=(Rule.parse("type:LayerNorm"),)))
    engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    seen, _ = capture_output_dtypes(model)
    with engine.autocast():
        model(torch.randn(2, 8))
        assert torch.is_autocast_enabled("cpu")
    assert seen == {"0": torch.bfloat16, "1": torch.float32, "2": torch.bfloat16}


def test_bf16_true_rules_keep_fp32_parameters_and_train():
    rules = (Rule.parse("type:LayerNorm"), Rule.parse("3"))
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = Engine(Policy(mode="bf16-true", rules=rules))
    engine.setup(model, opt)
    assert engine.fp32_modules == ["2", "3"]
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes == {
        "0.weight": torch.bfloat16, "0.bias": torch.bfloat16,
        "2.weight": torch.float32, "2.bias": torch.float32,
        "3.weight": torch.float32, "3.bias": torch.float32,
    }
    seen, _ = capture_output_dtypes(model)
    inputs: dict[str, torch.dtype] = {}
    for name in ("2", "3"):
        model.get_submodule(name).register_forward_pre_hook(
            lambda mod, args, name=name: inputs.__setitem__(name, args[0].dtype))
    start = [p.detach().clone() for p in model.parameters()]
    for x, y in batches(3):
        with engine.autocast():
            loss = loss_fn(model, x.bfloat16(), y)
        # The islands compute in fp32 and hand bf16 back to the rest of the model.
        assert inputs == {"2": torch.float32, "3": torch.float32}
        assert seen == {"0": torch.bfloat16, "1": torch.bfloat16, "2": torch.bfloat16, "3": torch.bfloat16}
        engine.backward(loss)
        assert engine.step().stepped
    assert {name: p.dtype for name, p in model.named_parameters()} == dtypes
    assert all(not torch.equal(a, b) for a, b in zip(start, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- StepResult and accumulation -----------------------------------------------------------


def test_accumulation_step_results():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    engine = Engine("bf16-mixed", accumulate=3)
    engine.setup(model, opt)
    actions = []
    weights = []
    window = []
    for x, y in batches(6):
        assert engine.accumulating == (len(actions) % 3 != 2)
        with engine.autocast():
            loss = loss_fn(model, x, y)
        window.append(loss.detach().float())
        engine.backward(loss)
        r = engine.step()
        assert isinstance(r, StepResult)
        actions.append(r.action)
        weights.append(model[0].weight.detach().clone())
        if r.stepped:
            # The logged loss is the mean of the window's micro-batch losses.
            assert r.loss == pytest.approx(torch.stack(window).mean().item(), rel=1e-6)
            assert r.step == engine.steps
            window = []
    assert actions == ["accumulated", "accumulated", "stepped"] * 2
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    assert engine.steps == 2
    # Gradients accumulate between the boundaries.
    assert all(p.grad is None for p in model.parameters())


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(accumulate=0), "0"),
        (dict(accumulate=2.5), "2.5"),
        (dict(clip_grad_norm=-1), "-1"),
        (dict(clip_grad_norm=0), "0"),
    ],
)
def test_engine_rejects_bad_arguments(kwargs, needle):
    key = next(iter(kwargs))
    with pytest.raises(mixprec.UsageError, match=key) as info:
        Engine("fp32", **kwargs)
    assert isinstance(info.value, ValueError)
    assert needle in str(info.value)


def test_engine_rejects_unknown_precision():
    with pytest.raises(ValueError, match="fp12") as info:
        Engine("fp12")
    assert isinstance(info.value, mixprec.UsageError)
    assert "bf16-mixed" in str(info.value)


def test_backward_rejects_non_scalar_loss():
    model = make_model()
    engine = Engine("fp32")
    engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    out = model(torch.randn(3, 8))
    with pytest.raises(mixprec.UsageError, match="scalar"):
        engine.backward(out)
    with pytest.raises(mixprec.UsageError, match="scalar"):
        engine.backward(1.0)


def test_step_before_setup_raises():
    with pytest.raises(mixprec.UsageError, match="setup"):
        Engine("bf16-mixed").step()


def test_setup_after_optimizer_stepped_raises():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    with pytest.raises(mixprec.UsageError, match="setup"):
        Engine("bf16-true").setup(model, opt)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tf32 is only an error without a GPU")
def test_tf32_on_cpu_is_a_usage_error():
    model = make_model()
    with pytest.raises(mixprec.UsageError, match="GPU"):
        Engine("tf32").setup(model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.skipif(cpu_has_fast_fp16(), reason="this CPU has fast fp16 kernels")
@pytest.mark.parametrize("mode", ["fp16-mixed", "fp16-true"])
def test_fp16_on_slow_cpu_warns(mode):
    model = make_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Engine(mode).setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "fp16" in messages[0] and "bf16-mixed" in messages[0]


def test_bf16_does_not_warn_about_fp16():
    model = make_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Engine("bf16-mixed").setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert [str(w.message) for w in caught] == []


# -- state_dict round-trip ---------------------------------------------------------------------


def _train(engine, model, data, dtype):
    for x, y in data:
        with engine.autocast():
            loss = loss_fn(model, x.to(dtype), y)
        engine.backward(loss)
        engine.step()


def test_state_dict_round_trip_fp16_true_is_bit_exact():
    data = batches(10, seed=7)

    def build(seed):
        model = make_model(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine = Engine(Policy(mode="fp16-true", scaler=ScalerConfig(growth_interval=2)))
        engine.setup(model, opt)
        return model, opt, engine

    model, opt, engine = build(0)
    _train(engine, model, data[:5], torch.float16)
    buf = io.BytesIO()
    torch.save({"engine": engine.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    model2, opt2, engine2 = build(123)  # different init: everything must come from the checkpoint
    model2.load_state_dict(saved["model"])
    engine2.load_state_dict(saved["engine"])
    opt2.load_state_dict(saved["opt"])
    assert engine2.loss_scale == engine.loss_scale
    assert params_equal(model, model2)
    assert all(torch.equal(a, b) for a, b in zip(opt_params(opt), opt_params(opt2)))

    _train(engine, model, data[5:], torch.float16)
    _train(engine2, model2, data[5:], torch.float16)
    assert params_equal(model, model2)
    assert all(torch.equal(a, b) for a, b in zip(opt_params(opt), opt_params(opt2)))
    assert_optimizer_state_equal(opt, opt2)
    assert engine.loss_scale == engine2.loss_scale
    assert engine.state_dict()["scaler"] == engine2.state_dict()["scaler"]
    assert engine.steps == engine2.steps == 10


def test_load_state_dict_rejects_other_mode():
    model = make_model()
    engine = Engine("fp16-true")
    engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    other = make_model()
    engine2 = Engine("bf16-true")
    engine2.setup(other, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(mixprec.UsageError, match="fp16-true"):
        engine2.load_state_dict(engine.state_dict())


# -- invariant 5: at most one host-device sync per optimizer step -------------------------------


SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")


@pytest.mark.parametrize("mode,accumulate,clip", [
    ("fp16-mixed", 1, None), ("fp16-mixed", 2, 1.0), ("bf16-mixed", 1, None), ("bf16-mixed", 1, 1.0),
])
def test_at_most_one_sync_per_step(mode, accumulate, clip):
    model = make_model()
    # SGD, not Adam: Adam's own step calls .item() on its CPU step counters (as it does in
    # the hand-written loop); the engine's syncs are what is counted here.
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    engine = Engine(Policy(mode=mode, scaler=ScalerConfig(init_scale=2.0**10)),
                    accumulate=accumulate, clip_grad_norm=clip)
    engine.setup(model, opt)
    counts = {name: 0 for name in SYNC_METHODS}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for i, (x, y) in enumerate(batches(4 * accumulate, seed=9)):
        with engine.autocast():
            loss = loss_fn(model, x, y)
        engine.backward(loss)
        for name in counts:
            counts[name] = 0
        with contextlib.ExitStack() as stack:
            for name in SYNC_METHODS:
                stack.enter_context(mock.patch.object(torch.Tensor, name, counting(name)))
            result = engine.step()
        total = sum(counts.values())
        if result.action == "accumulated":
            assert total == 0, counts
        else:
            assert result.stepped
            assert total <= 1, counts
    # The patch is gone again.
    assert torch.Tensor.item is not None and torch.ones(()).item() == 1.0


def test_sync_counter_would_notice_extra_syncs():
    # The counting above really sees Tensor.item/tolist: a sanity check of the method.
    calls = []
    original = torch.Tensor.item

    def wrapper(self):
        calls.append(1)
        return original(self)

    with mock.patch.object(torch.Tensor, "item", wrapper):
        torch.ones(()).item()
        torch.nn.utils.clip_grad_norm_([nn.Parameter(torch.ones(2))], 1.0)
    assert len(calls) == 1


def test_tf32_covers_the_backward_matmuls_too(monkeypatch):
    """tf32 is a switch on the matmul backend: the backward pass (two thirds of the FLOPs)
    must run with it on as well, and it is restored afterwards."""
    import mixprec.precision as precision

    monkeypatch.setattr(precision, "_cuda_has_tf32", lambda device: True)  # pretend: no GPU here
    seen = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen["forward"] = torch.backends.cuda.matmul.allow_tf32
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen["backward"] = torch.backends.cuda.matmul.allow_tf32
            return g

    before = torch.backends.cuda.matmul.allow_tf32
    model = nn.Linear(4, 1)
    engine = Engine("tf32")
    engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with engine.autocast():
        loss = Probe.apply(model(torch.randn(3, 4))).sum()
    engine.backward(loss)
    assert seen == {"forward": True, "backward": True}
    assert torch.backends.cuda.matmul.allow_tf32 == before


# -- sparse gradients (nn.EmbeddingBag(sparse=True), as in DLRM) ---------------------------


class _BagModel(nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        torch.manual_seed(0)
        self.bag = nn.EmbeddingBag(50, 8, mode="sum", sparse=sparse)
        self.head = nn.Linear(8, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(idx))


def _train_bags(mode: str, sparse: bool, clip: float | None, steps: int = 6) -> tuple[nn.Module, list]:
    model = _BagModel(sparse)
    engine = Engine(mode, clip_grad_norm=clip)
    engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))  # SGD takes sparse gradients
    g = torch.Generator().manual_seed(3)
    results = []
    for _ in range(steps):
        idx, y = torch.randint(0, 50, (6, 3), generator=g), torch.randn(6, 1, generator=g)
        with engine.autocast():
            loss = nn.functional.mse_loss(model(idx).float(), y)
        engine.backward(loss)
        results.append(engine.step())
    return model, results


@pytest.mark.parametrize("mode,clip", [("fp32", 0.05), ("fp32", None), ("bf16-mixed", 0.05), ("fp16-mixed", 0.05)])
def test_sparse_gradients_clip_and_step_like_dense_ones(mode, clip):
    # torch's clip_grad_norm_ and _foreach_norm have no sparse kernel; the engine must
    # still compute the same total norm and clip the same way as for dense gradients.
    dense, dense_results = _train_bags(mode, sparse=False, clip=clip)
    sparse, sparse_results = _train_bags(mode, sparse=True, clip=clip)
    # fp16 skips its first steps while the scale backs off, the same way for both.
    assert [r.action for r in sparse_results] == [r.action for r in dense_results]
    assert sum(r.stepped for r in sparse_results) >= 3
    if clip is not None or mode == "fp32":
        for d, s in zip(dense_results, sparse_results):
            if s.stepped:
                assert s.grad_norm == pytest.approx(d.grad_norm, rel=1e-5)
    if clip is not None:  # the clip bit: norms above 0.05 were scaled down
        assert any(r.stepped and r.grad_norm > clip for r in sparse_results)
    for a, b in zip(dense.parameters(), sparse.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(_BagModel(True).bag.weight, sparse.bag.weight)
