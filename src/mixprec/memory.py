"""Memory of one training step, counted from the tensors themselves (not the process).

``state``: parameters, gradients (after backward), the optimizer's state (after its first
step) and, in the true modes, the fp32 master weights. ``activations``: the tensors
autograd saves for backward in one forward pass (``saved_tensors_hooks``; each storage once,
parameters excluded; autocast's low-precision weight copies included, since they are real
extra memory). On CUDA also the allocator's peak over the step. The process's peak RSS is
not used: one process has one peak, and torch's own libraries dominate it at small sizes.
"""

from __future__ import annotations

from typing import Any

import torch

from mixprec.engine import NONFINITE_LOSS, Engine
from mixprec.environment import resolve_device
from mixprec.policy import Policy
from mixprec.task import Task, build_optimizers

MAX_SKIP_RETRIES = 40  # enough to back a 2**16 scale off to below 2**-16 (factor 0.5 each)

__all__ = ["measure_memory"]


def _storage_bytes(t: torch.Tensor, seen: dict[Any, int]) -> None:
    """Record the storage(s) behind ``t`` in ``seen`` (key -> bytes), each once."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        try:  # a wrapper subclass (torchao's Float8 tensors): count the tensors inside
            names, _ = flatten()
            for name in names:
                _storage_bytes(getattr(t, name), seen)
            return
        except Exception:  # noqa: BLE001 - fall back to the logical size
            seen[("tensor", id(t))] = t.numel() * t.element_size()
            return
    try:
        storage = t.untyped_storage()
        seen[(t.device.type, storage.data_ptr())] = storage.nbytes()
    except (RuntimeError, NotImplementedError):
        seen[("tensor", id(t))] = t.numel() * t.element_size()


def _nbytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[Any, int] = {}
    for t in tensors:
        _storage_bytes(t, seen)
    return sum(seen.values())


def measure_memory(task: Task, policy: Policy | str, *, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Bytes of one training step of ``task`` under ``policy``, counted from the tensors.

    ``state``: parameters, gradients (after backward), optimizer state (after the first
    step) and master weights (true modes); ``activations``: tensors saved for backward in
    one forward pass (each storage once, parameters excluded). On CUDA also
    ``cuda_peak_bytes``, the allocator's peak over the step.
    """
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model = task.build_model().to(dev)
    optimizers = build_optimizers(task, model)
    engine = Engine(policy, device=dev)
    engine.setup(model, *optimizers)
    params = list({id(p): p for p in model.parameters()}.values())
    param_keys: dict[Any, int] = {}
    for p in params:
        _storage_bytes(p, param_keys)
    batch = next(task.train_batches(seed))

    saved: dict[Any, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        _storage_bytes(t, saved)
        return t

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with engine.autocast():
            loss = task.loss(model, batch)
    engine.backward(loss)
    grads = _nbytes([p.grad for p in params if p.grad is not None])
    result = engine.step()
    # fp16 at its initial loss scale can overflow and skip the first step, which leaves an
    # optimizer without state to count. Retry on the same batch (the scaler has backed off)
    # until every optimizer has stepped once; the step counts as "stepped" only then.
    stepped = list(result.optimizers_stepped)
    retries = 0
    while not all(stepped) and result.reason != NONFINITE_LOSS and retries < MAX_SKIP_RETRIES:
        with engine.autocast():
            loss = task.loss(model, batch)
        engine.backward(loss)
        result = engine.step()
        stepped = [a or b for a, b in zip(stepped, result.optimizers_stepped)]
        retries += 1
    cuda_peak = None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        cuda_peak = int(torch.cuda.max_memory_allocated(dev) - before)
    weights = sum(param_keys.values())
    optim_state = _nbytes([v for optimizer in optimizers for state in optimizer.state.values() for v in state.values()
                           if isinstance(v, torch.Tensor)])
    masters = _nbytes([m for slot in engine.state_dict()["masters"] for m in slot])
    activations = sum(b for k, b in saved.items() if k not in param_keys)
    n_params = sum(p.numel() for p in params)
    state = weights + grads + optim_state + masters
    first = batch[0] if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor) else batch
    return {
        "mode": engine.effective_policy()["mode"],
        "parameters": n_params,
        "weights_bytes": weights,
        "grads_bytes": grads,
        "optimizer_state_bytes": optim_state,
        "master_weights_bytes": masters,
        "state_bytes": state,
        "state_bytes_per_parameter": state / n_params if n_params else None,
        "activation_bytes": activations,
        "batch_shape": list(first.shape) if isinstance(first, torch.Tensor) else None,
        "cuda_peak_bytes": cuda_peak,
        "step": "stepped" if all(stepped) else "skipped",
        "skipped_before_stepping": retries if all(stepped) else None,
    }
