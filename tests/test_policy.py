"""Policies: mode strings and aliases, rules, files (YAML/JSON) and resolving rules on a model.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import replace

import pytest
import yaml
from torch import nn

from mixprec.errors import UsageError
from mixprec.policy import (
    ALIASES,
    MODES,
    ControllerConfig,
    Policy,
    Rule,
    ScalerConfig,
    normalize_mode,
    parse_policy,
    policy_from_options,
    resolve_rules,
)

ALL_MODES = ["fp32", "tf32", "fp16-mixed", "bf16-mixed", "fp16-true", "bf16-true", "fp8-mixed",
             "emulate:fp16-mixed", "emulate:bf16-mixed", "emulate:fp8-mixed"]



# -- modes and aliases ------------------------------------------------------------------------


def test_mode_table_is_the_documented_one():
    assert list(MODES) == ALL_MODES


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_mode_parses(mode):
    assert normalize_mode(mode) == mode
    p = parse_policy(mode)
    assert p.mode == mode and p.rules == ()
    assert Policy(mode=mode.upper()).mode == mode
    assert Policy(mode=f"  {mode} ").mode == mode


def test_mode_facts():
    assert Policy("fp16-mixed").mode_info.kind == "mixed" and Policy("fp16-mixed").mode_info.compute == "fp16"
    assert Policy("bf16-true").mode_info.kind == "true" and Policy("bf16-true").mode_info.compute == "bf16"
    assert Policy("fp32").mode_info.kind == "full"
    # Loss scaling is on exactly for fp16 compute, unless the scaler config says otherwise.
    assert [Policy(m).loss_scaling for m in ALL_MODES] == [False, False, True, False, True, False, False,
                                                           True, False, False]
    assert Policy("bf16-mixed", scaler=ScalerConfig(enabled=True)).loss_scaling is True
    assert Policy("fp16-mixed", scaler=ScalerConfig(enabled=False)).loss_scaling is False


@pytest.mark.parametrize(
    "alias,mode",
    [("32", "fp32"), ("32-true", "fp32"), ("no", "fp32"), ("16-mixed", "fp16-mixed"), ("fp16", "fp16-mixed"),
     ("bf16", "bf16-mixed"), ("16-true", "fp16-true"), ("BF16", "bf16-mixed"), (" 16-Mixed ", "fp16-mixed")],
)
def test_aliases_normalize(alias, mode):
    p = Policy(mode=alias)
    assert p.mode == mode
    assert p == Policy(mode=mode)
    # ...and normalized in all output.
    assert p.to_dict()["mode"] == mode
    assert f"mode: {mode}" in p.to_yaml()


def test_documented_aliases_are_all_known():
    for alias in ("32", "32-true", "no", "16-mixed", "fp16", "bf16", "16-true"):
        assert alias in ALIASES


@pytest.mark.parametrize("bad", ["fp12", "bf16-mix", "", "mixed", "fp8"])
def test_unknown_mode_lists_the_valid_ones(bad):
    with pytest.raises(UsageError) as info:
        Policy(mode=bad)
    msg = str(info.value)
    assert repr(bad) in msg
    for mode in ALL_MODES:
        assert mode in msg
    assert isinstance(info.value, ValueError)


def test_non_string_mode_is_a_usage_error():
    with pytest.raises(UsageError, match="string"):
        normalize_mode(1.5)
    with pytest.raises(UsageError, match="unknown precision '16'.*bf16-mixed"):
        normalize_mode(16)  # an int is read as its text: YAML's `mode: 16`


def test_integer_alias_from_yaml_is_accepted():
    assert normalize_mode(32) == "fp32"  # YAML reads `mode: 32` as an int


def test_auto_is_a_clear_usage_error():
    with pytest.raises(UsageError) as info:
        Policy(mode="auto")
    msg = str(info.value)
    assert "auto" in msg and "autotune" in msg
    assert "bf16-mixed" in msg  # says what to use instead


def test_parse_policy_accepts_policy_and_dict_and_rejects_others():
    p = Policy(mode="bf16-mixed", rules=(Rule(match="lm_head"),))
    assert parse_policy(p) is p
    assert parse_policy(p.to_dict()) == p
    with pytest.raises(TypeError):
        parse_policy(3.0)


# -- rules -------------------------------------------------------------------------------------


def test_rule_parse_and_str():
    assert Rule.parse("type:LayerNorm") == Rule(type="LayerNorm")
    assert Rule.parse(" blocks.*.attn ") == Rule(match="blocks.*.attn")
    assert str(Rule(type="LayerNorm")) == "type:LayerNorm"
    assert str(Rule(match="lm_head")) == "lm_head"


@pytest.mark.parametrize(
    "kwargs,needle",
    [(dict(), "exactly one"), (dict(match="a", type="B"), "exactly one"), (dict(match=""), "non-empty"),
     (dict(type="  "), "non-empty"), (dict(match="a", format="fp16"), "fp16")],
)
def test_bad_rules(kwargs, needle):
    with pytest.raises(UsageError, match=needle):
        Rule(**kwargs)


@pytest.mark.parametrize(
    "kwargs,needle",
    [(dict(init_scale=0), "init_scale"), (dict(init_scale="big"), "init_scale"), (dict(growth_factor=1.0), "growth_factor"),
     (dict(backoff_factor=1.0), "backoff_factor"), (dict(backoff_factor=0), "backoff_factor"),
     (dict(growth_interval=0), "growth_interval"), (dict(growth_interval=2.5), "growth_interval"),
     (dict(growth_interval=True), "growth_interval"), (dict(hysteresis=0), "hysteresis"),
     (dict(min_scale=0), "min_scale"), (dict(init_scale=4.0, min_scale=8.0), "min_scale"),
     (dict(enabled="yes"), "enabled")],
)
def test_bad_scaler_config(kwargs, needle):
    with pytest.raises(UsageError, match=needle):
        ScalerConfig(**kwargs)


def test_bad_controller():
    with pytest.raises(UsageError, match="dynamic.*static"):
        ControllerConfig(name="dynamic")


# -- serialization -------------------------------------------------------------------------------


def rich_policy() -> Policy:
    return Policy(
        mode="fp16-true",
        rules=(Rule(match="blocks.*.attn"), Rule(type="LayerNorm"), Rule(match="lm_head")),
        scaler=ScalerConfig(init_scale=1024.0, growth_factor=1.5, backoff_factor=0.25, growth_interval=7,
                            hysteresis=3, min_scale=0.5, enabled=True),
    )


def test_yaml_round_trip():
    p = rich_policy()
    text = p.to_yaml()
    data = yaml.safe_load(text)
    assert data["schema"] == "mixprec.policy/1"
    assert data["rules"][1] == {"type": "LayerNorm", "format": "fp32"}
    back = Policy.from_dict(data)
    assert back == p
    assert back.to_yaml() == text


def test_yaml_file_round_trip(tmp_path):
    p = rich_policy()
    path = tmp_path / "policy.yaml"
    p.save(path)
    assert Policy.from_file(path) == p
    assert Policy.from_file(str(path)) == p


def test_json_file_parses(tmp_path):
    p = rich_policy()
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(p.to_dict()))
    assert Policy.from_file(path) == p


def test_default_policy_round_trip(tmp_path):
    for mode in ALL_MODES:
        p = Policy(mode=mode)
        assert Policy.from_dict(yaml.safe_load(p.to_yaml())) == p


def test_minimal_file_with_string_rules(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("mode: bf16\nrules: [lm_head, 'type:LayerNorm']\ncontroller: static\n")
    p = Policy.from_file(path)
    assert p == Policy(mode="bf16-mixed", rules=(Rule(match="lm_head"), Rule(type="LayerNorm")))


def test_json_save_round_trip(tmp_path):
    p = rich_policy()
    path = tmp_path / "policy.json"
    try:
        p.save(path)
        back = Policy.from_file(path)
    except UsageError as exc:
        raise AssertionError(str(exc)) from None
    assert back == p
    json.loads(path.read_text())


# -- CLI-style pieces ----------------------------------------------------------------------------


def test_policy_from_options_merges(tmp_path):
    path = tmp_path / "base.yaml"
    base = Policy(mode="fp16-mixed", rules=(Rule(match="embed"),), scaler=ScalerConfig(init_scale=256.0, growth_interval=5))
    base.save(path)

    # The file is the base; --precision overrides its mode; --keep-fp32 adds rules after the file's.
    p = policy_from_options(precision="bf16", keep_fp32="lm_head, type:LayerNorm", policy_file=path)
    assert p.mode == "bf16-mixed"
    assert p.rules == (Rule(match="embed"), Rule(match="lm_head"), Rule(type="LayerNorm"))
    assert p.scaler == base.scaler
    assert p.controller == base.controller

    assert policy_from_options(policy_file=path) == base
    assert policy_from_options(precision="16-true", policy_file=path) == replace(base, mode="fp16-true")
    assert policy_from_options(keep_fp32=["a,b", "type:LayerNorm"]).rules == (
        Rule(match="a"), Rule(match="b"), Rule(type="LayerNorm"))
    assert policy_from_options(keep_fp32=",,").rules == ()
    assert policy_from_options() == Policy()
    assert policy_from_options(precision="bf16-true") == Policy(mode="bf16-true")


def test_policy_from_options_bad_precision_overrides_file(tmp_path):
    path = tmp_path / "base.yaml"
    Policy(mode="fp16-mixed").save(path)
    with pytest.raises(UsageError, match="fp13"):
        policy_from_options(precision="fp13", policy_file=path)


# -- malformed files ---------------------------------------------------------------------------


def file_cases(*rows):
    return [pytest.param(*row, id=row[0]) for row in rows]


@pytest.mark.parametrize(
    "name,text,needles",
    file_cases(
        ("bad.yaml", "mode: [fp16\n", ["not valid YAML"]),
        ("bad.json", '{"mode": "fp16",', ["not valid JSON"]),
        ("list.yaml", "- fp16\n", ["mapping"]),
        ("nomode.yaml", "rules: []\n", ["mode"]),
        ("unknown.yaml", "mode: fp16\nmodee: bf16\n", ["'modee'", "valid keys"]),
        ("scalerkey.yaml", "mode: fp16\nscaler:\n  init_scal: 8\n", ["'init_scal'", "init_scale"]),
        ("rulekey.yaml", "mode: fp16\nrules:\n  - {name: lm_head}\n", ["rules[0]", "'name'"]),
        ("ruletype.yaml", "mode: fp16\nrules: [3]\n", ["rules[0]", "3"]),
        ("rules.yaml", "mode: fp16\nrules: lm_head\n", ["rules", "list"]),
        ("schema.yaml", "schema: mixprec.policy/9\nmode: fp16\n", ["mixprec.policy/9"]),
        ("scaler.yaml", "mode: fp16\nscaler: 5\n", ["scaler", "5"]),
    ),
)
def test_malformed_file_names_file_and_value(tmp_path, name, text, needles):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        Policy.from_file(path)
    msg = str(info.value)
    assert name in msg, msg
    for needle in needles:
        assert needle in msg, msg
    assert "\n" not in msg.strip()  # one line, for the CLI


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(UsageError, match="nope.yaml"):
        Policy.from_file(path)


@pytest.mark.parametrize(
    "name,text,needles",
    file_cases(
        ("interval.yaml", "mode: fp16\nscaler:\n  growth_interval: x\n", ["growth_interval", "'x'"]),
        ("mode.yaml", "mode: fp12\n", ["fp12"]),
        ("format.yaml", "mode: fp16\nrules:\n  - {match: lm_head, format: fp8}\n", ["fp8"]),
        ("empty.yaml", "mode: fp16\nrules:\n  - {match: ''}\n", ["rule"]),
        ("controller.yaml", "mode: fp16\ncontroller: dynamic\n", ["dynamic"]),
    ),
)
def test_bad_value_in_file_names_file_and_value(tmp_path, name, text, needles):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        Policy.from_file(path)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, msg
    assert name in msg, msg


# -- resolving rules on a model ----------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.mlp = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))


class MyNorm(nn.LayerNorm):
    pass


def toy_model() -> nn.Module:
    return nn.Sequential(OrderedDict(
        embed=nn.Linear(4, 4),
        blocks=nn.Sequential(Block(), Block()),
        ln_f=MyNorm(4),
        lm_head=nn.Linear(4, 4),
    ))


def resolve(*tokens: str) -> list[str]:
    return resolve_rules(Policy(mode="bf16-mixed", rules=tuple(Rule.parse(t) for t in tokens)), toy_model())


def test_resolve_rules_by_name_and_type():
    assert resolve("lm_head") == ["lm_head"]
    assert resolve("blocks.*.attn") == ["blocks.0.attn", "blocks.1.attn"]
    # Subclasses count, and a qualified class name works too.
    assert resolve("type:LayerNorm") == ["blocks.0.ln", "blocks.1.ln", "ln_f"]
    assert resolve("type:torch.nn.modules.normalization.LayerNorm") == ["blocks.0.ln", "blocks.1.ln", "ln_f"]
    assert resolve("type:MyNorm") == ["ln_f"]
    assert resolve_rules(Policy(mode="bf16-mixed"), toy_model()) == []


def test_resolve_rules_outermost_only_in_model_order():
    # blocks.0 covers its LayerNorm; later rules and inner matches do not add children.
    assert resolve("type:LayerNorm", "blocks.0") == ["blocks.0", "blocks.1.ln", "ln_f"]
    assert resolve("blocks.1.mlp.*", "blocks.1.mlp") == ["blocks.1.mlp"]
    assert resolve("lm_head", "embed") == ["embed", "lm_head"]
    assert resolve("blocks", "type:Linear") == ["embed", "blocks", "lm_head"]


def test_rule_matching_nothing_suggests_closest_name():
    with pytest.raises(UsageError) as info:
        resolve("lm_haed")
    msg = str(info.value)
    assert "lm_haed" in msg and "lm_head" in msg


def test_bare_class_name_hints_type_prefix():
    with pytest.raises(UsageError) as info:
        resolve("LayerNorm")
    assert "type:LayerNorm" in str(info.value)


def test_unknown_type_suggests_closest_types():
    with pytest.raises(UsageError) as info:
        resolve("type:LayerNrom")
    msg = str(info.value)
    assert "LayerNrom" in msg and "LayerNorm" in msg


def test_second_rule_matching_nothing_also_raises():
    with pytest.raises(UsageError, match="blocks.9"):
        resolve("lm_head", "blocks.9.*")
