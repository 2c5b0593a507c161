"""Precision policies: mode + per-module rules + loss-scaler and controller settings.

A policy is a frozen value. It parses from a mode string (``bf16-mixed`` or an alias),
from CLI-style pieces (``--precision``, ``--keep-fp32``) or from a YAML/JSON file, and
dumps back to YAML that parses to an equal policy. Resolving a policy against a model
(:func:`resolve_rules`) is where a rule that matches nothing becomes an error.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable

import yaml
from torch import nn

from mixprec.errors import UsageError

POLICY_SCHEMA = "mixprec.policy/1"


@dataclass(frozen=True)
class Mode:
    """How a run uses formats globally.

    ``kind`` is ``full`` (one format everywhere), ``mixed`` (fp32 parameters, autocast to
    ``compute``), ``true`` (parameters stored in ``compute``, fp32 master weights),
    ``fp8`` (fp8 matmuls in the eligible Linear layers, bf16 autocast elsewhere) or
    ``emulated`` (fp32 arithmetic on matmul inputs/outputs rounded to ``compute``).
    """

    name: str
    compute: str
    kind: str

    @property
    def low_precision(self) -> bool:
        return self.kind != "full"


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("fp32", "fp32", "full"),
        Mode("tf32", "tf32", "full"),
        Mode("fp16-mixed", "fp16", "mixed"),
        Mode("bf16-mixed", "bf16", "mixed"),
        Mode("fp16-true", "fp16", "true"),
        Mode("bf16-true", "bf16", "true"),
        # fp8 matmuls (e4m3 forward, e5m2 gradients, torchao) for the Linear layers that
        # can take them, bf16 autocast for the rest.
        Mode("fp8-mixed", "fp8_e4m3", "fp8"),
        # Software emulation: matmul inputs and outputs rounded to the format, arithmetic
        # in fp32, to study fp16/fp8 numerics where the hardware has no fast kernels.
        Mode("emulate:fp16-mixed", "fp16", "emulated"),
        Mode("emulate:bf16-mixed", "bf16", "emulated"),
        Mode("emulate:fp8-mixed", "fp8_e4m3", "emulated"),
    )
}

ALIASES: dict[str, str] = {
    "32": "fp32",
    "32-true": "fp32",
    "no": "fp32",
    "fp32-true": "fp32",
    "16-mixed": "fp16-mixed",
    "fp16": "fp16-mixed",
    "bf16": "bf16-mixed",
    "16-true": "fp16-true",
}

# Formats a rule may pin a module to. Rules keep modules in fp32 today; the controller
# and fp8 add more targets later.
RULE_FORMATS = ("fp32",)


def normalize_mode(text: str) -> str:
    """The canonical mode name for a mode string or alias; UsageError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)  # `mode: 32` in YAML is the alias 32
    if not isinstance(text, str):
        raise UsageError(f"precision must be a string, got {text!r}; valid: {', '.join(MODES)}")
    key = text.strip().lower()
    if key in MODES:
        return key
    if key in ALIASES:
        return ALIASES[key]
    if key == "auto":
        raise UsageError(
            "precision 'auto' is resolved by autotune before a policy exists: use `mixprec train --precision auto` "
            f"or mixprec.autotune.autotune(task); or choose one of: {', '.join(MODES)}"
        )
    raise UsageError(
        f"unknown precision {text!r}; valid: {', '.join(MODES)} "
        f"(aliases: {', '.join(f'{a}={m}' for a, m in ALIASES.items())})"
    )


@dataclass(frozen=True)
class Rule:
    """Keep matching modules in ``format``: by qualified-name glob or by class name."""

    match: str | None = None
    type: str | None = None
    format: str = "fp32"

    def __post_init__(self) -> None:
        if (self.match is None) == (self.type is None):
            raise UsageError(f"a rule needs exactly one of 'match' (name glob) or 'type' (class name): {self}")
        for value in (self.match, self.type):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise UsageError(f"rule pattern must be a non-empty string, got {value!r}")
        if self.format not in RULE_FORMATS:
            raise UsageError(f"unknown rule format {self.format!r}; valid: {', '.join(RULE_FORMATS)}")

    @classmethod
    def parse(cls, token: str) -> "Rule":
        """``type:LayerNorm`` selects by class; anything else is a name glob (``blocks.*.attn``)."""
        token = token.strip()
        if token.startswith("type:"):
            return cls(type=token[len("type:"):])
        return cls(match=token)

    def __str__(self) -> str:
        return f"type:{self.type}" if self.type is not None else str(self.match)

    def matches(self, name: str, module: nn.Module) -> bool:
        if self.match is not None:
            return fnmatch.fnmatchcase(name, self.match)
        # Any class in the MRO, short or qualified: `type:LayerNorm` also covers subclasses.
        for klass in type(module).__mro__:
            if self.type in (klass.__name__, f"{klass.__module__}.{klass.__qualname__}"):
                return True
        return False

    def to_dict(self) -> dict[str, str]:
        key = "type" if self.type is not None else "match"
        return {key: str(self.type if self.type is not None else self.match), "format": self.format}


