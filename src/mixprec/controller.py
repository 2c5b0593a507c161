"""Controllers: decide, per module, which format runs where during training.

A controller is pure decision logic. It never touches the model, installs no hooks and
holds no tensors: the engine tells it what happened (:meth:`Controller.after_step`, with
the step's :class:`~mixprec.engine.StepResult`, the monitor's record when the step was
sampled, and the module localization blamed when the step went non-finite), and it
answers with :class:`Decision` objects, which the engine applies. Between calls the
engine reads the current state from :attr:`Controller.fp32_modules` and
:attr:`Controller.all_fp32` (also what it re-applies after a resume). Everything is
deterministic: the same sequence of calls gives the same decisions, and
:meth:`Controller.state_dict` / :meth:`Controller.load_state_dict` resume exactly.

The four controllers (``ControllerConfig.name``), as specified by
:class:`mixprec.policy.ControllerConfig`:

- ``static`` (:class:`Controller`): decides nothing, ever.
- ``warmup`` (:class:`WarmupController`): the whole model (``"*"``) in fp32 for the
  first ``warmup_steps`` optimizer steps, then the run's low format.
- ``adaptive`` (:class:`AdaptiveController`): demotes a module to fp32 when a
  non-finite step is blamed on it, or when the monitor sees it near overflow on
  ``hysteresis`` consecutive samples; re-promotes it after a cool-down that grows with
  every demotion; after ``max_demotions`` it stays in fp32.
- ``progressive`` (:class:`ProgressiveController`): everything starts in fp32; every
  ``promote_every`` stable steps the least risky fraction is promoted.

Details shared by the per-module controllers (adaptive and progressive):

- *Steps.* ``step`` is the 1-based optimizer step just finished (stepped or skipped;
  ``"accumulated"`` results are ignored, record and blame included). Steps must increase.
  Durations (cool-downs, stable stretches) are differences of step numbers, so a caller
  that skips calls for some steps still gets the right timing.
- *A sample* is one module's entry in a monitor record. It is *risky* when its output in
  the low format overflows (``formats[low]["overflow"] > 0``), when ``amax >
  overflow_threshold * get_format(low).max``, or when the output is non-finite
  (``nonfinite > 0`` or a non-finite ``amax``). It is *inconclusive*, and ignored, when
  the module's input was already non-finite (``input_nonfinite`` > 0 or ``input_amax``
  inf/NaN: the trouble came
  from upstream, localization's job), or when it carries neither an ``amax`` nor a
  positive overflow fraction nor a non-finite count (None means unknown). Missing keys,
  modules not in the record and entries for non-candidate modules are ignored. A
  module's *risk* is its latest conclusive ``amax / low max`` (inf when non-finite or
  overflowing without a known amax). Modules are still observed while in fp32 (the
  monitor reports what their output would do in the low format).
- *Hysteresis.* Each conclusive sample either extends a module's streak of risky samples
  or resets it to zero; a module running in the low format is demoted when its streak
  reaches ``hysteresis``. Samples need not be on consecutive steps.
- *Blame.* ``blamed`` is mapped to the candidate it names, or to the candidate that
  contains it (``blocks.0.attn.inner`` -> ``blocks.0.attn``); a name that is neither (a
  module a rule already keeps in fp32, say) demotes nothing. A blamed module running in
  the low format is demoted at once (a localized non-finite step is definitive). A blamed
  module that is already in fp32 is not demoted again, but its cool-down starts over.
  Skips nobody is blamed for (the loss scaler's ordinary overflows) demote nothing and
  do not touch cool-downs. Gradient underflow is never a reason to demote: that is the
  loss scaler's job.
- *Cool-down and cap.* The n-th demotion of a module starts a cool-down of
  ``round(cooldown_steps * cooldown_growth ** (n - 1))`` steps with no skip blamed on
  it. The demotion that brings the count to ``max_demotions`` is final: its reason ends
  in ``"demoted N times: stays fp32"`` (logged once, with that demotion) and the module
  is never promoted again.
- *Order within one call*: ingest the record; act on the blame; demote on monitor
  evidence (forward order); then promote. A module demoted in a call is not promoted in
  the same call.

A controller built for ``low_format="fp32"`` (a run with no low-precision format) has
nothing to decide: every controller is then inert, like ``static``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Sequence

from mixprec.errors import UsageError
from mixprec.formats import get_format
from mixprec.policy import ControllerConfig

if TYPE_CHECKING:  # the engine imports this module; import it only for the type checker
    from mixprec.engine import StepResult

__all__ = [
    "CONTROLLER_SCHEMA",
    "Decision",
    "Controller",
    "WarmupController",
    "AdaptiveController",
    "ProgressiveController",
    "make_controller",
]

CONTROLLER_SCHEMA = "mixprec.controller/1"
WHOLE_MODEL = "*"
_BIG_COOLDOWN = 10**15  # cool-downs past this are "forever" (and stay plain ints)


@dataclass(frozen=True)
class Decision:
    """One change of format, effective after optimizer step ``step`` (0 = before training).

    ``module`` is a qualified module name, or ``"*"`` for the whole model (warm-up).
    ``reason`` is plain words for logs and reports.
    """

    step: int
    module: str
    from_format: str
    to_format: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Decision":
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise UsageError(f"controller decision is missing {missing[0]!r}: {data!r}")
        return cls(int(data["step"]), str(data["module"]), str(data["from_format"]), str(data["to_format"]),
                   str(data["reason"]))

    def __str__(self) -> str:
        return f"step {self.step}: {self.module} {self.from_format} -> {self.to_format} ({self.reason})"


class Controller:
    """The static controller, and the interface every controller shares.

    Call :meth:`start` once before training, then :meth:`after_step` after every optimizer
    step. Both return the decisions they made (also appended to :attr:`decisions`).
    """

    name = "static"

    def __init__(self, config: ControllerConfig, low_format: str, modules: Sequence[str]) -> None:
        if not isinstance(config, ControllerConfig):
            raise TypeError(f"config must be a ControllerConfig, got {type(config).__name__}")
        self.config = config
        self.low_format = get_format(low_format).name
        self._low_max = get_format(self.low_format).max
        if isinstance(modules, str):
            raise TypeError("modules must be a sequence of module names, not one string")
        names = list(modules)
        for name in names:
            if not isinstance(name, str) or not name or name == WHOLE_MODEL:
                raise UsageError(f"controller candidate module names must be non-empty strings other than "
                                 f"{WHOLE_MODEL!r}, got {name!r}")
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise UsageError(f"controller candidate module {name!r} is listed twice")
            seen.add(name)
        self.modules: tuple[str, ...] = tuple(names)
        self.decisions: list[Decision] = []
        self._started = False
        self._last_step = 0

    # -- the interface -------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """False when there is nothing to decide (static, or no low-precision format)."""
        return self.name != "static" and self.low_format != "fp32"

    def start(self) -> list[Decision]:
        """The decisions that hold before step 1. Call once, before training (not after
        :meth:`load_state_dict`: then apply :attr:`fp32_modules` / :attr:`all_fp32`)."""
        if self._started:
            raise RuntimeError("Controller.start() was already called (or state was loaded): call it once, "
                               "before the first step; after a resume apply fp32_modules / all_fp32 instead")
        self._started = True
        return self._log(self._start() if self.active else [])

    def after_step(self, step: int, result: "StepResult", record: dict | None = None,
                   blamed: str | None = None) -> list[Decision]:
        """Decisions after optimizer step ``step`` (1-based), from the engine's ``result``,
        the monitor ``record`` when the step was sampled, and the module ``blamed`` when the
        step went non-finite. An ``"accumulated"`` result is no step: it returns [] and
        ignores ``record`` and ``blamed``."""
        if not self._started:
            raise RuntimeError("Controller.after_step() before start(): call start() once before training "
                               "(or load_state_dict() when resuming)")
        action = getattr(result, "action", None)
        if action == "accumulated":
            return []
        if action not in ("stepped", "skipped"):
            raise ValueError(f"after_step() expects a StepResult with action 'stepped', 'skipped' or "
                             f"'accumulated', got {result!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"after_step() step must be an integer >= 1, got {step!r}")
        if step <= self._last_step:
            raise ValueError(f"after_step(step={step}) after step {self._last_step}: steps must increase")
        if blamed is not None and not isinstance(blamed, str):
            raise TypeError(f"blamed must be a module name or None, got {type(blamed).__name__}")
        self._last_step = step
        if not self.active:
            return []
        return self._log(self._after_step(step, result, record if isinstance(record, dict) else None, blamed))

    @property
    def fp32_modules(self) -> frozenset[str]:
        """Modules the controller currently holds in fp32 (on top of the policy's rules)."""
        return frozenset()

    @property
    def all_fp32(self) -> bool:
        """True while the whole model must run in fp32 (warm-up)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """Plain containers only (it goes into a checkpoint loaded with ``weights_only=True``)."""
        return {
            "schema": CONTROLLER_SCHEMA,
            "name": self.name,
            "low_format": self.low_format,
            "modules": list(self.modules),
            "started": self._started,
            "last_step": self._last_step,
            "decisions": [d.to_dict() for d in self.decisions],
            "state": self._state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly: after this the controller makes the decisions the saved one would.

        The controller's name, low format and candidate modules must match; the numeric
        settings are this controller's own (the config is not part of the state).
        """
        if not isinstance(state, dict):
            raise UsageError(f"controller state must be a mapping, got {type(state).__name__}")
        if state.get("schema") != CONTROLLER_SCHEMA:
            raise UsageError(f"unsupported controller state schema {state.get('schema')!r}; "
                             f"expected {CONTROLLER_SCHEMA!r}")
        for key, mine in (("name", self.name), ("low_format", self.low_format)):
            if state.get(key) != mine:
                raise UsageError(f"controller state was saved with {key} {state.get(key)!r}, "
                                 f"this controller has {mine!r}")
        if list(state.get("modules") or []) != list(self.modules):
            raise UsageError("controller state was saved for other candidate modules "
                             f"({len(state.get('modules') or [])} saved, {len(self.modules)} here)")
        self._load(state.get("state") or {})
        self.decisions = [Decision.from_dict(d) for d in state.get("decisions") or []]
        self._started = bool(state.get("started"))
        self._last_step = int(state.get("last_step", 0))

    # -- for subclasses ------------------------------------------------------------------
    def _start(self) -> list[Decision]:
        return []

    def _after_step(self, step: int, result: "StepResult", record: dict | None, blamed: str | None) -> list[Decision]:
        return []

    def _state(self) -> dict[str, Any]:
        return {}

    def _load(self, state: dict[str, Any]) -> None:
        pass

    def _log(self, decisions: list[Decision]) -> list[Decision]:
        self.decisions.extend(decisions)
        return decisions

    def __repr__(self) -> str:
        return f"{type(self).__name__}(low_format={self.low_format!r}, modules={len(self.modules)})"


class WarmupController(Controller):
    """The first ``warmup_steps`` optimizer steps (stepped or skipped) run entirely in fp32.

    ``start()`` gives ``Decision(0, "*", low, "fp32", "warm-up: first N steps in fp32")``;
    ``after_step(warmup_steps, ...)`` gives ``Decision(warmup_steps, "*", "fp32", low,
    "warm-up over")``, and :attr:`all_fp32` is False from then on.
    """

    name = "warmup"

    def __init__(self, config: ControllerConfig, low_format: str, modules: Sequence[str]) -> None:
        super().__init__(config, low_format, modules)
        self._warm = False

    @property
    def all_fp32(self) -> bool:
        return self._warm

    def _start(self) -> list[Decision]:
        self._warm = True
        n = self.config.warmup_steps
        return [Decision(0, WHOLE_MODEL, self.low_format, "fp32", f"warm-up: first {n} steps in fp32")]

    def _after_step(self, step: int, result: "StepResult", record: dict | None, blamed: str | None) -> list[Decision]:
        if self._warm and step >= self.config.warmup_steps:
            self._warm = False
            return [Decision(step, WHOLE_MODEL, "fp32", self.low_format, "warm-up over")]
        return []

    def _state(self) -> dict[str, Any]:
        return {"warm": self._warm}

    def _load(self, state: dict[str, Any]) -> None:
        self._warm = bool(state.get("warm", False))


@dataclass
class _Module:
    """What a per-module controller knows about one candidate (all plain values)."""

    fp32: bool = False  # held in fp32 by the controller now
    final: bool = False  # demoted max_demotions times: never promoted again
    demotions: int = 0
    clock: int = 0  # step the current cool-down started (demotion, or the last blame since)
    cooldown: int = 0  # length of the current cool-down in steps
    streak: int = 0  # consecutive risky samples
    sampled: bool = False  # a conclusive sample was seen
    risky: bool = False  # the latest conclusive sample was risky
    risk: float | None = None  # latest amax / low max (inf: non-finite or overflowing), None: unknown
    amax: float | None = None  # latest amax
    what: str = ""  # the latest risky sample, in words


class _PerModuleController(Controller):
    """Shared by adaptive and progressive: samples, hysteresis, blame, cool-downs, the cap."""

    def __init__(self, config: ControllerConfig, low_format: str, modules: Sequence[str]) -> None:
        super().__init__(config, low_format, modules)
        self._m: dict[str, _Module] = {name: _Module() for name in self.modules}

    @property
    def fp32_modules(self) -> frozenset[str]:
        return frozenset(name for name, m in self._m.items() if m.fp32)

    def _after_step(self, step: int, result: "StepResult", record: dict | None, blamed: str | None) -> list[Decision]:
        out: list[Decision] = []
        self._ingest(record)
        target = self._candidate_for(blamed)
        if target is not None:
            m = self._m[target]
            if not m.fp32:
                out.append(self._demote(step, target, f"non-finite output localized here at step {step}"))
            elif m.demotions and not m.final:
                m.clock = step  # not stable: the cool-down starts over
        hysteresis = self.config.hysteresis
        for name in self.modules:
            m = self._m[name]
            if not m.fp32 and m.streak >= hysteresis:
                out.append(self._demote(step, name, f"{m.what} on {m.streak} consecutive samples"))
        demoted = {d.module for d in out}
        out += self._promote(step, result, blamed, demoted)
        return out

    def _promote(self, step: int, result: "StepResult", blamed: str | None, demoted: set[str]) -> list[Decision]:
        raise NotImplementedError

    # -- evidence ------------------------------------------------------------------------
    def _ingest(self, record: dict | None) -> None:
        if record is None:
            return
        entries = record.get("modules")
        if not isinstance(entries, dict):
            return
        for name in self.modules:
            entry = entries.get(name)
            if not isinstance(entry, dict):
                continue
            sample = self._classify(entry)
            if sample is None:
                continue
            risky, risk, amax, what = sample
            m = self._m[name]
            m.sampled, m.risky, m.risk, m.amax = True, risky, risk, amax
            if risky:
                m.streak += 1
                m.what = what
            else:
                m.streak = 0

    def _classify(self, entry: dict) -> tuple[bool, float | None, float | None, str] | None:
        """(risky, risk, amax, in words) for one module's sample, or None if inconclusive."""
        input_amax = _number(entry.get("input_amax"))
        input_nonfinite = _number(entry.get("input_nonfinite"))
        if (input_amax is not None and not math.isfinite(input_amax)) or (input_nonfinite or 0) > 0:
            return None  # non-finite input: the trouble came from upstream
        amax = _number(entry.get("amax"))
        nonfinite = _number(entry.get("nonfinite"))
        formats = entry.get("formats")
        stats = formats.get(self.low_format) if isinstance(formats, dict) else None
        overflow = _number(stats.get("overflow")) if isinstance(stats, dict) else None
        low, threshold = self.low_format, self.config.overflow_threshold
        if (nonfinite is not None and nonfinite > 0) or (amax is not None and not math.isfinite(amax)):
            return True, math.inf, amax, "non-finite output"
        if amax is not None:
            risk = abs(amax) / self._low_max
            if risk > threshold:
                return True, risk, amax, f"amax {amax:.1e} > {threshold:g} x {low} max"
            if overflow is not None and overflow > 0:
                return True, risk, amax, f"{overflow:.1e} of outputs overflow {low}"
            return False, risk, amax, ""
        if overflow is not None and overflow > 0:
            return True, math.inf, None, f"{overflow:.1e} of outputs overflow {low}"
        return None  # nothing known

    def _candidate_for(self, blamed: str | None) -> str | None:
        if blamed is None:
            return None
        if blamed in self._m:
            return blamed
        owners = [name for name in self.modules if blamed.startswith(name + ".")]
        return max(owners, key=len) if owners else None

    # -- changes -------------------------------------------------------------------------
    def _demote(self, step: int, name: str, reason: str) -> Decision:
        m = self._m[name]
        m.fp32, m.streak = True, 0
        m.demotions += 1
        m.clock = step
        m.cooldown = self._cooldown_for(m.demotions)
        if m.demotions >= self.config.max_demotions:
            m.final = True
            reason = f"{reason}; demoted {m.demotions} times: stays fp32"
        return Decision(step, name, self.low_format, "fp32", reason)

    def _cooldown_for(self, demotions: int) -> int:
        try:
            length = self.config.cooldown_steps * float(self.config.cooldown_growth) ** (demotions - 1)
        except OverflowError:
            length = math.inf
        return _BIG_COOLDOWN if not length < _BIG_COOLDOWN else max(1, int(round(length)))

    def _cooled(self, step: int, m: _Module) -> bool:
        """True when a previously demoted module has served its cool-down (or was never demoted)."""
        return m.demotions == 0 or step - m.clock >= m.cooldown

    # -- state ---------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {"modules": {name: asdict(m) for name, m in self._m.items()}}

    def _load(self, state: dict[str, Any]) -> None:
        saved = state.get("modules") or {}
        names = {f.name for f in fields(_Module)}
        for name in self.modules:
            data = saved.get(name)
            if not isinstance(data, dict):
                raise UsageError(f"controller state has no entry for module {name!r}")
            self._m[name] = _Module(**{k: v for k, v in data.items() if k in names})


class AdaptiveController(_PerModuleController):
    """Everything starts in the low format; modules are demoted on evidence and re-promoted
    after their cool-down.

    A demoted module is re-promoted once ``step - clock >= cooldown`` (no skip blamed on it
    for its whole cool-down) and its latest conclusive sample is not risky (unknown counts
    as calm: with the monitor off, the cool-down is the only evidence). While the latest
    sample stays risky it waits; nothing is logged for waiting. Reason: ``"stable for N
    steps"``.
    """

    name = "adaptive"

    def _promote(self, step: int, result: "StepResult", blamed: str | None, demoted: set[str]) -> list[Decision]:
        out = []
        for name in self.modules:
            m = self._m[name]
            if not m.fp32 or m.final or name in demoted or not self._cooled(step, m) or m.risky:
                continue
            m.fp32, m.streak = False, 0
            out.append(Decision(step, name, "fp32", self.low_format, f"stable for {step - m.clock} steps"))
        return out


class ProgressiveController(_PerModuleController):
    """Everything starts in fp32; promoted a fraction at a time, least risky first.

    ``start()`` demotes every candidate (reason ``"progressive: start in fp32"``; this is not
    a failure: no demotion is counted). A step is *stable* when it was not skipped and
    nobody was blamed. Once ``promote_every`` steps have passed since the last promotion
    round and the last unstable step (a skip resets the count), a round promotes up to
    ``ceil(promote_fraction * n_candidates)`` modules, and the count starts over whether or
    not anything could be promoted. Order: observed modules by risk (latest ``amax / low
    max``), then never-observed ones, ties by forward order. Not promoted: modules whose
    risk exceeds ``overflow_threshold`` (or whose latest sample is otherwise risky) until
    it falls; modules demoted back by a failure until their cool-down has passed; modules
    at ``max_demotions``. Promoted modules are demoted back exactly as in adaptive (blame,
    or monitor evidence on ``hysteresis`` samples).
    """

    name = "progressive"

    def __init__(self, config: ControllerConfig, low_format: str, modules: Sequence[str]) -> None:
        super().__init__(config, low_format, modules)
        self._anchor = 0  # the last promotion round or unstable step
        n = len(self.modules)
        # The small epsilon keeps 0.1 * 30 (= 3.0000000000000004 in floats) at 3.
        self.per_round = min(n, max(1, math.ceil(config.promote_fraction * n - 1e-9))) if n else 0

    def _start(self) -> list[Decision]:
        out = []
        for name in self.modules:
            self._m[name].fp32 = True
            out.append(Decision(0, name, self.low_format, "fp32", "progressive: start in fp32"))
        return out

    def _promote(self, step: int, result: "StepResult", blamed: str | None, demoted: set[str]) -> list[Decision]:
        if getattr(result, "skipped", False) or blamed is not None:
            self._anchor = step
            return []
        stable = step - self._anchor
        if stable < self.config.promote_every:
            return []
        self._anchor = step
        order = {name: i for i, name in enumerate(self.modules)}
        eligible = [
            name for name in self.modules
            if (m := self._m[name]).fp32 and not m.final and name not in demoted and self._cooled(step, m)
            and not m.risky  # a risk above overflow_threshold makes the latest sample risky
        ]

        def rank(name: str) -> tuple[int, float, int]:
            risk = self._m[name].risk
            return (1, 0.0, order[name]) if risk is None else (0, risk, order[name])

        out = []
        for name in sorted(eligible, key=rank)[: self.per_round]:
            m = self._m[name]
            m.fp32, m.streak = False, 0
            if m.risk is None:
                why = "not observed yet"
            else:
                why = f"amax {m.amax:.1e} = {m.risk:.2g} x {self.low_format} max"
            out.append(Decision(step, name, "fp32", self.low_format, f"stable for {stable} steps; {why}"))
        return out

    def _state(self) -> dict[str, Any]:
        return {**super()._state(), "anchor": self._anchor}

    def _load(self, state: dict[str, Any]) -> None:
        super()._load(state)
        self._anchor = int(state.get("anchor", 0))


CONTROLLER_CLASSES: dict[str, type[Controller]] = {
    c.name: c for c in (Controller, WarmupController, AdaptiveController, ProgressiveController)
}


def make_controller(config: ControllerConfig, low_format: str, modules: Sequence[str]) -> Controller:
    """The controller ``config.name`` names, for a run whose low-precision format is
    ``low_format`` (``"fp16"``, ``"bf16"``, ...) over ``modules`` (candidate leaf-module
    names in forward order)."""
    if not isinstance(config, ControllerConfig):
        raise TypeError(f"config must be a ControllerConfig, got {type(config).__name__}")
    return CONTROLLER_CLASSES[config.name](config, low_format, modules)


def _number(value: Any) -> float | None:
    """A float from a monitor value, or None when it is missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
