"""quantize(): nearest == torch's cast (bitwise) and == an independent reference; stochastic
rounding is unbiased, picks only the two neighbours, and is reproducible; sqnr_db.

The reference rounding here is plain Python float arithmetic on the format's facts
(exponent range, mantissa bits), not torch, so it checks torch's cast as well as ours.
Hypothesis is optional: without it the property tests are skipped, the rest still run.
"""

from __future__ import annotations

import math
import struct

import pytest
import torch

from mixprec.errors import UsageError
from mixprec.formats import FORMATS, get_format
from mixprec.quantization import ROUNDING_MODES, quantize, sqnr_db

from hypothesis import HealthCheck, given, settings  # a dev dependency
from hypothesis import strategies as st

NARROW = ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2"]  # formats torch has a dtype for
ROUNDED = [*NARROW, "tf32"]  # every format that actually rounds fp32 values
ALL = list(FORMATS)
FP32_MAX = torch.finfo(torch.float32).max



@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # the random test inputs are the same on every run


# --------------------------------------------------------------------------- references


def ref_nearest(v: float, name: str) -> float:
    """Round-to-nearest-even of a Python float to ``name``, from the format's facts.

    Overflow: inf for formats with inf; fp8_e4m3 ("fn", no inf) saturates to +-max, which
    is what torch 2.13's cast does (inf included). NaN stays NaN.
    """
    f = get_format(name)
    if math.isnan(v):
        return math.nan
    if math.isinf(v):
        return v if f.has_inf else math.copysign(f.max, v)
    if v == 0.0:
        return v
    a = abs(v)
    exp = max(math.frexp(a)[1] - 1, 1 - f.bias)  # a in [2**exp, 2**(exp+1)), clamped: subnormals
    ulp = math.ldexp(1.0, exp - f.mantissa_bits)
    q = round(a / ulp) * ulp  # a / ulp is exact; round() is half-to-even
    if q > f.max:
        q = math.inf if f.has_inf else f.max
    return math.copysign(q, v)


def ref_neighbours(v: float, name: str) -> tuple[float, float]:
    """(toward zero, away from zero) representable neighbours of finite ``v`` (|v| <= max)."""
    f = get_format(name)
    a = abs(v)
    exp = max(math.frexp(a)[1] - 1, 1 - f.bias) if a else 1 - f.bias
    ulp = math.ldexp(1.0, exp - f.mantissa_bits)
    lo = math.floor(a / ulp) * ulp
    return math.copysign(lo, v), math.copysign(lo + ulp, v)


def tf32_ref_bits(b: int) -> int:
    """tf32 round-to-nearest-even on an unsigned fp32 bit pattern, in Python integers."""
    if (b >> 23) & 0xFF == 0xFF:  # inf / NaN: unchanged
        return b
    keep, low = b >> 13, b & 0x1FFF
    if low > 0x1000 or (low == 0x1000 and keep & 1):
        keep += 1  # a carry into the exponent is correct rounding (up to inf)
    return (keep << 13) & 0xFFFFFFFF


def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def bits_from_ints(ints) -> torch.Tensor:
    """fp32 tensor with the given unsigned 32-bit patterns."""
    return torch.tensor([i - (1 << 32) if i >= 1 << 31 else i for i in ints],
                        dtype=torch.int32).view(torch.float32)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise equality, except that any NaN matches any NaN."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    int_dtype = {torch.float32: torch.int32, torch.float64: torch.int64,
                 torch.float16: torch.int16, torch.bfloat16: torch.int16}[actual.dtype]
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), "NaN positions differ"
    a, e = actual.view(int_dtype)[~nan_a], expected.view(int_dtype)[~nan_e]
    bad = (a != e).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise AssertionError(
            f"{len(bad)} values differ; first: got {actual[~nan_a][i].item()!r}, "
            f"expected {expected[~nan_e][i].item()!r}"
        )


def cast_round_trip(x: torch.Tensor, name: str) -> torch.Tensor:
    return x.to(get_format(name).dtype).to(x.dtype)


# --------------------------------------------------------------------------- explicit edges


