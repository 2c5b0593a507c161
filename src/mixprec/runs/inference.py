"""Inference verification: a model's outputs under each precision against fp32.

The same weights (a copy per precision, prepared by the engine exactly as training would:
autocast, true-mode conversion, fp8 module swap, emulation) run the same evaluation
batches; each precision's outputs are compared with fp32's: max absolute and relative
error, relative L2 error, SQNR in dB, cosine similarity, argmax agreement (for outputs
whose last dimension is a class or vocabulary axis), and the task's metrics.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from mixprec.engine import Engine
from mixprec.environment import environment
from mixprec.errors import UsageError
from mixprec.policy import Policy, parse_policy
from mixprec.quantization import sqnr_db
from mixprec.task import Task

INFERENCE_SCHEMA = "mixprec.verify-inference/1"
DEFAULT_PRECISIONS = ("bf16-mixed", "fp16-mixed", "fp8-mixed")


def compare_outputs(reference: torch.Tensor, other: torch.Tensor, argmax: bool = True) -> dict[str, Any]:
    """Error figures of ``other`` against ``reference`` (both made float64)."""
    a, b = reference.detach().double().flatten(), other.detach().double().flatten()
    if a.shape != b.shape:
        raise ValueError(f"outputs differ in shape: {tuple(reference.shape)} vs {tuple(other.shape)}")
    finite = bool(torch.isfinite(b).all())
    diff = (b - a).abs()
    scale = float(a.abs().max()) if a.numel() else 0.0
    out = {
        "finite": finite,
        "max_abs_error": float(diff.max()) if a.numel() else 0.0,
        "max_rel_error": float(diff.max()) / scale if scale > 0 else None,
        "rel_l2_error": float(diff.norm() / a.norm()) if float(a.norm()) > 0 else None,
        "sqnr_db": sqnr_db(a, b),
        "cosine": float(nn.functional.cosine_similarity(a, b.nan_to_num(), dim=0)) if a.numel() else 1.0,
    }
    if argmax and reference.dim() >= 2 and reference.shape[-1] > 1:
        out["argmax_agreement"] = float((reference.argmax(-1) == other.nan_to_num().argmax(-1)).float().mean())
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in out.items()}


def verify_model(model: nn.Module, inputs: Iterable[Any], precisions: Iterable[str | Policy] = DEFAULT_PRECISIONS, *,
                 forward: Callable[[nn.Module, Any], Any] | None = None, evaluate: Callable[[nn.Module], dict] | None = None,
                 argmax: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Verify a bare model: ``forward(model, x)`` (default ``model(x)``) on each input, per
    precision. ``argmax``: the output's last axis is a class/vocabulary axis (not an embedding)."""
    forward = forward or (lambda m, x: m(x))
    inputs = list(inputs)
    if not inputs:
        raise UsageError("inference verification needs at least one input batch")
    model = model.to(device).eval()
    with torch.no_grad():
        ref_out = [_first_float(forward(model, x)) for x in inputs]
        ref_metrics = {k: float(v) for k, v in (evaluate(model) if evaluate else {}).items()}
    rows = []
    for spec in precisions:
        policy = parse_policy(spec)
        candidate = copy.deepcopy(model)
        engine = Engine(policy, device=device)
        engine.setup(candidate)
        candidate.eval()
        with torch.no_grad(), engine.autocast():
            outs = [_first_float(forward(candidate, x)) for x in inputs]
            metrics = {k: float(v) for k, v in (evaluate(candidate) if evaluate else {}).items()}
        figures = [compare_outputs(r, o, argmax) for r, o in zip(ref_out, outs)]
        rows.append({"precision": policy.mode, "policy": engine.effective_policy(),
                     **_aggregate(figures),
                     "metrics": {k: {"fp32": ref_metrics[k], "value": metrics.get(k),
                                     "abs_difference": None if metrics.get(k) is None else abs(metrics[k] - ref_metrics[k])}
                                 for k in ref_metrics}})
    return {"schema": INFERENCE_SCHEMA, "batches": len(inputs), "precisions": rows, "environment": environment(device)}


