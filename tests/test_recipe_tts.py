"""The ``tts`` recipe: mu-law companding, voiced synthetic audio, the causal WaveNet and its Task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mixprec
from mixprec.errors import UsageError
from mixprec.recipes import RECIPES, audio, get_recipe
from mixprec.recipes.tts import N_CLASSES, WaveNet, load_tts_data, mulaw_decode, mulaw_encode, tts
from mixprec.task import Task

TINY = dict(residual=16, gate=16, skip=32, layers_per_stack=4, n_stacks=1, crop=256,
            batch_size=4, n_train=4, n_val=2, wave_seconds=0.25, eval_crops=4)


@pytest.fixture(scope="module")
def tiny_task() -> Task:
    return tts(**TINY)


# --------------------------------------------------------------------------- mu-law


def test_mulaw_endpoints_and_centre():
    assert N_CLASSES == 256
    q = mulaw_encode(torch.tensor([-1.0, 1.0, 0.0, -5.0, 5.0]))
    assert q.dtype == torch.long and q.tolist() == [0, 255, 128, 0, 255]  # out of range clamps
    x = mulaw_decode(torch.tensor([0, 255]))
    assert x.dtype == torch.float32 and x.tolist() == [-1.0, 1.0]
    # The two classes around zero decode to +-(256**(1/255) - 1) / 255, about +-1.7e-4.
    small = (256 ** (1 / 255) - 1) / 255
    torch.testing.assert_close(mulaw_decode(torch.tensor([127, 128])),
                               torch.tensor([-small, small]), rtol=1e-4, atol=0)


def test_mulaw_round_trip_within_a_quantization_step():
    x = torch.linspace(-1, 1, 20001)
    q = mulaw_encode(x)
    assert int(q.min()) == 0 and int(q.max()) == 255
    assert torch.all(q[1:] >= q[:-1])  # monotonic
    assert torch.unique(q).numel() == 256  # every class is reachable
    levels = mulaw_decode(torch.arange(256))
    assert torch.all(levels[1:] > levels[:-1])
    # The round trip lands on the nearest level in the companded domain (within half a class,
    # 1/255 of f in [-1, 1]) ...
    f = torch.sign(x) * torch.log1p(255 * x.abs()) / math.log(256)
    assert torch.all((f - (2 * q.float() / 255 - 1)).abs() <= 1 / 255 + 1e-6)
    # ... so in the signal domain it is within one quantization step: the gap between the
    # decoded level and its neighbour on x's side.
    back = mulaw_decode(q)
    side = torch.where(x >= back, (q + 1).clamp(max=255), (q - 1).clamp(min=0))
    err = (back - x).abs()
    assert torch.all(err <= (levels[side] - back).abs() + 1e-6)
    assert float(err.max()) < 0.03  # the largest step (near +-1) is 0.043
    # Small amplitudes get small steps: the companding is finer near zero than near +-1.
    assert float(levels[129] - levels[128]) < 0.01 * float(levels[255] - levels[254])
    # The levels are fixed points of encode(decode(.)).
    assert torch.equal(mulaw_encode(levels), torch.arange(256))


# --------------------------------------------------------------------------- model


def test_wavenet_is_causal_with_the_stated_receptive_field():
    torch.manual_seed(0)
    model = WaveNet(residual=8, gate=8, skip=16, layers_per_stack=4, n_stacks=2).eval()
    assert model.receptive_field == 1 + 1 + 2 * (1 + 2 + 4 + 8)  # input conv + two stacks
    T, t = 128, 60
    x = torch.rand(1, 1, T) * 2 - 1
    with torch.no_grad():
        y = model(x)
        assert y.shape == (1, N_CLASSES, T)
        changed = x.clone()
        changed[..., t] += 0.5
        y2 = model(changed)
    # Outputs before t (the predictions of samples <= t) do not see x[t] ...
    assert torch.equal(y2[..., :t], y[..., :t])
    # ... output t (the prediction of sample t + 1) does, and so does every output within
    # the receptive field after it, but none beyond. In float64: at the far end of the
    # receptive field only one path (through every layer) carries the change, and it is
    # tiny (~1e-8 here, lost in float32 rounding).
    model.double()
    with torch.no_grad():
        moved = (model(changed.double()) - model(x.double())).abs().amax(dim=1)[0] > 0
    rf = model.receptive_field
    assert moved.nonzero().flatten().tolist() == list(range(t, t + rf))


def test_optimizer_and_structure(tiny_task):
    model = tiny_task.build_model()
    assert isinstance(model, WaveNet) and len(model.layers) == 4
    assert [layer.dilated.dilation[0] for layer in model.layers] == [1, 2, 4, 8]
    opt = tiny_task.build_optimizer(model)
    assert isinstance(opt, torch.optim.AdamW)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


# --------------------------------------------------------------------------- data and batches


def test_data_is_deterministic_and_the_splits_differ():
    n_samples = int(TINY["wave_seconds"] * audio.SAMPLE_RATE)
    train, val = load_tts_data(TINY["n_train"], TINY["n_val"], n_samples)
    assert train.shape == (TINY["n_train"], n_samples) and val.shape == (TINY["n_val"], n_samples)
    assert train.dtype == val.dtype == torch.long
    assert int(train.min()) >= 0 and int(train.max()) <= 255
    load_tts_data.cache_clear()
    audio.voiced_set.cache_clear()
    train2, val2 = load_tts_data(TINY["n_train"], TINY["n_val"], n_samples)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert not torch.equal(train[: len(val)], val)
    # Voiced audio, not silence: it spans many classes and has a periodic structure.
    assert torch.unique(train[0]).numel() > 100
    wave = mulaw_decode(train[0]).numpy()
    ac = np.correlate(wave[:1200], wave[:1200], mode="full")[1199:]
    period = 8000 / 220, 8000 / 90 * 1.15  # pitch range, with the declination and jitter
    lag = int(np.argmax(ac[int(period[0]) - 2: int(period[1]) + 2])) + int(period[0]) - 2
    assert ac[lag] > 0.3 * ac[0]


def test_train_batches_shapes_shift_and_determinism(tiny_task):
    x, y = next(tiny_task.train_batches(0))
    B, T = TINY["batch_size"], TINY["crop"]
    assert x.shape == (B, 1, T) and x.dtype == torch.float32
    assert y.shape == (B, T) and y.dtype == torch.long
    # Teacher forcing: the input at t is the target at t - 1, decoded to its signal value.
    assert torch.equal(mulaw_encode(x[:, 0, 1:]), y[:, :-1])
    torch.testing.assert_close(x[:, 0, 1:], mulaw_decode(y[:, :-1]), rtol=1e-6, atol=1e-7)

    torch.manual_seed(7)
    state = torch.get_rng_state()
    a = [next(it) for it in [tiny_task.train_batches(0)] for _ in range(3)]
    b = [next(it) for it in [tiny_task.train_batches(0)] for _ in range(3)]
    c = [next(it) for it in [tiny_task.train_batches(1)] for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[1], q[1]) for p, q in zip(a, c))
    assert not torch.equal(a[0][1], a[1][1])


def test_loss_is_fp32_under_bf16_autocast_and_near_uniform_at_init(tiny_task):
    torch.manual_seed(0)
    model = tiny_task.build_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tiny_task.loss(model, next(tiny_task.train_batches(0)))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - math.log(256)) < 0.5


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("kwargs, shown", [
    (dict(residual=0), "0"),
    (dict(gate=-4), "-4"),
    (dict(skip=1.5), "1.5"),
    (dict(layers_per_stack=20), "20"),
    (dict(n_stacks=False), "False"),
    (dict(crop="1024"), "'1024'"),
    (dict(batch_size=0), "0"),
    (dict(lr=-1e-3), "-0.001"),
    (dict(weight_decay=float("nan")), "nan"),
    (dict(wave_seconds=0), "0"),
    (dict(wave_seconds=0.1, crop=1024), "0.1"),  # 800 samples cannot hold a 1025-sample crop
    (dict(eval_crops=0), "0"),
])
def test_bad_arguments_raise_usage_error_naming_the_value(kwargs, shown):
    with pytest.raises(UsageError) as info:
        tts(**kwargs)
    message = str(info.value)
    assert shown in message and "\n" not in message
    assert next(iter(kwargs)) in message


# --------------------------------------------------------------------------- training and evaluation


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_short_training_lowers_the_loss(tiny_task, precision):
    result = mixprec.train(tiny_task, precision, steps=20, seed=0, monitor_every=0)
    assert result["status"] == "completed"
    losses = result["losses"]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # Measured (tiny, fp32, seeds 0-2): 5.53-5.56 -> 5.16-5.21 nats in 20 steps (0.33-0.39).
    assert last < first - 0.2, losses
    assert result["eval"]["nll_bits"] < 8.0


def test_evaluate_keys_modes_and_the_uniform_model(tiny_task):
    torch.manual_seed(0)
    model = tiny_task.build_model()
    metrics = tiny_task.evaluate(model)
    assert set(metrics) == {"nll_bits", "val_loss"}
    assert all(type(v) is float and math.isfinite(v) for v in metrics.values())
    assert metrics["nll_bits"] == pytest.approx(metrics["val_loss"] / math.log(2), rel=1e-12)
    assert model.training  # the mode it found is restored
    assert tiny_task.evaluate(model) == metrics  # fixed validation crops
    model.eval()
    tiny_task.evaluate(model)
    assert not model.training

    with torch.no_grad():  # all logits equal: the uniform model, exactly 8 bits per sample
        model.head2.weight.zero_()
        model.head2.bias.fill_(3.0)
    assert tiny_task.evaluate(model)["nll_bits"] == pytest.approx(8.0, abs=1e-5)
    with torch.no_grad():  # all mass on class 0 (the sample -1.0, absent from quiet audio)
        model.head2.bias.zero_()
        model.head2.bias[0] = 20.0
    # -log softmax at a true class other than 0: log(e^20 + 255) nats, i.e. 20 nats to float precision.
    assert tiny_task.evaluate(model)["nll_bits"] == pytest.approx(math.log(math.exp(20) + 255) / math.log(2), rel=1e-6)


# --------------------------------------------------------------------------- registry


@pytest.mark.xfail(__import__("mixprec.recipes", fromlist=["RECIPES"]).RECIPES["tts"].expected_fp32 is None,
                   reason="fp32 range at the defaults not yet measured on a quiet machine (issue 6)", strict=True)
def test_registry_entry():
    info = get_recipe("tts")
    assert "tts" in RECIPES and info.factory is tts
    assert info.metric_key == "nll_bits" and info.higher_is_better is False
    assert info.tiny == TINY
    lo, hi = info.expected_fp32
    assert 0.0 < lo < hi < 8.0  # documented range: below the uniform model's 8 bits
