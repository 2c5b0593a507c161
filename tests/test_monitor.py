"""The monitor: exact statistics, no work and no syncs when unarmed, one transfer when
armed, localization of the first non-finite module, outputs (JSONL, TensorBoard), summary."""

from __future__ import annotations

import contextlib
import json
import math
from unittest import mock

import pytest
import torch
from torch import nn

import mixprec.monitor as monitor_mod
from mixprec.errors import UsageError
from mixprec.formats import get_format
from mixprec.monitor import (
    DEFAULT_EVERY,
    MONITOR_SCHEMA,
    JsonlWriter,
    Monitor,
    TensorBoardWriter,
    describe,
    first_nonfinite_backward,
    first_nonfinite_forward,
    load_records,
    render_summary,
    summarize,
)

INF, NAN = float("inf"), float("nan")


class Const(nn.Module):
    """Returns a fixed tensor, whatever its input."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.clone()


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Fp32Scale(Scale):
    """Multiplies in fp32, whatever autocast made of its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.factor


class InfGrad(torch.autograd.Function):
    """Identity forward; the backward pass hands on an infinite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, INF)


class InfGradModule(nn.Module):
    def forward(self, x):
        return InfGrad.apply(x)


def sample(mon: Monitor, model: nn.Module, *inputs, step: int = 1, backward: bool = True,
           autocast: torch.dtype | None = None, **extra) -> dict:
    mon.arm(step)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with ctx:
        out = model(*inputs)
    if backward:
        out.float().sum().backward()
    return mon.collect(step, loss_scale=1.0, extra=extra or None)


# --------------------------------------------------------------------------- construction


def test_every_and_formats_are_validated() -> None:
    for bad in (0, -1, 2.5, True, "5"):
        with pytest.raises(UsageError, match="every"):
            Monitor(every=bad)
    with pytest.raises(UsageError, match="unknown format 'fp7'"):
        Monitor(formats=("fp16", "fp7"))
    with pytest.raises(UsageError, match="at least one"):
        Monitor(formats=())
    assert Monitor(formats=("bfloat16", "half", "e4m3", "fp16")).formats == ["bf16", "fp16", "fp8_e4m3"]
    assert Monitor(formats="bf16").formats == ["bf16"]
    assert Monitor().every == DEFAULT_EVERY


def test_should_sample_every_n() -> None:
    mon = Monitor(every=5)
    assert [s for s in range(1, 21) if mon.should_sample(s)] == [1, 5, 10, 15, 20]
    assert all(Monitor(every=1).should_sample(s) for s in range(1, 10))
    mon = Monitor(every=50)
    assert [s for s in range(1, 201) if mon.should_sample(s)] == [1, 50, 100, 150, 200]


def test_call_order_errors_and_detach() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    mon = Monitor()
    mon.attach(model)
    with pytest.raises(UsageError, match="already attached"):
        mon.attach(model)
    with pytest.raises(UsageError, match="without arm"):
        mon.collect(1, 1.0)
    mon.arm(3)
    mon.arm(3)  # idempotent for the same step
    assert mon.armed
    with pytest.raises(UsageError, match=r"arm\(4\) while step 3"):
        mon.arm(4)
    with pytest.raises(UsageError, match="reserved"):
        mon.collect(3, 1.0, extra={"modules": 1})
    assert mon.armed  # a rejected collect() keeps the sample; disarm() drops it
    mon.disarm()
    assert not mon.armed
    mon.detach()
    assert not mon.armed
    assert all(not m._forward_hooks for m in model.modules())
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    mon.attach(model)  # can attach again after detach
    assert sample(mon, model, torch.randn(2, 3))["modules"].keys() == {"0", "1"}


# --------------------------------------------------------------------------- exact statistics


@pytest.mark.parametrize("chunked", [False, True], ids=["float32-sums", "chunked-float64-sums"])
def test_forward_stats_exact_on_a_known_tensor(chunked: bool) -> None:
    value = torch.tensor([1e5, 1e-6, 0.0, INF, 1.0, 1e-8, NAN, -3.0])
    model = nn.Sequential(Const(value))
    mon = Monitor(formats=("fp16", "fp8_e4m3", "bf16"))
    mon.attach(model)
    # chunked: pretend float32 sums are exact only up to 3 elements, so the path for
    # tensors above 2**24 elements (chunk sums, float64 vectors) runs on this small one.
    with mock.patch.object(monitor_mod, "_EXACT_F32", 3 if chunked else monitor_mod._EXACT_F32):
        rec = sample(mon, model, torch.tensor([1.0, -7.0, INF]), backward=False)
    m = rec["modules"]["0"]
    assert m["type"] == "Const" and m["dtype"] == "torch.float32" and m["order"] == 0 and m["calls"] == 1
    assert m["amax"] == pytest.approx(1e5)
    finite = [1e5, 1e-6, 0.0, 1.0, 1e-8, 3.0]
    assert m["mean_abs"] == pytest.approx(sum(finite) / 6, rel=1e-6)
    assert m["nonfinite"] == 2
    assert m["input_amax"] == 7.0 and m["input_nonfinite"] == 1
    # 6 finite values, 5 of them non-zero.
    assert m["formats"]["fp16"] == {"underflow": 2 / 5, "flush": 1 / 5, "overflow": 1 / 6}  # 1e-6, 1e-8 | 1e-8 | 1e5
    assert m["formats"]["fp8_e4m3"] == {"underflow": 2 / 5, "flush": 2 / 5, "overflow": 1 / 6}
    assert m["formats"]["bf16"] == {"underflow": 0.0, "flush": 0.0, "overflow": 0.0}
    assert rec["schema"] == MONITOR_SCHEMA and rec["step"] == 1 and rec["formats"] == ["fp16", "fp8_e4m3", "bf16"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fractions_match_a_plain_reference(dtype: torch.dtype) -> None:
    """Every target format on every storage dtype, values placed on and around the
    thresholds: the counting trick must agree with plain float64 comparisons, and `flush`
    with what a real cast to the format rounds to zero."""
    gen = torch.Generator().manual_seed(0)
    special = []
    for name in ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp32"):
        f = get_format(name)
        for t in (f.smallest_normal, f.smallest_subnormal / 2, f.max):
            special += [t, t * (1 + 2**-7), t * (1 - 2**-7), t * (1 + 2**-20), t * (1 - 2**-20)]
    logs = torch.empty(4000).uniform_(-160, 130, generator=gen)
    x = torch.cat([torch.tensor(special, dtype=torch.float64), torch.exp2(logs.double()), torch.zeros(7)])
    x = x * torch.where(torch.rand(x.shape, generator=gen) < 0.5, -1.0, 1.0).double()
    x = x.to(dtype)  # values out of range become inf / round to zero in this dtype: also fine
    names = ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp32"]
    model = nn.Sequential(Const(x))
    mon = Monitor(formats=names)
    mon.attach(model)
    m = sample(mon, model, torch.ones(1), backward=False)["modules"]["0"]

    v = x.double()
    fin = v[v.isfinite()].abs()
    nz = fin[fin > 0]
    assert m["nonfinite"] == int((~v.isfinite()).sum())
    assert m["amax"] == fin.max().item()
    for name in names:
        f = get_format(name)
        got = m["formats"][name]
        assert got["underflow"] == (nz < f.smallest_normal).sum().item() / len(nz), name
        assert got["flush"] == (nz <= f.smallest_subnormal / 2).sum().item() / len(nz), name
        assert got["overflow"] == (fin > f.max).sum().item() / len(fin), name
        if name in ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2") and dtype != torch.float64:
            # (float64 -> 16/8-bit casts round twice, through float32: not a reference)
            rounds_to_zero = (nz.to(f.dtype).double() == 0).sum().item() / len(nz)
            assert got["flush"] == rounds_to_zero, name


def test_gradient_stats_exact() -> None:
    class Dot(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.w = nn.Parameter(torch.ones(len(c)))
            self.c = c

        def forward(self, x):
            return (self.w * self.c).sum() * x.sum()

    c = torch.tensor([1e5, 1e-6, 0.0, 1.0, 1e-8])
    model = Dot(c)
    mon = Monitor(formats=("fp16", "bf16"))
    mon.attach(model)
    rec = sample(mon, model, torch.ones(1))
    p = rec["params"]["w"]
    assert p["module"] == "<root>" and p["order"] == 0 and p["dtype"] == "torch.float32"
    assert p["amax"] == pytest.approx(1e5) and p["nonfinite"] == 0
    assert p["formats"]["fp16"] == {"underflow": 2 / 4, "overflow": 1 / 5}
    assert p["formats"]["bf16"] == {"underflow": 0.0, "overflow": 0.0}


def test_accumulation_over_micro_batches() -> None:
    """Forward: max of amax/counts, element-weighted fractions; gradients: the last call
    (the accumulated .grad)."""
    outs = iter([torch.tensor([1e5, 1.0]), torch.tensor([1.0, 1.0, 1e-6, NAN])])

    class Next(nn.Module):
        def forward(self, x):
            return next(outs) + 0 * x.sum()

    class Clean(nn.Module):
        def forward(self, x):
            return x.nan_to_num(0.0)

    class Weighted(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0]))

        def forward(self, x):
            return self.w * x

    model = nn.Sequential(Next(), Clean(), Weighted())
    mon = Monitor(formats=("fp16",))
    mon.attach(model)
    mon.arm(7)
    model(torch.ones(1)).sum().backward()
    first_grad = model[2].w.grad.clone()
    model(torch.ones(1)).sum().backward()
    rec = mon.collect(7, loss_scale=2.0)
    m = rec["modules"]["0"]
    assert m["calls"] == 2 and m["amax"] == pytest.approx(1e5) and m["nonfinite"] == 1
    assert m["formats"]["fp16"]["overflow"] == pytest.approx(1 / 5)  # finite values: 2 + 3
    assert m["formats"]["fp16"]["underflow"] == pytest.approx(1 / 5)
    assert m["order"] == 0 and rec["modules"]["2"]["order"] == 2
    # d(sum w*x)/dw = sum(x), accumulated over both calls: the record holds the final .grad.
    final = model[2].w.grad.item()
    assert final != first_grad.item() and rec["params"]["2.w"]["amax"] == final
    assert rec["loss_scale"] == 2.0 and rec["step"] == 7


def test_outputs_in_dicts_tuples_and_kwargs() -> None:
    class DictOut(nn.Module):
        def forward(self, x):
            return {"ids": torch.arange(3), "logits": x * 2, "hidden": x * 100}

    class TupleOut(nn.Module):
        def forward(self, x):
            return (torch.ones(2, dtype=torch.long), [x * 3, x])

    class IntOut(nn.Module):
        def forward(self, x):
            return x.long()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.d, self.t, self.i = DictOut(), TupleOut(), IntOut()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            a = self.d(x)["logits"]
            b = self.t(x)[1][0]
            self.i(x)
            return self.lin(input=a + b)  # a keyword argument, as HF models pass hidden_states

    model = Model()
    mon = Monitor()
    mon.attach(model)
    x = torch.tensor([1.0, -4.0])
    rec = sample(mon, model, x)
    assert rec["modules"]["d"]["amax"] == 8.0  # the first floating value: logits, not hidden
    assert rec["modules"]["t"]["amax"] == 12.0
    assert "i" not in rec["modules"]  # no floating output: nothing to observe
    assert rec["modules"]["lin"]["input_amax"] == 20.0  # passed as a keyword argument
    assert [rec["modules"][n]["order"] for n in ("d", "t", "lin")] == [0, 1, 2]


def test_inputs_reuse_a_producers_stats_unless_modified_in_place() -> None:
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            h = self.a(x)
            y = self.b(h)  # b's input is a's output, unchanged
            h.mul_(1e6)  # modified in place by functional code: c must see the new values
            return self.c(h) + y

    model = Model()
    mon = Monitor()
    mon.attach(model)
    x = torch.randn(4, 3)
    with torch.no_grad():
        h = model.a(x)
        rec = sample(mon, model, x, backward=False)
    assert rec["modules"]["b"]["input_amax"] == rec["modules"]["a"]["amax"] == h.abs().max().item()
    assert rec["modules"]["c"]["input_amax"] == (h * 1e6).abs().max().item()


def test_containers_and_prefix() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 1))
    mon = Monitor(containers=True)
    mon.attach(model, prefix="gen")
    rec = sample(mon, model, torch.randn(3, 2))
    mods = rec["modules"]
    assert set(mods) == {"gen.0", "gen.0.0", "gen.0.1", "gen.1"}  # the root itself is not a named container
    assert mods["gen.0.0"]["order"] < mods["gen.0.1"]["order"] < mods["gen.0"]["order"] < mods["gen.1"]["order"]
    assert rec["params"]["gen.0.0.weight"]["module"] == "gen.0.0"
    # Backward order: the layer nearest the loss first.
    assert rec["params"]["gen.1.weight"]["order"] < rec["params"]["gen.0.0.weight"]["order"]


# --------------------------------------------------------------------------- cost


def test_unarmed_hooks_do_no_tensor_work() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    mon = Monitor(formats=("fp16", "bf16"))
    mon.attach(model)
    spies = {name: mock.Mock(wraps=getattr(monitor_mod, name)) for name in ("_forward_stats", "_input_stats", "_grad_stats")}
    abs_calls = mock.Mock(wraps=torch.abs)
    with mock.patch.multiple(monitor_mod, **spies), mock.patch.object(torch, "abs", abs_calls), \
            mock.patch.object(torch.Tensor, "abs", lambda self: abs_calls(self)):
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
        assert all(s.call_count == 0 for s in spies.values()) and abs_calls.call_count == 0
        sample(mon, model, torch.randn(2, 4))
        assert spies["_forward_stats"].call_count == 3 and spies["_grad_stats"].call_count == 4
        assert abs_calls.call_count > 0
        for s in [*spies.values(), abs_calls]:
            s.reset_mock()
        model(torch.randn(2, 4)).sum().backward()  # collected: unarmed again
        assert all(s.call_count == 0 for s in spies.values()) and abs_calls.call_count == 0


TRANSFERS = ("tolist", "item", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


@contextlib.contextmanager
def count_transfers():
    calls: list[str] = []

    def wrap(name):
        orig = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            calls.append(name)
            return orig(self, *args, **kwargs)

        return counted

    with contextlib.ExitStack() as stack:
        for name in TRANSFERS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, wrap(name)))
        yield calls


def test_one_host_transfer_per_sampled_step() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 1))
    mon = Monitor(formats=("bf16", "fp16", "fp8_e4m3"))
    mon.attach(model)
    x = torch.randn(3, 4)
    with count_transfers() as calls:
        for _ in range(2):  # unmonitored steps: no transfer at all
            model(x).sum().backward()
        assert calls == []
        mon.arm(1)
        for _ in range(2):  # two micro-batches
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            out.float().sum().backward()
        assert calls == []  # nothing inside the hooks
        rec = mon.collect(1, loss_scale=1.0)
        assert calls == ["tolist"]
    assert len(rec["modules"]) == 4 and len(rec["params"]) == 6


def test_monitor_does_not_change_numerics() -> None:
    def run(with_monitor: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.LayerNorm(7), nn.Linear(7, 2))
        if with_monitor:
            mon = Monitor(every=1, formats=("bf16", "fp16"))
            mon.attach(model)
            mon.arm(1)
        x = torch.randn(4, 5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().pow(2).mean().backward()
        if with_monitor:
            mon.collect(1, 1.0)
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    (o1, g1), (o2, g2) = run(False), run(True)
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


# --------------------------------------------------------------------------- localization


def deep(depth: int, planted: dict[int, nn.Module]) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[planted.get(i, nn.Linear(8, 8)) for i in range(depth)])


@pytest.mark.parametrize("depth", [3, 7, 12])
def test_forward_localization_fp32_inf(depth: int) -> None:
    model = deep(16, {depth: Scale(1e39)})  # finite input * 1e39 -> inf in fp32
    mon = Monitor(formats=("fp16",))
    mon.attach(model)
    rec = sample(mon, model, torch.randn(2, 8), backward=False)
    first = first_nonfinite_forward(rec)
    assert first is not None and first["module"] == str(depth) and first["type"] == "Scale"
    assert first["input_nonfinite"] == 0 and first["output_nonfinite"] > 0
    assert all(rec["modules"][str(i)]["nonfinite"] > 0 for i in range(depth, 16))
    text = describe(first, None, "fp32")
    assert text.startswith(f"non-finite output first in `{depth}` (Scale, float32)") and "inputs finite" in text


@pytest.mark.parametrize("depth", [3, 7, 12])
def test_forward_localization_fp16_autocast_input_overflow(depth: int) -> None:
    """A module multiplies by 1e30 in fp32 (still finite); the next Linear casts that to
    fp16 under autocast and overflows: that Linear is named, with the reason."""
    model = deep(16, {depth: Fp32Scale(1e30)})
    mon = Monitor(formats=("fp16", "bf16"))
    mon.attach(model)
    rec = sample(mon, model, torch.randn(2, 8), backward=False, autocast=torch.float16)
    assert rec["modules"][str(depth)]["nonfinite"] == 0
    first = first_nonfinite_forward(rec)
    assert first["module"] == str(depth + 1) and first["type"] == "Linear" and first["dtype"] == "torch.float16"
    assert first["input_amax"] > 65504
    text = describe(first, None, "fp16")
    assert text.startswith(f"fp16 overflow in `{depth + 1}` (Linear): input amax ") and "> fp16 max 65504" in text


def test_forward_localization_fp16_weight_overflow() -> None:
    """A Linear whose fp16 output overflows (finite, in-range inputs) is named, not a later one."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)
            self.proj = nn.Linear(16, 16)

        def forward(self, x):
            return x + self.proj(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    blocks = nn.ModuleList(Block() for _ in range(5))
    with torch.no_grad():
        blocks[2].proj.weight.mul_(1e5)
    model = nn.Sequential(*blocks)
    mon = Monitor(formats=("fp16",))
    mon.attach(model)
    rec = sample(mon, model, torch.randn(4, 16), backward=False, autocast=torch.float16)
    first = first_nonfinite_forward(rec)
    assert first["module"] == "2.proj" and first["input_nonfinite"] == 0
    assert rec["modules"]["2.fc"]["nonfinite"] == 0 and rec["modules"]["3.fc"]["nonfinite"] > 0
    text = describe(first, None, "fp16")
    assert "non-finite output first in `2.proj` (Linear, float16)" in text and "inputs finite" in text
    assert "likely an overflow past fp16 max 65504" in text


def test_backward_localization() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), InfGradModule(), nn.Linear(4, 4), nn.Linear(4, 1))
    mon = Monitor()
    mon.attach(model)
    rec = sample(mon, model, torch.randn(3, 4))
    assert first_nonfinite_forward(rec) is None
    back = first_nonfinite_backward(rec)
    assert back["module"] == "1" and back["param"] in ("1.weight", "1.bias") and back["nonfinite"] > 0
    assert all(rec["params"][f"{i}.weight"]["nonfinite"] == 0 for i in (3, 4))
    assert rec["params"]["0.weight"]["nonfinite"] > 0
    text = describe(None, back, "fp16")
    assert text.startswith("first non-finite gradient in `1` (param `1.")
    assert describe(None, None, "bf16") == "no module produced a non-finite value"


