"""A user's own data-parallel loop through the engine, run by torchrun in tests/test_distributed.py.

``torchrun --nproc-per-node 2 tests/tasks/dist_worker.py OUT_DIR`` runs the scenarios below
on every rank (gloo, CPU) and writes ``OUT_DIR/rank<r>.json`` with what each saw:

- ``ddp_inf``/``fsdp_inf``: fp16-mixed, an inf written into rank 1's (local) gradients
  only at step 3: every rank must skip that step, the loss scale must be the same on every
  rank at every step, and the parameters must stay identical across ranks.
- ``ddp_no_sync``: accumulate=2 under DDP: gradients are all-reduced once per optimizer
  step (counted with a DDP comm hook), not once per micro-batch.
- ``fsdp_dtypes``: bf16-mixed with an fp32 rule on ``head``: the parameter dtypes each
  module sees in its forward (bf16 outside the rule, fp32 inside).
- ``train_localize``: ``mixprec.train(..., strategy="ddp")`` inside this script's process
  group, on a task whose forward goes NaN on rank 1 only: both ranks skip the step and
  the localization (gathered from both ranks) names rank 1 and ``lm_head``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import mixprec
from mixprec import distributed

STEPS, INJECT_AT = 5, 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 16), nn.GELU()), nn.Sequential(nn.Linear(16, 16), nn.GELU())])
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
    return distributed.shard_batch((x, y), rank, world)


def _full_params(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        full = getattr(p, "full_tensor", None)
        out.append((full() if type(p).__name__ == "DTensor" else p).detach().clone().float())
    return out


def _same_across_ranks(tensors: list[torch.Tensor]) -> bool:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def inf_scenario(strategy: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = mixprec.Engine("fp16-mixed", strategy=strategy, clip_grad_norm=1.0)
    wrapped, opt = engine.setup(model, opt)
    actions, scales, losses = [], [], []
    packets = []  # the engine's own all-reduces (flags + loss): one per optimizer step
    real = distributed.all_reduce_sum
    distributed.all_reduce_sum = lambda t: (packets.append(t.numel()), real(t))[1]
    for step in range(1, STEPS + 1):
        x, y = _batch(step, rank, world)
        with engine.autocast():
            loss = nn.functional.cross_entropy(wrapped(x).float(), y)
        engine.backward(loss)
        if step == INJECT_AT and rank == 1:
            p = next(iter(model.parameters()))
            distributed.local_tensor(p.grad).view(-1)[0] = float("inf")  # this rank's shard only
        result = engine.step()
        actions.append(result.action)
        scales.append(result.loss_scale)
        losses.append(result.loss)
    distributed.all_reduce_sum = real
    return {"actions": actions, "scales": scales, "losses": losses, "final_scale": engine.loss_scale,
            "packets": packets,
            "params_identical": _same_across_ranks(_full_params(model)),
            "scales_identical": _same_across_ranks([torch.tensor(scales + [engine.loss_scale])])}


def no_sync_scenario() -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = mixprec.Engine("fp32", strategy="ddp", accumulate=2)
    wrapped, opt = engine.setup(model, opt)
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        fut = dist.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    wrapped.register_comm_hook(None, counting_hook)
    for step in range(1, 3):
        for micro in range(2):
            x, y = _batch(10 * step + micro, rank, world)
            with engine.autocast():
                loss = nn.functional.cross_entropy(wrapped(x), y)
            engine.backward(loss)
            engine.step()
    return {"allreduce_calls": len(calls), "optimizer_steps": engine.steps,
            "params_identical": _same_across_ranks(_full_params(model))}


def fsdp_dtypes_scenario() -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    policy = mixprec.policy_from_options("bf16-mixed", ["head"])
    engine = mixprec.Engine(policy, strategy="fsdp")
    wrapped, opt = engine.setup(model, opt)
    seen: dict[str, list[str]] = {}

    def hook(mod, args, output, name):
        own = list(mod.parameters(recurse=False))
        if own:
            seen[name] = sorted({str(p.dtype) for p in own} | {f"out:{output.dtype}"})

    for name, mod in model.named_modules():
        if name:
            mod.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
    losses = []
    for step in range(1, 9):
        x, y = _batch(1, rank, world)  # the same batch: the loss must fall
        with engine.autocast():
            loss = nn.functional.cross_entropy(wrapped(x).float(), y)
        engine.backward(loss)
        losses.append(engine.step().loss)
    sharded = {n: type(p).__name__ for n, p in model.named_parameters()}
    return {"seen": seen, "losses": losses, "param_types": sharded,
            "effective_fp32": engine.effective_policy()["fp32_modules"]}


def train_localize_scenario(out: Path) -> dict:
    from tests.tasks.dist_tasks import nan_lm

    task = nan_lm(rank=1, at_call=2, n_layer=1, d_model=32, n_head=2, seq_len=32, batch_size=4)
    result = mixprec.train(task, "bf16-mixed", steps=3, strategy="ddp", monitor_every=1,
                           run_dir=out / "run" if dist.get_rank() == 0 else out / f"unused{dist.get_rank()}")
    return {"skipped": result["skipped_steps"], "localizations": result["localizations"],
            "distributed": result["distributed"], "losses": result["losses"],
            "still_initialized": dist.is_initialized()}


def main() -> None:
    out = Path(sys.argv[1])
    info, _ = distributed.init("ddp", torch.device("cpu"))
    results = {
        "world_size": info.world_size,
        "ddp_inf": inf_scenario("ddp"),
        "fsdp_inf": inf_scenario("fsdp"),
        "ddp_no_sync": no_sync_scenario(),
        "fsdp_dtypes": fsdp_dtypes_scenario(),
        "train_localize": train_localize_scenario(out),
    }
    (out / f"rank{info.rank}.json").write_text(json.dumps(results, indent=1))
    distributed.shutdown(info)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main()
