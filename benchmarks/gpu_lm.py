"""The lm recipe at a GPU-sized configuration, in every precision the GPU runs.

Run by benchmarks/gpu.sh after ``mixprec probe``. For each of fp32, tf32, bf16-mixed,
fp16-mixed and fp8-mixed, one after the other (each its own model, so peak memory is its
own): build the lm recipe's model (12 layers, d_model 768, 12 heads, seq_len 1024, batch
16 by default), train ``--warmup`` steps untimed, then ``--steps`` timed steps through
mixprec's engine (it synchronizes with the GPU once per step, so each step's wall time is
the GPU's). Reported per precision:

- median step time and tokens/s (batch x seq_len / median step);
- model FLOP utilization: the FLOPs of one training step, counted once with
  ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward; attention counted in
  full, the causal mask not discounted), per median step, divided by (a) the bf16 matmul
  throughput ``mixprec probe`` measured on this GPU and (b) the datasheet's dense bf16
  peak for the GPU's name ("unknown" for a GPU not in the table below);
- peak memory: ``torch.cuda.max_memory_allocated`` over the precision's run;
- energy per step, where NVML is available (nvidia-ml-py): the GPU's total-energy counter
  (``nvmlDeviceGetTotalEnergyConsumption``) across the timed steps, divided by the steps.

A precision the hardware cannot run is skipped with the reason (tf32 needs sm_80, fp8
sm_89; neither exists on a CPU). On a CPU (``--smoke``, as gpu.sh runs it there) the model
is tiny and the numbers only show that the script works.

    python benchmarks/gpu_lm.py [--smoke] [--probe probe.json] [--json gpu.json] [--md gpu.md]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import mixprec
from mixprec.recipes.lm import lm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

PRECISIONS = ("fp32", "tf32", "bf16-mixed", "fp16-mixed", "fp8-mixed")
GPU_CONFIG = dict(n_layer=12, n_head=12, d_model=768, seq_len=1024, batch_size=16)
SMOKE_CONFIG = dict(n_layer=1, n_head=2, d_model=32, seq_len=32, batch_size=2)

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, matched
# in order against the GPU's name; anything else is "unknown".
DATASHEET_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", None),
    ("H100", 989.0),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),  # H200 SXM, GH200
    ("A100", 312.0),
)


def datasheet_peak(name: str | None) -> float | None:
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if name and key in name:
            return tflops
    return None


def can_run(precision: str, device: torch.device) -> str | None:
    """None if ``precision`` runs on ``device``, else why not."""
    if device.type != "cuda":
        if precision == "tf32":
            return "tf32 is a CUDA tensor-core mode (sm_80 or newer); not on a CPU"
        if precision == "fp8-mixed":
            return "fp8 matmuls need an NVIDIA GPU of compute capability >= 8.9; not on a CPU"
        return None
    cap = torch.cuda.get_device_capability(device)
    if precision == "tf32" and cap < (8, 0):
        return f"tf32 needs sm_80 or newer; this GPU is sm_{cap[0]}{cap[1]}"
    if precision == "fp8-mixed" and cap < (8, 9):
        return f"fp8 matmuls need sm_89 or newer; this GPU is sm_{cap[0]}{cap[1]}"
    return None


class Energy:
    """The GPU's total-energy counter through NVML, or None where there is none."""

    def __init__(self, device: torch.device) -> None:
        self.handle, self.why = None, None
        if device.type != "cuda":
            self.why = "no GPU"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            props = torch.cuda.get_device_properties(device)
            try:
                bus = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
                self.handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
            except Exception:  # noqa: BLE001 - older drivers: fall back to the index
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self.read_mj()
        except Exception as exc:  # noqa: BLE001 - no pynvml, no NVML, or no energy counter
            self.handle, self.why = None, f"NVML energy counter unavailable: {type(exc).__name__}: {exc}"

    def read_mj(self) -> int | None:
        if self.handle is None:
            return None
        import pynvml

        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))


def step_flops(task: mixprec.Task, device: torch.device) -> int:
    torch.manual_seed(0)
    model = task.build_model().to(device)
    batch = next(task.train_batches(0))
    with FlopCounterMode(display=False) as counter:
        task.loss(model, batch).backward()
    del model
    return int(counter.get_total_flops())


