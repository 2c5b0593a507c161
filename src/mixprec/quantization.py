"""Round tensors to a number format in software (the arithmetic stays in fp32/fp64).

This is the numerical core of *emulation* (see DESIGN.md): ``quantize(x, fmt)`` returns a
tensor of ``x``'s dtype whose values are representable in ``fmt``, so fp16/fp8 numerics can
be studied on hardware without fast kernels for those formats.

Rounding modes
    ``"nearest"``
        Bit for bit what torch's own cast does: ``x.to(fmt.dtype).to(x.dtype)`` — round to
        nearest, ties to even, with subnormals, signed zeros and NaN kept. Overflow
        follows the cast too, which for torch 2.13 on CPU means:

        * fp16, bf16, fp8_e5m2: values that round beyond ``max`` become ``±inf``.
        * fp8_e4m3 (torch's ``float8_e4m3fn``, no inf): the cast **saturates**: every value
          above 448 in magnitude, ``±inf`` included, becomes ``±448``; only NaN maps to
          NaN. (Checked on torch 2.13.0+cpu, scalar and vectorized paths alike.)
        * tf32 (no torch dtype): implemented here on the fp32 bit pattern — keep 10
          mantissa bits, round to nearest even, fp32's exponent range (so subnormals are
          multiples of 2**-136 and values from ``(2 - 2**-11) * 2**127`` round to inf).
        * fp32: an identity copy for fp32 input.

        For fp64 input torch's cast goes through fp32 first (rare double rounding on ties
        such as ``1 + 2**-11 + 2**-40`` -> fp16 1.0); ``nearest`` matches the cast exactly
        there too. For fp16/bf16 input the result is the same round trip, which is exact
        whenever ``x.dtype`` can hold every value of ``fmt`` (not so for bf16 input
        rounded to fp16's subnormals, or fp16 input near 65504 rounded to bf16).

    ``"stochastic"``
        Rounds to one of the two representable neighbours of ``x`` with probability
        proportional to proximity, so ``E[quantize(x)] == x`` for ``|x| <= fmt.max``.
        Representable values (and ±0) are returned unchanged; NaN, ±inf and ``|x| > max``
        are rounded exactly as in ``"nearest"`` mode. ``generator`` makes it reproducible.

        * bf16 / tf32 from fp32: the standard trick on the fp32 bit pattern — add uniform
          random bits below the kept mantissa, then truncate. Exact probabilities.
        * everything else (fp16, fp8, and any format from fp64): ``lo`` = ``x`` rounded
          toward zero to the format, ``hi`` = the next representable value away from
          zero (one step of the format's sign-magnitude bit pattern), and ``hi`` is picked
          when ``u < (x - lo) / (hi - lo)`` with ``u`` uniform in ``[0, 1)`` (24 random bits
          for fp32 input, 53 for fp64; the probability is exact to that resolution).

        fp16/bf16 inputs are computed in fp32 and cast back.
"""

from __future__ import annotations

import math

import torch

from mixprec.errors import UsageError
from mixprec.formats import Format, get_format

__all__ = ["quantize", "sqnr_db", "ROUNDING_MODES"]

ROUNDING_MODES: tuple[str, ...] = ("nearest", "stochastic")

# Integer dtype of the same width as each storage dtype, for stepping bit patterns.
_INT_VIEW: dict[torch.dtype, torch.dtype] = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float8_e4m3fn: torch.uint8,
    torch.float8_e5m2: torch.uint8,
}

_TF32_DROP = 23 - 10  # fp32 mantissa bits that tf32 does not keep


def _check_tensor(x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"quantize expects a floating-point tensor, got dtype {x.dtype}")
    return x


def _round_fp32_bits_nearest(x32: torch.Tensor, drop: int) -> torch.Tensor:
    """Round fp32 ``x32`` to ``23 - drop`` mantissa bits, nearest even, on the bit pattern.

    Inf and NaN are returned unchanged (adding to their pattern could turn a NaN whose
    payload sits in the dropped bits into inf). A carry out of the mantissa moves into the
    exponent, which is exactly round-to-nearest across a binade, and to inf at the top.
    """
    bits = x32.view(torch.int32)
    half_minus_one = (1 << (drop - 1)) - 1
    lsb = (bits >> drop) & 1  # arithmetic shift; only bit 0 is kept
    rounded = (bits + (half_minus_one + lsb)) & ~((1 << drop) - 1)
    out = rounded.view(torch.float32)
    return torch.where(torch.isfinite(x32), out, x32)


