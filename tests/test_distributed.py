"""Data parallel under torchrun (issue 7): DDP and FSDP2 under one policy, on 2 CPU ranks (gloo).

Every torchrun launch costs seconds of start-up, so launches are shared between tests
(module-scoped, started on first use). The in-process tests at the top use 1-rank
groups (``--strategy`` without torchrun) and cost no launch.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mixprec
from mixprec import checkpoint, dist_checkpoint, distributed
from mixprec.monitor import first_nonfinite_across_ranks, merge_rank_records
from mixprec.recipes.lm import lm

from conftest import REPO_ROOT, cli_env

dist = torch.distributed
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

TINY = dict(n_layer=1, d_model=32, n_head=2, seq_len=32)
TINY_ARGS = [a for k, v in TINY.items() for a in ("--task-arg", f"{k}={v}")]
BATCH, STEPS = 8, 6  # the global batch: 2 ranks x 4 rows
COMMON = ["--batch-size", str(BATCH), "--steps", str(STEPS), "--accumulate", "2", "--clip-grad-norm", "1.0",
          "--no-progress"]
KEEP = ["--keep-fp32", "lm_head"]
# torch issue #135712: with the rendezvous TCPStore shared with the workers (the default), a
# restarted worker can read the previous attempt's gloo addresses and fail to connect.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _single(mode: str, path: Path, rules=(), **kwargs) -> dict:
    """The 1-process reference: batch 2B on one process, --strategy none."""
    policy = mixprec.policy_from_options(mode, list(rules))
    return mixprec.train(lm(**TINY, batch_size=BATCH), policy, steps=STEPS, accumulate=2, clip_grad_norm=1.0,
                         checkpoint_dir=path, monitor_every=0, **kwargs)


def _torchrun(args: list[str], cwd: Path, *, nproc: int = 2, extra: list[str] = (), task: str = "lm",
              popen: bool = False, timeout: float = 300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone", *extra,
           "-m", "mixprec", "train", task, *TINY_ARGS, *COMMON, *args]
    env = cli_env(env=WORKER_ENV)
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _rel_update_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||b - init||: how far apart two runs' parameters are, relative to how far
    training moved them. Elementwise maxima say little in the low formats: Adam turns
    gradients that are pure rounding noise (the attention key bias, whose true gradient
    is zero) into full lr-sized steps in a random direction."""
    torch.manual_seed(0)
    init = lm(**TINY, batch_size=BATCH).build_model().state_dict()
    num = sum(((a[k].float() - b[k].float()) ** 2).sum() for k in b).sqrt()
    den = sum(((b[k].float() - init[k].float()) ** 2).sum() for k in b).sqrt()
    return (num / den).item()


def _params_single(path: Path) -> dict:
    return checkpoint.load(path / "last.pt")["model"]


