"""Checkpoints: atomic writes, safe loading, and bit-exact resume after SIGKILL (invariant 6)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mixprec
from mixprec import checkpoint
from mixprec.recipes.lm import lm

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = dict(n_layer=1, d_model=32, n_head=2, seq_len=32, batch_size=4, dropout=0.1)
TINY_ARGS = [a for k, v in TINY.items() if k != "batch_size" for a in ("--task-arg", f"{k}={v}")] + [
    "--batch-size", str(TINY["batch_size"])]


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-m", "mixprec", "train", "lm", *TINY_ARGS, "--no-progress", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"step": 1})
    before = (tmp_path / "last.pt").read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, {"step": 2})
    assert (tmp_path / "last.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_load_refuses_pickled_code_and_foreign_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(mixprec.UsageError, match="corrupt or not a torch checkpoint"):
        checkpoint.load(tmp_path / "evil.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(mixprec.UsageError, match="not a mixprec checkpoint"):
        checkpoint.load(tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(mixprec.UsageError, match="corrupt"):
        checkpoint.load(tmp_path / "garbage.pt")


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = checkpoint.rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]


@pytest.mark.parametrize("mode", ["fp16-mixed", "bf16-true"])
def test_resume_in_process_is_bit_exact(tmp_path, mode):
    kwargs = dict(accumulate=2, clip_grad_norm=1.0)
    full = mixprec.train(lm(**TINY), mode, steps=6, checkpoint_dir=tmp_path / "full", **kwargs)
    mixprec.train(lm(**TINY), mode, steps=2, checkpoint_dir=tmp_path / "cut", **kwargs)
    resumed = mixprec.train(lm(**TINY), mode, steps=6, checkpoint_dir=tmp_path / "cut", resume=True, **kwargs)
    a, b = checkpoint.load(tmp_path / "full" / "last.pt"), checkpoint.load(tmp_path / "cut" / "last.pt")
    assert _states_equal(a["model"], b["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["engine"]["masters"][0], b["engine"]["masters"][0]))
    assert resumed["resumed_from_step"] == 2
    assert resumed["losses"] == full["losses"]
    assert resumed["eval"] == full["eval"]


def test_resume_refuses_a_different_policy(tmp_path):
    mixprec.train(lm(**TINY), "bf16-mixed", steps=1, checkpoint_dir=tmp_path)
    with pytest.raises(mixprec.UsageError, match="bf16-mixed"):
        mixprec.train(lm(**TINY), "fp32", steps=2, checkpoint_dir=tmp_path, resume=True)


def _wait_for_checkpoint(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint appeared; rc={proc.poll()} stderr={proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)


def test_sigkill_at_several_points_then_resume_is_bit_exact(tmp_path):
    steps = "60"
    common = ["--precision", "fp16-mixed", "--steps", steps, "--accumulate", "2", "--clip-grad-norm", "1.0",
              "--checkpoint-every", "1"]
    reference = _cli([*common, "--checkpoint-dir", str(tmp_path / "ref")])

    ckpt_dir = tmp_path / "killed"
    last = ckpt_dir / "last.pt"
    killed_at = []
    # Kill at staggered moments after a checkpoint exists: right away, mid-run, a bit later.
    for i, delay in enumerate([0.0, 0.35, 0.15]):
        proc = _cli([*common, "--checkpoint-dir", str(ckpt_dir), *(["--resume"] if i else [])])
        if i:
            time.sleep(2.0)  # past interpreter start-up, into training
        _wait_for_checkpoint(last, proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        step = checkpoint.load(last)["step"]  # whatever the moment, the last checkpoint loads
        killed_at.append(step)
    final = _cli([*common, "--checkpoint-dir", str(ckpt_dir), "--resume"])
    assert final.wait() == 0, final.stderr.read().decode()[-2000:]
    assert reference.wait() == 0, reference.stderr.read().decode()[-2000:]

    assert any(s < int(steps) for s in killed_at), f"every run finished before its kill: {killed_at}"
    a, b = checkpoint.load(tmp_path / "ref" / "last.pt"), checkpoint.load(last)
    assert a["step"] == b["step"] == int(steps)
    assert _states_equal(a["model"], b["model"])
    assert a["engine"]["scaler"] == b["engine"]["scaler"]
    assert a["history"]["losses"] == b["history"]["losses"]
    opt_a, opt_b = a["optimizers"][0]["state"], b["optimizers"][0]["state"]
    assert all(_states_equal(opt_a[k], opt_b[k]) for k in opt_a)