def run(task: mixprec.Task, precision: str, device: torch.device, steps: int, warmup: int,
        energy: Energy) -> dict[str, Any]:
    torch.manual_seed(0)
    model = task.build_model().to(device)
    engine = mixprec.Engine(precision, clip_grad_norm=1.0, device=device)
    engine.setup(model, task.build_optimizer(model))
    batches = task.train_batches(0)
    cuda = device.type == "cuda"

    def step() -> Any:
        batch = next(batches)
        with engine.autocast():
            loss = task.loss(model, batch)
        engine.backward(loss)
        return engine.step()  # one host synchronization: the step is done when this returns

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    e0 = energy.read_mj()
    times, skipped = [], 0
    for _ in range(steps):
        t0 = time.perf_counter()
        result = step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        skipped += bool(result.skipped)
    e1 = energy.read_mj()
    out = {"precision": precision, "steps": steps, "warmup": warmup, "skipped_steps": skipped,
           "step_s_median": statistics.median(times), "step_s_mean": statistics.fmean(times),
           "effective_policy": engine.effective_policy()["mode"],
           "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
           "energy_j_per_step": None if e0 is None or e1 is None else (e1 - e0) / 1000 / steps}
    del model, engine
    if cuda:
        torch.cuda.empty_cache()
    return out


def markdown(doc: dict[str, Any]) -> str:
    c = doc["config"]
    measured = doc.get("probe_bf16_tflops")
    sheet = doc.get("datasheet_bf16_tflops")
    head = (f"{doc['device_name']}: lm {c['n_layer']} layers, d_model {c['d_model']}, {c['n_head']} heads, "
            f"seq_len {c['seq_len']}, batch {c['batch_size']}; {doc['flops_per_step'] / 1e12:.3g} TFLOP per step "
            f"(counted); bf16 peak: measured {('%.4g TFLOP/s' % measured) if measured else 'n/a'} (probe), "
            f"datasheet {('%.0f TFLOP/s' % sheet) if sheet else 'unknown'}\n\n")
    rows = []
    for r in doc["results"]:
        if "skipped" in r or "error" in r:
            rows.append([r["precision"], "skipped" if "skipped" in r else "error", "", "", "", "", "",
                         r.get("skipped") or r.get("error")])
            continue
        rows.append([r["precision"], _common.fmt_ms(r["step_s_median"]), f"{r['tokens_per_s']:,.0f}",
                     "n/a" if r["mfu_measured_peak"] is None else f"{r['mfu_measured_peak']:.1%}",
                     "unknown" if r["mfu_datasheet_peak"] is None else f"{r['mfu_datasheet_peak']:.1%}",
                     _common.fmt_bytes(r["peak_memory_bytes"]),
                     "n/a" if r["energy_j_per_step"] is None else f"{r['energy_j_per_step']:.1f} J",
                     f"{r['steps']} steps" + (f", {r['skipped_steps']} skipped" if r["skipped_steps"] else "")])
    note = "" if doc.get("energy_note") is None else f"\nEnergy: {doc['energy_note']}\n"
    return head + _common.table(["precision", "step", "tokens/s", "MFU (probe bf16 peak)", "MFU (datasheet)",
                                 "peak memory", "energy/step", "note"], rows, right=(1, 2, 3, 4, 5, 6)) + "\n" + note


def main() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--probe", default=None, metavar="FILE", help="`mixprec probe --json` output for this device")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--md", default=None, metavar="FILE", help="write the Markdown table here too")
    args = p.parse_args()
    warnings.simplefilter("ignore")  # fp16 on a CPU, torchao's notices
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    small = args.smoke or device.type != "cuda"
    config = SMOKE_CONFIG if small else GPU_CONFIG
    steps = args.steps or (3 if small else 100 if not args.quick else 50)
    warmup = args.warmup or (1 if small else 10)
    task = lm(**config)
    probe_doc = json.loads(Path(args.probe).read_text()) if args.probe else None
    bf16 = (probe_doc or {}).get("matmul", {}).get("bf16", {})
    measured = bf16.get("tflops") if bf16.get("available") else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    sheet = datasheet_peak(name)
    flops = step_flops(task, device)
    energy = Energy(device)
    tokens = config["batch_size"] * config["seq_len"]
    results = []
    for precision in PRECISIONS:
        why = can_run(precision, device)
        if why is not None:
            results.append({"precision": precision, "skipped": why})
            continue
        print(f"{precision}: {warmup} warm-up + {steps} timed steps ...", file=sys.stderr, flush=True)
        try:
            r = run(task, precision, device, steps, warmup, energy)
        except Exception as exc:  # noqa: BLE001 - out of memory or a kernel missing: say so, go on
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results.append({"precision": precision, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        achieved = flops / r["step_s_median"] / 1e12
        r.update(tokens_per_s=tokens / r["step_s_median"], achieved_tflops=achieved,
                 mfu_measured_peak=achieved / measured if measured else None,
                 mfu_datasheet_peak=achieved / sheet if sheet else None)
        results.append(r)
    doc = _common.document("mixprec.bench.gpu_lm/1", args, str(device), device_name=name or "CPU (smoke: no GPU)",
                           config=config, flops_per_step=flops, tokens_per_step=tokens,
                           probe_bf16_tflops=measured, probe_measured_at=(probe_doc or {}).get("measured_at"),
                           datasheet_bf16_tflops=sheet, energy_note=energy.why, results=results)
    _common.write(doc, args.json)
    text = markdown(doc)
    if args.md:
        Path(args.md).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
