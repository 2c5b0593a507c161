"""Number formats as plain facts and pure functions.

Every number here is derived from the bit layout (exponent bits, mantissa bits and the
format's special-value convention), never typed in, and the tests check them against
``torch.finfo`` and against raw bit patterns.

Design of ``dtype``: it is always the torch dtype that *stores* values of the format, so
callers never branch on ``None``. ``native`` says whether that dtype's own bit layout *is*
the format. tf32 is the one non-native format: it is stored in ``torch.float32`` (its
values are the float32 values whose low 13 mantissa bits are zero), and only matmul/conv
kernels compute in it. ``format_of_dtype`` therefore maps ``torch.float32`` to fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixprec.errors import UsageError

__all__ = [
    "Format",
    "FORMATS",
    "get_format",
    "format_of_dtype",
    "formats_table",
    "render_formats_table",
    "fits",
    "underflows",
]


@dataclass(frozen=True)
class Format:
    """Facts about one floating-point format (1 sign bit + exponent + stored mantissa)."""

    name: str
    exponent_bits: int
    mantissa_bits: int  # explicitly stored fraction bits (the leading 1 is implicit)
    max: float  # largest finite value
    smallest_normal: float
    smallest_subnormal: float
    eps: float  # machine epsilon: distance from 1.0 to the next value, 2**-mantissa_bits
    dtype: torch.dtype  # storage dtype (see module docstring)
    native: bool  # False when `dtype` only stores the format (tf32)
    has_inf: bool  # False for fp8_e4m3 ("fn"): overflow saturates or gives NaN

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1


def _make(
    name: str,
    exponent_bits: int,
    mantissa_bits: int,
    dtype: torch.dtype,
    *,
    native: bool = True,
    ieee_specials: bool = True,
) -> Format:
    """Derive a format's facts from its layout.

    ``ieee_specials``: the all-ones exponent is reserved for inf/NaN (IEEE 754). When False
    (the OCP "fn" fp8 variant), that exponent holds normal numbers and only the all-ones
    mantissa there is NaN, so there is no inf and max has mantissa 1...10.
    """
    bias = 2 ** (exponent_bits - 1) - 1
    ulp_frac = 2.0**-mantissa_bits
    if ieee_specials:
        emax = (2**exponent_bits - 2) - bias
        max_frac = 2.0 - ulp_frac  # mantissa all ones
    else:
        emax = (2**exponent_bits - 1) - bias
        max_frac = 2.0 - 2 * ulp_frac  # mantissa all ones is NaN, so one step below
    return Format(
        name=name,
        exponent_bits=exponent_bits,
        mantissa_bits=mantissa_bits,
        max=math.ldexp(max_frac, emax),
        smallest_normal=math.ldexp(1.0, 1 - bias),
        smallest_subnormal=math.ldexp(1.0, 1 - bias - mantissa_bits),
        eps=ulp_frac,
        dtype=dtype,
        native=native,
        has_inf=ieee_specials,
    )


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        _make("fp32", 8, 23, torch.float32),
        _make("tf32", 8, 10, torch.float32, native=False),
        _make("bf16", 8, 7, torch.bfloat16),
        _make("fp16", 5, 10, torch.float16),
        _make("fp8_e4m3", 4, 3, torch.float8_e4m3fn, ieee_specials=False),
        _make("fp8_e5m2", 5, 2, torch.float8_e5m2),
    )
}

_ALIASES: dict[str, str] = {
    "float32": "fp32",
    "32": "fp32",
    "tensorfloat32": "tf32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "16": "fp16",
    "e4m3": "fp8_e4m3",
    "fp8_e4m3fn": "fp8_e4m3",
    "float8_e4m3fn": "fp8_e4m3",
    "e5m2": "fp8_e5m2",
    "float8_e5m2": "fp8_e5m2",
}

# Only native formats own their dtype; float32 means fp32, not tf32.
_BY_DTYPE: dict[torch.dtype, Format] = {f.dtype: f for f in FORMATS.values() if f.native}


def get_format(name: str | Format) -> Format:
    """Look up a format by canonical name or alias (case-insensitive)."""
    if isinstance(name, Format):
        return name
    key = name.strip().lower() if isinstance(name, str) else None
    if key is not None:
        key = _ALIASES.get(key, key)
        if key in FORMATS:
            return FORMATS[key]
    raise UsageError(
        f"unknown format {name!r}; valid formats: {', '.join(FORMATS)} "
        "(or aliases such as float16, half, bfloat16, e4m3, e5m2)"
    )


def format_of_dtype(dtype: torch.dtype) -> Format:
    """The format a torch dtype stores natively (``torch.float32`` -> fp32)."""
    fmt = _BY_DTYPE.get(dtype) if isinstance(dtype, torch.dtype) else None
    if fmt is None:
        valid = ", ".join(str(d) for d in _BY_DTYPE)
        raise UsageError(f"no mixprec format for dtype {dtype!r}; supported dtypes: {valid}")
    return fmt


def formats_table() -> list[dict]:
    """One JSON-able dict per format, in ``FORMATS`` order."""
    return [
        {
            "name": f.name,
            "bits": f.bits,
            "exponent_bits": f.exponent_bits,
            "mantissa_bits": f.mantissa_bits,
            "max": f.max,
            "smallest_normal": f.smallest_normal,
            "smallest_subnormal": f.smallest_subnormal,
            "eps": f.eps,
            "torch_dtype": str(f.dtype),
            "native": f.native,
            "has_inf": f.has_inf,
        }
        for f in FORMATS.values()
    ]


def render_formats_table() -> str:
    """A fixed-width text table of ``formats_table()`` for the terminal."""
    header = ["format", "bits", "exp", "man", "max", "min normal", "min subnormal", "eps",
              "torch dtype", "inf"]
    rows = [
        [
            r["name"],
            str(r["bits"]),
            str(r["exponent_bits"]),
            str(r["mantissa_bits"]),
            f"{r['max']:.2e}",
            f"{r['smallest_normal']:.2e}",
            f"{r['smallest_subnormal']:.2e}",
            f"{r['eps']:.2e}",
            r["torch_dtype"].removeprefix("torch.") + ("" if r["native"] else " (storage)"),
            "yes" if r["has_inf"] else "no",
        ]
        for r in formats_table()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    # Text columns left-aligned, numeric columns right-aligned.
    left = {0, 8, 9}

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def fits(amax: float, fmt: Format | str) -> bool:
    """True when a tensor with absolute maximum ``amax`` does not overflow ``fmt``.

    NaN never fits (the comparison is False).
    """
    return amax <= get_format(fmt).max


def underflows(value: float, fmt: Format | str) -> bool:
    """True when nonzero ``value`` is below ``fmt``'s normal range (subnormal or flushed)."""
    return 0 < abs(value) < get_format(fmt).smallest_normal