@dataclass(frozen=True)
class ScalerConfig:
    """Dynamic loss scaling (fp16). ``enabled=None`` means: on exactly when the mode computes in fp16.

    ``hysteresis`` follows DeepSpeed: that many overflowing steps are tolerated before the
    scale backs off; the count is restored when the scale grows. ``min_scale`` is the floor:
    a step that would back off below it is reported (the run stops) instead of training on.
    """

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    hysteresis: int = 1
    min_scale: float = 1.0
    enabled: bool | None = None

    def __post_init__(self) -> None:
        def number(name: str, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"scaler.{name} must be a number, got {value!r}")
            return float(value)

        def integer(name: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"scaler.{name} must be an integer >= 1, got {value!r}")
            return value

        init = number("init_scale", self.init_scale)
        if not init > 0:
            raise UsageError(f"scaler.init_scale must be > 0, got {self.init_scale!r}")
        if not number("growth_factor", self.growth_factor) > 1:
            raise UsageError(f"scaler.growth_factor must be > 1, got {self.growth_factor!r}")
        if not 0 < number("backoff_factor", self.backoff_factor) < 1:
            raise UsageError(f"scaler.backoff_factor must be in (0, 1), got {self.backoff_factor!r}")
        integer("growth_interval", self.growth_interval)
        integer("hysteresis", self.hysteresis)
        if not 0 < number("min_scale", self.min_scale) <= init:
            raise UsageError(f"scaler.min_scale must be in (0, init_scale={init:g}], got {self.min_scale!r}")
        if self.enabled is not None and not isinstance(self.enabled, bool):
            raise UsageError(f"scaler.enabled must be true, false or null, got {self.enabled!r}")


CONTROLLERS = ("static", "warmup", "adaptive", "progressive")


