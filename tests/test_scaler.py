"""LossScaler: GradScaler's arithmetic with hysteresis and a floor, and a no-op when disabled.
"""

from __future__ import annotations

import io
import random

import pytest
import torch
from torch import nn

from mixprec.errors import UsageError
from mixprec.policy import ScalerConfig
from mixprec.scaler import LossScaler, ScaleUpdate



class TorchScaler:
    """torch.amp.GradScaler driven through its public API with a chosen overflow pattern."""

    def __init__(self, **kwargs) -> None:
        self.param = nn.Parameter(torch.zeros(3))
        self.opt = torch.optim.SGD([self.param], lr=0.0)
        self.scaler = torch.amp.GradScaler("cpu", **kwargs)

    def update(self, overflow: bool) -> float:
        self.scaler.scale(torch.ones(()))  # the lazy init, as in a real loop
        self.param.grad = torch.full((3,), float("inf") if overflow else 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        return self.scaler.get_scale()


def overflow_pattern(n: int, seed: int, p: float = 0.3) -> list[bool]:
    rng = random.Random(seed)
    return [rng.random() < p for _ in range(n)]


# -- the scale sequence against GradScaler ------------------------------------------------------


@pytest.mark.parametrize(
    "init_scale,growth_factor,backoff_factor,growth_interval,seed,p",
    [(2.0**16, 2.0, 0.5, 3, 0, 0.3), (2.0**10, 2.0, 0.5, 1, 1, 0.4), (1024.0, 1.7, 0.3, 3, 2, 0.15),
     (2.0**16, 4.0, 0.25, 2, 3, 0.3)],
)
def test_scale_sequence_matches_gradscaler(init_scale, growth_factor, backoff_factor, growth_interval, seed, p):
    kw = dict(init_scale=init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
              growth_interval=growth_interval)
    ours = LossScaler(ScalerConfig(**kw, hysteresis=1, min_scale=1e-30))
    theirs = TorchScaler(**kw)
    pattern = overflow_pattern(300, seed, p)
    grew = backed = 0
    for i, overflow in enumerate(pattern):
        update = ours.update(overflow)
        expected = theirs.update(overflow)
        assert ours.scale == expected, f"step {i}: {ours.scale} != {expected}"
        assert update.backed_off == overflow
        grew += update.grew
        backed += update.backed_off
        assert not update.absorbed and not update.floor_hit
        assert 1e-30 < ours.scale < float("inf")
    assert grew > 5 and backed > 5  # the pattern exercised both directions


def test_scale_is_mirrored_into_the_loss():
    ours = LossScaler(ScalerConfig(init_scale=2.0**12, growth_interval=2))
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    loss = torch.tensor(0.3141, dtype=torch.float32)
    for overflow in [False, True, False, False, True]:
        a, b = ours.scale_loss(loss), theirs.scale(loss)
        # (GradScaler returns a 0-dim tensor here; LossScaler one of shape (1,).)
        assert a.dtype == b.dtype and torch.equal(a.reshape(()), b.reshape(()))
        assert a.item() == pytest.approx(0.3141 * ours.scale, rel=1e-6)
        ours.update(overflow)
        theirs._scale.fill_(ours.scale)  # keep theirs in step without a step()
    half = torch.tensor(2.0, dtype=torch.float16)
    a, b = ours.scale_loss(half), theirs.scale(half)
    assert a.dtype == b.dtype == torch.float32 and torch.equal(a.reshape(()), b.reshape(()))


# -- hysteresis ---------------------------------------------------------------------------------


def test_hysteresis_absorbs_first_overflow_then_backs_off():
    s = LossScaler(ScalerConfig(init_scale=1024.0, growth_interval=3, hysteresis=2))
    assert s.update(True) == ScaleUpdate(absorbed=True)
    assert s.scale == 1024.0
    assert s.update(True) == ScaleUpdate(backed_off=True)
    assert s.scale == 512.0
    # After a back-off the count is not restored: the next overflow backs off at once.
    assert s.update(True).backed_off and s.scale == 256.0


def test_hysteresis_restored_when_scale_grows():
    s = LossScaler(ScalerConfig(init_scale=1024.0, growth_interval=3, hysteresis=2))
    assert s.update(True).absorbed
    assert [s.update(False).grew for _ in range(3)] == [False, False, True]
    assert s.scale == 2048.0
    assert s.update(True).absorbed and s.scale == 2048.0  # restored: absorbed again
    assert s.update(True).backed_off and s.scale == 1024.0


def test_absorbed_overflow_resets_growth_interval():
    s = LossScaler(ScalerConfig(init_scale=1024.0, growth_interval=3, hysteresis=3))
    s.update(False)
    s.update(False)
    assert s.update(True).absorbed
    assert [s.update(False).grew for _ in range(3)] == [False, False, True]


def test_hysteresis_one_is_gradscaler():
    # With hysteresis=1 every overflow backs off, as torch does.
    s = LossScaler(ScalerConfig(init_scale=8.0, hysteresis=1))
    assert s.update(True) == ScaleUpdate(backed_off=True) and s.scale == 4.0


# -- the floor ----------------------------------------------------------------------------------


def test_min_scale_floor():
    s = LossScaler(ScalerConfig(init_scale=4.0, min_scale=1.0))
    assert s.update(True).backed_off and s.scale == 2.0
    assert s.update(True).backed_off and s.scale == 1.0
    for _ in range(3):
        update = s.update(True)
        assert update == ScaleUpdate(floor_hit=True)
        assert s.scale == 1.0


def test_min_scale_clamps_back_off():
    s = LossScaler(ScalerConfig(init_scale=3.0, min_scale=2.0))
    assert s.update(True).backed_off and s.scale == 2.0  # clamped, not 1.5
    assert s.update(True).floor_hit and s.scale == 2.0
    # It can still grow from the floor.
    s2 = LossScaler(ScalerConfig(init_scale=2.0, min_scale=2.0, growth_interval=2))
    assert s2.update(True).floor_hit
    s2.update(False)
    assert s2.update(False).grew and s2.scale == 4.0


# -- disabled -----------------------------------------------------------------------------------


def test_disabled_scaler_is_a_no_op():
    s = LossScaler(ScalerConfig(init_scale=1024.0), enabled=False)
    assert s.scale == 1.0
    loss = torch.tensor(3.5, requires_grad=True)
    assert s.scale_loss(loss) is loss
    g = torch.tensor([1.0, float("inf")])
    before = g.clone()
    assert s.unscale_([g]) is None
    assert torch.equal(g, before)
    for overflow in (True, False, True):
        assert s.update(overflow) == ScaleUpdate()
        assert s.scale == 1.0
    state = s.state_dict()
    assert state["enabled"] is False and state["scale"] == 1.0
    other = LossScaler(enabled=False)
    other.load_state_dict(state)
    assert other.scale == 1.0


def test_state_of_the_other_kind_is_refused():
    on, off = LossScaler(), LossScaler(enabled=False)
    with pytest.raises(UsageError, match="off"):
        off.load_state_dict(on.state_dict())
    with pytest.raises(UsageError, match="on"):
        on.load_state_dict(off.state_dict())


# -- state_dict -------------------------------------------------------------------------------


def test_state_dict_round_trip():
    cfg = ScalerConfig(init_scale=2.0**14, growth_interval=4, hysteresis=3)
    a = LossScaler(cfg)
    pattern = overflow_pattern(40, seed=7, p=0.25)
    for overflow in pattern[:17]:
        a.update(overflow)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = LossScaler(cfg)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.state_dict() == a.state_dict()
    assert b.scale == a.scale
    loss = torch.tensor(1.5)
    assert torch.equal(b.scale_loss(loss), a.scale_loss(loss))
    for overflow in pattern[17:]:
        assert a.update(overflow) == b.update(overflow)
        assert a.scale == b.scale
    # A fresh scaler that skipped the load would have diverged.
    c = LossScaler(cfg)
    for overflow in pattern[17:]:
        c.update(overflow)
    assert (c.scale, c.state_dict()["growth_tracker"]) != (a.scale, a.state_dict()["growth_tracker"]) or \
        c.state_dict()["hysteresis_left"] != a.state_dict()["hysteresis_left"]


def test_loaded_scale_reaches_the_loss():
    a = LossScaler(ScalerConfig(init_scale=2.0**8))
    a.scale_loss(torch.ones(()))  # device mirror created
    a.load_state_dict({"enabled": True, "scale": 32.0, "growth_tracker": 0, "hysteresis_left": 1})
    assert a.scale == 32.0
    assert a.scale_loss(torch.ones(())).item() == 32.0


# -- unscale_ -------------------------------------------------------------------------------------


def make_grads(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 3, 2), (1,)]
    grads = [torch.randn(s, generator=g) * 10.0 ** torch.randint(-6, 8, (), generator=g).item() for s in shapes]
    grads[1][0] = 1e-38  # near the fp32 subnormal range after unscaling
    return grads


