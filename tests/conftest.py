"""Shared test helpers: the tiny lm configuration and ways to run the `mixprec` CLI.

- ``TINY``: CLI arguments that make the ``lm`` recipe tiny (1 layer, d_model 32); add
  ``--steps N`` yourself.
- ``run_cli`` fixture: ``run_cli(args, cwd=None, env=None) -> (rc, stdout, stderr)`` runs
  ``python -m mixprec ARGS`` in a real subprocess, with PYTHONPATH holding the repo's
  ``src`` and ``tests`` directories and the repo root (so ``tests.tasks...`` imports), in
  the test's ``tmp_path`` unless ``cwd`` is given. Use it where the process boundary
  matters (the real exit code, no traceback); it costs a few seconds per call.
- ``invoke`` fixture: ``invoke(args) -> (rc, stdout, stderr)`` calls
  ``mixprec.cli.main(args)`` in this process (argparse's SystemExit becomes the rc).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
SRC_DIR = REPO_ROOT / "src"

TINY: list[str] = [
    "--task-arg", "n_layer=1", "--task-arg", "d_model=32", "--task-arg", "n_head=2",
    "--task-arg", "seq_len=32", "--batch-size", "4",
]

CliResult = tuple[int, str, str]


def cli_env(extra_path: Sequence[str | os.PathLike] = (), env: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ with PYTHONPATH = extra_path + src + tests + repo root (+ the old value)."""
    out = dict(os.environ)
    out.update(env or {})
    parts = [str(p) for p in extra_path] + [str(SRC_DIR), str(TESTS_DIR), str(REPO_ROOT)]
    if out.get("PYTHONPATH"):
        parts.append(out["PYTHONPATH"])
    out["PYTHONPATH"] = os.pathsep.join(parts)
    out.setdefault("PYTHONUNBUFFERED", "1")
    return out


def run_mixprec(args: Sequence[str], cwd: str | os.PathLike, *, env: dict[str, str] | None = None,
                extra_path: Sequence[str | os.PathLike] = (), timeout: float = 240) -> CliResult:
    """``python -m mixprec ARGS`` in a subprocess in ``cwd``: (returncode, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "mixprec", *map(str, args)], cwd=cwd, env=cli_env(extra_path, env),
        capture_output=True, text=True, timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., CliResult]:
    def run(args: Sequence[str], cwd: str | os.PathLike | None = None, **kwargs) -> CliResult:
        return run_mixprec(args, cwd if cwd is not None else tmp_path, **kwargs)

    return run


@pytest.fixture
def invoke(capsys: pytest.CaptureFixture[str]) -> Callable[[Sequence[str]], CliResult]:
    from mixprec.cli import main

    def run(args: Sequence[str]) -> CliResult:
        capsys.readouterr()  # drop anything printed before
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:  # argparse: --version, usage errors
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return rc, out, err

    return run
