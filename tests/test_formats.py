"""Format facts checked against torch.finfo and against raw bit patterns."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mixprec.errors import UsageError
from mixprec.formats import (
    FORMATS,
    Format,
    fits,
    format_of_dtype,
    formats_table,
    get_format,
    render_formats_table,
    underflows,
)

NATIVE = [f for f in FORMATS.values() if f.native]
# Integer dtype of the same width, to build bit patterns and view them as the format.
INT_OF_BITS = {32: torch.int32, 16: torch.int16, 8: torch.uint8}


def from_bits(pattern: int, fmt: Format) -> float:
    return torch.tensor([pattern], dtype=INT_OF_BITS[fmt.bits]).view(fmt.dtype).double().item()


def all_values(fmt: Format) -> torch.Tensor:
    """Every value of a <=16-bit format, as float64."""
    n = 2**fmt.bits
    codes = torch.arange(n, dtype=torch.int32)
    if fmt.bits == 16:
        codes = torch.where(codes >= 2**15, codes - 2**16, codes)  # two's complement for int16
    return codes.to(INT_OF_BITS[fmt.bits]).view(fmt.dtype).double()


def test_order_and_names() -> None:
    assert list(FORMATS) == ["fp32", "tf32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2"]
    assert all(name == f.name for name, f in FORMATS.items())


@pytest.mark.parametrize("fmt", NATIVE, ids=lambda f: f.name)
def test_matches_finfo(fmt: Format) -> None:
    fi = torch.finfo(fmt.dtype)
    assert fmt.max == fi.max
    assert fmt.smallest_normal == fi.smallest_normal == fi.tiny
    assert fmt.eps == fi.eps
    assert fmt.bits == fi.bits
    assert fmt.smallest_subnormal == fi.smallest_normal * 2.0**-fmt.mantissa_bits


@pytest.mark.parametrize("fmt", NATIVE, ids=lambda f: f.name)
def test_matches_bit_patterns(fmt: Format) -> None:
    m, e = fmt.mantissa_bits, fmt.exponent_bits
    top_exp = 2**e - 1
    if fmt.has_inf:  # IEEE: top exponent reserved, max = 0.(top-1).1...1
        max_bits = ((top_exp - 1) << m) | (2**m - 1)
    else:  # e4m3fn: only S.1111.111 is NaN, max = 0.1111.110
        max_bits = (top_exp << m) | (2**m - 2)
    assert from_bits(max_bits, fmt) == fmt.max
    assert from_bits(1, fmt) == fmt.smallest_subnormal
    assert from_bits(1 << m, fmt) == fmt.smallest_normal
    one_bits = fmt.bias << m
    assert from_bits(one_bits, fmt) == 1.0
    assert from_bits(one_bits + 1, fmt) == 1.0 + fmt.eps
    nxt = from_bits(max_bits + 1, fmt)  # the pattern just above max
    assert math.isinf(nxt) if fmt.has_inf else math.isnan(nxt)


@pytest.mark.parametrize("fmt", [f for f in NATIVE if f.bits <= 16], ids=lambda f: f.name)
def test_exhaustive_small_formats(fmt: Format) -> None:
    v = all_values(fmt)
    finite = v[torch.isfinite(v)]
    positive = finite[finite > 0]
    assert finite.max().item() == fmt.max
    assert positive.min().item() == fmt.smallest_subnormal
    assert bool(torch.isinf(v).any()) == fmt.has_inf
    normal_min = positive[positive >= fmt.smallest_normal].min().item()
    assert normal_min == fmt.smallest_normal
    # Subnormals are exactly the positive values below smallest_normal: 2**m - 1 of them.
    assert int((positive < fmt.smallest_normal).sum()) == 2**fmt.mantissa_bits - 1


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp8_e5m2"])
def test_double_max_rounds_to_inf(name: str) -> None:
    fmt = get_format(name)
    x = torch.tensor([fmt.max, fmt.max * 2], dtype=torch.float64).to(fmt.dtype).double()
    assert x[0].item() == fmt.max
    assert math.isinf(x[1].item())


def test_e4m3_has_no_inf() -> None:
    fmt = get_format("fp8_e4m3")
    assert not fmt.has_inf
    x = torch.tensor([fmt.max * 2, math.inf], dtype=torch.float32).to(fmt.dtype).float()
    assert not torch.isinf(x).any()


def test_tf32_facts() -> None:
    tf32, fp32 = get_format("tf32"), get_format("fp32")
    assert tf32.bits == 19 and tf32.dtype == torch.float32 and not tf32.native
    assert tf32.max == (2 - 2**-10) * 2.0**127
    assert tf32.smallest_normal == 2.0**-126 == fp32.smallest_normal
    assert tf32.smallest_subnormal == 2.0**-136
    assert tf32.eps == 2.0**-10
    # tf32 values are float32 values with the low 13 mantissa bits zero.
    as_fp32 = lambda bits: torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()  # noqa: E731
    assert as_fp32(0x7F7FFFFF & ~0x1FFF) == tf32.max
    assert as_fp32(1 << 13) == tf32.smallest_subnormal


@pytest.mark.parametrize(
    "alias,name",
    [("float32", "fp32"), ("32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16"),
     ("half", "fp16"), ("16", "fp16"), ("e4m3", "fp8_e4m3"), ("e5m2", "fp8_e5m2"),
     ("FP16", "fp16"), (" bf16 ", "bf16"), ("tf32", "tf32")],
)
def test_aliases(alias: str, name: str) -> None:
    assert get_format(alias) is FORMATS[name]


def test_canonical_names_and_passthrough() -> None:
    for name, fmt in FORMATS.items():
        assert get_format(name) is fmt
        assert get_format(fmt) is fmt


def test_unknown_format_message() -> None:
    with pytest.raises(UsageError) as info:
        get_format("fp12")
    msg = str(info.value)
    assert "fp12" in msg and "bf16" in msg and "fp8_e4m3" in msg
    assert "\n" not in msg
    assert isinstance(info.value, ValueError)
    with pytest.raises(UsageError):
        get_format(None)  # type: ignore[arg-type]


def test_format_of_dtype() -> None:
    assert format_of_dtype(torch.float32).name == "fp32"  # never tf32
    assert format_of_dtype(torch.bfloat16).name == "bf16"
    assert format_of_dtype(torch.float16).name == "fp16"
    assert format_of_dtype(torch.float8_e4m3fn).name == "fp8_e4m3"
    assert format_of_dtype(torch.float8_e5m2).name == "fp8_e5m2"
    for bad in (torch.int32, torch.float64, "float16"):
        with pytest.raises(UsageError, match="dtype"):
            format_of_dtype(bad)  # type: ignore[arg-type]


def test_formats_table_is_json() -> None:
    table = formats_table()
    assert [r["name"] for r in table] == list(FORMATS)
    back = json.loads(json.dumps(table))
    assert back == table
    fp16 = table[3]
    assert fp16["max"] == 65504.0 and fp16["bits"] == 16 and fp16["torch_dtype"] == "torch.float16"
    assert table[4]["has_inf"] is False
    keys = {"name", "bits", "exponent_bits", "mantissa_bits", "max", "smallest_normal",
            "smallest_subnormal", "eps", "torch_dtype", "has_inf"}
    assert all(keys <= r.keys() for r in table)


def test_render_table() -> None:
    text = render_formats_table()
    for name in FORMATS:
        assert name in text
    assert "6.55e+04" in text and "4.48e+02" in text
    lines = text.splitlines()
    assert len(lines) == 2 + len(FORMATS)


def test_fits_and_underflows() -> None:
    fp16 = get_format("fp16")
    assert fits(65504.0, fp16) and not fits(65505.0, fp16)
    assert fits(0.0, "bf16") and not fits(math.nan, fp16) and not fits(math.inf, fp16)
    assert fits(448.0, "e4m3") and not fits(449.0, "e4m3")
    assert underflows(1e-5, fp16) and underflows(-1e-5, fp16)
    assert not underflows(0.0, fp16) and not underflows(fp16.smallest_normal, fp16)
    assert not underflows(1e-5, "bf16")