# --------------------------------------------------------------------------- outputs


def records_with_nan(n: int = 2) -> list[dict]:
    model = nn.Sequential(nn.Linear(3, 3), Scale(1e39), nn.Linear(3, 1))
    mon = Monitor(every=1)
    mon.attach(model)
    return [sample(mon, model, torch.randn(2, 3), step=s, loss=NAN, note="x") for s in range(1, n + 1)]


def test_jsonl_round_trip_is_strict_json(tmp_path) -> None:
    records = records_with_nan()
    assert records[0]["loss"] is None  # non-finite extra floats become None
    path = tmp_path / "sub" / "monitor.jsonl"
    writer = JsonlWriter(path)
    for r in records:
        writer.write(r)
    writer.close()

    def no_constants(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert [json.loads(line, parse_constant=no_constants) for line in lines] == records
    assert load_records(path) == records
    with JsonlWriter(path) as again:  # appends
        again.write(records[0])
    assert len(load_records(path)) == 3

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n\n{not json\n")
    with pytest.raises(UsageError, match=r"bad\.jsonl.*line 3"):
        load_records(bad)
    other = tmp_path / "other.jsonl"
    other.write_text('{"schema": "mixprec.train/1"}\n')
    with pytest.raises(UsageError, match="line 1: not a mixprec.monitor/1 record"):
        load_records(other)
    with pytest.raises(UsageError, match="missing.jsonl"):
        load_records(tmp_path / "missing.jsonl")
    with JsonlWriter(tmp_path / "x.jsonl") as w:  # non-finite floats are written as null
        w.write({"schema": MONITOR_SCHEMA, "v": NAN, "ok": [INF, 1.5]})
    assert (tmp_path / "x.jsonl").read_text() == '{"schema": "mixprec.monitor/1", "v": null, "ok": [null, 1.5]}\n'


def test_tensorboard_events_are_written_and_readable(tmp_path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = records_with_nan(3)
    writer = TensorBoardWriter(tmp_path / "tb")
    for r in records:
        writer.write(r)
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss_scale", "amax/0", "overflow_fp16/0", "underflow_fp16/0", "nonfinite/1",
            "grad_underflow_fp16/0.weight"} <= tags
    assert [e.step for e in acc.Scalars("loss_scale")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("nonfinite/1")] == [records[0]["modules"]["1"]["nonfinite"]] * 3


def test_tensorboard_missing_is_a_usage_error(tmp_path) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("TensorBoard logging requires TensorBoard")
        return real_import(name, *args, **kwargs)

    with mock.patch.object(builtins, "__import__", fake_import):
        with pytest.raises(UsageError, match="pip install tensorboard"):
            TensorBoardWriter(tmp_path / "tb")


# --------------------------------------------------------------------------- summary


def test_summarize_ranks_planted_modules() -> None:
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.hot = Scale(2e4)  # |x| up to ~4 -> amax near fp16 max
            self.cool = Scale(1e-4)
            self.tiny = Scale(1e-7)  # mostly below fp16's smallest normal
            self.b = nn.Linear(8, 1)
            self.g = nn.Parameter(torch.ones(4))  # its gradient, 16e-9, underflows fp16

        def forward(self, x):
            h = self.a(x)
            self.tiny(h)
            return self.b(self.cool(self.hot(h))) + (self.g * 1e-9).sum()

    torch.manual_seed(0)
    model = Model()
    mon = Monitor(every=1, formats=("fp16", "bf16"))
    mon.attach(model)
    records = [sample(mon, model, torch.randn(16, 8), step=s) for s in (1, 2, 3)]
    records[1]["modules"]["cool"]["nonfinite"] = 3  # as if it had overflowed once
    s = summarize(records, top=3)
    assert s["samples"] == 3 and s["format"] == "fp16" and s["steps"] == [1, 3]
    assert s["overflow_risk"][0]["module"] == "hot" and 0.1 < s["overflow_risk"][0]["ratio"] < 10
    assert len(s["overflow_risk"]) == 3
    assert s["underflow"][0]["module"] == "tiny" and s["underflow"][0]["underflow"] > 0.5
    assert s["grad_underflow"][0]["param"] == "g" and s["grad_underflow"][0]["underflow"] == 1.0
    assert s["nonfinite"] == [{"module": "cool", "type": "Scale", "records": 1, "first_step": 2, "max_nonfinite": 3}]
    text = render_summary(s)
    assert "overflow risk" in text and "hot" in text and "tiny" in text and "cool" in text
    assert text.splitlines()[0].startswith("monitor: 3 sampled steps")
    json.dumps(s, allow_nan=False)
    with pytest.raises(UsageError):
        summarize(records, top=0)
    assert "(none)" in render_summary(summarize([]))


def test_lm_recipe_record_under_bf16_autocast() -> None:
    from mixprec.recipes.lm import lm

    task = lm(n_layer=1, d_model=32, n_head=2, seq_len=32, batch_size=4)
    torch.manual_seed(0)
    model = task.build_model()
    mon = Monitor(formats=("bf16", "fp16"))
    mon.attach(model)
    batch = next(task.train_batches(0))
    mon.arm(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = task.loss(model, batch)
    loss.backward()
    rec = mon.collect(1, loss_scale=1.0, extra={"loss": loss.item()})
    leaves = {n for n, m in model.named_modules() if n and next(m.children(), None) is None}
    assert set(rec["modules"]) == leaves
    assert set(rec["params"]) == {n for n, _ in model.named_parameters()}
    assert rec["modules"]["blocks.0.attn.qkv"]["dtype"] == "torch.bfloat16"
    assert rec["modules"]["tok_emb"]["input_amax"] is None  # integer inputs only
    assert first_nonfinite_forward(rec) is None and first_nonfinite_backward(rec) is None
    assert math.isfinite(rec["modules"]["lm_head"]["amax"])
    json.dumps(rec, allow_nan=False)
