"""Dynamic loss scaling on top of torch.amp's kernels, with hysteresis and a floor.

The scale lives on the host as a Python float (the engine learns whether a step
overflowed in its one synchronization per step anyway) and is mirrored into a device
tensor that multiplies the loss. Unscaling and the finite check use
``torch._amp_foreach_non_finite_check_and_unscale_``, the kernel ``torch.amp.GradScaler``
uses, so with ``hysteresis=1`` and no floor reached the arithmetic is GradScaler's, bit
for bit. ``enabled=False`` makes every method a no-op (scale 1.0) so callers never branch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from mixprec.errors import UsageError
from mixprec.policy import ScalerConfig


@dataclass(frozen=True)
class ScaleUpdate:
    """What :meth:`LossScaler.update` did."""

    backed_off: bool = False
    grew: bool = False
    absorbed: bool = False  # an overflow absorbed by hysteresis
    floor_hit: bool = False  # an overflow at min_scale: the scale cannot back off further


class LossScaler:
    def __init__(self, config: ScalerConfig | None = None, enabled: bool = True) -> None:
        self.config = config or ScalerConfig()
        self.enabled = enabled
        self._scale = _fp32(self.config.init_scale) if enabled else 1.0
        self._growth_tracker = 0
        self._hysteresis_left = self.config.hysteresis
        self._tensors: dict[torch.device, torch.Tensor] = {}  # device mirror of _scale

    @property
    def scale(self) -> float:
        return self._scale

    def _scale_on(self, device: torch.device) -> torch.Tensor:
        t = self._tensors.get(device)
        if t is None:
            t = self._tensors[device] = torch.full((), self._scale, dtype=torch.float32, device=device)
        return t

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return loss
        return loss * self._scale_on(loss.device)

    def unscale_(self, grads: Iterable[torch.Tensor]) -> torch.Tensor | None:
        """Divide ``grads`` by the scale in place; return a found-inf flag (a device tensor).

        Returns None when disabled: the caller checks finiteness another way.
        """
        if not self.enabled:
            return None
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        for g in grads:
            if g.is_sparse:
                if g.dtype == torch.float16 and not g.is_coalesced():
                    # Duplicate indices could sum past fp16's max after unscaling; GradScaler
                    # coalesces param.grad in place, which only the owner of .grad can do.
                    raise UsageError("an fp16 sparse gradient must be coalesced before unscale_ (param.grad = param.grad.coalesce())")
                g = g._values()
            groups[(g.device, g.dtype)].append(g)
        if not groups:
            return None
        flags = []
        for (device, _), tensors in groups.items():
            found_inf = torch.zeros(1, dtype=torch.float32, device=device)
            # Same value GradScaler computes: reciprocal in double, then rounded to fp32.
            inv_scale = torch.full((1,), 1.0 / self._scale, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found_inf, inv_scale)
            flags.append(found_inf)
        first = flags[0]
        return first if len(flags) == 1 else torch.stack([f.to(first.device) for f in flags]).sum().reshape(1)

    def update(self, found_inf: bool) -> ScaleUpdate:
        """Advance the state machine after a step whose gradients did (not) overflow."""
        if not self.enabled:
            return ScaleUpdate()
        c = self.config
        if found_inf:
            self._growth_tracker = 0
            if self._hysteresis_left > 1:
                self._hysteresis_left -= 1
                return ScaleUpdate(absorbed=True)
            floor = _fp32(c.min_scale)  # compared as the fp32 value the scale can take
            if self._scale <= floor:
                return ScaleUpdate(floor_hit=True)
            self._set(max(self._scale * c.backoff_factor, floor))
            return ScaleUpdate(backed_off=True)
        self._growth_tracker += 1
        if self._growth_tracker == c.growth_interval:
            self._growth_tracker = 0
            self._hysteresis_left = c.hysteresis
            grown = _fp32(self._scale * c.growth_factor)
            if math.isfinite(grown):  # as torch: never grow into inf
                self._set(grown)
                return ScaleUpdate(grew=True)
        return ScaleUpdate()

    def _set(self, value: float) -> None:
        # Round through fp32 so the host float and the device tensor always agree.
        self._scale = _fp32(value)
        for t in self._tensors.values():
            t.fill_(self._scale)

    def state_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "scale": self._scale,
            "growth_tracker": self._growth_tracker,
            "hysteresis_left": self._hysteresis_left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state.get("enabled")) != self.enabled:
            raise UsageError(
                f"scaler state was saved with loss scaling {'on' if state.get('enabled') else 'off'}, "
                f"but this policy has it {'on' if self.enabled else 'off'}"
            )
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_left = int(state["hysteresis_left"])
        self._set(float(state["scale"]))


def _fp32(value: float) -> float:
    """``value`` rounded to fp32: the scale is an fp32 tensor on the device, as in GradScaler."""
    return float(torch.tensor(value, dtype=torch.float32))
