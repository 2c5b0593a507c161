"""Emulated low precision: matmul-like ops see inputs rounded to a format, compute in fp32.

On CPUs without fast fp16/fp8 kernels (this project's AMD EPYC has AVX512_BF16 but not
AVX512_FP16, so native fp16 matmuls are tens of times slower than fp32), mixprec studies
fp16/fp8 numerics by *emulation* (DESIGN.md): the inputs of every matmul-like op are
rounded to the format with :func:`mixprec.quantization.quantize` (nearest), and the op then
runs at full speed in the inputs' own dtype (fp32). Everything else runs untouched.

    with EmulatedPrecision("fp16", round_outputs=True) as emu:
        loss = model(x).square().mean()
        loss.backward()
    optimizer.step()
    print(emu.intercepted)  # Counter({'torch.nn.functional.linear': 12, ...})

``EmulatedPrecision`` is a :class:`torch.overrides.TorchFunctionMode` (no torch function is
patched). Its ``__torch_function__`` runs with the mode disabled, so the quantization and
the op itself never re-enter it; ops that are not matmul-like are called straight through.

What is intercepted: see :func:`emulated_matmul_ops`. Module-level layers reach these
ops: ``nn.Linear`` calls ``F.linear``, ``nn.Conv{1,2,3}d`` call ``F.conv{1,2,3}d``,
SDPA-based attention calls ``F.scaled_dot_product_attention``. ``nn.MultiheadAttention``
calls the Python function ``F.multi_head_attention_forward``, which hands itself to the
mode at entry; the mode then runs its body *with the mode active* (through
``torch.overrides.redispatch_function``), so the projections (``F.linear``) and the
attention (SDPA, or ``bmm``/``baddbmm`` when ``need_weights=True``) inside it are
emulated too. The mode also makes ``nn.MultiheadAttention`` skip its fused fast path.

Options
    ``round_outputs``: round each intercepted op's floating outputs to the format too
    (what a kernel that writes fp16 would store; an fp16 overflow then shows up as inf
    exactly where native fp16 would overflow).
    ``round_grads``: in the backward pass, round the gradient that flows into each
    rounded tensor (inputs, and outputs when ``round_outputs``). Without it rounding is
    straight-through: the gradient passes unchanged to the fp32 tensor.
    ``propagate`` (default: the value of ``round_outputs``; it needs ``round_outputs``):
    dtype propagation, see below.

Dtype propagation
    Under native autocast a matmul returns an fp16 *tensor*, and the ops that consume it
    compute in fp16 too: in ``linear(x) * 2e5`` the product overflows to inf. Rounding the
    matmul's output alone would miss that (the product of an fp32 tensor holding fp16
    values is a finite fp32 value). With ``propagate`` the mode follows autocast's dtype
    rules instead, keeping the storage fp32:

    * Every tensor a rounded op produces is *marked* as virtually low precision.
    * Any other op whose floating tensor inputs are all marked (Python scalars do not
      count; it needs at least one tensor input) produces outputs rounded to the format,
      and marked. An unmarked dimensioned floating tensor among the inputs means type
      promotion to fp32, as natively (fp16 + fp32 -> fp32): the output stays unrounded and
      unmarked. A 0-dim tensor counts only when no dimensioned floating tensor is among the
      inputs (torch's promotion rule: ``fp16 * fp32_scalar_tensor`` stays fp16).
    * Ops that autocast runs in fp32 (:data:`AUTOCAST_FP32_OPS`: the losses,
      normalizations, softmax, exp/log/pow, sum/prod/cumsum, norms, linalg and fft that
      autocast casts up on CUDA or on CPU; see "Decisions"), ops given an explicit
      ``dtype``, and explicit casts (``.float()``, ``.double()``, ``.to(dtype)``,
      ``.type(dtype)``, ``.type_as(unmarked)``) produce unmarked, unrounded outputs. A cast
      of a marked tensor to fp32 returns a new alias of it (``view_as``), since ``.float()``
      of an fp32 tensor would return the marked tensor itself.
    * Views of a marked tensor are marked (their values are its values), as are the
      outputs of value-preserving ops (``clone``, ``contiguous``, ``reshape``, indexing,
      ``cat``/``stack``, ``abs``, ``relu``, ``max``...): these are marked without the
      rounding pass. Values of a view are not re-rounded, so views keep aliasing.
    * In-place ops (and ``__setitem__``) on a marked tensor: the tensor is rounded in
      place afterwards, as an fp16 tensor would store the result whatever the other
      operands' dtype was. Detected by the tensor's version counter; the rounding writes
      through ``.data``, so autograd's saved results stay valid (see ``_round_in_place``).
    * Property reads (``.grad``, ``.shape``...) pass through; ``.data``, ``.T``, ``.mT``,
      ``.H``, ``.mH`` of a marked tensor are marked.

    Marks live in a :class:`weakref.WeakValueDictionary` from ``id(t)`` to ``t`` and are
    checked with ``marks.get(id(t)) is t`` (never tensor equality, which is elementwise);
    a tensor that dies drops out of it. Marks outlive one ``with`` block, as an fp16 tensor
    stays fp16: a marked tensor kept across steps is still low precision the next time
    the mode is entered. The rounding is differentiable (straight-through, or rounding the
    gradient with ``round_grads``), in place too (a gradient hook there). Without
    ``round_grads`` an already-marked input of a matmul-like op is not rounded again (its
    values already are the format's); with it, it is, so the gradient into it is rounded.

Cost (lm recipe defaults, forward + backward + AdamW, median step on the 2-core AMD EPYC,
torch 2.13): fp32 65 ms; emulated fp16 71 ms (1.09x; 1.19x with round_outputs and
round_grads); emulated fp8_e4m3 with round_outputs 89 ms (1.36x; torch's e4m3 cast is not
vectorized); native fp16 autocast 2.5 s (39x). With one thread: 96 / 105 / 151 ms and
1.13 s. Every op inside the mode passes through a Python ``__torch_function__``.
Dtype propagation adds little on top: the ``emulate:fp16-mixed`` engine step (round_outputs,
round_grads, propagate) 79 ms against 77 ms without propagation and 60 ms in fp32 (1.32x;
interleaved, median of 12 steps, same machine and torch).

Decisions
    * SDPA: only ``query``, ``key`` and ``value`` are rounded. A floating ``attn_mask`` is
      an additive bias, not matmul data: rounding it would perturb e.g. an ALiBi or
      relative-position bias, and fp8_e4m3 would saturate a ``-1e9`` mask to ``-448``.
    * ``out=`` tensors of matmul-like ops are not rounded (they are written, not read);
      with propagation, a *marked* ``out=`` tensor of any other op is rounded after the
      write (it is an fp16 tensor), an unmarked one is left alone.
    * Non-floating tensors (indices, boolean masks) pass through.
    * ``intercepted`` (a ``collections.Counter``) counts the emulated calls by op name,
      so a run can state what was emulated (DESIGN invariant 1).
    * The fp32 list is the union of what autocast runs in fp32 on CUDA and on CPU
      (torch 2.13). CPU autocast alone keeps fewer ops in fp32: given an fp16 tensor it
      runs softmax, log_softmax, layer_norm, group_norm, norm, cumsum, sum, exp, log and
      pow in fp16 (only losses, linalg, fft and a few pooling/padding ops are cast up
      there), while CUDA autocast, where fp16 training is usually done, casts them up.
      The emulation follows CUDA for those: they stay fp32 (so ``exp`` of a marked tensor
      does not overflow at 11.1 as it would under CPU autocast). Norm layers with fp32
      affine parameters are fp32 by promotion anyway (batch_norm too, which autocast on
      either device would run on fp16 input).
"""