def gradscaler_unscale(grads: list[torch.Tensor], init_scale: float) -> tuple[list[torch.Tensor], bool]:
    params = [nn.Parameter(torch.zeros_like(x)) for x in grads]
    for p, x in zip(params, grads):
        p.grad = x.clone()
    opt = torch.optim.SGD(params, lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    scaler.scale(torch.ones(()))
    scaler.unscale_(opt)
    found = sum(v.item() for v in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
    return [p.grad for p in params], bool(found)


@pytest.mark.parametrize("init_scale", [2.0**16, 2.0**24, 3.0, 1024.0 * 1.5])
@pytest.mark.parametrize("poison", [None, "inf", "-inf", "nan"])
def test_unscale_matches_gradscaler(init_scale, poison):
    grads = make_grads(seed=int(init_scale) % 97)
    if poison is not None:
        grads[2][1, 1, 0] = float(poison)
    expected, expected_found = gradscaler_unscale(grads, init_scale)
    s = LossScaler(ScalerConfig(init_scale=init_scale, min_scale=1.0))
    ours = [x.clone() for x in grads]
    found = s.unscale_(ours)
    assert isinstance(found, torch.Tensor) and found.numel() == 1
    assert bool(found.item()) == expected_found == (poison is not None)
    for a, b in zip(ours, expected):
        assert a.dtype == b.dtype
        assert torch.equal(a, b) or (poison == "nan" and torch.equal(a.nan_to_num(), b.nan_to_num()))


def test_unscale_mixed_dtypes_flags_any_group():
    s = LossScaler(ScalerConfig(init_scale=4.0))
    g32 = torch.tensor([8.0, 4.0])
    g16 = torch.tensor([2.0, float("inf")], dtype=torch.float16)
    found = s.unscale_([g32, g16])
    assert found.item() > 0
    assert torch.equal(g32, torch.tensor([2.0, 1.0]))
    assert g16[0].item() == 0.5 and g16.dtype == torch.float16
    finite = s.unscale_([torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.float16)])
    assert finite.item() == 0


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_unscale_sparse_fp32():
    s = LossScaler(ScalerConfig(init_scale=2.0))
    g = torch.sparse_coo_tensor(torch.tensor([[0, 0, 2]]), torch.tensor([2.0, 2.0, 8.0]), (3,))
    assert s.unscale_([g]).item() == 0
    assert torch.equal(g.to_dense(), torch.tensor([2.0, 0.0, 4.0]))


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_unscale_sparse_fp16_uncoalesced_is_refused():
    # Only the owner of .grad can coalesce it in place (the engine does, as GradScaler does).
    s = LossScaler(ScalerConfig(init_scale=2.0))
    g = torch.sparse_coo_tensor(torch.tensor([[0, 0, 1]]), torch.tensor([2.0, 2.0, 4.0], dtype=torch.float16), (3,))
    with pytest.raises(UsageError, match="coalesced"):
        s.unscale_([g])
    s.unscale_([g.coalesce()])  # coalesced: fine


# -- bugs: the host scale vs the fp32 scale GradScaler (and the loss) use --------------------------

UNREPRESENTABLE = 100000.3  # not an fp32 value; 1/x and 1/fp32(x) round to different fp32s


def test_init_scale_is_rounded_to_fp32_like_gradscaler():
    s = LossScaler(ScalerConfig(init_scale=UNREPRESENTABLE))
    theirs = torch.amp.GradScaler("cpu", init_scale=UNREPRESENTABLE)
    theirs.scale(torch.ones(()))
    assert s.scale_loss(torch.ones(())).item() == s.scale
    assert s.scale == theirs.get_scale()


def test_unscale_matches_gradscaler_with_unrepresentable_init_scale():
    grads = [torch.full((4,), 3.0), torch.linspace(-5, 5, 11)]
    expected, _ = gradscaler_unscale(grads, UNREPRESENTABLE)
    s = LossScaler(ScalerConfig(init_scale=UNREPRESENTABLE))
    ours = [x.clone() for x in grads]
    s.unscale_(ours)
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))


def test_state_dict_round_trip_unrepresentable_init_scale():
    cfg = ScalerConfig(init_scale=UNREPRESENTABLE)
    a = LossScaler(cfg)
    b = LossScaler(cfg)
    b.load_state_dict(a.state_dict())
    assert b.scale == a.scale


def test_scale_never_grows_into_fp32_inf():
    s = LossScaler(ScalerConfig(init_scale=2.0**127, growth_interval=1))
    theirs = TorchScaler(init_scale=2.0**127, growth_interval=1)
    s.update(False)
    assert s.scale == theirs.update(False) == 2.0**127
