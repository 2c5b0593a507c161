"""`mixprec verify --all`: the parity table across recipes, and `mixprec recipes --json`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mixprec.errors import UsageError
from mixprec.recipes import RECIPE_ORDER, RECIPES
from mixprec.runs import parity

DOC = (Path(__file__).resolve().parents[1] / "docs" / "schemas.md").read_text()
PARITY_RECIPES = "lm,vision"  # two of the cheapest at their tiny sizes


def documented_top_level(schema: str) -> set[str]:
    """Backticked names in a schemas.md bullet, outside any parentheses (the top-level keys)."""
    line = next(l for l in DOC.splitlines() if l.startswith(f"- `{schema}`"))
    body = line.split(":", 1)[1]
    while re.search(r"\([^()]*\)", body):
        body = re.sub(r"\([^()]*\)", "", body)
    return set(re.findall(r"`([a-z_0-9]+)`", body))


def probe_doc(**ratios):
    """A probe document with the given bf16/fp16/fp8_e4m3 ratios (None = unavailable)."""
    matmul = {"fp32": {"available": True, "ratio_to_fp32": 1.0}}
    for fmt, ratio in ratios.items():
        matmul[fmt] = ({"available": False, "ratio_to_fp32": None, "reason": "not on this device"} if ratio is None
                       else {"available": True, "ratio_to_fp32": ratio, "reason": None})
    return {"matmul": matmul}


# -- what runs, native or emulated -------------------------------------------------------
def test_a_recipes_scaler_settings_apply_only_where_the_loss_is_scaled():
    asr = RECIPES["asr"]
    assert asr.scaler == {"init_scale": 1024.0}  # the recipe's documented fp16 fix
    for mode in ("fp16-mixed", "emulate:fp16-mixed"):
        policy = parity.candidate_policy(asr, mode)
        assert policy.scaler.init_scale == 1024.0 and policy.scaler.growth_interval == 2000
    for mode in ("bf16-mixed", "fp8-mixed"):
        assert parity.candidate_policy(asr, mode).scaler.init_scale == 2.0**16
    assert parity.candidate_policy(RECIPES["lm"], "fp16-mixed").scaler.init_scale == 2.0**16
    cell = parity._shown("fp16-mixed", {"emulated": True, "scaler": {"init_scale": 1024.0}})
    assert cell == "fp16-mixed (emulated; init scale 1024)"


def test_the_probe_decides_emulation():
    plan = parity.execution_plan(["bf16-mixed", "fp16-mixed", "fp8-mixed"],
                                 probe_doc(bf16=2.4, fp16=0.004, fp8_e4m3=None))
    assert plan["bf16-mixed"] == {"executed_as": "bf16-mixed", "emulated": False, "probe_ratio": 2.4,
                                  "why": "bf16 matmuls run at 2.4x fp32 here (probe)"}
    assert plan["fp16-mixed"]["executed_as"] == "emulate:fp16-mixed" and plan["fp16-mixed"]["emulated"]
    assert plan["fp8-mixed"]["executed_as"] == "emulate:fp8-mixed" and "cannot run" in plan["fp8-mixed"]["why"]


def test_fast_fp16_hardware_runs_fp16_natively():
    plan = parity.execution_plan(["fp16-mixed"], probe_doc(fp16=3.0))
    assert plan["fp16-mixed"]["executed_as"] == "fp16-mixed" and not plan["fp16-mixed"]["emulated"]


@pytest.mark.parametrize("emulate,expected", [("never", "fp16-mixed"), ("always", "emulate:fp16-mixed")])
def test_emulation_can_be_forced_either_way(emulate, expected):
    slow_or_fast = probe_doc(fp16=0.004) if emulate == "never" else probe_doc(fp16=3.0)
    assert parity.execution_plan(["fp16-mixed"], slow_or_fast, emulate)["fp16-mixed"]["executed_as"] == expected


def test_bad_precisions_recipes_and_options_are_usage_errors():
    with pytest.raises(UsageError, match=r"'fp32'.*valid: bf16-mixed, fp16-mixed, fp8-mixed"):
        parity.parse_precisions("bf16-mixed,fp32")
    with pytest.raises(UsageError, match=r"unknown recipe 'nope'; valid recipes: lm"):
        parity.parse_recipes("lm,nope")
    with pytest.raises(UsageError, match="emulate must be one of"):
        parity.execution_plan(["bf16-mixed"], probe_doc(bf16=2.0), "sometimes")
    with pytest.raises(UsageError, match="size must be"):
        parity.verify_all("lm", "bf16-mixed", size="huge", probe_doc=probe_doc(bf16=2.0))
    assert parity.parse_precisions("bf16,16-mixed,bf16-mixed") == ["bf16-mixed", "fp16-mixed"]  # aliases, dedup


@pytest.mark.parametrize("args,message", [
    (["verify", "--all", "lm"], "drop TASK"),
    (["verify", "--all", "--precision", "bf16-mixed"], "drop --precision"),
    (["verify", "--all", "--task-arg", "d_model=64"], "drop --task-arg"),
    (["verify", "--all", "--reference", "bf16-mixed"], "compares against fp32"),
    (["verify", "lm", "--precisions", "bf16-mixed"], "--precisions goes with --all"),
    (["verify", "lm"], "needs --precision"),
    (["verify", "--all", "--precisions", "tf32"], "'tf32' is not one verify --all compares"),
])
def test_cli_rejects_mixed_up_flags(invoke, args, message):
    rc, out, err = invoke(args)
    assert rc == 2 and message in err and "Traceback" not in err


# -- the table at tiny sizes ----------------------------------------------------------------
@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    from mixprec.cli import main

    out = tmp_path_factory.mktemp("parity")
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["verify", "--all", "--tiny", "--recipes", PARITY_RECIPES, "--report", str(out / "report"),
                   "--json", str(out / "parity.json")])
    return rc, stdout.getvalue(), json.loads((out / "parity.json").read_text()), out / "report"


def test_tiny_parity_table_passes_with_every_documented_key(parity_run):
    rc, out, doc, _ = parity_run
    assert rc == 0, out
    assert doc["schema"] == "mixprec.verify-all/1" and doc["verdict"] == "PASS"
    assert documented_top_level("mixprec.verify-all/1") <= set(doc)
    assert [r["recipe"] for r in doc["rows"]] == PARITY_RECIPES.split(",")
    assert doc["command"] == f"mixprec verify --all --recipes {PARITY_RECIPES} --tiny"
    for row in doc["rows"]:
        info = RECIPES[row["recipe"]]
        assert row["metric"] == info.metric_key and row["steps"] == info.tiny_steps
        assert set(row["candidates"]) == {"bf16-mixed", "fp16-mixed"}
        assert row["noise_floor"]["difference"] == pytest.approx(row["noise_floor"]["value"] - row["reference_value"])
        for mode, cand in row["candidates"].items():
            assert cand["verdict"] == "PASS", (row["recipe"], mode, cand["reasons"])
            assert cand["difference"] == pytest.approx(cand["value"] - row["reference_value"])
            assert cand["speedup"] > 0 and cand["memory_ratio"] > 0
            assert cand["executed_as"] == doc["execution"][mode]["executed_as"]
    # The table printed is the one in the document.
    assert parity.render_markdown(doc) in out


def test_tiny_parity_report_links_every_pair(parity_run):
    _, _, doc, report = parity_run
    index = (report / "index.html").read_text()
    for row in doc["rows"]:
        for mode in row["candidates"]:
            assert f'href="{row["recipe"]}-{mode}/report.html"' in index
            assert (report / f"{row['recipe']}-{mode}" / "report.html").is_file()
    assert json.loads((report / "results.json").read_text())["rows"] == doc["rows"]
    assert "| recipe | domain | metric |" in (report / "results.md").read_text()


def test_a_failing_candidate_fails_the_table():
    """A doctored verify document: the row and the table verdict follow the candidate's."""
    doc = {"rows": [{"recipe": "lm", "domain": "language model", "metric": "val_loss", "higher_is_better": False,
                     "reference_value": 2.5, "noise_floor": {"difference": 0.01},
                     "candidates": {"bf16-mixed": {"emulated": False, "value": 3.1, "difference": 0.6,
                                                   "verdict": "FAIL", "speedup": 1.2, "memory_ratio": 0.8,
                                                   "reasons": ["final loss differs by 20%"]}}}],
           "precisions": ["bf16-mixed"], "verdict": "FAIL", "wall_time_s": 1.0}
    text = parity.render_summary(doc)
    assert "-> FAIL" in text and "FAIL lm bf16-mixed: final loss differs by 20%" in text
    assert "| lm | language model | val_loss ↓ | 2.5 | bf16-mixed | 3.1 | +0.6 | +0.01 | FAIL | 1.20x | 0.80x |" in text


