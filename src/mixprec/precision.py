"""One small class per kind of mode, behind one interface (after Lightning Fabric's plugins).

- :class:`FullPrecision`: fp32 (and tf32 on GPUs that have it).
- :class:`MixedPrecision`: fp32 parameters, ``torch.autocast`` to fp16/bf16.
- :class:`TruePrecision`: parameters stored in fp16/bf16, fp32 master weights in the optimizer;
  floating inputs to the model are cast to that dtype.

Per-module fp32 rules ("islands") are applied with forward hooks, not by replacing
``forward``: the pre-hook casts floating inputs to fp32 (and, under autocast, disables it
for the module); the post-hook restores autocast or casts outputs back down.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from mixprec.errors import UsageError
from mixprec.formats import get_format
from mixprec.policy import Mode


def cast_floating(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating tensor (in tuples, lists and dicts too) cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(cast_floating(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [cast_floating(o, dtype) for o in obj]
    if type(obj) is dict:
        return {k: cast_floating(v, dtype) for k, v in obj.items()}
    return obj


class Plugin:
    """The interface every mode implements."""

    # Whether modules can move to fp32 and back during training (controllers need it).
    supports_dynamic_islands = False

    def __init__(self, mode: Mode, device: torch.device) -> None:
        self.mode = mode
        self.device = device
        fmt = get_format(mode.compute)
        self.dtype: torch.dtype = fmt.dtype if fmt.dtype is not None else torch.float32

    def convert_module(self, model: nn.Module, fp32_roots: list[str]) -> list[Any]:
        """Convert ``model`` in place for this mode; return the hook handles it installed."""
        return []

    def forward_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward_context(self) -> contextlib.AbstractContextManager:
        """Around ``loss.backward()``: what the backward matmuls need (tf32's switch)."""
        return contextlib.nullcontext()

    @property
    def uses_master_weights(self) -> bool:
        return False


class FullPrecision(Plugin):
    def __init__(self, mode: Mode, device: torch.device) -> None:
        super().__init__(mode, device)
        if mode.name == "tf32" and not _cuda_has_tf32(device):
            raise UsageError(
                f"tf32 needs an NVIDIA GPU of compute capability >= 8.0; this run is on {device} "
                "(use fp32, or bf16-mixed on CPUs with AVX512_BF16/AMX)"
            )

    def forward_context(self) -> contextlib.AbstractContextManager:
        return self._tf32()

    def backward_context(self) -> contextlib.AbstractContextManager:
        return self._tf32()  # the backward matmuls (two thirds of the FLOPs) run in tf32 too

    @contextlib.contextmanager
    def _tf32(self) -> Iterator[None]:
        if self.mode.name != "tf32":
            yield
            return
        # Scoped to the forward and backward passes instead of flipping the global default.
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class MixedPrecision(Plugin):
    """fp32 parameters, autocast to the mode's dtype. ``all_fp32`` switches autocast off
    for the whole model (the warm-up controller); islands can come and go during training
    (the adaptive controllers)."""

    supports_dynamic_islands = True

    def __init__(self, mode: Mode, device: torch.device) -> None:
        super().__init__(mode, device)
        self.all_fp32 = False

    def forward_context(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=not self.all_fp32)

    def convert_module(self, model: nn.Module, fp32_roots: list[str]) -> list[Any]:
        return [h for name in fp32_roots for h in self.island(model.get_submodule(name))]

    def island(self, module: nn.Module) -> list[Any]:
        """Run ``module`` in fp32: autocast off inside it, floating inputs cast up."""
        device_type = self.device.type
        stack: list[torch.autocast] = []

        def pre(mod: nn.Module, args: Any, kwargs: Any) -> Any:
            ctx = torch.autocast(device_type, enabled=False)
            ctx.__enter__()
            stack.append(ctx)
            return cast_floating(args, torch.float32), cast_floating(kwargs, torch.float32)

        def post(mod: nn.Module, args: Any, output: Any) -> None:
            if stack:
                stack.pop().__exit__(None, None, None)

        return [module.register_forward_pre_hook(pre, with_kwargs=True),
                module.register_forward_hook(post, always_call=True)]


class TruePrecision(Plugin):
    @property
    def uses_master_weights(self) -> bool:
        return True

    def convert_module(self, model: nn.Module, fp32_roots: list[str]) -> list[Any]:
        model.to(self.dtype)
        low = self.dtype

        def model_inputs(mod: nn.Module, args: Any, kwargs: Any) -> Any:
            # As Fabric's true modes: floating inputs arrive in the parameters' dtype.
            return cast_floating(args, low), cast_floating(kwargs, low)

        handles = [model.register_forward_pre_hook(model_inputs, with_kwargs=True)]
        for name in fp32_roots:
            module = model.get_submodule(name)
            module.float()

            def pre(mod: nn.Module, args: Any, kwargs: Any) -> Any:
                return cast_floating(args, torch.float32), cast_floating(kwargs, torch.float32)

            def post(mod: nn.Module, args: Any, output: Any) -> Any:
                # The rest of the model runs in `low`; hand it what it expects.
                return cast_floating(output, low)

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post))
        return handles