from __future__ import annotations

import collections
import weakref
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mixprec.errors import UsageError
from mixprec.formats import Format, get_format
from mixprec.quantization import quantize

__all__ = ["AUTOCAST_FP32_OPS", "EmulatedPrecision", "emulated_matmul_ops"]


def _lookup(name: str) -> Any:
    """``torch.a.b`` -> the object, or None when this torch build lacks it."""
    obj: Any = torch
    for part in name.split(".")[1:]:
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _matmul_ops() -> dict[Callable, str]:
    ops: dict[Callable, str] = {}

    def add(name: str) -> None:
        obj = _lookup(name)
        if obj is not None:
            ops.setdefault(obj, name)

    for name in (
        "torch.nn.functional.linear",
        "torch.nn.functional.bilinear",
        "torch.matmul",
        "torch.Tensor.matmul",
        "torch.Tensor.__matmul__",
        "torch.Tensor.__rmatmul__",
        "torch.mm",
        "torch.Tensor.mm",
        "torch.bmm",
        "torch.Tensor.bmm",
        "torch.addmm",
        "torch.Tensor.addmm",
        "torch.baddbmm",
        "torch.Tensor.baddbmm",
        "torch.addbmm",
        "torch.Tensor.addbmm",
        "torch.mv",
        "torch.Tensor.mv",
        "torch.dot",
        "torch.Tensor.dot",
        "torch.tensordot",
        "torch.einsum",
        "torch.nn.functional.conv1d",
        "torch.nn.functional.conv2d",
        "torch.nn.functional.conv3d",
        "torch.nn.functional.conv_transpose1d",
        "torch.nn.functional.conv_transpose2d",
        "torch.nn.functional.conv_transpose3d",
        "torch.nn.functional.scaled_dot_product_attention",
    ):
        add(name)
    # torch.einsum is a Python wrapper around the builtin; code may call either.
    ops.setdefault(torch._C._VariableFunctions.einsum, "torch.einsum")
    return ops