def verify_inference(task: Task, precisions: Iterable[str | Policy] = DEFAULT_PRECISIONS, *, steps: int = 0,
                     batches: int = 4, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Verify ``task``'s model (after ``steps`` of fp32 training) on ``batches`` held-out
    batches of its stream (seed + 1, so not the training batches)."""
    from mixprec.runs.train import train  # a training run only when steps > 0

    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise UsageError(f"batches must be an integer >= 1, got {batches!r}")
    torch.manual_seed(seed)
    model = task.build_model().to(device)
    if steps:
        import tempfile

        from mixprec import checkpoint

        with tempfile.TemporaryDirectory(prefix="mixprec-inference-") as tmp:
            train(task, "fp32", steps=steps, seed=seed, device=device, checkpoint_dir=tmp, monitor_every=0)
            model.load_state_dict(checkpoint.load(f"{tmp}/{checkpoint.CHECKPOINT_NAME}")["model"])
    stream = task.train_batches(seed + 1)
    data = [next(stream) for _ in range(batches)]
    doc = verify_model(model, data, precisions, forward=_task_forward(task), evaluate=task.evaluate, device=device)
    return {**doc, "task": task.name, "trained_steps": steps, "seed": seed}


def _task_forward(task: Task) -> Callable[[nn.Module, Any], Any]:
    """The model's own output for a task batch: ``task.loss`` runs the forward; a hook on
    the root module keeps what it returned."""
    def forward(model: nn.Module, batch: Any) -> Any:
        captured: list[Any] = []
        handle = model.register_forward_hook(lambda m, a, out: captured.append(out))
        try:
            task.loss(model, batch)
        finally:
            handle.remove()
        if not captured:
            raise UsageError(f"task {task.name!r}: its loss() never called the model's forward")
        return captured[0]
    return forward


def _first_float(obj: Any) -> torch.Tensor:
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return obj.detach().float()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else []
    for o in items:
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            return o.detach().float()
    if hasattr(obj, "to_tuple"):  # transformers' ModelOutput
        return _first_float(obj.to_tuple())
    raise UsageError(f"the model's output ({type(obj).__name__}) holds no floating tensor to compare")


def _aggregate(figures: list[dict[str, Any]]) -> dict[str, Any]:
    def worst(key: str, fn) -> Any:
        values = [f[key] for f in figures if f.get(key) is not None]
        return fn(values) if values else None

    out = {
        "finite": all(f["finite"] for f in figures),
        "max_abs_error": worst("max_abs_error", max),
        "max_rel_error": worst("max_rel_error", max),
        "rel_l2_error": worst("rel_l2_error", max),
        "sqnr_db": worst("sqnr_db", min),
        "cosine": worst("cosine", min),
    }
    if any("argmax_agreement" in f for f in figures):
        out["argmax_agreement"] = worst("argmax_agreement", lambda v: sum(v) / len(v))
    return out


def render_inference(doc: dict[str, Any]) -> str:
    head = f"inference verification of {doc.get('task', 'the model')} against fp32 on {doc['batches']} batches"
    if doc.get("trained_steps"):
        head += f" (after {doc['trained_steps']} fp32 training steps)"
    lines = [head, f"{'precision':<20} {'finite':>6} {'max abs':>9} {'rel L2':>9} {'SQNR dB':>8} {'cosine':>9} {'argmax':>7}"]
    for r in doc["precisions"]:
        def f(v, fmt):
            return "-" if v is None else format(v, fmt)
        lines.append(f"{r['precision']:<20} {'yes' if r['finite'] else 'NO':>6} {f(r['max_abs_error'], '.2e'):>9} "
                     f"{f(r['rel_l2_error'], '.2e'):>9} {f(r['sqnr_db'], '.1f'):>8} {f(r['cosine'], '.6f'):>9} "
                     f"{f(r.get('argmax_agreement'), '.1%'):>7}")
        for name, m in r["metrics"].items():
            lines.append(f"    {name}: {m['value']:.4g} vs fp32 {m['fp32']:.4g}" if m["value"] is not None else f"    {name}: n/a")
    return "\n".join(lines)