class Fp8Precision(MixedPrecision):
    """fp8-mixed: torchao's float8 training (e4m3 forward, e5m2 gradients, dynamic
    per-tensor scales) for every Linear whose dimensions are multiples of 16 and that no
    rule keeps in fp32; bf16 autocast for everything else. ``skipped`` says which Linear
    layers stay in bf16 and why."""

    supports_dynamic_islands = False
    FP8_MULTIPLE = 16  # torch._scaled_mm needs both matmul dimensions divisible by 16

    def __init__(self, mode: Mode, device: torch.device) -> None:
        super().__init__(mode, device)
        self.dtype = torch.bfloat16  # the autocast dtype of everything that is not fp8
        self.fp8_modules: list[str] = []
        self.skipped: dict[str, str] = {}

    def convert_module(self, model: nn.Module, fp32_roots: list[str]) -> list[Any]:
        convert = _torchao_float8()
        handles = super().convert_module(model, fp32_roots)

        def eligible(module: nn.Module, fqn: str) -> bool:
            if not isinstance(module, nn.Linear):
                return False
            if any(fqn == r or fqn.startswith(r + ".") for r in fp32_roots):
                return False
            if module.in_features % self.FP8_MULTIPLE or module.out_features % self.FP8_MULTIPLE:
                self.skipped[fqn] = (f"{module.in_features}x{module.out_features} is not a multiple of "
                                     f"{self.FP8_MULTIPLE}: stays bf16")
                return False
            self.fp8_modules.append(fqn)
            return True

        convert(model, module_filter_fn=eligible)
        return handles


def _torchao_float8() -> Any:
    import logging

    # At import torchao announces CUDA-only kernels a CPU build cannot load, and torch a
    # deprecation in torchao's pytree registration: neither is the user's concern.
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as exc:
        raise UsageError(f"fp8-mixed needs torchao (pip install torchao): {exc}") from None
    finally:
        for lg, level in zip(quiet[1:], levels[1:]):
            lg.setLevel(level)
    return convert_to_float8_training


class EmulatedMixedPrecision(MixedPrecision):
    """``emulate:<fmt>-mixed``: fp32 parameters and arithmetic; the inputs and outputs of
    matmul-like ops rounded to the format (:class:`mixprec.emulation.EmulatedPrecision`),
    so fp16 or fp8 numerics (overflow, underflow, rounding) show up on hardware without
    fast kernels for them. fp16 also rounds the gradients flowing into those ops, so
    gradient underflow (and the loss scaler's cure) is emulated too; fp8 does not, because
    fp8 training scales gradients per tensor (e5m2) rather than by a loss scale. fp32 rules
    pause the emulation inside their modules."""

    def __init__(self, mode: Mode, device: torch.device) -> None:
        super().__init__(mode, device)
        from mixprec.emulation import EmulatedPrecision

        class _Pausable(EmulatedPrecision):
            paused = 0

            def __torch_function__(self, func, types, args=(), kwargs=None):
                if self.paused:
                    return func(*args, **(kwargs or {}))
                return super().__torch_function__(func, types, args, kwargs)

        self.dtype = torch.float32
        self.emulation = _Pausable(mode.compute, round_outputs=True, round_grads=mode.compute == "fp16")

    def forward_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.all_fp32 else self.emulation

    def island(self, module: nn.Module) -> list[Any]:
        emulation = self.emulation

        def pre(mod: nn.Module, args: Any) -> None:
            emulation.paused += 1

        def post(mod: nn.Module, args: Any, output: Any) -> None:
            emulation.paused = max(0, emulation.paused - 1)

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post, always_call=True)]


def make_plugin(mode: Mode, device: torch.device) -> Plugin:
    kinds = {"full": FullPrecision, "mixed": MixedPrecision, "true": TruePrecision, "fp8": Fp8Precision,
             "emulated": EmulatedMixedPrecision}
    return kinds[mode.kind](mode, device)


def _cuda_has_tf32(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
