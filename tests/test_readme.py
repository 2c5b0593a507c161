"""The README is executed, so its examples cannot drift (DESIGN.md, Style: docs that drift).

- every ```python block runs, each in a fresh namespace;
- the quick-start command (`make demo`'s `mixprec train ...`, which the README quotes)
  runs, shrunk to the tiny setting;
- every `mixprec ...` line of the ```sh blocks parses with the real parser, and its policy
  and task arguments are valid;
- the policy YAML block parses to a Policy that dumps back to the same document, and runs.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

import mixprec
from mixprec.policy import MODES
from conftest import REPO_ROOT, TINY
from mixprec.cli import build_parser

README = (REPO_ROOT / "README.md").read_text()
MAKEFILE = (REPO_ROOT / "Makefile").read_text()
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def located_blocks(lang: str) -> list[tuple[int, str]]:
    """(line number of the block's first line in README.md, body) of each ```lang block."""
    return [(README.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(README)
            if m.group(1) == lang]


def blocks(lang: str) -> list[str]:
    return [body for _, body in located_blocks(lang)]


@functools.lru_cache(maxsize=None)
def run_block(line: int, code: str) -> str:
    """exec ``code`` in a fresh namespace (tracebacks point into README.md); what it printed."""
    padded = "\n" * (line - 1) + code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(padded, str(REPO_ROOT / "README.md"), "exec"), {"__name__": "__readme__"})
    return out.getvalue()


def first_line(code: str) -> str:
    return next(line for line in code.splitlines() if line.strip())


def sh_commands(program: str) -> list[str]:
    """Lines of the ```sh blocks that run ``program``."""
    return [line.strip() for body in blocks("sh") for line in body.splitlines()
            if line.strip().split(" ", 1)[0] == program]


def makefile_targets() -> dict[str, list[str]]:
    """target -> its recipe lines (tab-indented), from the Makefile."""
    targets: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in MAKEFILE.splitlines():
        m = re.match(r"^([A-Za-z0-9_.$()/-]+):(?!=)", line)
        if m:
            current = targets.setdefault(m.group(1), [])
        elif line.startswith("\t") and current is not None:
            current.append(line.strip())
        elif not line.strip():
            current = None
    return targets


def demo_command() -> str:
    """The `mixprec demo ...` line that `make demo` runs, without the venv prefix."""
    lines = [l for l in makefile_targets()["demo"] if re.search(r"\bmixprec demo\b", l)]
    assert len(lines) == 1, f"expected one `mixprec demo` line in the demo target, got {lines}"
    return re.sub(r"^\S*?\bmixprec\b", "mixprec", lines[0])


# -- the sanity of the extraction itself ------------------------------------------------------
def test_readme_has_the_expected_blocks() -> None:
    assert len(blocks("python")) >= 2
    assert len(blocks("yaml")) == 1
    assert len(sh_commands("mixprec")) >= 6


# -- python blocks --------------------------------------------------------------------------------
@pytest.mark.parametrize("line, code", [pytest.param(n, c, id=f"README.md:{n}") for n, c in located_blocks("python")])
def test_python_block_runs(line: int, code: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    printed = run_block(line, code)
    # A top-level `print(...)  # expected` states what it prints: hold it to that.
    for expected in re.findall(r"^print\(.*\)\s+#\s*(.+?)\s*$", code, re.MULTILINE):
        assert expected in printed, f"README says {expected!r}; the block printed:\n{printed}"


def test_engine_example_prints_what_it_claims() -> None:
    line, code = next((n, b) for n, b in located_blocks("python") if "engine.step()" in b)
    lines = run_block(line, code).splitlines()
    assert lines[-1] == "['2']"
    steps = [l for l in lines if l.startswith("step ")]
    assert len(steps) == 8  # 16 micro-batches, accumulate=2
    assert re.fullmatch(r"step 1: loss \d+\.\d{3}, grad norm \d+\.\d{3}", steps[0])


# -- the quick start ------------------------------------------------------------------------------
def test_readme_quotes_the_demo_command() -> None:
    cmd = demo_command()
    assert cmd.startswith("mixprec demo")
    assert f"`make demo` runs `{cmd}`" in README
    assert "make demo" in sh_commands("make")[0]
    args = build_parser().parse_args(shlex.split(cmd)[1:])
    assert args.command == "demo" and args.json == "demo.json"


def test_demo_command_runs_tiny(invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mixprec.probe as probe_mod

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(probe_mod, "default_cache_dir", lambda: tmp_path / "cache")  # not the user's cache
    argv = shlex.split(demo_command())[1:] + ["--quick"]
    rc, out, err = invoke(argv)
    assert rc in (0, 1), err  # PASS or an honest FAIL; never a crash
    assert "Traceback" not in err
    doc = json.loads((tmp_path / "demo.json").read_text())
    assert doc["schema"] == "mixprec.demo/1" and doc["verdict"] in ("PASS", "FAIL")
    assert (tmp_path / "mixprec-demo" / "report.html").exists()
    assert doc["verdict"] in out and "fp32" in out


def test_make_targets_in_readme_exist() -> None:
    targets = makefile_targets()
    for line in sh_commands("make"):
        target = shlex.split(line, comments=True)[1]
        assert target in targets, f"README runs `make {target}`; the Makefile has {sorted(targets)}"


# -- documented command lines ---------------------------------------------------------------------
@pytest.mark.parametrize("line", sh_commands("mixprec"))
def test_documented_command_parses(line: str) -> None:
    from mixprec.recipes import RECIPES
    from mixprec.taskref import _check_arguments, parse_task_args

    argv = shlex.split(line, comments=True)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse already wrote why to stderr
        pytest.fail(f"README command no longer parses (exit {exc.code}): {line}")
    if args.command != "train":
        return
    # Flags that parse but whose values are wrong drift too: check policy and task arguments.
    if args.precision != "auto":  # auto is resolved by autotune before a policy exists
        policy = mixprec.policy_from_options(args.precision, args.keep_fp32, args.policy, args.controller)
        assert policy.mode in MODES
    task_args = parse_task_args(args.task_arg)
    if args.batch_size is not None:
        task_args["batch_size"] = args.batch_size
    task = args.task or "lm"
    if task in RECIPES:
        _check_arguments(task, RECIPES[task].factory, task_args)
    else:
        assert ":" in task, f"{task!r} is neither a recipe nor package.module:function"


# -- the policy file ---------------------------------------------------------------------------------
def test_policy_yaml_round_trips() -> None:
    (text,) = blocks("yaml")
    data = yaml.safe_load(text)
    policy = mixprec.Policy.from_dict(data)
    assert policy.to_dict() == data  # the README shows the complete dumped form
    assert yaml.safe_load(policy.to_yaml()) == data
    assert mixprec.Policy.from_dict(yaml.safe_load(policy.to_yaml())) == policy
    assert policy.mode == "fp16-mixed"
    assert [str(r) for r in policy.rules] == ["lm_head", "type:LayerNorm"]


def test_policy_yaml_from_file_and_cli(invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (text,) = blocks("yaml")
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    assert mixprec.Policy.from_file(path) == mixprec.Policy.from_dict(yaml.safe_load(text))
    monkeypatch.chdir(tmp_path)
    rc, out, err = invoke(["train", *TINY, "--steps", "2", "--policy", "policy.yaml", "--json", "out.json",
                           "--no-progress"])
    assert rc == 0, err
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["policy"]["mode"] == "fp16-mixed"
    assert doc["policy"]["fp32_modules"] == ["blocks.0.ln1", "blocks.0.ln2", "ln_f", "lm_head"]
    assert doc["policy_spec"] == mixprec.Policy.from_dict(yaml.safe_load(text)).to_dict()


def test_readme_lists_every_recipe() -> None:
    from mixprec.recipes import RECIPES

    section = README.split("## Recipes: one per domain", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([a-z]+)` \|", section, re.MULTILINE)
    assert listed == list(RECIPES)
