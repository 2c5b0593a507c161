"""The `mixprec` command line: output documents, exit codes and bad input (DESIGN.md, CLI
and invariant 7: bad input gets a one-line error naming the bad value and what would be
valid, exit 2, no traceback, and nothing already on disk is lost or half-written).

Most cases call ``mixprec.cli.main`` in-process (fast); a few run the real entry point
(``python -m mixprec``) where the process boundary matters.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import mixprec
from conftest import TINY

ENV_KEYS = {"mixprec", "torch", "python", "device", "device_name", "cpu_model", "gpu_model", "threads"}
TRAIN_KEYS = {"schema", "task", "policy", "steps", "optimizer_steps", "skipped_steps", "first_loss",
              "final_loss", "eval", "loss_scale", "step_time_s", "peak_memory_bytes", "environment"}
PRECIOUS = b"precious bytes: a previous run's result\n"
HAS_CUDA = torch.cuda.is_available()


def strict_json(text: str):
    """json.loads that rejects NaN/Infinity (the documents are strict JSON)."""
    def reject(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=reject)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (but __pycache__) with its bytes, to prove nothing changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def assert_usage_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, f"expected exit code 2, got {rc}; stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line reason on stderr, got {len(lines)} lines:\n{err}"
    line = lines[0]
    assert "error" in line, line
    for needle in needles:
        assert needle in line, f"{needle!r} not in the message: {line}"
    return line


# -- version, formats, recipes ------------------------------------------------------------
def test_version_from_real_entry_point(run_cli) -> None:
    rc, out, err = run_cli(["--version"])
    assert rc == 0, err
    assert out.strip() == f"mixprec {mixprec.__version__}"
    assert "Traceback" not in err


def test_formats_table(invoke) -> None:
    rc, out, err = invoke(["formats"])
    assert rc == 0, err
    header = out.splitlines()[0].split()
    assert header[0] == "format" and "max" in header and "eps" in header
    names = [line.split()[0] for line in out.splitlines()[2:] if line.strip()]
    assert names[:4] == ["fp32", "tf32", "bf16", "fp16"]
    assert {"fp8_e4m3", "fp8_e5m2"} <= set(names)


def test_formats_json_stdout(invoke) -> None:
    rc, out, err = invoke(["formats", "--json", "-"])
    assert rc == 0, err
    doc = strict_json(out)  # nothing but the document on stdout
    assert doc["schema"] == "mixprec.formats/1"
    env = doc["environment"]
    assert ENV_KEYS <= set(env), sorted(ENV_KEYS - set(env))
    assert env["mixprec"] == mixprec.__version__
    assert env["torch"] == torch.__version__
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["device"] == "cpu"
    assert isinstance(env["threads"], int) and env["threads"] >= 1
    formats = doc["formats"]
    names = [f["name"] for f in formats] if isinstance(formats, list) else list(formats)
    assert {"fp32", "bf16", "fp16"} <= set(names)


def test_formats_json_file(invoke, tmp_path: Path) -> None:
    target = tmp_path / "formats.json"
    rc, out, err = invoke(["formats", "--json", str(target)])
    assert rc == 0, err
    assert "fp16" in out  # the table still prints when the JSON goes to a file
    assert strict_json(target.read_text())["schema"] == "mixprec.formats/1"


def test_recipes_json_lists_lm(invoke) -> None:
    rc, out, err = invoke(["recipes", "--json", "-"])
    assert rc == 0, err
    doc = strict_json(out)
    assert doc["schema"] == "mixprec.recipes/1"
    assert "environment" in doc and ENV_KEYS <= set(doc["environment"])
    by_name = {r["name"]: r for r in doc["recipes"]}
    assert "lm" in by_name and by_name["lm"]["default"] is True


def test_recipes_listing(invoke) -> None:
    rc, out, err = invoke(["recipes"])
    assert rc == 0, err
    assert out.startswith("lm (default)")


# -- train: the result document ---------------------------------------------------------
def test_train_json_document(invoke, tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    rc, out, err = invoke(["train", *TINY, "--steps", "3", "--json", str(target), "--no-progress"])
    assert rc == 0, err
    doc = strict_json(target.read_text())
    assert TRAIN_KEYS <= set(doc), sorted(TRAIN_KEYS - set(doc))
    assert doc["schema"] == "mixprec.train/1"
    assert doc["task"] == "lm" and doc["status"] == "completed"
    assert doc["policy"]["mode"] == "fp32" and doc["policy"]["fp32_modules"] == []
    assert doc["steps"] == 3 and doc["optimizer_steps"] == 3 and doc["skipped_steps"] == []
    assert len(doc["losses"]) == 3 and all(math.isfinite(x) for x in doc["losses"])
    assert doc["first_loss"] == doc["losses"][0] and doc["final_loss"] == doc["losses"][-1]
    assert abs(doc["first_loss"] - math.log(256)) < 0.3  # an untrained byte model
    assert doc["final_loss"] < doc["first_loss"]
    assert set(doc["eval"]) == {"val_loss", "perplexity"} and math.isfinite(doc["eval"]["val_loss"])
    assert doc["loss_scale"] == 1.0  # no loss scaling in fp32
    assert doc["step_time_s"] > 0 and doc["peak_memory_bytes"] > 0
    assert ENV_KEYS <= set(doc["environment"])
    # The summary goes to stdout when the JSON goes to a file.
    assert out.startswith("mixprec train lm: fp32 - 3 steps (3 applied, 0 skipped)"), out
    assert "Traceback" not in err


def test_keep_fp32_and_alias_in_output(invoke, tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    rc, out, err = invoke(["train", *TINY, "--steps", "2", "--precision", "bf16",
                           "--keep-fp32", "lm_head,type:LayerNorm", "--json", str(target), "--no-progress"])
    assert rc == 0, err
    doc = strict_json(target.read_text())
    policy = doc["policy"]
    assert policy["mode"] == "bf16-mixed"  # the alias, normalized
    assert doc["policy_spec"]["mode"] == "bf16-mixed"
    assert policy["fp32_modules"] == ["blocks.0.ln1", "blocks.0.ln2", "ln_f", "lm_head"]
    assert policy["rules"] == ["lm_head", "type:LayerNorm"]
    assert "bf16-mixed, fp32: blocks.0.ln1, blocks.0.ln2, ln_f, lm_head" in out
    assert "'bf16'" not in out and " bf16 " not in out


@pytest.mark.parametrize("alias, mode", [("32", "fp32"), ("16-mixed", "fp16-mixed"), ("16-true", "fp16-true")])
def test_aliases_normalized(invoke, tmp_path: Path, alias: str, mode: str) -> None:
    target = tmp_path / "out.json"
    rc, out, err = invoke(["train", *TINY, "--steps", "1", "--precision", alias, "--json", str(target), "--no-progress"])
    assert rc == 0, err
    doc = strict_json(target.read_text())
    assert doc["policy"]["mode"] == mode and doc["policy_spec"]["mode"] == mode
    assert out.startswith(f"mixprec train lm: {mode} - 1 steps"), out


def test_json_to_stdout(invoke) -> None:
    rc, out, err = invoke(["train", *TINY, "--steps", "2", "--json", "-", "--no-progress"])
    assert rc == 0, err
    doc = strict_json(out)  # stdout holds exactly the document
    assert doc["schema"] == "mixprec.train/1" and doc["steps"] == 2
    assert "mixprec train lm: fp32 - 2 steps" in err  # the summary moved to stderr


def test_fp16_on_this_cpu_warns_and_runs(invoke, tmp_path: Path) -> None:
    from mixprec.environment import cpu_has_fast_fp16

    if cpu_has_fast_fp16():
        pytest.skip("this CPU has fast fp16 kernels: no warning expected")
    target = tmp_path / "out.json"
    rc, out, err = invoke(["train", *TINY, "--steps", "2", "--precision", "fp16-mixed", "--json", str(target),
                           "--no-progress"])
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "fp16" in warnings[0], err
    doc = strict_json(target.read_text())
    assert doc["policy"]["mode"] == "fp16-mixed"  # what ran is what was asked
    assert doc["policy"]["loss_scaling"] is True


def _floor_policy(path: Path, floor: str) -> None:
    # A loss scale this large overflows every fp16 gradient, and the floor is the start.
    path.write_text(f"mode: fp16-mixed\nscaler:\n  init_scale: {floor}\n  min_scale: {floor}\n")


def _assert_diverged_at_step_1(doc: dict) -> None:
    assert doc["status"] == "diverged" and "minimum loss scale" in doc["diagnosis"]
    assert doc["steps"] == 1 and doc["requested_steps"] == 3
    assert doc["optimizer_steps"] == 0
    assert [s["step"] for s in doc["skipped_steps"]] == [1]
    assert doc["skipped_steps"][0]["reason"] == "nonfinite_grad"


def test_scale_floor_exits_1_from_real_entry_point(run_cli, tmp_path: Path) -> None:
    _floor_policy(tmp_path / "policy.yaml", "1.0e+30")  # 1e30 is not exactly an fp32 number
    rc, out, err = run_cli(["train", *TINY, "--steps", "3", "--policy", "policy.yaml", "--json", "out.json",
                            "--no-progress"])
    assert "Traceback" not in err
    assert rc == 1, f"rc {rc}\n{out}\n{err}"
    assert "DIVERGED" in out
    _assert_diverged_at_step_1(strict_json((tmp_path / "out.json").read_text()))


@pytest.mark.parametrize("floor", [
    pytest.param("1.2676506002282294e+30", id="2**100-fp32-exact"),
    pytest.param("1.0e+30", id="1e30-not-fp32-exact"),
])
def test_scale_floor_diverges(invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, floor: str) -> None:
    """min_scale is a floor whatever its value; the scale lives in fp32, the floor need not."""
    monkeypatch.chdir(tmp_path)
    _floor_policy(tmp_path / "policy.yaml", floor)
    rc, out, err = invoke(["train", *TINY, "--steps", "3", "--policy", "policy.yaml", "--json", "out.json",
                           "--no-progress"])
    assert rc == 1, f"rc {rc}\n{out}\n{err}"
    assert "DIVERGED" in out
    _assert_diverged_at_step_1(strict_json((tmp_path / "out.json").read_text()))


# -- bad input ------------------------------------------------------------------------------
USER_TASKS = '''
import mixprec
from mixprec.recipes.lm import lm

def tiny_task(n_layer=1):
    return lm(n_layer=n_layer, d_model=32, n_head=2, seq_len=32, batch_size=4)

def not_a_task():
    return {"name": "not a task"}

NOT_CALLABLE = 42
'''

POLICY_FILES = {
    "invalid.yaml": "mode: fp16-mixed\nrules: [lm_head\n",
    "unknown_key.yaml": "mode: fp16-mixed\nmodee: bf16-mixed\n",
    "unknown_scaler_key.yaml": "mode: fp16-mixed\nscaler:\n  init_scal: 1024.0\n",
    "bad_scale.yaml": "mode: fp16-mixed\nscaler:\n  init_scale: -1.0\n",
    "bad_mode.yaml": "mode: fp12\n",
    "bad_rule_format.yaml": "mode: bf16-mixed\nrules:\n- match: lm_head\n  format: fp16\n",
    "not_a_mapping.yaml": "- fp16-mixed\n",
    "bad.json": '{"mode": "bf16-mixed",}',
}

# (id, arguments after `mixprec train`, substrings the one-line message must hold)
BAD_INPUT = [
    ("unknown-precision", ["--precision", "fp12"], ["'fp12'", "bf16-mixed", "fp16-mixed"]),
    ("unknown-task", ["nosuch"], ["'nosuch'", "lm"]),
    ("task-module-not-importable", ["nosuchmod:task"], ["nosuchmod", "import"]),
    ("task-no-such-function", ["user_tasks_mp:nope"], ["'nope'", "tiny_task"]),
    ("task-not-callable", ["user_tasks_mp:NOT_CALLABLE"], ["NOT_CALLABLE", "int"]),
    ("task-returns-non-task", ["user_tasks_mp:not_a_task"], ["not_a_task", "dict", "mixprec.Task"]),
    ("task-path-malformed", ["user_tasks_mp:"], ["'user_tasks_mp:'", "package.module:function"]),
    ("unknown-task-arg", ["--task-arg", "n_layr=2"], ["'n_layr'", "n_layer"]),
    ("user-task-unknown-arg", ["user_tasks_mp:tiny_task", "--task-arg", "depth=2"], ["'depth'", "n_layer"]),
    ("task-arg-not-key-value", ["--task-arg", "n_layer"], ["'n_layer'", "key=value"]),
    ("task-arg-bad-value", ["--task-arg", "n_layer=0"], ["n_layer", "0"]),
    ("policy-invalid-yaml", ["--policy", "invalid.yaml"], ["invalid.yaml", "YAML"]),
    ("policy-invalid-json", ["--policy", "bad.json"], ["bad.json", "JSON"]),
    ("policy-unknown-key", ["--policy", "unknown_key.yaml"], ["'modee'", "mode", "rules"]),
    ("policy-unknown-scaler-key", ["--policy", "unknown_scaler_key.yaml"], ["'init_scal'", "init_scale"]),
    ("policy-bad-value", ["--policy", "bad_scale.yaml"], ["init_scale", "-1.0"]),
    ("policy-bad-mode", ["--policy", "bad_mode.yaml"], ["'fp12'", "bf16-mixed"]),
    ("policy-bad-rule-format", ["--policy", "bad_rule_format.yaml"], ["'fp16'", "fp32"]),
    ("policy-not-a-mapping", ["--policy", "not_a_mapping.yaml"], ["not_a_mapping.yaml", "mapping"]),
    ("policy-missing-file", ["--policy", "missing.yaml"], ["missing.yaml"]),
    ("rule-matches-nothing", ["--keep-fp32", "lm_haed"], ["'lm_haed'", "lm_head"]),
    ("type-rule-matches-nothing", ["--keep-fp32", "type:LayerNrom"], ["LayerNrom", "LayerNorm"]),
    ("class-name-as-glob", ["--keep-fp32", "LayerNorm"], ["'LayerNorm'", "type:LayerNorm"]),
    ("steps-0", ["--steps", "0"], ["--steps", "'0'", ">= 1"]),
    ("steps-negative", ["--steps", "-3"], ["--steps", "'-3'"]),
    ("steps-not-a-number", ["--steps", "ten"], ["--steps", "'ten'"]),
    ("accumulate-0", ["--accumulate", "0"], ["--accumulate", "'0'"]),
    ("clip-negative", ["--clip-grad-norm", "-1"], ["--clip-grad-norm", "'-1'"]),
    ("checkpoint-every-0", ["--checkpoint-every", "0"], ["--checkpoint-every", "'0'"]),
    ("unknown-flag", ["--precison", "bf16"], ["--precison"]),
    ("resume-without-checkpoint-dir", ["--resume"], ["--checkpoint-dir"]),
    ("json-into-missing-dir", ["--json", "no/such/dir/x.json"], ["no/such/dir/x.json"]),
    ("json-is-a-directory", ["--json", "."], ["'.'", "directory"]),
    ("invalid-device", ["--device", "gpu0"], ["gpu0"]),
]
if not HAS_CUDA:
    BAD_INPUT += [
        ("tf32-on-cpu", ["--precision", "tf32"], ["tf32", "GPU"]),
        ("cuda-unavailable", ["--device", "cuda"], ["cuda"]),
    ]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the cwd, with a user task module, policy files and a precious out.json."""
    (tmp_path / "user_tasks_mp.py").write_text(USER_TASKS)
    for name, text in POLICY_FILES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "out.json").write_bytes(PRECIOUS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_tasks_mp", raising=False)
    yield tmp_path
    sys.modules.pop("user_tasks_mp", None)


@pytest.mark.parametrize("args, needles", [pytest.param(a, n, id=i) for i, a, n in BAD_INPUT])
def test_bad_input(invoke, workdir: Path, args: list[str], needles: list[str]) -> None:
    before = snapshot(workdir)
    json_args = [] if "--json" in args else ["--json", "out.json"]
    tiny = [] if ":" in args[0] else TINY  # a user task takes its own arguments
    rc, out, err = invoke(["train", *tiny, "--steps", "2", *json_args, *args, "--no-progress"])
    assert_usage_error(rc, err, *needles)
    assert snapshot(workdir) == before  # out.json keeps its bytes; nothing new was written
    assert "DIVERGED" not in out


def test_user_task_from_current_directory(invoke, workdir: Path) -> None:
    """The good path of the module above: `module:function` from the cwd trains."""
    rc, out, err = invoke(["train", "user_tasks_mp:tiny_task", "--steps", "1", "--json", "out.json", "--no-progress"])
    assert rc == 0, err
    assert strict_json((workdir / "out.json").read_text())["task"] == "lm"


def test_policy_file_mode_written_as_a_yaml_number(invoke, workdir: Path) -> None:
    """`mode: 32` is the alias 32 (fp32), but YAML reads it as the int 32. Either accept it
    or say what is wrong with the value and list the valid modes (invariant 7)."""
    (workdir / "numeric_mode.yaml").write_text("mode: 32\n")
    rc, out, err = invoke(["train", *TINY, "--steps", "1", "--policy", "numeric_mode.yaml", "--json", "out.json",
                           "--no-progress"])
    if rc == 0:
        assert strict_json((workdir / "out.json").read_text())["policy"]["mode"] == "fp32"
    else:
        assert_usage_error(rc, err, "32", "fp32", "bf16-mixed")  # the value, and the valid modes


@pytest.mark.parametrize("args", [
    pytest.param(["--keep-fp32", "lm_haed"], id="rule-matches-nothing"),
    pytest.param(["--resume"], id="resume-without-checkpoint-dir"),
])
def test_errors_stay_one_line_with_the_progress_bar_on(invoke, workdir: Path, args: list[str]) -> None:
    """The default (progress bar on) must not put a bar in front of the one-line reason:
    errors found while setting up the run come before any bar is drawn."""
    rc, out, err = invoke(["train", *TINY, "--steps", "2", *args])
    assert_usage_error(rc, err)


@pytest.mark.parametrize("args, needles", [
    pytest.param(["--precision", "fp12"], ["'fp12'", "bf16-mixed"], id="unknown-precision"),
    pytest.param(["--steps", "0"], ["--steps", "'0'"], id="steps-0"),
    pytest.param(["nosuchmod:task"], ["nosuchmod"], id="task-module-not-importable"),
])
def test_bad_input_from_real_entry_point(run_cli, tmp_path: Path, args: list[str], needles: list[str]) -> None:
    (tmp_path / "out.json").write_bytes(PRECIOUS)
    rc, out, err = run_cli(["train", *TINY, *args, "--json", "out.json", "--no-progress"])
    assert_usage_error(rc, err, *needles)
    assert (tmp_path / "out.json").read_bytes() == PRECIOUS
    assert out == ""


# -- bad input: checkpoints -------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a genuine last.pt: the tiny lm, fp32, 2 steps, default settings."""
    from mixprec.recipes.lm import lm

    directory = tmp_path_factory.mktemp("real_ckpt")
    task = lm(n_layer=1, d_model=32, n_head=2, seq_len=32, batch_size=4)
    mixprec.train(task, "fp32", steps=2, checkpoint_dir=directory)
    return (directory / "last.pt").read_bytes()


def _ckpt_case(workdir: Path, kind: str, real: bytes) -> Path:
    ckpt = workdir / "ckpt"
    ckpt.mkdir()
    if kind == "garbage":
        (ckpt / "last.pt").write_bytes(b"\x00\x01 this is not a checkpoint \xff" * 10)
    elif kind == "foreign":
        torch.save({"hello": 1}, ckpt / "last.pt")
    elif kind == "truncated":
        (ckpt / "last.pt").write_bytes(real[: len(real) // 2])
    elif kind == "real":
        (ckpt / "last.pt").write_bytes(real)
    return ckpt


@pytest.mark.parametrize("kind, extra, needles", [
    pytest.param("garbage", ["--resume"], ["last.pt", "corrupt"], id="corrupt"),
    pytest.param("truncated", ["--resume"], ["last.pt", "corrupt"], id="truncated"),
    pytest.param("foreign", ["--resume"], ["last.pt", "not a mixprec checkpoint", "mixprec.checkpoint/1"], id="foreign"),
    pytest.param("empty", ["--resume"], ["nothing to resume", "ckpt", "last.pt"], id="resume-empty-dir"),
    pytest.param("real", [], ["already holds a checkpoint", "--resume"], id="fresh-run-into-checkpoint"),
    pytest.param("real", ["--resume", "--precision", "bf16-mixed"], ["'fp32'", "'bf16-mixed'"], id="resume-other-policy"),
    pytest.param("real", ["--resume", "--seed", "1"], ["seed"], id="resume-other-settings"),
])
def test_bad_checkpoint_input(invoke, workdir: Path, real_checkpoint: bytes, kind: str, extra: list[str],
                              needles: list[str]) -> None:
    _ckpt_case(workdir, kind, real_checkpoint)
    before = snapshot(workdir)
    rc, out, err = invoke(["train", *TINY, "--steps", "3", "--checkpoint-dir", "ckpt", "--json", "out.json",
                           *extra, "--no-progress"])
    assert_usage_error(rc, err, *needles)
    assert snapshot(workdir) == before  # last.pt and out.json keep their bytes, no temp files


def test_checkpoint_dir_not_writable(invoke, workdir: Path) -> None:
    # Under a regular file: no directory can be made there, even by root.
    (workdir / "file.txt").write_text("a file, not a directory\n")
    before = snapshot(workdir)
    rc, out, err = invoke(["train", *TINY, "--steps", "2", "--checkpoint-dir", "file.txt/ckpt", "--json", "out.json",
                           "--no-progress"])
    assert_usage_error(rc, err, "file.txt/ckpt", "not writable")
    assert snapshot(workdir) == before


def test_resume_continues_a_real_checkpoint(invoke, workdir: Path, real_checkpoint: bytes) -> None:
    """The good path next to the bad ones: the same checkpoint resumes under the same settings."""
    _ckpt_case(workdir, "real", real_checkpoint)
    rc, out, err = invoke(["train", *TINY, "--steps", "3", "--checkpoint-dir", "ckpt", "--resume", "--json",
                           "out.json", "--no-progress"])
    assert rc == 0, err
    doc = strict_json((workdir / "out.json").read_text())
    assert doc["resumed_from_step"] == 2 and doc["steps"] == 3 and len(doc["losses"]) == 3
    assert (workdir / "ckpt" / "last.pt").read_bytes() != real_checkpoint
    assert [p.name for p in (workdir / "ckpt").iterdir()] == ["last.pt"]
