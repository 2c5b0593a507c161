"""Per-module numerics statistics and non-finite localization, observed with hooks.

The monitor only observes: it never changes the policy, the outputs or the gradients
(its hooks return ``None``). The controller decides from what it saw.

Use::

    monitor = Monitor(every=50, formats=("bf16", "fp16"))   # the run's format first
    monitor.attach(model)                                   # after engine.setup(model, ...)
    for step in range(1, steps + 1):
        sample = monitor.should_sample(step)
        if sample:
            monitor.arm(step)
        ...forward / backward of every micro-batch, engine.step()...
        if sample:
            record = monitor.collect(step, loss_scale=result.loss_scale)
            writer.write(record)
            where = first_nonfinite_forward(record)

Cost
    Unarmed, every hook is one Python attribute check and returns: no tensor work, no
    synchronization (invariant 5 holds on unmonitored steps). Armed, the statistics are
    computed on the device inside the hooks (a dozen element-wise passes and reductions
    per module output, fewer per gradient) and kept as small device tensors;
    :meth:`Monitor.collect` concatenates them and copies them to the host with one
    ``.tolist()``. An armed step on the ``lm`` recipe on a 2-core CPU costs about 1.5x an
    unarmed one, so sampling every ``DEFAULT_EVERY = 50`` steps costs about 1% on average
    (the design's budget is 3%).

What is measured
    Forward, per leaf module (and named containers with ``containers=True``): the first
    floating tensor of the output (of a tuple, list, dict or HF ``ModelOutput`` too).
    ``amax`` and ``mean_abs`` over the finite values, ``nonfinite`` (count of NaN/inf),
    ``input_amax`` / ``input_nonfinite`` over all floating tensors among the positional
    and keyword inputs, and per target format ``underflow`` (fraction of the non-zero
    finite values below the format's smallest normal), ``flush`` (fraction of the
    non-zero finite values that would round to zero: ``|x| <= smallest_subnormal / 2``;
    the half-way value itself rounds to zero, to even) and ``overflow`` (fraction of the
    finite values above the format's max). The counts are exact for every dtype (see
    "Counting without comparisons" below).

    Gradients, per parameter that requires grad, in ``register_post_accumulate_grad_hook``:
    the gradient as accumulated in ``.grad`` (scaled by the loss scale when loss scaling
    is on): ``amax``, ``nonfinite`` and per target format ``underflow`` and ``overflow``.

Several calls in one sampled step (gradient accumulation, a module called twice)
    Forward: ``amax``, ``input_amax``, ``nonfinite`` and ``input_nonfinite`` are the max
    over the calls; the fractions are element-weighted over all calls (summed counts over
    summed denominators, i.e. the fraction of all the values the module produced in the
    step); ``mean_abs`` likewise; ``order`` and ``dtype`` are those of the first call;
    ``calls`` says how many there were. Gradients: the last call, which is the fully
    accumulated gradient the optimizer sees; ``order`` is where the hook first fired.

``order``
    Forward: the index, among observed modules, of the module's first completed call in
    the sampled step (forward hooks fire when a module returns, so a container comes
    after its children: the innermost module that went non-finite is found first).
    Backward: the index at which the parameter's gradient hook first fired; gradients are
    produced from the loss backwards, so the smallest order with a non-finite gradient is
    the one nearest the loss, where the non-finite value entered the backward pass.

The record: ``{"schema", "step", "loss_scale", "formats" (the target formats, the run's
first), "every", "modules": {qualname: {...}}, "params": {qualname: {...}}, **extra}``,
strict JSON (non-finite floats become ``None``).

Attach after ``engine.setup``: the hooks then observe what the rest of the model receives
(for instance an fp32 island's output after it is cast back down in the true modes).

Data parallel runs: each rank records its own micro-batch slices; :func:`merge_rank_records`
combines the ranks' records of a step into one (max over ranks for ``amax``,
``input_amax`` and the non-finite counts, the mean over ranks for the fractions and
``mean_abs``: every rank sees equally many values) and lists the ranks that saw
non-finite values (``nonfinite_ranks``); :func:`first_nonfinite_across_ranks` says which
rank saw the first one. Under DDP the gradients are each rank's own (before DDP averages
them); under FSDP2 they are each rank's shard of the reduce-scattered (averaged)
gradient, so the merged ``amax`` is the global one.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from mixprec.errors import UsageError
from mixprec.jsonio import json_safe
from mixprec.formats import Format, get_format

__all__ = [
    "DEFAULT_EVERY",
    "MONITOR_SCHEMA",
    "Monitor",
    "JsonlWriter",
    "TensorBoardWriter",
    "first_nonfinite_forward",
    "first_nonfinite_backward",
    "describe",
    "summarize",
    "render_summary",
    "load_records",
    "merge_rank_records",
    "first_nonfinite_across_ranks",
]

# Measured on the lm recipe (bf16 autocast, 2-core CPU): an armed step costs ~1.5x an
# unarmed one and unarmed hooks cost well under 1%, so every 50 steps averages ~1%,
# inside the design's 3% budget with room for slower machines and deeper models. Lower
# `every` for diagnosis; the first step is always sampled.
DEFAULT_EVERY = 50
MONITOR_SCHEMA = "mixprec.monitor/1"

_ROOT = "<root>"  # qualname of the model itself when it is a leaf module
_MAX_DEPTH = 3  # how deep to look into nested tuples/lists/dicts for tensors
_RESERVED = ("schema", "step", "loss_scale", "formats", "every", "modules", "params")


# --------------------------------------------------------------------------- statistics
#
# Counting without comparisons. On a CPU, `(a >= t).sum()` is slow: the comparison writes
# a bool tensor and bool sums are not vectorized (~0.7 ms per million values on the
# 2-core dev box), while float element-wise ops and float sums are several times faster.
# So a count of `a >= t`, with `a` = |x| (NaN/inf set to 0) in the tensor's own dtype D,
# is computed as sum(clamp(a, lo, hi) - lo) / (hi - lo), where hi is the smallest D value
# >= t and lo the D value just below it: every element of `a` is <= lo or >= hi, so each
# contributes exactly 0 or hi - lo, and the float sum is exact (float32 up to 2**24
# elements, float64 above). Non-finite counts use (x - x), which is 0 where x is finite
# and NaN elsewhere; non-zero counts use sign(a). The bounds are D values, so the result
# is exact whatever precision the kernels compute in. (Denormal bounds assume the default
# torch.set_flush_denormal(False).)

_EXACT_F32 = 2**24  # float32 sums of 0/1-like values are exact up to this many elements
_KNOWN = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_OF = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
           torch.float64: torch.int64}
_FORWARD_PREDICATES = ("normal", "flush", "max")  # a >= smallest_normal, a > smallest_subnormal/2, a > max
_GRAD_PREDICATES = ("normal", "max")


def _adjacent(value: float, dtype: torch.dtype, direction: int) -> float:
    """The ``dtype`` value next to non-negative ``value`` (a ``dtype`` value), up or down."""
    bits = int(torch.tensor(value, dtype=dtype).view(_INT_OF[dtype]).item()) + direction
    return float(torch.tensor(bits, dtype=_INT_OF[dtype]).view(dtype).item())


def _ceil(t: float, dtype: torch.dtype) -> float:
    """The smallest ``dtype`` value >= t (inf when t is above the finite range)."""
    r = float(torch.tensor(t, dtype=torch.float64).to(dtype).item())
    return _adjacent(r, dtype, +1) if r < t else r


def _floor(t: float, dtype: torch.dtype) -> float:
    r = float(torch.tensor(t, dtype=torch.float64).to(dtype).item())
    return _adjacent(r, dtype, -1) if r > t else r


def _predicate(t: float, strict: bool, dtype: torch.dtype) -> Any:
    """How to count ``a > t`` (strict) or ``a >= t`` over finite |values| of ``dtype``:
    ``None`` (never true), ``"nz"`` (true exactly for the non-zero values) or (lo, hi)."""
    hi = _adjacent(_floor(t, dtype), dtype, +1) if strict else _ceil(t, dtype)
    if math.isinf(hi):
        return None
    lo = _adjacent(hi, dtype, -1)
    return "nz" if lo == 0.0 else (lo, hi)


@dataclass(frozen=True)
class _Layout:
    """Where the counts of one tensor dtype sit in a statistics vector.

    ``bounds``: (lo, hi) per clamp counter, in vector order after the fixed head.
    ``refs``: per target format, per predicate: None (count 0), "nz" or a counter index.
    """

    head: int  # fixed leading values: forward [amax, sum|x|, n_nonfinite, n_nonzero], grads [amax, n_nonfinite, n_nonzero]
    bounds: tuple[tuple[float, float], ...]
    refs: tuple[tuple[Any, ...], ...]

    @property
    def length(self) -> int:
        return self.head + len(self.bounds)

    def count(self, row: Sequence[float], nonzero: float, ref: Any) -> float:
        if ref is None:
            return 0.0
        if ref == "nz":
            return nonzero
        lo, hi = self.bounds[ref]
        return row[self.head + ref] / (hi - lo)  # hi - lo is a power of two: exact


def _make_layout(dtype: torch.dtype, formats: Sequence[Format], predicates: Sequence[str], head: int) -> _Layout:
    bounds: list[tuple[float, float]] = []
    refs = []
    for f in formats:
        per = []
        for what in predicates:
            t, strict = {"normal": (f.smallest_normal, False), "flush": (f.smallest_subnormal / 2, True),
                         "max": (f.max, True)}[what]
            ref = _predicate(t, strict, dtype)
            if isinstance(ref, tuple):
                if ref not in bounds:
                    bounds.append(ref)
                ref = bounds.index(ref)
            per.append(ref)
        refs.append(tuple(per))
    return _Layout(head, tuple(bounds), tuple(refs))


@dataclass(frozen=True)
class _Plan:
    """The target formats and, per tensor dtype, the forward and gradient layouts
    (computed once, at construction: no host work or transfers while armed)."""

    formats: tuple[Format, ...]
    forward: dict[torch.dtype, _Layout]
    grad: dict[torch.dtype, _Layout]

    @classmethod
    def build(cls, formats: Sequence[Format]) -> "_Plan":
        return cls(
            tuple(formats),
            {d: _make_layout(d, formats, _FORWARD_PREDICATES, 4) for d in _KNOWN},
            {d: _make_layout(d, formats, _GRAD_PREDICATES, 3) for d in _KNOWN},
        )

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.formats]


class _Scratch:
    """Two reusable float buffers per dtype on the CPU, grown to the largest tensor seen in
    the sampled step and released at collect: writing the element-wise intermediates into
    them (``out=``) avoids allocating, and page-faulting, fresh memory per op. Other
    devices get fresh tensors: their caching allocators are cheap and stream-aware."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, like: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        n = like.numel()
        if like.device.type != "cpu":
            return (torch.empty(like.shape, dtype=dtype, device=like.device),
                    torch.empty(like.shape, dtype=dtype, device=like.device))
        key = (like.device, dtype)
        bufs = self._buffers.get(key)
        if bufs is None or bufs[0].numel() < n:
            bufs = self._buffers[key] = (torch.empty(n, dtype=dtype, device=like.device),
                                         torch.empty(n, dtype=dtype, device=like.device))
        return bufs[0][:n].view(like.shape), bufs[1][:n].view(like.shape)