def edge_values(name: str) -> list[float]:
    f = get_format(name)
    top_ulp = math.ldexp(1.0, math.frexp(f.max)[1] - 1 - f.mantissa_bits)
    sub = f.smallest_subnormal
    vals = [
        0.0, -0.0, math.inf, -math.inf, math.nan,
        f.max, -f.max, f.max * (1 + f.eps / 2), -f.max * (1 + f.eps / 2),
        f.max + top_ulp / 2, f.max + top_ulp / 2 - top_ulp / 64, f.max + 3 * top_ulp,
        sub, -sub, sub / 2, -sub / 2, sub / 2 * (1 + 2**-20), sub * 1.5, sub / 4,
        f.smallest_normal, f.smallest_normal - sub, f.smallest_normal - sub / 2,
        1.0, 1.0 + f.eps / 2, 1.0 + f.eps * 1.5, -(1.0 + f.eps / 2 + f.eps / 8),
        3.0e38, 1e-45,
    ]
    return [v for v in vals if math.isnan(v) or abs(v) <= FP32_MAX]


@pytest.mark.parametrize("name", ROUNDED)
def test_nearest_edge_cases_match_cast_and_reference(name):
    x = f32(edge_values(name))
    q = quantize(x, name)
    assert_same_bits(q, f32([ref_nearest(v, name) for v in x.tolist()]))
    if name != "tf32":
        assert_same_bits(q, cast_round_trip(x, name))


@pytest.mark.parametrize("name", ROUNDED)
def test_nearest_specific_edges(name):
    f = get_format(name)
    sub = f.smallest_subnormal
    q = lambda v: quantize(f32([v]), name).item()  # noqa: E731
    assert q(f.max) == f.max
    over = math.inf if f.has_inf else f.max
    assert q(f.max * (1 + f.eps / 2)) == over
    assert q(-f.max * (1 + f.eps / 2)) == -over
    top_ulp = math.ldexp(1.0, math.frexp(f.max)[1] - 1 - f.mantissa_bits)
    assert q(f.max + top_ulp / 2 * (1 - 2**-10)) == f.max  # just below the midpoint
    # smallest subnormal / 2 is a tie: to even, i.e. zero, keeping the sign
    assert q(sub / 2) == 0.0 and math.copysign(1, q(sub / 2)) == 1
    assert q(-sub / 2) == 0.0 and math.copysign(1, q(-sub / 2)) == -1
    assert q(sub / 2 * (1 + 2**-10)) == sub  # just above the tie
    assert q(sub * 1.5) == 2 * sub  # tie between sub and 2 sub: to even
    assert math.copysign(1, q(-0.0)) == -1


def test_e4m3_cast_saturates_in_this_torch():
    """Documents torch's fp8_e4m3fn cast: > 448 and +-inf saturate to +-448, NaN stays NaN.

    quantize matches the cast (tested above); this pins down what the cast is, so a torch
    upgrade that changes it (e.g. to NaN) is noticed.
    """
    x = f32([449.0, 464.0, 1e4, 3e38, math.inf, -math.inf, -500.0, math.nan])
    q = quantize(x, "fp8_e4m3")
    assert q[:7].tolist() == [448.0, 448.0, 448.0, 448.0, 448.0, -448.0, -448.0]
    assert math.isnan(q[7].item())
    assert_same_bits(q, cast_round_trip(x, "fp8_e4m3"))


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp8_e5m2"])
def test_overflow_to_inf(name):
    f = get_format(name)
    big = 3.4e38 if name == "bf16" else f.max * (1 + f.eps)  # past max + half an ulp
    q = quantize(f32([big, -big, 3.4e38]), name)
    assert q.tolist() == [math.inf, -math.inf, math.inf]


def test_tf32_against_integer_reference_exhaustive_patterns():
    # Every low-13-bit pattern class that matters around a few exponents, plus specials.
    lows = [0, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF]
    patterns = []
    for sign in (0, 1 << 31):
        for exp in (0, 1, 0x7E, 0x7F, 0xFE, 0xFF):
            for keep_lsb in (0, 1 << 13, 0x7FE000):
                for low in lows:
                    patterns.append(sign | (exp << 23) | keep_lsb | low)
    x = bits_from_ints(patterns)
    expected = bits_from_ints([tf32_ref_bits(b) for b in patterns])
    assert_same_bits(quantize(x, "tf32"), expected)
    finite = torch.isfinite(x)
    assert (quantize(x, "tf32")[finite].view(torch.int32) & 0x1FFF).eq(0).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtype_shape_and_fresh_tensor(name, dtype):
    x = (torch.randn(3, 5, dtype=torch.float64) * 10).to(dtype)
    for rounding in ROUNDING_MODES:
        q = quantize(x, name, rounding)
        assert q.dtype == dtype and q.shape == x.shape
        assert q.data_ptr() != x.data_ptr()  # a copy, never the input itself
    if get_format(name).native and dtype != torch.float64:
        assert_same_bits(quantize(x, name), cast_round_trip(x, name))