def test_the_document_names_fp32_values_outside_their_documented_range(parity_run):
    _, _, doc, _ = parity_run
    row = dict(doc["rows"][0])
    assert not parity.outside_expected({**row, "expected_fp32": None})
    value = row["reference_value"]
    assert not parity.outside_expected({**row, "expected_fp32": [value - 1, value + 1]})
    assert parity.outside_expected({**row, "expected_fp32": [value + 1, value + 2]})
    shifted = {**doc, "rows": [{**row, "expected_fp32": [value + 1, value + 2]}, *doc["rows"][1:]]}
    text = parity.render_document(shifted)
    assert f"outside for {row['recipe']} ({parity._num(value)}, documented {value + 1:g}-{value + 2:g})" in text
    inside = {**doc, "rows": [{**r, "expected_fp32": [r["reference_value"] - 1, r["reference_value"] + 1]}
                              for r in doc["rows"]]}
    assert "every recipe's fp32 value is inside its range" in parity.render_document(inside)


# -- mixprec recipes --json ---------------------------------------------------------------------
def test_recipes_json_documents_every_recipe(invoke):
    rc, out, err = invoke(["recipes", "--json", "-"])
    assert rc == 0, err
    doc = json.loads(out)
    line = next(l for l in DOC.splitlines() if l.startswith("- `mixprec.recipes/1`"))
    per_recipe = set(re.findall(r"`([a-z_0-9]+)`", re.sub(r"\([^()]*\)", "", line.split("one per recipe:", 1)[1])))
    assert {"name", "metric_key", "verify_steps"} <= per_recipe
    assert [r["name"] for r in doc["recipes"]] == [n for n in RECIPE_ORDER if n in RECIPES]
    for r in doc["recipes"]:
        assert set(r) == per_recipe
        assert r["expected_fp32"] is None or (len(r["expected_fp32"]) == 2 and r["expected_fp32"][0] <= r["expected_fp32"][1])