def _dense(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """``x`` detached and dense, and the dtype its values come from (picks the layout)."""
    x = x.detach()
    if type(x).__name__ == "DTensor":  # an FSDP2 gradient: this rank's shard
        x = x.to_local()
    if x.is_sparse:
        x = x._values()
    return x, (x.dtype if x.dtype in _KNOWN else torch.float32)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """Intermediates are float32 (16-bit values convert exactly), float64 for float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The statistics vector's dtype: float32 while its counts are exact, else float64 (not on MPS)."""
    if x.device.type == "mps":
        return torch.float32
    return torch.float64 if x.dtype == torch.float64 or x.numel() > _EXACT_F32 else torch.float32


def _count_sum(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """The exact sum of ``t``'s 0/1-like values: float32 sums are exact up to 2**24 elements,
    so larger tensors are summed in chunks of that size, the chunk sums in float64."""
    if t.numel() <= _EXACT_F32 or t.dtype == torch.float64:
        return t.sum().to(acc)
    chunks = t.reshape(-1).split(_EXACT_F32)
    return torch.stack([c.sum() for c in chunks]).sum(dtype=acc)


def _finite_abs(x: torch.Tensor, scratch: _Scratch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]:
    """(|x| with NaN/inf set to 0, a free buffer of its shape, the count of non-finite
    values, the acc dtype); both buffers are scratch, valid until the next call."""
    acc = _acc_dtype(x)
    a, tmp = scratch.get(x, _work_dtype(x))
    if x.dtype != a.dtype:
        x = a.copy_(x)  # 16-bit values convert exactly; convert once
    torch.sub(x, x, out=tmp)  # 0 where finite, NaN where not
    nonfinite = _count_sum(tmp.nan_to_num_(1.0, 1.0, 1.0), acc)
    torch.abs(x, out=a).nan_to_num_(0.0, 0.0, 0.0)
    return a, tmp, nonfinite, acc


def _magnitudes(x: torch.Tensor, layout: _Layout, scratch: _Scratch, with_sum: bool) -> list[torch.Tensor]:
    """[amax, (sum|x|), n_nonfinite, n_nonzero, counters...] of ``x``, as 0-dim tensors."""
    a, tmp, nonfinite, acc = _finite_abs(x, scratch)
    parts = [a.amax().to(acc)]
    if with_sum:
        parts.append(a.sum().to(acc))
    parts += [nonfinite, _count_sum(torch.sign(a, out=tmp), acc)]
    for lo, hi in layout.bounds:
        torch.clamp(a, lo, hi, out=tmp)
        parts.append(_count_sum(tmp.sub_(lo), acc))
    return parts


def _forward_stats(out: torch.Tensor, layout: _Layout, scratch: _Scratch) -> torch.Tensor:
    """One module output's statistics: a 1-D device tensor of ``layout.length`` values,
    [amax, sum|x|, n_nonfinite, n_nonzero_finite, clamp counters...]. No synchronization."""
    return torch.stack(_magnitudes(out, layout, scratch, with_sum=True))


def _input_stats(t: torch.Tensor, scratch: _Scratch) -> torch.Tensor:
    """[amax of the finite |values|, n_nonfinite] of one input."""
    a, _, nonfinite, acc = _finite_abs(t, scratch)
    return torch.stack([a.amax().to(acc), nonfinite])


def _grad_stats(grad: torch.Tensor, layout: _Layout, scratch: _Scratch) -> torch.Tensor:
    """One gradient's statistics: [amax, n_nonfinite, n_nonzero_finite, clamp counters...]."""
    return torch.stack(_magnitudes(grad, layout, scratch, with_sum=False))


def _first_float(obj: Any, depth: int = 0) -> torch.Tensor | None:
    """The first floating tensor of a tensor, tuple, list, dict or ModelOutput (a Mapping)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    if depth >= _MAX_DEPTH:
        return None
    if isinstance(obj, Mapping):
        items: Iterable[Any] = obj.values()
    elif isinstance(obj, (tuple, list)):
        items = obj
    else:
        return None
    for item in items:
        t = _first_float(item, depth + 1)
        if t is not None:
            return t
    return None


def _floats(obj: Any, out: list[torch.Tensor], depth: int = 0) -> list[torch.Tensor]:
    """Every non-empty floating tensor in ``obj`` (nested tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() > 0:
            out.append(obj)
    elif depth < _MAX_DEPTH:
        if isinstance(obj, Mapping):
            for v in obj.values():
                _floats(v, out, depth + 1)
        elif isinstance(obj, (tuple, list)):
            for v in obj:
                _floats(v, out, depth + 1)
    return out


@dataclass
class _Call:
    """One observed call of a module: its output statistics and, when it had floating
    inputs, their [amax, n_nonfinite] (device tensors until collect)."""

    layout: _Layout
    out: torch.Tensor
    numel: int
    inputs: torch.Tensor | None
    input_numel: int


@dataclass
class _ForwardSlot:
    order: int
    type: str
    dtype: str
    calls: list[_Call] = field(default_factory=list)


@dataclass
class _GradSlot:
    order: int
    module: str
    dtype: str = ""
    layout: _Layout | None = None
    vector: torch.Tensor | None = None
    numel: int = 0


# --------------------------------------------------------------------------- the monitor


class Monitor:
    """Observes per-module numerics on sampled steps; see the module docstring.

    ``every``: sample step 1 and every ``every``-th optimizer step. ``formats``: target
    format names for :func:`mixprec.formats.get_format`, the run's low-precision format
    first, then any others to ask "how would this run look in that format?".
    ``containers``: also observe modules that have children (not the root), besides the
    leaves.
    """

    def __init__(self, every: int = DEFAULT_EVERY, formats: Sequence[str] = ("fp16",),
                 containers: bool = False) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UsageError(f"monitor every must be an integer >= 1 (sample every N optimizer steps), got {every!r}")
        if isinstance(formats, (str, Format)):
            formats = (formats,)
        resolved: list[Format] = []
        for name in formats:
            fmt = get_format(name)
            if fmt not in resolved:
                resolved.append(fmt)
        if not resolved:
            raise UsageError("monitor formats must name at least one format (the run's low-precision format first)")
        self.every = every
        self.containers = bool(containers)
        self._plan = _Plan.build(resolved)
        self._handles: list[Any] = []
        self._names: set[str] = set()
        self._attached: set[int] = set()  # ids of modules and parameters with our hooks
        self._armed = False  # the one attribute every hook checks
        self._armed_step: int | None = None
        self._reset()

    @property
    def formats(self) -> list[str]:
        """Canonical names of the target formats, the run's format first."""
        return self._plan.names

    @property
    def armed(self) -> bool:
        return self._armed

    def __repr__(self) -> str:
        return (f"Monitor(every={self.every}, formats={tuple(self.formats)}, containers={self.containers}, "
                f"hooks={len(self._handles)}, armed={self._armed})")

    # -- hooks ---------------------------------------------------------------------------
    def attach(self, model: nn.Module, prefix: str = "") -> None:
        """Hook every leaf module of ``model`` (and named containers with ``containers``)
        and every parameter that requires grad. ``prefix`` is prepended to qualified names
        (``"model0"`` -> ``"model0.blocks.0.fc"``), to tell several models apart."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"attach() expects an nn.Module, got {type(model).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"attach() prefix must be a str, got {type(prefix).__name__}")

        def qual(name: str) -> str:
            if prefix and name:
                return f"{prefix}.{name}"
            return prefix or name or _ROOT

        modules = []
        for name, module in model.named_modules():
            leaf = next(module.children(), None) is None
            if leaf or (self.containers and name):
                modules.append((qual(name), module))
        params = [(qual(name), p) for name, p in model.named_parameters() if p.requires_grad]
        taken = [n for n, _ in modules if n in self._names] + [n for n, _ in params if n in self._names]
        again = [n for n, m in modules + params if id(m) in self._attached]
        if taken or again:
            what = (again or taken)[0]
            raise UsageError(
                f"monitor is already attached to {what!r}: attach each model once, and give several models "
                "different prefixes (attach(model, prefix='model1'))"
            )
        for name, module in modules:
            self._handles.append(module.register_forward_hook(self._forward_hook(name), with_kwargs=True))
            self._names.add(name)
            self._attached.add(id(module))
        for name, p in params:
            owner = name.rpartition(".")[0] or (prefix or _ROOT)
            self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(name, owner)))
            self._names.add(name)
            self._attached.add(id(p))

    def detach(self) -> None:
        """Remove every hook this monitor installed (and drop an armed sample)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._names = set()
        self._attached = set()
        self.disarm()

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if not self._armed:
                return None
            self._observe_forward(name, module, args, kwargs, output)
            return None

        return hook

    def _grad_hook(self, name: str, owner: str):
        def hook(param: torch.Tensor) -> None:
            if not self._armed:
                return None
            self._observe_grad(name, owner, param)
            return None

        return hook

    def _cached(self, t: torch.Tensor) -> torch.Tensor | None:
        """The output statistics already computed for this very tensor, if unchanged since."""
        seen = self._seen.get(id(t))
        if seen is not None and seen[0]() is t and not t.is_inference() and seen[1] == t._version:
            return seen[2]
        return None

    def _observe_forward(self, name: str, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        out = _first_float(output)
        if out is None or out.numel() == 0:
            return
        with torch.no_grad():
            x, dtype = _dense(out)
            layout = self._plan.forward[dtype]
            stats = self._cached(out)
            if stats is None:
                stats = _forward_stats(x, layout, self._scratch)
                if not out.is_inference():
                    self._seen[id(out)] = (weakref.ref(out), out._version, stats)
            inputs = _floats(kwargs, _floats(args, []))
            in_stats = None
            if inputs:
                # An input that another module produced (a Sequential, a residual branch)
                # reuses that module's statistics: [amax, n_nonfinite] are its entries 0 and 2.
                pieces = []
                for t in inputs:
                    cached = self._cached(t)
                    pieces.append(cached[0:3:2] if cached is not None else _input_stats(_dense(t)[0], self._scratch))
                if len(pieces) == 1:
                    in_stats = pieces[0]
                else:
                    acc = max((p.dtype for p in pieces), key=lambda d: d.itemsize)  # float32 or float64
                    both = torch.stack([p.to(device=out.device, dtype=acc) for p in pieces])
                    in_stats = torch.stack([both[:, 0].amax(), both[:, 1].sum()])
        slot = self._forward.get(name)
        if slot is None:
            slot = self._forward[name] = _ForwardSlot(self._forward_order, type(module).__name__, str(out.dtype))
            self._forward_order += 1
        slot.calls.append(_Call(layout, stats, x.numel(), in_stats, sum(t.numel() for t in inputs)))

    def _observe_grad(self, name: str, owner: str, param: torch.Tensor) -> None:
        grad = param.grad
        slot = self._grads.get(name)
        if slot is None:
            slot = self._grads[name] = _GradSlot(self._grad_order, owner)
            self._grad_order += 1
        if grad is None or grad.numel() == 0:
            return
        with torch.no_grad():
            x, dtype = _dense(grad)
            if x.numel() == 0:  # an empty FSDP shard
                return
            slot.layout = self._plan.grad[dtype]
            slot.vector = _grad_stats(x, slot.layout, self._scratch)  # the last call: the accumulated gradient
        slot.numel = x.numel()
        slot.dtype = str(grad.dtype)

    # -- sampling ------------------------------------------------------------------------
    def should_sample(self, step: int) -> bool:
        """Whether 1-based optimizer step ``step`` is sampled: step 1 and every ``every``-th."""
        return step == 1 or step % self.every == 0

    def arm(self, step: int) -> None:
        """Observe the next forward/backward passes (every micro-batch) until :meth:`collect`."""
        if self._armed:
            if step == self._armed_step:
                return
            raise UsageError(
                f"monitor.arm({step}) while step {self._armed_step} is armed and not collected: "
                "call collect() (or disarm()) first"
            )
        self._reset()
        self._armed_step = step
        self._armed = True

    def disarm(self) -> None:
        """Drop the armed sample without collecting it (after an exception, for instance)."""
        self._armed = False
        self._armed_step = None
        self._reset()

    def _reset(self) -> None:
        self._forward: dict[str, _ForwardSlot] = {}
        self._grads: dict[str, _GradSlot] = {}
        self._seen: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}
        self._scratch = _Scratch()
        self._forward_order = 0
        self._grad_order = 0

    def collect(self, step: int, loss_scale: float, extra: dict | None = None) -> dict:
        """The sampled step's record, with one device-to-host transfer; disarms.

        ``extra`` entries are added to the record (non-finite floats become ``None``); they
        may not reuse the record's own keys.
        """
        if not self._armed:
            raise UsageError("monitor.collect() without arm(): arm(step) before the step's forward pass")
        if step != self._armed_step:
            raise UsageError(f"monitor.collect({step}) but step {self._armed_step} was armed")
        extra = dict(extra or {})
        clash = [k for k in extra if k in _RESERVED]
        if clash:
            raise UsageError(f"monitor.collect() extra may not set {clash[0]!r}; reserved keys: {', '.join(_RESERVED)}")
        forward, grads = self._forward, self._grads
        try:
            pieces = []
            for slot in forward.values():
                for call in slot.calls:
                    pieces.append(call.out)
                    if call.inputs is not None:
                        pieces.append(call.inputs)
            pieces += [g.vector for g in grads.values() if g.vector is not None]
            values: list[float] = []
            if pieces:
                device = pieces[0].device
                values = torch.cat([p.to(device) for p in pieces]).tolist()  # the one transfer
        finally:
            self.disarm()

        pos = 0
        modules: dict[str, dict] = {}
        for name, slot in forward.items():
            rows = []
            for call in slot.calls:
                out_row = values[pos: pos + call.layout.length]
                pos += call.layout.length
                in_row = None
                if call.inputs is not None:
                    in_row = values[pos: pos + 2]
                    pos += 2
                rows.append((call, out_row, in_row))
            modules[name] = _module_entry(slot, rows, self._plan)
        params: dict[str, dict] = {}
        for name, gslot in grads.items():  # in backward order: the dict fills as hooks first fire
            if gslot.vector is None or gslot.layout is None:
                continue
            row = values[pos: pos + gslot.layout.length]
            pos += gslot.layout.length
            params[name] = _param_entry(gslot, row, self._plan)
        return {
            "schema": MONITOR_SCHEMA,
            "step": step,
            "loss_scale": json_safe(float(loss_scale)),
            "formats": self._plan.names,
            "every": self.every,
            "modules": modules,
            "params": params,
            **json_safe(extra),
        }


def _frac(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _module_entry(slot: _ForwardSlot, rows: list[tuple[_Call, list[float], list[float] | None]], plan: _Plan) -> dict:
    n_fin = sum(call.numel - r[2] for call, r, _ in rows)
    n_nz = sum(r[3] for _, r, _ in rows)
    with_inputs = [(call, i) for call, _, i in rows if i is not None]
    entry: dict[str, Any] = {
        "type": slot.type,
        "dtype": slot.dtype,
        "order": slot.order,
        "calls": len(rows),
        "amax": max(r[0] for _, r, _ in rows) if n_fin > 0 else None,
        "mean_abs": sum(r[1] for _, r, _ in rows) / n_fin if n_fin > 0 else None,
        "nonfinite": int(max(r[2] for _, r, _ in rows)),
        "input_amax": max(i[0] for _, i in with_inputs) if with_inputs else None,
        "input_nonfinite": int(max(i[1] for _, i in with_inputs)) if with_inputs else 0,
    }
    formats = {}
    for k, name in enumerate(plan.names):
        normal = flush = over = 0.0
        for call, r, _ in rows:
            ref_normal, ref_flush, ref_max = call.layout.refs[k]
            normal += call.layout.count(r, r[3], ref_normal)
            flush += call.layout.count(r, r[3], ref_flush)
            over += call.layout.count(r, r[3], ref_max)
        formats[name] = {
            "underflow": _frac(n_nz - normal, n_nz),
            "flush": _frac(n_nz - flush, n_nz),
            "overflow": _frac(over, n_fin),
        }
    entry["formats"] = formats
    return json_safe(entry)


def _param_entry(slot: _GradSlot, row: list[float], plan: _Plan) -> dict:
    layout = slot.layout
    amax, nonfinite, n_nz = row[0], row[1], row[2]
    n_fin = slot.numel - nonfinite
    formats = {}
    for k, name in enumerate(plan.names):
        ref_normal, ref_max = layout.refs[k]
        formats[name] = {
            "underflow": _frac(n_nz - layout.count(row, n_nz, ref_normal), n_nz),
            "overflow": _frac(layout.count(row, n_nz, ref_max), n_fin),
        }
    entry: dict[str, Any] = {
        "module": slot.module,
        "dtype": slot.dtype,
        "order": slot.order,
        "amax": amax if n_fin > 0 else None,
        "nonfinite": int(nonfinite),
        "formats": formats,
    }
    return json_safe(entry)


# --------------------------------------------------------------------------- localization


def first_nonfinite_forward(record: dict) -> dict | None:
    """The module that produced a non-finite output first in the sampled forward pass."""
    hits = [(m["order"], name, m) for name, m in record.get("modules", {}).items() if (m.get("nonfinite") or 0) > 0]
    if not hits:
        return None
    order, name, m = min(hits, key=lambda h: h[0])
    return {
        "module": name,
        "type": m.get("type"),
        "dtype": m.get("dtype"),
        "input_amax": m.get("input_amax"),
        "input_nonfinite": m.get("input_nonfinite"),
        "output_nonfinite": m.get("nonfinite"),
        "order": order,
        "step": record.get("step"),
    }


def first_nonfinite_backward(record: dict) -> dict | None:
    """The parameter whose gradient went non-finite first in the backward pass."""
    hits = [(p["order"], name, p) for name, p in record.get("params", {}).items() if (p.get("nonfinite") or 0) > 0]
    if not hits:
        return None
    order, name, p = min(hits, key=lambda h: h[0])
    return {"param": name, "module": p.get("module"), "order": order, "nonfinite": p.get("nonfinite"),
            "step": record.get("step")}


def merge_rank_records(records: Sequence[dict]) -> dict:
    """One record from the ranks' records of the same step (see the module docstring)."""
    if len(records) == 1:
        return records[0]
    base = json.loads(json.dumps(records[0]))  # a deep copy of plain JSON data
    base["world_size"] = len(records)
    for section in ("modules", "params"):
        merged: dict[str, dict] = {}
        names = list(base.get(section, {}))
        for r in records[1:]:
            names += [n for n in r.get(section, {}) if n not in names]
        for name in names:
            entries = [(rank, r[section][name]) for rank, r in enumerate(records) if name in r.get(section, {})]
            out = json.loads(json.dumps(entries[0][1]))
            for key in ("amax", "input_amax", "nonfinite", "input_nonfinite"):
                values = [e.get(key) for _, e in entries if e.get(key) is not None]
                if key in out:
                    out[key] = max(values) if values else None
            means = [e.get("mean_abs") for _, e in entries if e.get("mean_abs") is not None]
            if "mean_abs" in out:
                out["mean_abs"] = sum(means) / len(means) if means else None
            for fmt, stats in out.get("formats", {}).items():
                for key in stats:
                    values = [e["formats"][fmt][key] for _, e in entries
                              if e.get("formats", {}).get(fmt, {}).get(key) is not None]
                    stats[key] = sum(values) / len(values) if values else None
            bad = [rank for rank, e in entries if (e.get("nonfinite") or 0) > 0]
            if bad:
                out["nonfinite_ranks"] = bad
            merged[name] = out
        base[section] = merged
    return base


def first_nonfinite_across_ranks(records: Sequence[dict]) -> tuple[dict | None, dict | None]:
    """(forward, backward) as :func:`first_nonfinite_forward`/``_backward`` over the ranks'
    records of one step, each with the ``rank`` that saw it first (the smallest ``order``,
    ties to the lower rank) and ``ranks``: every rank that saw a non-finite value in that pass."""
    out = []
    for find in (first_nonfinite_forward, first_nonfinite_backward):
        hits = [(h["order"], rank, h) for rank, h in ((rank, find(r)) for rank, r in enumerate(records)) if h]
        if not hits:
            out.append(None)
            continue
        _, rank, hit = min(hits, key=lambda h: (h[0], h[1]))
        out.append({**hit, "rank": rank, "ranks": sorted(r for _, r, _ in hits)})
    return out[0], out[1]


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def describe(forward: dict | None, backward: dict | None, run_format: str) -> str:
    """One or two plain lines saying where the first non-finite value appeared."""
    fmt = get_format(run_format)
    lines = []
    if forward is not None:
        name, kind = forward["module"], forward.get("type")
        dtype = str(forward.get("dtype") or "")
        short = dtype.removeprefix("torch.")
        in_amax, in_bad = forward.get("input_amax"), forward.get("input_nonfinite") or 0
        low = fmt.name not in ("fp32", "tf32") and dtype == str(fmt.dtype)
        if low and in_amax is not None and in_amax > fmt.max and not in_bad:
            lines.append(f"{fmt.name} overflow in `{name}` ({kind}): input amax {_num(in_amax)} > {fmt.name} max {fmt.max:g}")
        else:
            if in_amax is None:
                inputs = "no floating inputs"
            elif in_bad:
                parent = name.rpartition(".")[0]
                where = f"functional code of `{parent}`" if parent else "functional code between modules"
                inputs = (f"inputs already non-finite ({in_bad} values): it arose before `{name}`, outside "
                          f"the monitored modules (in the model's inputs or in {where})")
            else:
                inputs = "inputs finite"
            line = f"non-finite output first in `{name}` ({kind}, {short}): input amax {_num(in_amax)}, {inputs}"
            if low and not in_bad:
                line += f"; likely an overflow past {fmt.name} max {fmt.max:g} inside the op"
            lines.append(line)
    if backward is not None:
        lines.append(f"first non-finite gradient in `{backward['module']}` (param `{backward['param']}`, "
                     f"{backward.get('nonfinite')} non-finite values)")
    if not lines:
        return "no module produced a non-finite value"
    return "\n".join(lines)


# --------------------------------------------------------------------------- outputs


class JsonlWriter:
    """Appends one record per line (strict JSON), flushed as each line is written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write monitor records to {str(self.path)!r}: {exc.strerror or exc}") from None

    def write(self, record: dict) -> None:
        line = json.dumps(json_safe(record), allow_nan=False)  # fails before anything is written
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TensorBoardWriter:
    """Writes each record as TensorBoard scalars (``loss_scale``, ``amax/<module>``,
    ``overflow_<fmt>/<module>``, ``underflow_<fmt>/<module>``, ``nonfinite/<module>``,
    ``grad_underflow_<fmt>/<param>``) at the record's step."""

    def __init__(self, logdir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("TensorBoard output needs the tensorboard package: pip install tensorboard") from None
        self.logdir = Path(logdir)
        self._writer = SummaryWriter(log_dir=str(self.logdir))

    def write(self, record: dict) -> None:
        step = record["step"]
        add = self._writer.add_scalar

        def scalar(tag: str, value: Any) -> None:
            if value is not None:
                add(tag, value, step)

        scalar("loss_scale", record.get("loss_scale"))
        for name, m in record.get("modules", {}).items():
            scalar(f"amax/{name}", m.get("amax"))
            scalar(f"nonfinite/{name}", m.get("nonfinite"))
            for fmt, stats in m.get("formats", {}).items():
                scalar(f"overflow_{fmt}/{name}", stats.get("overflow"))
                scalar(f"underflow_{fmt}/{name}", stats.get("underflow"))
        for name, p in record.get("params", {}).items():
            for fmt, stats in p.get("formats", {}).items():
                scalar(f"grad_underflow_{fmt}/{name}", stats.get("underflow"))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "TensorBoardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_records(path: str | Path) -> list[dict]:
    """The records of a monitor JSONL file (blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read monitor records from {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{str(path)!r} is not a monitor JSONL file (not UTF-8 text)") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{str(path)!r} line {lineno}: malformed monitor record ({exc.msg})") from None
        if not isinstance(record, dict) or record.get("schema") != MONITOR_SCHEMA:
            got = record.get("schema") if isinstance(record, dict) else type(record).__name__
            raise UsageError(f"{str(path)!r} line {lineno}: not a {MONITOR_SCHEMA} record (schema {got!r})")
        records.append(record)
    return records


# --------------------------------------------------------------------------- summary


def summarize(records: list[dict], top: int = 5) -> dict:
    """What the sampled records say, ranked: overflow risk (amax / max of the first target
    format), underflow, gradient underflow and non-finite outputs."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise UsageError(f"summarize top must be an integer >= 1, got {top!r}")
    fmt_name = next((r["formats"][0] for r in records if r.get("formats")), "fp16")
    fmt = get_format(fmt_name)
    risk: dict[str, dict] = {}
    under: dict[str, dict] = {}
    grad_under: dict[str, dict] = {}
    bad: dict[str, dict] = {}
    for r in records:
        step = r.get("step")
        for name, m in r.get("modules", {}).items():
            amax = m.get("amax")
            if amax is not None:
                ratio = amax / fmt.max
                if name not in risk or ratio > risk[name]["ratio"]:
                    risk[name] = {"module": name, "type": m.get("type"), "amax": amax, "ratio": ratio, "step": step}
            u = (m.get("formats", {}).get(fmt.name) or {}).get("underflow")
            if u is not None and (name not in under or u > under[name]["underflow"]):
                under[name] = {"module": name, "type": m.get("type"), "underflow": u, "step": step}
            if (m.get("nonfinite") or 0) > 0:
                b = bad.setdefault(name, {"module": name, "type": m.get("type"), "records": 0, "first_step": step,
                                          "max_nonfinite": 0})
                b["records"] += 1
                b["max_nonfinite"] = max(b["max_nonfinite"], m["nonfinite"])
        for name, p in r.get("params", {}).items():
            u = (p.get("formats", {}).get(fmt.name) or {}).get("underflow")
            if u is not None and (name not in grad_under or u > grad_under[name]["underflow"]):
                grad_under[name] = {"param": name, "module": p.get("module"), "underflow": u, "step": step}
    steps = [r.get("step") for r in records if isinstance(r.get("step"), int)]
    return {
        "samples": len(records),
        "format": fmt.name,
        "steps": [min(steps), max(steps)] if steps else None,
        "overflow_risk": sorted(risk.values(), key=lambda e: -e["ratio"])[:top],
        "underflow": sorted(under.values(), key=lambda e: -e["underflow"])[:top],
        "grad_underflow": sorted(grad_under.values(), key=lambda e: -e["underflow"])[:top],
        "nonfinite": sorted(bad.values(), key=lambda e: (-e["records"], e["first_step"] or 0)),
    }


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), "  " + "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def render_summary(summary: dict) -> str:
    """A fixed-width text rendering of :func:`summarize`'s result for the terminal."""
    fmt = summary.get("format", "fp16")
    steps = summary.get("steps")
    span = f", steps {steps[0]}-{steps[1]}" if steps else ""
    out = [f"monitor: {summary.get('samples', 0)} sampled steps{span}; target format {fmt}"]

    def section(title: str, header: list[str], rows: list[list[str]], right: set[int]) -> None:
        out.append("")
        out.append(title)
        out.extend(_table(header, rows, right) if rows else ["  (none)"])

    section(f"overflow risk (amax / {fmt} max)", ["module", "type", "amax", "ratio", "step"],
            [[e["module"], str(e.get("type")), f"{e['amax']:.3g}", f"{e['ratio']:.3g}", str(e.get("step"))]
             for e in summary.get("overflow_risk", [])], {2, 3, 4})
    section(f"underflow (non-zero outputs below {fmt} min normal)", ["module", "type", "fraction", "step"],
            [[e["module"], str(e.get("type")), f"{e['underflow']:.2%}", str(e.get("step"))]
             for e in summary.get("underflow", [])], {2, 3})
    section(f"gradient underflow (non-zero scaled gradients below {fmt} min normal)", ["param", "fraction", "step"],
            [[e["param"], f"{e['underflow']:.2%}", str(e.get("step"))] for e in summary.get("grad_underflow", [])],
            {1, 2})
    section("non-finite outputs", ["module", "type", "samples", "first step", "max count"],
            [[e["module"], str(e.get("type")), str(e["records"]), str(e.get("first_step")), str(e["max_nonfinite"])]
             for e in summary.get("nonfinite", [])], {2, 3, 4})
    return "\n".join(out)