@dataclass(frozen=True)
class ControllerConfig:
    """How the policy may change per module during training (see mixprec.controller).

    - ``static``: never.
    - ``warmup``: the first ``warmup_steps`` optimizer steps in fp32, then the mode's format.
    - ``adaptive``: a module blamed for a non-finite step, or seen near overflow
      (output amax > ``overflow_threshold`` x the format's max) on ``hysteresis``
      consecutive samples, is demoted to fp32; after ``cooldown_steps`` stable steps it is
      re-promoted; each new failure multiplies its cool-down by ``cooldown_growth``; after
      ``max_demotions`` it stays in fp32.
    - ``progressive``: everything starts in fp32; every ``promote_every`` stable steps the
      ``promote_fraction`` least risky modules (by the monitor's ranges) are promoted.
    """

    name: str = "static"
    warmup_steps: int = 50
    cooldown_steps: int = 50
    cooldown_growth: float = 2.0
    max_demotions: int = 3
    overflow_threshold: float = 0.5
    hysteresis: int = 2
    promote_every: int = 20
    promote_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.name not in CONTROLLERS:
            raise UsageError(f"unknown controller {self.name!r}; valid: {', '.join(CONTROLLERS)}")
        for key in ("warmup_steps", "cooldown_steps", "max_demotions", "hysteresis", "promote_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"controller.{key} must be an integer >= 1, got {value!r}")
        for key, low, high in (("cooldown_growth", 1.0, float("inf")), ("overflow_threshold", 0.0, 1.0),
                               ("promote_fraction", 0.0, 1.0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
                raise UsageError(f"controller.{key} must be a number in ({low:g}, {high:g}], got {value!r}")


@dataclass(frozen=True)
class Policy:
    """Mode + rules + scaler + controller. Build with :func:`parse_policy` or :meth:`from_file`."""

    mode: str = "fp32"
    rules: tuple[Rule, ...] = ()
    scaler: ScalerConfig = field(default_factory=ScalerConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", normalize_mode(self.mode))
        object.__setattr__(self, "rules", tuple(self.rules))

    @property
    def mode_info(self) -> Mode:
        return MODES[self.mode]

    @property
    def loss_scaling(self) -> bool:
        if self.scaler.enabled is not None:
            return self.scaler.enabled
        return self.mode_info.compute == "fp16"

    def with_rules(self, rules: Iterable[Rule]) -> "Policy":
        return replace(self, rules=self.rules + tuple(rules))

    # -- serialization -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": POLICY_SCHEMA,
            "mode": self.mode,
            "rules": [r.to_dict() for r in self.rules],
            "scaler": asdict(self.scaler),
            "controller": asdict(self.controller),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write YAML, or JSON when the name ends in .json; :meth:`from_file` reads either back."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) + "\n" if path.suffix == ".json" else self.to_yaml()
        path.write_text(text)

    @classmethod
    def from_dict(cls, data: Any, source: str = "policy") -> "Policy":
        try:
            return cls._from_dict(data, source)
        except UsageError as exc:
            message = str(exc)
            raise UsageError(message if message.startswith(source) else f"{source}: {message}") from None

    @classmethod
    def _from_dict(cls, data: Any, source: str) -> "Policy":
        if not isinstance(data, dict):
            raise UsageError(f"{source}: expected a mapping with 'mode', got {type(data).__name__}")
        _check_keys(data, {"schema", "mode", "rules", "scaler", "controller"}, source)
        schema = data.get("schema", POLICY_SCHEMA)
        if schema != POLICY_SCHEMA:
            raise UsageError(f"{source}: unsupported schema {schema!r}; expected {POLICY_SCHEMA!r}")
        if "mode" not in data:
            raise UsageError(f"{source}: missing 'mode' (one of: {', '.join(MODES)})")
        rules_data = data.get("rules") or []
        if not isinstance(rules_data, list):
            raise UsageError(f"{source}: 'rules' must be a list, got {type(rules_data).__name__}")
        rules = []
        for i, item in enumerate(rules_data):
            if isinstance(item, str):
                rules.append(Rule.parse(item))
                continue
            if not isinstance(item, dict):
                raise UsageError(f"{source}: rules[{i}] must be a mapping or a string, got {item!r}")
            _check_keys(item, {"match", "type", "format"}, f"{source}: rules[{i}]")
            rules.append(Rule(**item))
        return cls(
            mode=data["mode"],
            rules=tuple(rules),
            scaler=_sub_config(ScalerConfig, data.get("scaler"), f"{source}: scaler"),
            controller=_sub_config(ControllerConfig, data.get("controller"), f"{source}: controller"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "Policy":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise UsageError(f"cannot read policy file {str(path)!r}: {exc.strerror or exc}") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"policy file {str(path)!r} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {first}") from None
        return cls.from_dict(data, source=f"policy file {str(path)!r}")


def _check_keys(data: dict, valid: set[str], source: str) -> None:
    unknown = sorted(set(map(str, data)) - valid)
    if unknown:
        raise UsageError(f"{source}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(valid))}")


def _sub_config(klass: type, data: Any, source: str) -> Any:
    if data is None:
        return klass()
    if isinstance(data, str) and klass is ControllerConfig:
        return klass(name=data)
    if not isinstance(data, dict):
        raise UsageError(f"{source} must be a mapping, got {data!r}")
    _check_keys(data, {f.name for f in fields(klass)}, source)
    return klass(**data)


def parse_policy(spec: "str | Policy | dict[str, Any]") -> Policy:
    """A Policy from a mode string or alias, a dict (file contents) or a Policy."""
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, dict):
        return Policy.from_dict(spec)
    if isinstance(spec, str):
        return Policy(mode=spec)
    raise TypeError(f"policy must be a str, dict or Policy, got {type(spec).__name__}")


def policy_from_options(
    precision: str | None = None,
    keep_fp32: Iterable[str] | str | None = None,
    policy_file: str | Path | None = None,
    controller: str | None = None,
) -> Policy:
    """The policy the CLI flags describe: a file as the base, ``--precision`` overriding
    its mode, ``--keep-fp32`` patterns (comma-separated) adding fp32 rules, ``--controller``
    choosing the controller (keeping the file's controller settings)."""
    policy = Policy.from_file(policy_file) if policy_file is not None else Policy()
    if precision is not None:
        policy = replace(policy, mode=precision)
    if controller is not None:
        policy = replace(policy, controller=replace(policy.controller, name=controller))
    if keep_fp32:
        items = [keep_fp32] if isinstance(keep_fp32, str) else list(keep_fp32)
        tokens = [t for item in items for t in item.split(",") if t.strip()]
        policy = policy.with_rules(Rule.parse(t) for t in tokens)
    return policy


def replace_mode_and_rules(base: Policy, chosen: Policy) -> Policy:
    """``base`` (from flags/file) with ``chosen``'s mode and its rules added (autotune's choice)."""
    return replace(base, mode=chosen.mode, rules=base.rules + tuple(r for r in chosen.rules if r not in base.rules))


def resolve_rules(policy: Policy, model: nn.Module) -> list[str]:
    """Qualified names of the outermost modules that the rules pin to fp32, in model order.

    A rule that matches no module is an error listing the closest names (or types).
    """
    named = [(name, mod) for name, mod in model.named_modules() if name]
    matched: set[str] = set()
    for rule in policy.rules:
        hits = {name for name, mod in named if rule.matches(name, mod)}
        if not hits:
            raise UsageError(_no_match_message(rule, named))
        matched |= hits
    # Outermost only: a rule on `blocks.0` covers its children already.
    roots = []
    for name, _ in named:
        if name in matched and not any(name.startswith(r + ".") for r in roots):
            roots.append(name)
    return roots


def _no_match_message(rule: Rule, named: list[tuple[str, nn.Module]]) -> str:
    if rule.type is not None:
        types = sorted({type(m).__name__ for _, m in named})
        close = difflib.get_close_matches(rule.type, types, n=5, cutoff=0.3) or types[:8]
        return f"rule {str(rule)!r} matches no module type in the model; closest types: {', '.join(close)}"
    names = [n for n, _ in named]
    close = difflib.get_close_matches(str(rule.match), names, n=5, cutoff=0.3) or names[:8]
    hint = ""
    types = {type(m).__name__ for _, m in named}
    if rule.match in types:
        hint = f" (to select by class, write 'type:{rule.match}')"
    return f"rule {str(rule)!r} matches no module in the model{hint}; closest names: {', '.join(close)}"
