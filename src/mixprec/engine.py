"""The engine: one optimizer step under a policy.

A user's own loop::

    engine = mixprec.Engine("fp16-mixed", accumulate=2, clip_grad_norm=1.0)
    model, optimizer = engine.setup(model, optimizer)
    for batch in batches:
        with engine.autocast():
            loss = loss_fn(model, batch)
        engine.backward(loss)
        result = engine.step()      # accumulates, or steps, or skips; says which

``step`` does, at an accumulation boundary: (true modes) gradients to fp32 master
weights, unscale with GradScaler's kernel, clip by norm after unscaling, the finite
check, step or skip each optimizer, scale update, zero the gradients. It synchronizes
with the device once (one small tensor copied to the host) and returns a
:class:`StepResult`.

Data parallel (``strategy="ddp"`` or ``"fsdp"``, in a process group; see
:mod:`mixprec.distributed`): ``setup`` wraps the model (DDP) or shards it (FSDP2, the
policy mapped to ``MixedPrecisionPolicy`` per module) and returns the wrapped model;
``autocast`` turns gradient sync off on the micro-batches that do not end a window; and
``step`` all-reduces the found-inf flags and the window's loss in one small tensor before
its one host sync, so every rank steps or skips together and the loss scale stays
identical on every rank. In fp16 the scaler unscales each rank's local gradient shards
and the all-reduced flag decides (what ``ShardedGradScaler`` does); clipping uses the
global norm (``clip_grad_norm_`` over FSDP's DTensor gradients reduces across shards).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from mixprec.environment import cpu_has_fast_fp16
from mixprec.errors import UsageError
from mixprec.policy import Policy, parse_policy, resolve_rules
from mixprec.precision import Plugin, make_plugin
from mixprec.scaler import LossScaler

# Why a step was skipped.
NONFINITE_GRAD = "nonfinite_grad"  # overflow in the (scaled) gradients: a scale problem
NONFINITE_LOSS = "nonfinite_loss"  # the forward pass itself went non-finite: not a scale problem


@dataclass(frozen=True)
class StepResult:
    """What one :meth:`Engine.step` call did.

    ``action`` is ``"accumulated"`` (not at a boundary yet), ``"stepped"`` or ``"skipped"``
    (then ``reason`` says why). ``loss_scale`` is the scale this step's gradients carried,
    ``next_loss_scale`` the one the next step uses. ``grad_norm`` is the total norm after
    unscaling and before clipping, when it was computed (clipping on, or loss scaling off).
    ``loss`` comes with the step's one synchronization, so logging it costs nothing extra.
    ``scale_floor_hit``: the gradients overflowed with the scale already at ``min_scale``.
    """

    action: str
    step: int
    reason: str | None = None
    loss_scale: float = 1.0
    next_loss_scale: float = 1.0
    grad_norm: float | None = None
    optimizers_stepped: tuple[bool, ...] = ()
    scale_floor_hit: bool = False
    loss: float | None = None  # mean loss of the window's micro-batches (as passed to backward)

    @property
    def stepped(self) -> bool:
        return self.action == "stepped"

    @property
    def skipped(self) -> bool:
        return self.action == "skipped"


@dataclass
class _Slot:
    """An optimizer and, in the true modes, its (model param, fp32 master) pairs."""

    optimizer: torch.optim.Optimizer
    pairs: list[tuple[nn.Parameter, nn.Parameter]] = field(default_factory=list)
    # The optimizer's parameters in the model's own order: clip_grad_norm_ over
    # model.parameters() sums the norms in that order, and float sums depend on order.
    ordered: list[torch.Tensor] = field(default_factory=list)

    def params(self) -> list[torch.Tensor]:
        return self.ordered


class Engine:
    def __init__(
        self,
        policy: Policy | str = "fp32",
        *,
        accumulate: int = 1,
        clip_grad_norm: float | None = None,
        device: str | torch.device | None = None,
        strategy: str = "none",
    ) -> None:
        self.policy = parse_policy(policy)
        if strategy not in ("none", "ddp", "fsdp"):
            raise UsageError(f"unknown strategy {strategy!r}; valid: none, ddp, fsdp")
        self.strategy = strategy
        self.world_size = 1  # ranks in the process group (set by setup for ddp/fsdp)
        self.rank = 0
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise UsageError(f"accumulate must be an integer >= 1, got {accumulate!r}")
        if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float)) and clip_grad_norm > 0):
            raise UsageError(f"clip_grad_norm must be a number > 0 (or None), got {clip_grad_norm!r}")
        self.accumulate = accumulate
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self._device = torch.device(device) if device is not None else None
        self.scaler = LossScaler(self.policy.scaler, enabled=self.policy.loss_scaling)
        self._plugin: Plugin | None = None
        self._models: list[nn.Module] = []  # as the user built them (names without DDP's "module.")
        self._wrapped: list[nn.Module] = []  # their DDP wrappers / FSDP-sharded selves
        self._fsdp_units: dict[str, str] = {}  # fully_shard unit -> its MixedPrecisionPolicy param dtype
        self._slots: list[_Slot] = []
        self._hooks: list[Any] = []
        self._fp32_roots: list[list[str]] = []  # per model: the outermost modules rules pin to fp32
        self._dynamic: dict[str, list[Any]] = {}  # modules a controller moved to fp32 -> their hooks
        self._micro = 0  # backward/step calls since the last optimizer step
        self._window_losses: list[torch.Tensor] = []
        self.steps = 0  # optimizer steps attempted (stepped + skipped)
        self.skipped_steps = 0
        # Called at each optimizer step as grad_observer(step, {param name: parameter}) with
        # .grad unscaled and not yet clipped and the values those of before the step (the
        # fp32 masters in the true modes). For verification; training leaves it None.
        self.grad_observer: Callable[[int, dict[str, torch.Tensor]], None] | None = None
        self._param_names: dict[int, str] = {}

    # -- set-up -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else torch.device("cpu")

    def setup(self, model: nn.Module, *optimizers: torch.optim.Optimizer) -> Any:
        """Prepare ``model`` (and the optimizers over its parameters) for the policy.

        Applies per-module rules, converts parameters in the true modes and gives the
        optimizers fp32 master weights. Returns ``model`` or ``(model, *optimizers)``, the
        same objects, so the call reads like Fabric's; with ``strategy="ddp"`` the model
        comes back wrapped in ``DistributedDataParallel``, with ``"fsdp"`` sharded in place
        by ``fully_shard`` (the optimizers then hold its sharded parameters).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"setup() expects an nn.Module first, got {type(model).__name__}")
        if self.strategy != "none":
            from mixprec.distributed import require_group

            self.rank, self.world_size = require_group(self.strategy)
            if self._models:
                raise UsageError(f"strategy {self.strategy!r} takes one model per engine")
            if self.strategy == "fsdp" and self.policy.mode_info.kind not in ("full", "mixed"):
                raise UsageError(
                    f"strategy 'fsdp' does not run {self.policy.mode!r}: FSDP2 keeps sharded fp32 master weights itself "
                    "and casts them per module (MixedPrecisionPolicy), which is what the *-mixed modes map to; use "
                    "fp32, bf16-mixed or fp16-mixed with fsdp, or strategy 'ddp' for the true, fp8 and emulated modes")
        for opt in optimizers:
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"setup() expects torch.optim.Optimizer objects, got {type(opt).__name__}")
            if opt.state:
                raise UsageError("setup() must be called before the optimizer has stepped (its state is not empty)")
        if self._device is None:
            first = next(iter(model.parameters()), None)
            self._device = first.device if first is not None else torch.device("cpu")
        plugin = self._plugin_for_device()
        roots = resolve_rules(self.policy, model)
        fp32_params = {id(p) for name in roots for p in model.get_submodule(name).parameters()}
        if plugin.uses_master_weights:
            _check_ties(model, roots, fp32_params)

        masters: dict[int, nn.Parameter] = {}
        if plugin.uses_master_weights:
            # Cloned before conversion: masters start from the exact fp32 values.
            for p in model.parameters():
                if p.is_floating_point() and id(p) not in fp32_params and id(p) not in masters:
                    masters[id(p)] = nn.Parameter(p.detach().clone().float(), requires_grad=p.requires_grad)
        prefix = f"model{len(self._models)}." if self._models else ""
        for name, p in model.named_parameters():
            self._param_names[id(p)] = prefix + name
            if id(p) in masters:
                self._param_names[id(masters[id(p)])] = prefix + name
        self._hooks += plugin.convert_module(model, roots)
        self._fp32_roots.append(roots)
        self._models.append(model)
        wrapped = self._distribute(model, roots, optimizers)

        model_params = {id(p): p for p in model.parameters()}
        position = {id(p): i for i, p in enumerate(model_params.values())}
        for opt in optimizers:
            slot = _Slot(opt)
            placed = []
            for group in opt.param_groups:
                swapped = []
                for p in group["params"]:
                    m = masters.get(id(p))
                    if m is not None:
                        slot.pairs.append((model_params[id(p)], m))
                        swapped.append(m)
                    else:
                        swapped.append(p)
                    placed.append((position.get(id(p), len(position) + len(placed)), swapped[-1]))
                group["params"] = swapped
            slot.ordered = [p for _, p in sorted(placed, key=lambda item: item[0])]
            self._slots.append(slot)
        return wrapped if not optimizers else (wrapped, *optimizers)

    def _distribute(self, model: nn.Module, roots: list[str], optimizers: Sequence[torch.optim.Optimizer]) -> nn.Module:
        """Wrap (DDP) or shard (FSDP2) ``model``; under FSDP point the optimizers at the
        sharded parameters that replaced the model's own."""
        if self.strategy == "none":
            return model
        from mixprec import distributed

        if self.strategy == "ddp":
            wrapped = distributed.wrap_ddp(model, self.device)
        else:
            before = {}
            for name, p in model.named_parameters(remove_duplicate=False):
                before.setdefault(id(p), name)
            mode = self.policy.mode_info
            low = self._plugin.dtype if mode.kind == "mixed" and self._plugin is not None else None
            units = distributed.shard_model(model, roots, low, self.device)
            low_name = self.policy.mode_info.compute if low is not None else "fp32"
            self._fsdp_units = {(u or "<root>"): ("fp32" if u in roots else low_name) for u in units}
            after = dict(model.named_parameters(remove_duplicate=False))
            for opt in optimizers:
                for group in opt.param_groups:
                    try:
                        group["params"] = [after[before[id(p)]] for p in group["params"]]
                    except KeyError:
                        raise UsageError("strategy 'fsdp': the optimizer holds a parameter that is not the model's") from None
            self._param_names = {id(p): name for name, p in after.items()}
            wrapped = model
        self._wrapped.append(wrapped)
        return wrapped

    def _plugin_for_device(self) -> Plugin:
        if self._plugin is None:
            self._plugin = make_plugin(self.policy.mode_info, self.device)
            mode = self.policy.mode_info
            if mode.compute == "fp16" and mode.kind != "emulated" and self.device.type == "cpu" and not cpu_has_fast_fp16():
                warnings.warn(
                    "fp16 on this CPU: it has no fast fp16 kernels (no AVX512-FP16/AMX-FP16), "
                    "so fp16 matmuls run far slower than fp32; bf16-mixed is the fast format here",
                    stacklevel=3,
                )
        return self._plugin

    # -- the loop ------------------------------------------------------------------------
    @property
    def accumulating(self) -> bool:
        """True while the current micro-batch is not the last of its accumulation window."""
        return self._micro + 1 < self.accumulate

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward context: the policy's autocast (or none), plus DDP's ``no_sync``
        on micro-batches that do not end an accumulation window."""
        plugin = self._plugin_for_device()
        with contextlib.ExitStack() as stack:
            if self.strategy == "fsdp":
                for model in self._wrapped:  # FSDP2 has no no_sync: the same switch, per micro-batch
                    model.set_requires_gradient_sync(not self.accumulating)
            elif self.accumulating:
                for model in self._wrapped + self._models:
                    if hasattr(model, "no_sync"):
                        stack.enter_context(model.no_sync())
            stack.enter_context(plugin.forward_context())
            yield

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Backward of ``loss / accumulate``, scaled when loss scaling is on."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise UsageError(f"backward() expects a scalar loss tensor, got {_describe(loss)}")
        self._window_losses.append(loss.detach())
        if self.accumulate > 1:
            loss = loss / self.accumulate
        with self._plugin_for_device().backward_context():
            self.scaler.scale_loss(loss).backward(**kwargs)

    def step(self, *optimizers: torch.optim.Optimizer) -> StepResult:
        """End a micro-batch; at an accumulation boundary, step or skip the optimizers
        (all of them, or the ones given) and zero their gradients."""
        if not self._slots:
            raise UsageError("step() before setup(model, optimizer): the engine has no optimizer to step")
        if self.accumulating:
            self._micro += 1
            return StepResult("accumulated", self.steps, loss_scale=self.scaler.scale, next_loss_scale=self.scaler.scale)
        self._micro = 0
        slots = self._select(optimizers)
        scale = self.scaler.scale

        flags: list[torch.Tensor] = []
        norms: list[torch.Tensor] = []
        for slot in slots:
            for p, m in slot.pairs:
                m.grad = None if p.grad is None else p.grad.to(torch.float32)
                p.grad = None
            params = [p for p in slot.params() if p.grad is not None]
            for p in params:
                if p.grad.is_sparse and p.grad.dtype == torch.float16:
                    p.grad = p.grad.coalesce()  # as GradScaler: duplicates could overflow once summed
            grads = [p.grad for p in params] if self.strategy != "fsdp" else [_local(p.grad) for p in params]
            found = self.scaler.unscale_(grads)
            if self.grad_observer is not None:
                self.grad_observer(self.steps + 1, {self._param_names.get(id(p), f"param{i}"): p
                                                    for i, p in enumerate(params)})
            norm = self._grad_norm(params)  # clips each optimizer's own gradients
            if found is None:  # no loss scaling: the norm is the finite check
                found = torch.zeros(1, device=self.device) if norm is None else ~norm.isfinite()
            flags.append(found.reshape(1).float())
            if norm is not None:
                norms.append(norm.reshape(()))
        norm = None if not norms else norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
        had_losses = bool(self._window_losses)
        if had_losses:
            window = torch.stack([l.reshape(()).float() for l in self._window_losses])
            loss_ok, loss_mean = window.isfinite().all(), window.mean()
        else:
            loss_ok, loss_mean = torch.tensor(True), torch.tensor(float("nan"))
        self._window_losses = []

        # Under FSDP without clipping the norm is of this rank's shards: its square is summed
        # across ranks with the flags. Otherwise it is the same on every rank.
        local_norm = norm is not None and self.world_size > 1 and self.strategy == "fsdp" and self.clip_grad_norm is None
        packet = torch.cat([f.to(self.device) for f in flags] + [
            (~loss_ok).reshape(1).float().to(self.device),
            loss_mean.reshape(1).float().to(self.device),
        ] + ([norm.reshape(1).float().square()] if local_norm else []))
        if self.world_size > 1:
            # One all-reduce of the flags and the loss: every rank steps or skips together.
            from mixprec.distributed import all_reduce_sum

            all_reduce_sum(packet)
        # The one host-device synchronization of this step.
        values = torch.cat([packet, _local(norm if norm is not None and not local_norm
                                           else torch.zeros((), device=self.device)).reshape(1).float().to(self.device)]).tolist()
        found_inf, (loss_bad, loss_value), rest = values[:len(flags)], values[len(flags):len(flags) + 2], values[len(flags) + 2:]
        norm_value = rest[0] ** 0.5 if local_norm else rest[-1]
        loss_finite = not loss_bad
        if self.world_size > 1:
            loss_value /= self.world_size  # the mean over ranks: each rank's loss is a mean over equal rows
        loss_value = loss_value if had_losses else None
        found = [bool(f) for f in found_inf]

        self.steps += 1
        if not loss_finite:
            # Invariant 4: a forward pass that is already non-finite says nothing about the
            # scale, so the scale stays where it is.
            self.skipped_steps += 1
            self._zero_grad(slots)
            return StepResult("skipped", self.steps, NONFINITE_LOSS, scale, self.scaler.scale,
                              optimizers_stepped=(False,) * len(slots), loss=loss_value)
        stepped = []
        for slot, inf in zip(slots, found):
            if not inf:
                slot.optimizer.step()
                if slot.pairs:
                    with torch.no_grad():
                        torch._foreach_copy_([p for p, _ in slot.pairs], [m for _, m in slot.pairs])
            stepped.append(not inf)
        update = self.scaler.update(any(found))
        self._zero_grad(slots)
        any_stepped = any(stepped)
        self.skipped_steps += not any_stepped
        return StepResult(
            "stepped" if any_stepped else "skipped", self.steps, None if any_stepped else NONFINITE_GRAD,
            scale, self.scaler.scale, norm_value if norm is not None else None, tuple(stepped),
            update.floor_hit, loss_value,
        )

    def _grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        if not params:
            return None
        if self.clip_grad_norm is not None:
            # torch's clip_grad_norm_ has no sparse kernel (nn.Embedding(sparse=True))
            if any(p.grad.is_sparse for p in params):
                norm = _total_norm([p.grad for p in params])
                coef = torch.clamp(self.clip_grad_norm / (norm + 1e-6), max=1.0)
                for p in params:
                    p.grad.mul_(coef)
                return norm
            # Over FSDP's DTensor gradients the total norm is the global one (a replicated DTensor).
            return _local(torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm))
        if self.scaler.enabled:
            return None  # the unscale kernel already checked finiteness; skip a pass
        # No scaling and no clipping: the finite check costs one read of the gradients,
        # and the norm comes with it.
        return _total_norm([_local(p.grad) for p in params])

    def _select(self, optimizers: Sequence[torch.optim.Optimizer]) -> list[_Slot]:
        if not optimizers:
            return self._slots
        by_id = {id(s.optimizer): s for s in self._slots}
        missing = [o for o in optimizers if id(o) not in by_id]
        if missing:
            raise UsageError("step() got an optimizer that was not passed to setup()")
        return [by_id[id(o)] for o in optimizers]

    @staticmethod
    def _zero_grad(slots: list[_Slot]) -> None:
        for slot in slots:
            slot.optimizer.zero_grad(set_to_none=True)
            for p, _ in slot.pairs:
                p.grad = None

    # -- applying a controller's decisions ----------------------------------------------
    def candidate_modules(self, containers: bool = False) -> list[str]:
        """Modules a controller may move between formats, in definition order: leaf modules
        with parameters, plus (``containers``) every module whose own forward code could
        overflow; those the policy's rules pin to fp32 are left out."""
        leaves = [name for name, fmt in self._module_formats(dynamic=False).items() if fmt != "fp32"]
        if not containers:
            return leaves
        out = []
        for i, (model, roots) in enumerate(zip(self._models, self._fp32_roots)):
            prefix = f"model{i}." if len(self._models) > 1 else ""
            for name, _ in model.named_modules():
                if name and not any(name == r or name.startswith(r + ".") for r in roots):
                    out.append(prefix + name)
        return out

    def apply(self, decisions: Iterable[Any]) -> None:
        """Apply controller decisions (objects with ``module`` and ``to_format``): a module
        to fp32 becomes an fp32 island, back to the low format loses it; ``"*"`` switches
        the whole model (warm-up)."""
        decisions = list(decisions)
        if not decisions:
            return
        if self.strategy == "fsdp":
            raise UsageError("controllers change precision per module during training; under strategy 'fsdp' each "
                             "module's parameter dtype is fixed by fully_shard at setup: use the static controller, "
                             "or strategy 'ddp'")
        plugin = self._plugin_for_device()
        if not plugin.supports_dynamic_islands:
            raise UsageError(f"controllers change precision per module during training, which needs a *-mixed mode; "
                             f"this run is {self.policy.mode!r}")
        for d in decisions:
            to_fp32 = d.to_format == "fp32"
            if d.module == "*":
                plugin.all_fp32 = to_fp32
            elif to_fp32 and d.module not in self._dynamic:
                self._dynamic[d.module] = plugin.island(self._find_module(d.module))
            elif not to_fp32 and d.module in self._dynamic:
                for handle in self._dynamic.pop(d.module):
                    handle.remove()

    def _find_module(self, name: str) -> nn.Module:
        model, local = self._models[0], name
        if len(self._models) > 1:
            head, _, local = name.partition(".")
            index = int(head[len("model"):]) if head.startswith("model") and head[5:].isdigit() else -1
            if not 0 <= index < len(self._models):
                raise UsageError(f"module {name!r}: with several models, names start with model<i>.")
            model = self._models[index]
        try:
            return model.get_submodule(local)
        except AttributeError:
            raise UsageError(f"no module {name!r} in the model") from None

    @property
    def controlled_fp32_modules(self) -> list[str]:
        """Modules a controller currently holds in fp32 (on top of the policy's rules)."""
        return sorted(self._dynamic)

    @property
    def all_fp32(self) -> bool:
        return bool(getattr(self._plugin, "all_fp32", False))

    # -- reporting and state ------------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    def effective_policy(self) -> dict[str, Any]:
        """What runs where: the mode, its compute format and the modules kept in fp32."""
        mode = self.policy.mode_info
        return {
            "mode": mode.name,
            "compute_format": mode.compute,
            "master_weights": mode.kind == "true",
            "loss_scaling": self.scaler.enabled,
            "fp32_modules": list(self.fp32_modules),
            "controller_fp32_modules": self.controlled_fp32_modules,
            "all_fp32": self.all_fp32,
            "modules": self._module_formats(),
            "rules": [str(r) for r in self.policy.rules],
            "controller": self.policy.controller.name,
            **({"fp8_modules": list(self._plugin.fp8_modules), "fp8_skipped": dict(self._plugin.skipped)}
               if self.policy.mode_info.kind == "fp8" and self._plugin is not None else {}),
            # Under FSDP each unit's parameters are gathered in its param dtype (gradients reduced
            # in fp32): outside the fp32 rules the modules compute with low-precision weights.
            **({"strategy": self.strategy, "world_size": self.world_size,
                **({"fsdp_param_dtypes": dict(self._fsdp_units), "fsdp_reduce_dtype": "fp32"}
                   if self.strategy == "fsdp" else {})}
               if self.strategy != "none" else {}),
        }

    @property
    def fp32_modules(self) -> list[str]:
        """Qualified names of the modules kept in fp32 (``model<i>.``-prefixed with several models)."""
        if len(self._models) == 1:
            return list(self._fp32_roots[0])
        return [f"model{i}.{r}" for i, roots in enumerate(self._fp32_roots) for r in roots]

    def _module_formats(self, dynamic: bool = True) -> dict[str, str]:
        """The format each leaf module with parameters computes in: ``fp32`` under a rule;
        ``autocast:bf16`` in the mixed modes (autocast picks per op: matmuls and convs go
        low, reductions and embeddings stay fp32); the storage format in the true modes."""
        mode = self.policy.mode_info
        compute = f"autocast:{mode.compute}" if mode.kind == "mixed" else mode.compute
        fp8 = set(getattr(self._plugin, "fp8_modules", ()))
        if mode.kind == "fp8":
            compute = "autocast:bf16"
        elif mode.kind == "emulated":
            compute = f"emulated:{mode.compute}"
        out: dict[str, str] = {}
        for i, (model, roots) in enumerate(zip(self._models, self._fp32_roots)):
            prefix = f"model{i}." if len(self._models) > 1 else ""
            for name, module in model.named_modules():
                if not name or next(module.children(), None) is not None:
                    continue
                if next(module.parameters(recurse=False), None) is None:
                    continue
                pinned = any(name == r or name.startswith(r + ".") for r in roots)
                full = prefix + name
                if dynamic and (self.all_fp32 or any(full == d or full.startswith(d + ".") for d in self._dynamic)):
                    pinned = True
                out[prefix + name] = "fp32" if pinned else "fp8_e4m3" if prefix + name in fp8 else compute
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.policy.mode,
            "scaler": self.scaler.state_dict(),
            "micro": self._micro,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "masters": [[m.detach().clone() for _, m in slot.pairs] for slot in self._slots],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.policy.mode:
            raise UsageError(
                f"engine state was saved under precision {state.get('mode')!r}, this engine runs {self.policy.mode!r}"
            )
        masters = state["masters"]
        if len(masters) != len(self._slots) or any(len(a) != len(s.pairs) for a, s in zip(masters, self._slots)):
            raise UsageError("engine state does not match this model/optimizer set-up (master weights differ)")
        self.scaler.load_state_dict(state["scaler"])
        self._micro = int(state["micro"])
        self.steps = int(state["steps"])
        self.skipped_steps = int(state["skipped_steps"])
        with torch.no_grad():
            for saved, slot in zip(masters, self._slots):
                for t, (p, m) in zip(saved, slot.pairs):
                    m.copy_(t)
                    p.copy_(t)