_OPS: dict[Callable, str] = _matmul_ops()
_SDPA = F.scaled_dot_product_attention
_SDPA_QKV = ("query", "key", "value")

# Python-level composites that call matmul-like ops inside and dispatch
# __torch_function__ at their entry: their bodies are re-run with the mode active.
_REDISPATCH: frozenset = frozenset({F.multi_head_attention_forward})
_redispatch_function = getattr(torch.overrides, "redispatch_function", None)


def _variants(names: Iterable[str], *, where: Iterable[str]) -> tuple[str, ...]:
    """Every ``prefix.name`` for the prefixes in ``where`` that this torch has."""
    return tuple(f"{p}.{n}" for n in names for p in where if _lookup(f"{p}.{n}") is not None)


_TORCH_AND_METHOD = ("torch", "torch.Tensor", "torch.special")
_FUNCTIONAL = ("torch.nn.functional", "torch")

# What autocast runs in fp32 (inputs cast up) on CUDA or on CPU: see "Decisions".
AUTOCAST_FP32_OPS: tuple[str, ...] = tuple(sorted(set(
    # CUDA's pointwise and reduction list
    _variants(("acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log1p", "log2",
               "pow", "reciprocal", "rsqrt", "sinh", "tan", "cumprod", "cumsum", "prod", "sum",
               "norm", "renorm", "dist", "cdist", "softmax", "log_softmax", "logsumexp",
               "__pow__", "__rpow__", "__rdiv__", "__rtruediv__"), where=_TORCH_AND_METHOD)
    # the losses, normalizations and activations of either list
    + _variants(("binary_cross_entropy", "binary_cross_entropy_with_logits", "cosine_embedding_loss",
                 "cosine_similarity", "cross_entropy", "ctc_loss", "hinge_embedding_loss", "huber_loss",
                 "kl_div", "l1_loss", "margin_ranking_loss", "mse_loss", "multilabel_margin_loss",
                 "multi_margin_loss", "nll_loss", "poisson_nll_loss", "smooth_l1_loss",
                 "soft_margin_loss", "triplet_margin_loss", "layer_norm", "group_norm", "normalize",
                 "pdist", "softmax", "softmin", "log_softmax", "softplus", "grid_sample", "avg_pool3d",
                 "max_pool3d", "max_unpool2d", "max_unpool3d", "adaptive_avg_pool3d", "adaptive_max_pool3d",
                 "fractional_max_pool2d", "fractional_max_pool3d", "interpolate"), where=_FUNCTIONAL)
    # CPU's list: linalg, fft and friends
    + _variants(("polar", "quantile", "nanquantile", "stft", "trace", "cholesky",
                 "cholesky_inverse", "cholesky_solve", "inverse", "lu_solve", "orgqr", "ormqr",
                 "pinverse", "geqrf", "qr", "svd", "triangular_solve"), where=("torch", "torch.Tensor"))
    + _variants(("cond", "matrix_rank", "solve", "cholesky", "cholesky_ex", "svd", "svdvals", "eig",
                 "eigvals", "eigh", "eigvalsh", "inv", "inv_ex", "householder_product", "tensorinv",
                 "tensorsolve", "qr", "lstsq", "norm", "vector_norm", "matrix_norm"), where=("torch.linalg",))
    + _variants(("fft", "ifft", "fft2", "ifft2", "fftn", "ifftn", "rfft", "irfft", "rfft2", "irfft2",
                 "rfftn", "irfftn", "hfft", "ihfft"), where=("torch.fft",))
)))
_FP32: frozenset = frozenset(_lookup(n) for n in AUTOCAST_FP32_OPS)