def _nearest_storage(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``x`` rounded to nearest, in ``fmt``'s storage dtype (fp32 for tf32)."""
    if fmt.native:
        return x.to(fmt.dtype)
    # tf32: round the fp32 value (torch's own cast for fp64 input, as for every format).
    return _round_fp32_bits_nearest(x.to(torch.float32), _TF32_DROP)


def _nearest(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    if x.dtype == fmt.dtype and fmt.native:
        return x.clone()  # .to() would return x itself
    out = _nearest_storage(x, fmt).to(x.dtype)
    return out.clone() if out.data_ptr() == x.data_ptr() else out


def _stochastic_fp32_bits(x32: torch.Tensor, fmt: Format, nearest: torch.Tensor,
                          generator: torch.Generator | None) -> torch.Tensor:
    """bf16/tf32 from fp32: add random bits below the kept mantissa, then truncate."""
    drop = 23 - fmt.mantissa_bits
    r = torch.randint(0, 1 << drop, x32.shape, generator=generator, dtype=torch.int32,
                      device=x32.device)
    bits = x32.view(torch.int32)
    out = ((bits + r) & ~((1 << drop) - 1)).view(torch.float32)
    special = ~torch.isfinite(x32) | (x32.abs() > fmt.max)
    return torch.where(special, nearest, out)


def _stochastic_generic(x: torch.Tensor, fmt: Format, generator: torch.Generator | None
                        ) -> torch.Tensor:
    """lo = x toward zero, hi = next value away from zero; pick hi with p = (x-lo)/(hi-lo).

    ``x`` is fp32 or fp64 (the compute dtype). Steps are taken on the storage dtype's bit
    pattern, which is sign-magnitude for every format, so +1 on the raw pattern moves one
    representable value away from zero (through subnormals and across binades) and -1
    moves toward zero; tf32 lives in fp32 storage and steps by 2**13.
    """
    n_store = _nearest_storage(x, fmt)
    nearest = n_store.to(x.dtype)
    step = (1 << _TF32_DROP) if not fmt.native else 1
    ints = n_store.view(_INT_VIEW[n_store.dtype])
    # Nearest went away from zero -> one step back gives the value toward zero.
    away = (nearest.abs() > x.abs()).to(ints.dtype)
    lo_int = ints - away * step
    hi_int = lo_int + step
    lo = lo_int.view(n_store.dtype).to(x.dtype)
    hi = hi_int.view(n_store.dtype).to(x.dtype)
    # Both differences are exact: x - lo keeps a subset of x's bits, hi - lo is one ulp.
    p = (x - lo) / (hi - lo)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    out = torch.where(u < p, hi, lo)
    # |x| == max has p == 0; beyond max, inf and NaN: exactly as nearest.
    special = ~torch.isfinite(x) | (x.abs() > fmt.max)
    return torch.where(special, nearest, out)


def _stochastic(x: torch.Tensor, fmt: Format, generator: torch.Generator | None
                ) -> torch.Tensor:
    if fmt.name == "fp32" and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return x.clone()  # every such value is an fp32 value
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(compute)
    if compute == torch.float32 and fmt.name in ("bf16", "tf32"):
        out = _stochastic_fp32_bits(xc, fmt, _nearest_storage(xc, fmt).to(compute), generator)
    else:
        out = _stochastic_generic(xc, fmt, generator)
    return out.to(x.dtype)


def quantize(x: torch.Tensor, fmt: str | Format, rounding: str = "nearest",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` rounded to the values of ``fmt``, as a new tensor of ``x``'s dtype and shape.

    ``fmt``: a format name or alias (``"fp16"``, ``"bf16"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``,
    ``"tf32"``, ``"fp32"``) or a :class:`~mixprec.formats.Format`.
    ``rounding``: ``"nearest"`` (bitwise equal to torch's cast round trip) or
    ``"stochastic"`` (unbiased; reproducible with ``generator``). See the module docstring
    for overflow, NaN and subnormal behaviour.

    Raises ``TypeError`` for a non-tensor or non-floating tensor, and
    :class:`~mixprec.errors.UsageError` for an unknown format or rounding mode.
    The result carries no autograd history (use :mod:`mixprec.emulation` to quantize
    inside a differentiable computation).
    """
    x = _check_tensor(x)
    fmt = get_format(fmt)
    if rounding not in ROUNDING_MODES:
        raise UsageError(
            f"unknown rounding {rounding!r}; valid rounding modes: {', '.join(ROUNDING_MODES)}"
        )
    with torch.no_grad():
        if rounding == "nearest":
            return _nearest(x, fmt)
        return _stochastic(x, fmt, generator)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum ref^2 / sum (ref - approx)^2)``.

    Computed in fp64. ``+inf`` when the tensors are equal (also when both are all zeros),
    ``-inf`` when the reference is all zeros and the approximation is not, NaN when a
    difference is NaN (NaN in either tensor, or infs that do not cancel).
    """
    for name, t in (("reference", reference), ("approx", approx)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sqnr_db: {name} must be a torch.Tensor, got {type(t).__name__}")
    if reference.shape != approx.shape:
        raise ValueError(
            f"sqnr_db: shapes differ: reference {tuple(reference.shape)} vs "
            f"approx {tuple(approx.shape)}"
        )
    with torch.no_grad():
        ref = reference.detach().to(torch.float64)
        app = approx.detach().to(device=ref.device, dtype=torch.float64)
        if torch.equal(ref, app):
            return math.inf
        signal = float(ref.square().sum())
        noise = float((ref - app).square().sum())
    if math.isnan(noise) or math.isnan(signal):
        return math.nan
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    if math.isinf(signal) and math.isinf(noise):
        return math.nan
    return 10.0 * math.log10(signal / noise)