def test_fp32_is_identity_for_fp32_input():
    x = torch.randn(100)
    assert_same_bits(quantize(x, "fp32"), x)
    assert_same_bits(quantize(x, "fp32", "stochastic"), x)


def test_fp64_nearest_matches_torch_cast_including_double_rounding():
    # 1 + 2**-11 + 2**-40 is above the fp16 midpoint; torch rounds through fp32 -> 1.0.
    x = torch.tensor([1 + 2**-11 + 2**-40, 1e300, -1e-300, 65519.9], dtype=torch.float64)
    q = quantize(x, "fp16")
    assert_same_bits(q, cast_round_trip(x, "fp16"))
    assert q.tolist() == [1.0, math.inf, -0.0, 65504.0]


def test_non_contiguous_and_empty():
    x = torch.randn(8, 6).t()
    assert_same_bits(quantize(x, "fp16"), cast_round_trip(x, "fp16"))
    assert quantize(x, "bf16", "stochastic").shape == x.shape
    assert quantize(torch.empty(0), "fp8_e5m2").shape == (0,)


# --------------------------------------------------------------------------- errors


def test_unknown_format_is_usage_error():
    with pytest.raises(UsageError, match="fp17"):
        quantize(torch.ones(2), "fp17")


def test_unknown_rounding_is_usage_error_naming_value_and_valid_ones():
    with pytest.raises(UsageError, match=r"'up'.*nearest.*stochastic"):
        quantize(torch.ones(2), "fp16", rounding="up")


@pytest.mark.parametrize("bad", [torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.bool),
                                 torch.ones(2, dtype=torch.complex64), [1.0, 2.0]])
def test_non_floating_is_type_error(bad):
    with pytest.raises(TypeError):
        quantize(bad, "fp16")


# --------------------------------------------------------------------------- stochastic


def stochastic_cases(name: str) -> list[tuple[float, float, float]]:
    """(lo, hi, x) with x strictly between neighbours lo and hi, exact in fp32."""
    f = get_format(name)
    sub = f.smallest_subnormal
    top_ulp = math.ldexp(1.0, math.frexp(f.max)[1] - 1 - f.mantissa_bits)
    cases = [
        (1.0, 1.0 + f.eps, 1.0 + f.eps * 5 / 16),
        (-1.5, -1.5 - f.eps, -1.5 - f.eps * 11 / 16),  # negative: hi is away from zero
        (3 * sub, 4 * sub, 3 * sub + sub / 4),  # subnormal
        (0.0, sub, sub * 3 / 8),  # below the smallest subnormal
        (f.max - top_ulp, f.max, f.max - top_ulp / 2 - top_ulp / 8),  # just below max
    ]
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ROUNDED)
def test_stochastic_unbiased_and_only_neighbours(name, dtype):
    n = 10_000
    gen = torch.Generator().manual_seed(1234)
    for lo, hi, v in stochastic_cases(name):
        x = torch.full((n,), v, dtype=dtype)
        assert x[0].item() == v
        q = quantize(x, name, "stochastic", generator=gen).double()
        assert set(q.unique().tolist()) == {lo, hi}, (name, lo, hi, v)
        p = (v - lo) / (hi - lo)
        se = abs(hi - lo) * math.sqrt(p * (1 - p) / n)
        assert abs(q.mean().item() - v) < 4 * se, (name, v, q.mean().item(), se)


