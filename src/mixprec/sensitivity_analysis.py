"""Sensitivity: how much the loss, the gradients and the output move when one module alone
runs in a low-precision format and everything else stays in fp32.

For each candidate module the same batches run forward and backward with only that module
in the format (a forward pre-hook enters the format's context, the post-hook leaves it):
native autocast where the hardware has fast kernels for the format, software emulation
(:class:`mixprec.emulation.EmulatedPrecision`, outputs rounded too, so an fp16 overflow
shows up as it would natively) where it does not, and always for fp8. The monitor's range
of the module's output in the fp32 reference (amax / format max) comes with each row.

Candidates are every module but the root: leaves with parameters (Linear, Conv,
Embedding, norms) and containers (attention blocks, MLPs), because a container's own
forward code (an attention softmax, a residual scale) can be what overflows. A container's
figures include its children's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mixprec import checkpoint
from mixprec.emulation import EmulatedPrecision
from mixprec.environment import cpu_has_fast_bf16, cpu_has_fast_fp16, environment
from mixprec.errors import UsageError
from mixprec.formats import get_format
from mixprec.monitor import Monitor
from mixprec.quantization import quantize, sqnr_db
from mixprec.task import Task

SENSITIVITY_SCHEMA = "mixprec.sensitivity/1"
SENSITIVITY_FORMATS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")


def native_is_fast(fmt: str, device: torch.device) -> bool:
    """Whether autocast to ``fmt`` runs on fast kernels here (else: emulate)."""
    if fmt.startswith("fp8"):
        return False  # autocast has no fp8; fp8 numerics are studied by emulation
    if device.type == "cuda":
        return True
    return cpu_has_fast_fp16() if fmt == "fp16" else cpu_has_fast_bf16()


def sensitivity(task: Task, fmt: str = "fp16", *, batches: int = 2, seed: int = 0, device: str = "cpu",
                emulate: bool | None = None, modules: list[str] | None = None) -> dict[str, Any]:
    """Run the sensitivity analysis; returns a ``mixprec.sensitivity/1`` document whose
    ``modules`` rows are ranked riskiest first."""
    fmt_info = get_format(fmt)
    if fmt_info.name not in SENSITIVITY_FORMATS:
        raise UsageError(f"sensitivity format {fmt!r}: valid: {', '.join(SENSITIVITY_FORMATS)}")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise UsageError(f"batches must be an integer >= 1, got {batches!r}")
    dev = torch.device(device)
    emulated = (not native_is_fast(fmt_info.name, dev)) if emulate is None else bool(emulate)
    if not emulated and fmt_info.name.startswith("fp8"):
        raise UsageError("fp8 sensitivity runs emulated (autocast has no fp8); drop emulate=False")

    torch.manual_seed(seed)
    model = task.build_model().to(dev)
    model.train()
    stream = task.train_batches(seed)
    data = [next(stream) for _ in range(batches)]
    names = [n for n, _ in model.named_modules() if n]
    if modules is not None:
        unknown = [m for m in modules if m not in names]
        if unknown:
            raise UsageError(f"no module {unknown[0]!r} in the model; modules: {', '.join(names[:10])}")
        names = list(modules)

    rng = checkpoint.rng_state()
    monitor = Monitor(every=1, formats=[fmt_info.name], containers=True)
    monitor.attach(model)
    monitor.arm(1)
    reference = _run(model, task, data, rng)
    ranges = monitor.collect(1, 1.0)["modules"]
    monitor.detach()
    if not all(math.isfinite(l) for l in reference["losses"]):
        raise UsageError(f"task {task.name!r}: the loss is not finite in fp32 already; "
                         "no precision choice can fix a model that diverges in fp32")

    rows = []
    for name in names:
        module = model.get_submodule(name)
        context = _context_factory(fmt_info.name, dev, emulated)
        handles = _low_island(module, context, fmt_info.name)
        try:
            run = _run(model, task, data, rng)
        finally:
            for h in handles:
                h.remove()
        rows.append(_row(name, module, run, reference, ranges.get(name, {}), fmt_info.max))
    rows.sort(key=_risk_key)
    return {
        "schema": SENSITIVITY_SCHEMA,
        "task": task.name,
        "format": fmt_info.name,
        "emulated": emulated,
        "batches": batches,
        "seed": seed,
        "reference_loss": sum(reference["losses"]) / len(reference["losses"]),
        "modules": rows,
        "environment": environment(dev),
    }


def _context_factory(fmt: str, device: torch.device, emulated: bool):
    if emulated:
        return lambda: EmulatedPrecision(fmt, round_outputs=True)
    dtype = get_format(fmt).dtype
    return lambda: torch.autocast(device.type, dtype=dtype)


def _low_island(module: nn.Module, context, fmt: str) -> list[Any]:
    """Hooks that run ``module`` (and only it) inside ``context()``. Its output leaves the
    island as the format stores it (rounded to ``fmt``: an fp16 module emits fp16, so a
    value past fp16's max becomes inf, natively or emulated) and in fp32, which the rest
    of the model computes in."""
    stack: list[Any] = []

    def pre(mod: nn.Module, args: Any) -> None:
        ctx = context()
        ctx.__enter__()
        stack.append(ctx)

    def post(mod: nn.Module, args: Any, output: Any) -> Any:
        if stack:
            stack.pop().__exit__(None, None, None)
        return _map_floating(output, lambda t: _stored(t.float(), fmt))

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post, always_call=True)]


def _stored(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """``t`` as ``fmt`` stores it, with a straight-through gradient."""
    with torch.no_grad():
        rounded = quantize(t, fmt)
    return t + (rounded - t).detach() if t.requires_grad else rounded


def _map_floating(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_map_floating(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_floating(o, fn) for o in obj]
    return obj


def _run(model: nn.Module, task: Task, data: list[Any], rng: dict[str, Any]) -> dict[str, Any]:
    """Losses, the summed gradient vector and the model outputs over ``data``, from the same
    RNG state each time (dropout masks match across runs)."""
    checkpoint.set_rng_state(rng)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    outputs: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda m, a, out: outputs.append(_first_float(out)))
    losses = []
    try:
        model.zero_grad(set_to_none=True)
        for batch in data:
            loss = task.loss(model, batch)
            loss.float().backward()
            losses.append(float(loss.detach().float()))
        grads = [p.grad.detach().float().flatten() if p.grad is not None else torch.zeros(p.numel())
                 for p in model.parameters() if p.requires_grad]
        grad = torch.cat(grads) if grads else torch.zeros(0)
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():  # BatchNorm statistics: every run starts from the same ones
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
    return {"losses": losses, "grad": grad, "outputs": [o for o in outputs if o is not None]}


def _first_float(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj.detach().float() if obj.is_floating_point() else None
    if isinstance(obj, (tuple, list)):
        for o in obj:
            found = _first_float(o)
            if found is not None:
                return found
    if isinstance(obj, dict):
        for o in obj.values():
            found = _first_float(o)
            if found is not None:
                return found
    return None


def _row(name: str, module: nn.Module, run: dict[str, Any], ref: dict[str, Any], rng: dict[str, Any],
         fmt_max: float) -> dict[str, Any]:
    losses, ref_losses = run["losses"], ref["losses"]
    finite = all(math.isfinite(l) for l in losses) and bool(torch.isfinite(run["grad"]).all())
    loss_change = sum(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, ref_losses)) / len(ref_losses)
    g, g_ref = run["grad"], ref["grad"]
    cosine = (min(1.0, float(nn.functional.cosine_similarity(g.nan_to_num().double(), g_ref.double(), dim=0)))
              if g.numel() else 1.0)
    sqnr = [sqnr_db(r, o) for r, o in zip(ref["outputs"], run["outputs"])]
    amax = rng.get("amax")
    return {
        "module": name,
        "type": type(module).__name__,
        "finite": finite,
        "loss_rel_change": loss_change if finite else None,
        "grad_cosine": cosine if finite else None,
        "output_sqnr_db": (min(sqnr) if sqnr else None) if finite else None,
        "amax": amax,
        "range_ratio": None if amax is None else amax / fmt_max,
    }


def _risk_key(row: dict[str, Any]) -> tuple:
    # Non-finite first, then outputs past the format's max, then the largest loss change,
    # then the worst gradient direction.
    if not row["finite"]:
        return (0, -(row["range_ratio"] or 0.0), 0.0)
    if (row["range_ratio"] or 0.0) > 1.0:
        return (1, -row["range_ratio"], 0.0)
    return (2, -(row["loss_rel_change"] or 0.0), row["grad_cosine"] if row["grad_cosine"] is not None else 1.0)


def render_sensitivity(doc: dict[str, Any], top: int = 15) -> str:
    how = "emulated" if doc["emulated"] else "native"
    lines = [f"sensitivity of {doc['task']} to {doc['format']} ({how}), {doc['batches']} batches, "
             f"fp32 loss {doc['reference_loss']:.4g}; one module at a time, riskiest first",
             f"{'module':<32} {'type':<18} {'loss change':>11} {'grad cos':>9} {'out SQNR':>9} {'amax/max':>9}"]
    for r in doc["modules"][:top]:
        if not r["finite"]:
            figures = f"{'NON-FINITE':>11} {'':>9} {'':>9}"
        else:
            sq = r["output_sqnr_db"]
            sq_text = "inf" if sq is not None and math.isinf(sq) else "-" if sq is None else f"{sq:.1f}"
            figures = f"{r['loss_rel_change']:>11.2e} {r['grad_cosine']:>9.5f} {sq_text:>9}"
        ratio = "-" if r["range_ratio"] is None else f"{r['range_ratio']:.2g}"
        lines.append(f"{r['module'][:32]:<32} {r['type'][:18]:<18} {figures} {ratio:>9}")
    if len(doc["modules"]) > top:
        lines.append(f"... {len(doc['modules']) - top} more (see --json)")
    return "\n".join(lines)