def _check_ties(model: nn.Module, roots: list[str], fp32_params: set[int]) -> None:
    """In the true modes a parameter has one storage dtype: a weight tied between a module
    kept in fp32 and one that is not cannot honour both."""
    for name, module in model.named_modules():
        if any(name == r or name.startswith(r + ".") for r in roots):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in fp32_params:
                owner = next(r for r in roots for q in model.get_submodule(r).parameters() if q is p)
                raise UsageError(
                    f"{name}.{pname} is tied to a parameter of {owner!r}, which a rule keeps in fp32; in the true "
                    f"modes a tied weight has one dtype: keep both {name!r} and {owner!r} in fp32, or neither"
                )


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2 gradients, replicated norms), else ``t`` itself."""
    return t.to_local() if type(t).__name__ == "DTensor" else t


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm over all gradients; a sparse one counts by its (coalesced) values, since
    ``torch._foreach_norm`` and ``vector_norm`` have no sparse kernel."""
    dense = [g for g in grads if not g.is_sparse]
    norms = list(torch._foreach_norm(dense)) if dense else []
    norms += [torch.linalg.vector_norm(g.coalesce()._values()) for g in grads if g.is_sparse]
    return torch.linalg.vector_norm(torch.stack(norms))


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    return type(obj).__name__
