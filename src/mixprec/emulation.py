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

Cost (lm recipe defaults, forward + backward + AdamW, median step on the 2-core AMD EPYC,
torch 2.13): fp32 65 ms; emulated fp16 71 ms (1.09x; 1.19x with round_outputs and
round_grads); emulated fp8_e4m3 with round_outputs 89 ms (1.36x; torch's e4m3 cast is not
vectorized); native fp16 autocast 2.5 s (39x). With one thread: 96 / 105 / 151 ms and
1.13 s. Every op inside the mode passes through a Python ``__torch_function__``.

Decisions
    * SDPA: only ``query``, ``key`` and ``value`` are rounded. A floating ``attn_mask`` is
      an additive bias, not matmul data: rounding it would perturb e.g. an ALiBi or
      relative-position bias, and fp8_e4m3 would saturate a ``-1e9`` mask to ``-448``.
    * ``out=`` tensors are not rounded (they are written, not read).
    * Non-floating tensors (indices, boolean masks) pass through.
    * ``intercepted`` (a ``collections.Counter``) counts the emulated calls by op name,
      so a run can state what was emulated (DESIGN invariant 1).
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mixprec.formats import Format, get_format
from mixprec.quantization import quantize

__all__ = ["EmulatedPrecision", "emulated_matmul_ops"]


def _matmul_ops() -> dict[Callable, str]:
    ops: dict[Callable, str] = {}

    def add(name: str) -> None:
        obj: Any = torch
        for part in name.split(".")[1:]:
            obj = getattr(obj, part, None)
            if obj is None:
                return  # not in this torch build
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
    :class:`~mixprec.errors.UsageError`). See the module docstring for the options.
    One instance may be entered again after it exits; ``intercepted`` keeps counting.
    """

    def __init__(self, fmt: str | Format, *, round_outputs: bool = False,
                 round_grads: bool = False):
        super().__init__()
        self.format: Format = get_format(fmt)
        self.round_outputs = bool(round_outputs)
        self.round_grads = bool(round_grads)
        self.intercepted: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return (f"EmulatedPrecision({self.format.name!r}, round_outputs={self.round_outputs}, "
                f"round_grads={self.round_grads})")

    # ------------------------------------------------------------------ rounding
    def _round(self, t: Any) -> Any:
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            return t
        if t.requires_grad and torch.is_grad_enabled():
            return _Round.apply(t, self.format, self.round_grads)
        return quantize(t, self.format)

    def _round_tree(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._round(obj)
        if isinstance(obj, (list, tuple)) and any(isinstance(o, torch.Tensor) for o in obj):
            return type(obj)(self._round_tree(o) for o in obj)
        return obj

    # ------------------------------------------------------------------ dispatch
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _OPS.get(func)
        if name is None:
            if func in _REDISPATCH:
                return self._redispatch(func, types, args, kwargs)
            return func(*args, **kwargs)
        self.intercepted[name] += 1
        if func is _SDPA:
            args = tuple(self._round(a) if i < 3 else a for i, a in enumerate(args))
            kwargs = {k: (self._round(v) if k in _SDPA_QKV else v) for k, v in kwargs.items()}
        else:
            args = tuple(self._round_tree(a) for a in args)
            kwargs = {k: (v if k == "out" else self._round_tree(v)) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        if self.round_outputs and "out" not in kwargs:
            out = self._round_tree(out)
        return out

    def _redispatch(self, func, types, args, kwargs):
        if _redispatch_function is None:
            raise RuntimeError(
                f"EmulatedPrecision cannot emulate the ops inside {func.__qualname__}: this "
                f"torch ({torch.__version__}) lacks torch.overrides.redispatch_function "
                "(torch 2.13 has it); use SDPA-based attention or a newer torch"
            )
        with self:
            return _redispatch_function(func, types, args, kwargs)