# Explicit casts: their output dtype is the one asked for (see _cast_request).
_T = torch.Tensor
_CASTS: frozenset = frozenset({_T.float, _T.double, _T.to, _T.type, _T.type_as})
_ALWAYS_FP = frozenset({_T.float, _T.double})

# Outputs whose values are input values (or zeros): marked without the rounding pass.
_PRESERVING: frozenset = frozenset(filter(None, map(_lookup, _variants((
    "clone", "contiguous", "detach", "reshape", "flatten", "unflatten", "__getitem__", "cat",
    "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "repeat", "repeat_interleave",
    "tile", "flip", "fliplr", "flipud", "roll", "rot90", "index_select", "gather", "take",
    "take_along_dim", "masked_select", "abs", "__abs__", "neg", "__neg__", "negative", "relu",
    "max", "min", "amax", "amin", "aminmax", "maximum", "minimum", "fmax", "fmin", "sort", "topk",
    "kthvalue", "msort", "cummax", "cummin", "zeros_like", "ones_like", "empty_like",
    "narrow_copy", "select_scatter", "slice_scatter", "diag", "diagonal_scatter", "tril", "triu",
    "sign", "sgn", "copysign"), where=("torch", "torch.Tensor")) + _variants(
    ("relu", "relu6", "hardtanh", "max_pool1d", "max_pool2d", "pixel_shuffle", "pixel_unshuffle",
     "channel_shuffle", "embedding"), where=("torch.nn.functional",)))))
# Output in the dtype of ``self`` whatever the other arguments are.
_SELF_DTYPE: frozenset = frozenset({_T.new_zeros, _T.new_ones, _T.new_empty, _T.new_full, _T.new_tensor})

_MethodWrapper = type(torch.Tensor.T.__get__)  # property reads arrive as a getter's __get__
_VIEW_GETTERS: frozenset = frozenset(
    getattr(torch.Tensor, n).__get__ for n in ("data", "T", "mT", "H", "mH") if hasattr(torch.Tensor, n))


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _mutated(t: torch.Tensor, before: int | None, func: Any) -> bool:
    """Whether the op just run wrote into ``t`` (by the version counter; by the op's name
    for inference tensors, which have none)."""
    if before is not None:
        return t._version != before
    name = getattr(func, "__name__", "") if func is not None else ""
    return name.endswith("_") and not name.endswith("__") or name == "__setitem__" or (
        name.startswith("__i") and name.endswith("__") and name not in ("__index__", "__int__", "__invert__"))


def emulated_matmul_ops() -> tuple[str, ...]:
    """Names of the ops whose floating inputs :class:`EmulatedPrecision` rounds (sorted).

    These are also the keys of ``EmulatedPrecision.intercepted``; ``a @ b`` reaches the
    mode as (and is counted under) ``torch.Tensor.matmul``.
    """
    return tuple(sorted(set(_OPS.values())))