class Launches:
    """torchrun jobs, each started once on first use and shared by the tests that need it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._done: dict[str, Path] = {}

    def train(self, name: str, args: list[str]) -> Path:
        if name not in self._done:
            out = self.root / name
            out.mkdir()
            _torchrun([*args, "--checkpoint-dir", str(out / "ckpt"), "--json", str(out / "train.json")], cwd=out)
            self._done[name] = out
        return self._done[name]

    def ddp(self, mode: str) -> Path:
        return self.train(f"ddp-{mode}", ["--strategy", "ddp", "--precision", mode, *KEEP])

    def worker(self) -> list[dict]:
        if "worker" not in self._done:
            out = self.root / "worker"
            out.mkdir()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                   str(REPO_ROOT / "tests" / "tasks" / "dist_worker.py"), str(out)]
            proc = subprocess.run(cmd, cwd=out, env=cli_env(env=WORKER_ENV), capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
            self._done["worker"] = out
        out = self._done["worker"]
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> Launches:
    return Launches(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def singles(tmp_path_factory) -> dict:
    """1-process references, computed once: {mode: (result, checkpoint dir)}."""
    root = tmp_path_factory.mktemp("single")
    cache: dict = {}

    def get(mode: str):
        if mode not in cache:
            path = root / mode
            cache[mode] = (_single(mode, path, ["lm_head"]), path)
        return cache[mode]

    return get


# --------------------------------------------------------------------------- in process


def test_shard_batch_slices_rows_of_every_tensor():
    x, y = torch.arange(8).reshape(4, 2), torch.arange(4)
    batch = {"x": x, "pair": (y, [y * 2]), "meta": "keep", "scalar": torch.tensor(3.0)}
    part = distributed.shard_batch(batch, 1, 2)
    assert torch.equal(part["x"], x[2:]) and torch.equal(part["pair"][0], y[2:])
    assert torch.equal(part["pair"][1][0], y[2:] * 2) and part["meta"] == "keep"
    assert part["scalar"].item() == 3.0
    assert distributed.shard_batch(batch, 0, 1) is batch
    with pytest.raises(mixprec.UsageError, match="batch size 4 is not divisible by the 3 ranks"):
        distributed.shard_batch(batch, 0, 3)


def test_strategy_none_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(mixprec.UsageError, match="rank 1 of WORLD_SIZE=2 .*--strategy ddp"):
        mixprec.train(lm(**TINY, batch_size=4), "fp32", steps=1)
    with pytest.raises(mixprec.UsageError, match="unknown strategy 'zero'"):
        distributed.check_strategy("zero")


def test_one_rank_ddp_equals_one_process_and_writes_a_dcp_checkpoint(tmp_path, singles):
    ref, ref_dir = singles("fp32")
    got = mixprec.train(lm(**TINY, batch_size=BATCH), "fp32", steps=STEPS, accumulate=2, clip_grad_norm=1.0,
                        checkpoint_dir=tmp_path / "ddp1", monitor_every=0, strategy="ddp")
    assert not dist.is_initialized()  # the 1-rank group is torn down again
    assert got["distributed"] == {"strategy": "ddp", "world_size": 1, "backend": "gloo"}
    assert got["losses"] == ref["losses"]
    params = dist_checkpoint.load_model_state_dict(tmp_path / "ddp1")
    assert _max_diff(params, _params_single(ref_dir)) == 0.0
    assert not (tmp_path / "ddp1" / "last.pt").exists()
    # A distributed checkpoint is refused by a single-process resume, and a fresh run into it too.
    with pytest.raises(mixprec.UsageError, match="written by a distributed run"):
        mixprec.train(lm(**TINY, batch_size=BATCH), "fp32", steps=STEPS + 1, accumulate=2, clip_grad_norm=1.0,
                      checkpoint_dir=tmp_path / "ddp1", resume=True)
    with pytest.raises(mixprec.UsageError, match="already holds a checkpoint"):
        mixprec.train(lm(**TINY, batch_size=BATCH), "fp32", steps=1, checkpoint_dir=tmp_path / "ddp1", strategy="ddp")


def test_one_rank_fsdp_trains_with_monitor_and_checkpoint(tmp_path):
    policy = mixprec.policy_from_options("bf16-mixed", ["lm_head"])
    got = mixprec.train(lm(**TINY, batch_size=4), policy, steps=3, strategy="fsdp", monitor_every=1,
                        run_dir=tmp_path / "run", checkpoint_dir=tmp_path / "ckpt")
    assert got["distributed"]["strategy"] == "fsdp" and got["policy"]["fp32_modules"] == ["lm_head"]
    assert got["policy"]["fsdp_param_dtypes"] == {"lm_head": "fp32", "blocks.0": "bf16", "<root>": "bf16"}
    records = [json.loads(line) for line in (tmp_path / "run" / "monitor.jsonl").read_text().splitlines()]
    assert len(records) == 3 and records[0]["params"]["lm_head.weight"]["amax"] > 0
    assert records[0]["modules"]["lm_head"]["dtype"] == "torch.float32"  # the fp32 rule
    assert records[0]["modules"]["blocks.0.mlp.fc"]["dtype"] == "torch.bfloat16"
    resumed = mixprec.train(lm(**TINY, batch_size=4), policy, steps=4, strategy="fsdp", monitor_every=1,
                            run_dir=tmp_path / "run", checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert resumed["resumed_from_step"] == 3 and resumed["losses"][:3] == got["losses"]


def test_distributed_true_modes_train_but_refuse_checkpoints(tmp_path):
    got = mixprec.train(lm(**TINY, batch_size=4), "bf16-true", steps=2, strategy="ddp", monitor_every=0)
    assert got["status"] == "completed" and got["policy"]["master_weights"]
    with pytest.raises(mixprec.UsageError, match="bf16-true.*not supported"):
        mixprec.train(lm(**TINY, batch_size=4), "bf16-true", steps=1, strategy="ddp", checkpoint_dir=tmp_path)


def test_fsdp_refuses_true_modes_and_controllers():
    with pytest.raises(mixprec.UsageError, match="fsdp.*bf16-true"):
        mixprec.train(lm(**TINY, batch_size=4), "bf16-true", steps=1, strategy="fsdp")
    assert not dist.is_initialized()
    policy = mixprec.policy_from_options("bf16-mixed", controller="adaptive")
    with pytest.raises(mixprec.UsageError, match="controller 'adaptive'.*fsdp"):
        mixprec.train(lm(**TINY, batch_size=4), policy, steps=1, strategy="fsdp")


def test_merge_rank_records_takes_max_and_names_the_rank():
    def record(amax, bad, under):
        return {"schema": "mixprec.monitor/1", "step": 3, "loss_scale": 1.0, "formats": ["bf16"], "every": 1,
                "modules": {"a": {"order": 0, "amax": amax, "mean_abs": 1.0, "nonfinite": 0, "input_amax": 1.0,
                                  "input_nonfinite": 0, "formats": {"bf16": {"underflow": under, "overflow": 0.0}}},
                            "b": {"order": 1, "amax": amax, "mean_abs": 1.0, "nonfinite": bad, "input_amax": 1.0,
                                  "input_nonfinite": 0, "formats": {"bf16": {"underflow": 0.0, "overflow": 0.0}}}},
                "params": {}}

    merged = merge_rank_records([record(2.0, 0, 0.1), record(5.0, 7, 0.3)])
    assert merged["world_size"] == 2
    assert merged["modules"]["a"]["amax"] == 5.0
    assert merged["modules"]["a"]["formats"]["bf16"]["underflow"] == pytest.approx(0.2)
    assert merged["modules"]["b"]["nonfinite"] == 7 and merged["modules"]["b"]["nonfinite_ranks"] == [1]
    forward, backward = first_nonfinite_across_ranks([record(2.0, 0, 0.1), record(5.0, 7, 0.3)])
    assert forward["module"] == "b" and forward["rank"] == 1 and backward is None


def test_cli_refuses_auto_precision_with_a_strategy(invoke):
    rc, _, err = invoke(["train", "lm", "--precision", "auto", "--strategy", "ddp", "--steps", "1"])
    assert rc == 2 and "--precision auto with --strategy" in err


# --------------------------------------------------------------------------- 2 ranks


@pytest.mark.parametrize("mode", ["fp32", "bf16-mixed"])
def test_ddp_two_ranks_equal_one_process_with_twice_the_batch(launches, singles, mode):
    ref, ref_dir = singles(mode)
    out = launches.ddp(mode)
    got = json.loads((out / "train.json").read_text())
    assert got["distributed"] == {"strategy": "ddp", "world_size": 2, "backend": "gloo"}
    params, ref_params = dist_checkpoint.load_model_state_dict(out / "ckpt"), _params_single(ref_dir)
    if mode == "fp32":  # only the order of floating-point sums differs
        assert _max_diff(params, ref_params) <= 1e-6
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    else:  # bf16 rounds each rank's partial gradient sums: within bf16's own noise (measured 1.4%)
        assert _rel_update_distance(params, ref_params) <= 0.03
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-4)
    assert got["eval"]["val_loss"] == pytest.approx(ref["eval"]["val_loss"], rel=1e-4)
    assert got["policy"]["fp32_modules"] == ref["policy"]["fp32_modules"] == ["lm_head"]
    assert got["policy"]["compute_format"] == ref["policy"]["compute_format"]


def test_inf_on_one_rank_skips_on_every_rank(launches):
    ranks = launches.worker()
    for name in ("ddp_inf", "fsdp_inf"):
        a, b = (r[name] for r in ranks)
        assert a["actions"] == b["actions"] == ["stepped", "stepped", "skipped", "stepped", "stepped"], name
        assert a["scales"] == b["scales"] and a["scales"][3] == a["scales"][2] / 2  # backed off together
        assert a["params_identical"] and a["scales_identical"], name
        assert a["losses"] == b["losses"]  # the global mean, the same on every rank
        assert a["packets"] == [3] * 5  # one all-reduce per step: found-inf flag, loss flag, loss


def test_ddp_accumulation_reduces_once_per_optimizer_step(launches):
    for r in launches.worker():
        assert r["ddp_no_sync"] == {"allreduce_calls": 2, "optimizer_steps": 2, "params_identical": True}


def test_fsdp_honours_fp32_rules_in_forward(launches):
    for r in launches.worker():
        d = r["fsdp_dtypes"]
        assert d["seen"]["head"] == ["out:torch.float32", "torch.float32"]  # the rule: params and output fp32
        for name in ("blocks.0.0", "blocks.1.0"):
            assert d["seen"][name] == ["out:torch.bfloat16", "torch.bfloat16"]
        assert set(d["param_types"].values()) == {"DTensor"}  # sharded
        assert d["losses"][-1] < d["losses"][0] * 0.5


def test_localization_names_the_rank_that_went_nonfinite(launches):
    a, b = (r["train_localize"] for r in launches.worker())
    assert a["skipped"] == b["skipped"] == [{"step": 2, "reason": "nonfinite_loss", "loss_scale": 1.0}]
    loc = a["localizations"][0]
    assert loc["rank"] == 1 and loc["blamed"] == "lm_head" and loc["message"].startswith("rank 1 of 2:")
    assert a["localizations"] == b["localizations"]  # gathered: every rank decides alike
    assert a["still_initialized"]  # train() leaves a process group it did not create alone
    records = [json.loads(line) for line in (launches.root / "worker" / "run" / "monitor.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["world_size"] == 2 for r in records)
    assert records[1]["modules"]["lm_head"]["nonfinite_ranks"] == [1]


@pytest.mark.filterwarnings("ignore:fp16 on this CPU")
@pytest.mark.parametrize("mode", ["bf16-mixed", "fp16-mixed"])
def test_fsdp_trains_and_matches_ddp(launches, mode, tmp_path):
    out = launches.train(f"fsdp-{mode}", ["--strategy", "fsdp", "--precision", mode, *KEEP])
    got = json.loads((out / "train.json").read_text())
    assert got["distributed"]["strategy"] == "fsdp" and got["policy"]["fp32_modules"] == ["lm_head"]
    assert got["final_loss"] < got["first_loss"]
    # FSDP keeps all non-rule parameters in the low format during compute, so it matches
    # DDP within the format's rounding, not bit for bit (measured: bf16 2.6% against DDP
    # bf16, fp16 0.6% against one fp16 process). fp16 is compared with the DDP fp32 run
    # (launched anyway): a DDP fp16 reference would cost another slow fp16-on-CPU launch.
    ref = launches.ddp("bf16-mixed" if mode == "bf16-mixed" else "fp32")
    distance = _rel_update_distance(dist_checkpoint.load_model_state_dict(out / "ckpt"),
                                    dist_checkpoint.load_model_state_dict(ref / "ckpt"))
    assert distance <= 0.05, f"{mode}: FSDP vs DDP relative parameter distance {distance:.3g}"
    ddp_losses = json.loads((ref / "train.json").read_text())["losses"]
    assert got["losses"] == pytest.approx(ddp_losses, rel=1e-3)
    if mode == "bf16-mixed":  # the 2-rank sharded checkpoint resumes on one process (DCP reshards)
        ckpt = tmp_path / "ckpt"
        shutil.copytree(out / "ckpt", ckpt)
        resumed = mixprec.train(lm(**TINY, batch_size=BATCH), mixprec.policy_from_options(mode, ["lm_head"]),
                                steps=STEPS + 1, accumulate=2, clip_grad_norm=1.0, checkpoint_dir=ckpt, resume=True,
                                monitor_every=0, strategy="fsdp")
        assert resumed["resumed_from_step"] == STEPS and resumed["losses"][:STEPS] == got["losses"]
        assert resumed["losses"][STEPS] < got["losses"][0]


def _interesting(output: str) -> str:
    """torchrun's output without gloo's connection-retry noise, head and tail."""
    lines = [line for line in output.splitlines() if "debug_logger" not in line and "dcp_logger" not in line]
    text = "\n".join(lines)
    return text if len(text) < 8000 else text[:3000] + "\n...\n" + text[-5000:]


def _worker_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of the torchrun agent's worker processes (Linux /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env and "TORCHELASTIC_RESTART_COUNT" in env:
            out[int(env["RANK"])] = int(entry.name)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes through /proc")
def test_sigkill_one_rank_torchrun_restarts_and_the_run_finishes_equal(launches, tmp_path):
    reference = launches.ddp("fp32")
    ckpt = tmp_path / "ckpt"
    proc = _torchrun(["--strategy", "ddp", "--precision", "fp32", *KEEP, "--checkpoint-dir", str(ckpt),
                      "--checkpoint-every", "1", "--task-arg", "delay=0.25", "--json", str(tmp_path / "train.json")],
                     cwd=tmp_path, extra=["--max-restarts", "1"], task="tests.tasks.dist_tasks:slow_lm", popen=True)
    killed_at = None
    try:
        deadline = time.monotonic() + 180
        while killed_at is None and time.monotonic() < deadline and proc.poll() is None:
            pointer = dist_checkpoint.pointer_path(ckpt)
            step = json.loads(pointer.read_text())["step"] if pointer.exists() else 0
            if 1 <= step < STEPS - 2:
                pids = _worker_pids(proc.pid)
                if 1 in pids:
                    os.kill(pids[1], signal.SIGKILL)
                    killed_at = step
            time.sleep(0.05)
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at is not None, "the run finished (or failed) before a rank could be killed"
    assert proc.returncode == 0, f"killed rank 1 at step {killed_at}; torchrun rc {proc.returncode}:\n" + _interesting(output)
    got = json.loads((tmp_path / "train.json").read_text())
    assert got["resumed_from_step"] is not None and got["resumed_from_step"] >= killed_at
    assert got["steps"] == STEPS
    a = dist_checkpoint.load_model_state_dict(ckpt)
    b = dist_checkpoint.load_model_state_dict(reference / "ckpt")
    assert _max_diff(a, b) == 0.0  # bit-exact versus the uninterrupted run
    ref_losses = json.loads((reference / "train.json").read_text())["losses"]
    assert got["losses"] == ref_losses


def test_dcp_checkpoint_resumes_with_another_number_of_ranks(launches, tmp_path):
    reference = launches.ddp("fp32")
    ckpt = tmp_path / "ckpt"
    _torchrun(["--strategy", "ddp", "--precision", "fp32", *KEEP, "--checkpoint-dir", str(ckpt), "--steps", "3"],
              cwd=tmp_path)
    assert dist_checkpoint.load_meta(ckpt)["step"] == 3 and dist_checkpoint.load_meta(ckpt)["world_size"] == 2
    # Resume the 2-rank checkpoint on one process (a 1-rank group): same data position, same model.
    resumed = mixprec.train(lm(**TINY, batch_size=BATCH), mixprec.policy_from_options("fp32", ["lm_head"]),
                            steps=STEPS, accumulate=2, clip_grad_norm=1.0, checkpoint_dir=ckpt, resume=True,
                            monitor_every=0, strategy="ddp")
    assert resumed["resumed_from_step"] == 3
    diff = _max_diff(dist_checkpoint.load_model_state_dict(ckpt), dist_checkpoint.load_model_state_dict(reference / "ckpt"))
    assert diff <= 1e-6, diff
    ref_losses = json.loads((reference / "train.json").read_text())["losses"]
    assert resumed["losses"] == pytest.approx(ref_losses, rel=1e-5)
    assert len(list((ckpt / "dist").iterdir())) == 1  # older checkpoints are removed once replaced


def _readme_torchrun_commands() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"^```sh[ \t]*\n(.*?)^```", readme, re.DOTALL | re.MULTILINE)
    lines = [line.strip() for body in blocks for line in body.replace("\\\n", " ").splitlines()]
    # `VAR=value torchrun ...`: the command from torchrun on
    return [m.group(1) for line in lines if (m := re.match(r"^(?:\w+=\S*\s+)*(torchrun\s.*)$", line))]


def test_readme_torchrun_commands_parse():
    from torch.distributed.run import get_args_parser

    from mixprec.cli import build_parser

    commands = _readme_torchrun_commands()
    if not commands:
        pytest.skip("README.md has no torchrun command yet (the distributed section is pasted by hand)")
    assert any("--nnodes" in c and "--rdzv-endpoint" in c for c in commands), "no multi-node example"
    for command in commands:
        run_args = get_args_parser().parse_args(shlex.split(command)[1:])
        assert run_args.module and run_args.training_script == "mixprec", command
        args = build_parser().parse_args(run_args.training_script_args)
        assert args.command == "train" and args.strategy in ("ddp", "fsdp"), command
        mixprec.policy_from_options(args.precision, args.keep_fp32, args.policy, args.controller)