@pytest.mark.parametrize("name", ROUNDED)
def test_stochastic_reproducible_with_generator(name):
    x = torch.randn(4096) * 3
    a = quantize(x, name, "stochastic", generator=torch.Generator().manual_seed(7))
    b = quantize(x, name, "stochastic", generator=torch.Generator().manual_seed(7))
    c = quantize(x, name, "stochastic", generator=torch.Generator().manual_seed(8))
    assert_same_bits(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", ROUNDED)
def test_stochastic_leaves_representable_and_specials(name):
    f = get_format(name)
    rep = quantize(torch.randn(2048) * 4, name)
    specials = f32([0.0, -0.0, f.max, -f.max, f.smallest_subnormal, -f.smallest_normal])
    x = torch.cat([rep, specials])
    assert_same_bits(quantize(x, name, "stochastic"), x)
    beyond = [math.inf, -math.inf, math.nan, f.max * 1.001, -f.max * 1.3]
    beyond = f32(beyond + ([3e38, -1e38] if f.max < 1e38 else []))
    assert_same_bits(quantize(beyond, name, "stochastic", generator=torch.Generator()),
                     quantize(beyond, name))


def test_stochastic_differs_from_nearest_sometimes():
    x = torch.full((1000,), 1.0 + 2**-12)  # fp16: nearest is always 1.0
    q = quantize(x, "fp16", "stochastic", generator=torch.Generator().manual_seed(0))
    assert (q == 1.0).any() and (q == 1.0 + 2**-10).any()


# --------------------------------------------------------------------------- sqnr


def test_sqnr_db():
    ref = torch.ones(100)
    assert sqnr_db(ref, ref.clone()) == math.inf
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0, abs=1e-5)
    assert sqnr_db(torch.zeros(4), torch.ones(4)) == -math.inf
    x = torch.randn(10_000)
    assert 70 < sqnr_db(x, quantize(x, "fp16")) < 80  # ~6 dB per mantissa bit
    assert sqnr_db(x, quantize(x, "fp8_e4m3")) < sqnr_db(x, quantize(x, "bf16"))
    assert math.isnan(sqnr_db(f32([1.0, math.nan]), f32([1.0, 2.0])))
    with pytest.raises(ValueError, match="shapes differ"):
        sqnr_db(torch.ones(3), torch.ones(4))


# --------------------------------------------------------------------------- properties

_SETTINGS = settings(deadline=None, database=None, max_examples=150,
                     suppress_health_check=[HealthCheck.too_slow])

def _fp32_lists(name: str):
    f = get_format(name)
    sub = f.smallest_subnormal
    elems = st.one_of(
        st.floats(width=32),  # everything: nan, inf, subnormals, huge
        st.integers(0, 2**32 - 1).map(lambda b: struct.unpack("<f", struct.pack("<I", b))[0]),
        st.floats(min_value=-min(2 * f.max, FP32_MAX), max_value=min(2 * f.max, FP32_MAX),
                  width=32),  # around overflow
        st.floats(min_value=-64 * sub, max_value=64 * sub, width=32),  # subnormals, ties
        st.sampled_from(edge_values(name)),
    )
    return st.lists(elems, min_size=1, max_size=64)

@pytest.mark.parametrize("name", NARROW)
def test_property_nearest_equals_cast_and_reference(name):
    @_SETTINGS
    @given(_fp32_lists(name))
    def check(values):
        x = f32(values)
        q = quantize(x, name)
        assert_same_bits(q, cast_round_trip(x, name))
        assert_same_bits(q, f32([ref_nearest(v, name) for v in x.tolist()]))

    check()

def test_property_tf32_nearest_equals_integer_reference():
    @_SETTINGS
    @given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
    def check(patterns):
        x = bits_from_ints(patterns)
        q = quantize(x, "tf32")
        assert_same_bits(q, bits_from_ints([tf32_ref_bits(b) for b in patterns]))
        assert_same_bits(q, f32([ref_nearest(v, "tf32") for v in x.tolist()]))

    check()

@pytest.mark.parametrize("name", NARROW)
def test_property_fp64_nearest_equals_cast(name):
    @_SETTINGS
    @given(st.lists(st.floats(width=64), min_size=1, max_size=64))
    def check(values):
        x = torch.tensor(values, dtype=torch.float64)
        assert_same_bits(quantize(x, name), cast_round_trip(x, name))

    check()

@pytest.mark.parametrize("name", ROUNDED)
def test_property_stochastic_picks_a_neighbour(name):
    f = get_format(name)

    @_SETTINGS
    @given(_fp32_lists(name), st.integers(0, 2**31 - 1), st.booleans())
    def check(values, seed, fp64):
        x = f32(values).to(torch.float64 if fp64 else torch.float32)
        q = quantize(x, name, "stochastic", generator=torch.Generator().manual_seed(seed))
        assert_same_bits(quantize(q, name), q)  # representable
        near = quantize(x, name)
        for v, r, nv in zip(x.tolist(), q.tolist(), near.tolist()):
            if math.isnan(v) or abs(v) > f.max:
                assert r == nv or (math.isnan(r) and math.isnan(nv))
            else:
                lo, hi = ref_neighbours(v, name)
                assert r in (lo, hi) and math.copysign(1, r) == math.copysign(1, v)

    check()