class _Round(torch.autograd.Function):
    """Forward: round to ``fmt``. Backward: round the incoming grad (or pass it through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: Format, round_grads: bool) -> torch.Tensor:
        ctx.fmt = fmt
        ctx.round_grads = round_grads
        return quantize(x, fmt)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.round_grads and grad is not None:
            grad = quantize(grad, ctx.fmt)
        return grad, None, None


class EmulatedPrecision(TorchFunctionMode):
    """Run matmul-like ops on inputs rounded to ``fmt``; the arithmetic stays in fp32.

    ``fmt``: a format name or :class:`~mixprec.formats.Format` (unknown names raise
    :class:`~mixprec.errors.UsageError`). See the module docstring for the options;
    ``propagate=None`` means ``propagate = round_outputs``, and ``propagate=True`` without
    ``round_outputs`` is a :class:`~mixprec.errors.UsageError`.
    One instance may be entered again after it exits; ``intercepted`` keeps counting and
    marked tensors stay marked.
    """

    def __init__(self, fmt: str | Format, *, round_outputs: bool = False,
                 round_grads: bool = False, propagate: bool | None = None):
        super().__init__()
        self.format: Format = get_format(fmt)
        self.round_outputs = bool(round_outputs)
        self.round_grads = bool(round_grads)
        if propagate is None:
            propagate = self.round_outputs
        elif propagate and not self.round_outputs:
            raise UsageError("EmulatedPrecision: propagate=True needs round_outputs=True (the "
                             "tensors it marks as low precision are the rounded outputs)")
        self.propagate = bool(propagate)
        self.intercepted: collections.Counter[str] = collections.Counter()
        # id(t) -> t for the tensors that are virtually in the format (see the module doc).
        self._marks: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()

    def __repr__(self) -> str:
        extra = "" if self.propagate == self.round_outputs else f", propagate={self.propagate}"
        return (f"EmulatedPrecision({self.format.name!r}, round_outputs={self.round_outputs}, "
                f"round_grads={self.round_grads}{extra})")

    def is_marked(self, t: Any) -> bool:
        """Whether ``t`` is a tensor this mode treats as stored in the format."""
        return isinstance(t, torch.Tensor) and self._marks.get(id(t)) is t

    # ------------------------------------------------------------------ rounding
    def _round(self, t: Any) -> Any:
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            return t
        if t.requires_grad and torch.is_grad_enabled():
            return _Round.apply(t, self.format, self.round_grads)
        return quantize(t, self.format)

    def _round_input(self, t: Any) -> Any:
        # A marked tensor holds the format's values already; re-rounding it only matters
        # for the gradient (round_grads).
        if not self.round_grads and isinstance(t, torch.Tensor) and self._marks.get(id(t)) is t:
            return t
        return self._round(t)

    def _round_tree(self, obj: Any, one=None) -> Any:
        one = one or self._round
        if isinstance(obj, torch.Tensor):
            return one(obj)
        if isinstance(obj, (list, tuple)) and any(isinstance(o, torch.Tensor) for o in obj):
            return type(obj)(self._round_tree(o, one) for o in obj)
        return obj

    def _round_in_place(self, t: torch.Tensor) -> None:
        """Round ``t``'s values in place (an in-place op wrote fp32 values into it).

        Written through ``t.data``, which does not bump ``t``'s version counter: an
        in-place op that saved its result for backward (``sigmoid_``, ``relu_``) sees the
        rounded result, as the fp16 kernel's output, instead of failing autograd's
        modified-in-place check. The rounding is straight-through; with ``round_grads`` a
        hook rounds the gradient flowing into ``t``.
        """
        data = t.data
        with torch.no_grad():
            data.copy_(quantize(data, self.format))
        if self.round_grads and t.requires_grad and torch.is_grad_enabled():
            fmt = self.format
            t.register_hook(lambda grad: quantize(grad, fmt))

    def _mark_tree(self, obj: Any) -> None:
        marks = self._marks
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point():
                marks[id(obj)] = obj
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                if isinstance(o, torch.Tensor) and o.is_floating_point():
                    marks[id(o)] = o

    # ------------------------------------------------------------------ dispatch
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _OPS.get(func)
        if name is None:
            if func in _REDISPATCH:
                return self._redispatch(func, types, args, kwargs)
            if self.propagate and self._marks:
                return self._propagated(func, args, kwargs)
            return func(*args, **kwargs)
        self.intercepted[name] += 1
        one = self._round_input if self.propagate else self._round
        if func is _SDPA:
            args = tuple(one(a) if i < 3 else a for i, a in enumerate(args))
            kwargs = {k: (one(v) if k in _SDPA_QKV else v) for k, v in kwargs.items()}
        else:
            args = tuple(self._round_tree(a, one) for a in args)
            kwargs = {k: (v if k == "out" else self._round_tree(v, one)) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        if self.round_outputs and "out" not in kwargs:
            out = self._round_tree(out)
            if self.propagate:
                self._mark_tree(out)
        return out

    def _propagated(self, func, args, kwargs):
        """A non-matmul op while some tensors are marked: autocast's dtype rules."""
        if func in _FP32 or type(func) is _MethodWrapper:
            out = func(*args, **kwargs)  # fp32 ops; property reads and writes
            if func in _VIEW_GETTERS and self.is_marked(args[0]) and isinstance(out, torch.Tensor):
                self._marks[id(out)] = out
            return out
        marks = self._marks
        first = args[0] if args else None
        self_marked = isinstance(first, torch.Tensor) and marks.get(id(first)) is first
        if func in _CASTS and self_marked and self._cast_request(func, args, kwargs):
            out = func(*args, **kwargs)
            if out is first:  # .float() of an fp32 tensor is the tensor itself
                out = out.view_as(out)
            return out
        written = kwargs.get("out")
        if not (isinstance(written, torch.Tensor) and marks.get(id(written)) is written):
            written = None
        version = _version(first) if self_marked else None
        out_version = _version(written) if written is not None else None

        out = func(*args, **kwargs)

        if self_marked and _mutated(first, version, func):
            self._round_in_place(first)  # in place on a marked tensor: it stays in the format
            return out
        if "out" in kwargs:
            if written is not None and _mutated(written, out_version, None):
                self._round_in_place(written)
            return out
        # Out of place: only floating outputs matter.
        if isinstance(out, torch.Tensor):
            if not out.is_floating_point() or marks.get(id(out)) is out:
                return out
            if self_marked and out._is_view():
                marks[id(out)] = out  # a view has its base's dtype
                return out
        elif isinstance(out, (list, tuple)):
            if not any(isinstance(o, torch.Tensor) and o.is_floating_point() for o in out):
                return out
        else:
            return out
        if kwargs.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in args):
            return out  # an explicit dtype: autocast leaves the op alone
        low = self_marked if func in _SELF_DTYPE else self._all_marked(args, kwargs)
        if not low:
            return out
        if isinstance(out, torch.Tensor):
            return self._mark_output(func, out)
        return type(out)([self._mark_output(func, o) if isinstance(o, torch.Tensor) else o for o in out])

    def _mark_output(self, func, out: torch.Tensor) -> torch.Tensor:
        if not out.is_floating_point():
            return out
        marks = self._marks
        if marks.get(id(out)) is out:
            return out
        if not (func in _PRESERVING or out._is_view()):
            out = self._round(out)
        marks[id(out)] = out
        return out

    def _all_marked(self, args, kwargs) -> bool:
        """Whether the floating tensor inputs are all marked: autocast's type promotion
        (an unmarked dimensioned tensor wins; 0-dim tensors count only among 0-dim)."""
        get = self._marks.get
        dim_marked = zero_marked = zero_unmarked = False
        for group in (args, kwargs.values()):
            for a in group:
                if isinstance(a, torch.Tensor):
                    items: Any = (a,)
                elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
                    items = a
                else:
                    continue
                for t in items:
                    if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
                        continue
                    marked = get(id(t)) is t
                    if t.dim():
                        if not marked:
                            return False  # fp16 + fp32 -> fp32
                        dim_marked = True
                    elif marked:
                        zero_marked = True
                    else:
                        zero_unmarked = True
        return dim_marked or (zero_marked and not zero_unmarked)

    def _cast_request(self, func, args, kwargs) -> bool:
        """Whether a cast of a marked tensor asks for a dtype (not just a device)."""
        if func in _ALWAYS_FP:
            return True
        if kwargs.get("dtype") is not None:
            return True
        for a in args[1:]:
            if isinstance(a, (torch.dtype, str)) and func is _T.type:
                return True
            if isinstance(a, torch.dtype):
                return True
            if isinstance(a, torch.Tensor):  # .to(other) / .type_as(other): other's dtype
                return not self.is_marked(a)
        return False

    def _redispatch(self, func, types, args, kwargs):
        if _redispatch_function is None:
            raise RuntimeError(
                f"EmulatedPrecision cannot emulate the ops inside {func.__qualname__}: this "
                f"torch ({torch.__version__}) lacks torch.overrides.redispatch_function "
                "(torch 2.13 has it); use SDPA-based attention or a newer torch"
            )
        with self:
            return _redispatch_function(func, types, args, kwargs)
