"""mixprec side by side with what a user would otherwise use, same model, same data.

The peers, each training the same model from the same initial weights on the same
batches, with gradient clipping at norm 1.0 (so every peer unscales before clipping):

    (a) torch.amp     the hand-written loop: autocast + GradScaler + unscale_ +
                      clip_grad_norm_ + step + update (GradScaler disabled unless fp16)
    (b) accelerate    Hugging Face Accelerate: Accelerator(mixed_precision=...), prepare,
                      accelerator.backward, accelerator.clip_grad_norm_
    (c) fabric        Lightning Fabric: Fabric(precision=...), setup, fabric.backward,
                      fabric.clip_gradients
    (d) mixprec       mixprec.Engine(mode, clip_grad_norm=1.0)

Models: the ``lm`` recipe and the Hugging Face BERT of the ``bert`` recipe, both at their
defaults. Precisions: fp32, bf16-mixed and fp16-mixed. All peers of one precision are
timed in one loop: one step of each per round, order rotated, warm-up rounds first; the
claim is the median per-round ratio to (a) with its 95% CI (benchmarks/_stats.py).
Accelerate keeps one global state per process, so precisions are measured one after the
other, each with a fresh Accelerator.

Native fp16 on a CPU without AVX512-FP16 is tens to hundreds of times slower than fp32: it
is timed with a few rounds only, and said so. A peer that cannot run a precision here is
skipped and says why (Accelerate does not autocast fp16 on a CPU; Fabric's
``precision="16-mixed"`` on a CPU silently becomes bf16, so fp16 goes through its
``MixedPrecision("16-mixed")`` plugin). A peer whose library is not installed is skipped
(``pip install -e '.[bench]'`` installs them).

Peak memory: each (model, precision, peer) trains 2 steps in a fresh process (see
benchmarks/_common.py): the peak resident set, and its rise over the process's resident
set before the model was built. On CUDA: ``torch.cuda.max_memory_allocated``. With
--quick, a precision this hardware runs slowly (native fp16 on most CPUs) gets no memory
runs: its tensors are the sizes bf16-mixed's are, and each run would take seconds a step.

    python benchmarks/peers.py [--quick | --smoke] [--models lm,bert] [--json peers.json]
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

import mixprec
from mixprec.environment import cpu_has_fast_fp16
from mixprec.recipes import RECIPES

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import _stats  # noqa: E402

CLIP = 1.0
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")
PEERS = ("torch.amp", "accelerate", "fabric", "mixprec")
AUTOCAST = {"fp32": None, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
REPO = Path(__file__).resolve().parent.parent


class Skip(Exception):
    """This peer cannot run this precision here; the message says why."""


# -- the models ----------------------------------------------------------------------------
def build_task(model: str, smoke: bool) -> tuple[mixprec.Task, str]:
    """(task, description) for "lm" or "bert", at the recipe's defaults (tiny with smoke)."""
    if model in RECIPES:
        info = RECIPES[model]
        kwargs = dict(info.tiny) if smoke else {}
        return info.factory(**kwargs), f"{model} recipe ({'tiny' if smoke else 'defaults'})"
    if model == "bert":  # the bert recipe is not in this checkout: the tests' HF BERT task
        sys.path.insert(0, str(REPO))
        from tests.tasks.hf_tasks import bert_task

        kwargs = dict(batch_size=4, seq_len=16) if smoke else {}
        return bert_task(**kwargs), "tests.tasks.hf_tasks:bert_task (no bert recipe here)" + (" (small)" if smoke else "")
    raise SystemExit(f"unknown model {model!r}: lm or bert")


# -- the peers -----------------------------------------------------------------------------
class TorchAmp:
    """(a) the loop a PyTorch user writes by hand."""

    def __init__(self, task: mixprec.Task, precision: str, device: str) -> None:
        self.task, self.device = task, device
        self.model = task.build_model().to(device)
        self.opt = task.build_optimizer(self.model)
        self.dtype = AUTOCAST[precision]
        self.scaler = torch.amp.GradScaler(device, enabled=self.dtype is torch.float16)

    def step(self, batch: Any) -> None:
        with torch.autocast(self.device, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss = self.task.loss(self.model, batch)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)


class Accelerate:
    """(b) Hugging Face Accelerate."""

    MIXED = {"fp32": "no", "bf16-mixed": "bf16", "fp16-mixed": "fp16"}

    def __init__(self, task: mixprec.Task, precision: str, device: str) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process otherwise
        GradientState._reset_state()
        self.task = task
        self.acc = Accelerator(mixed_precision=self.MIXED[precision], cpu=device == "cpu")
        if precision != "fp32" and not self.acc.native_amp:
            raise Skip(f"Accelerator(mixed_precision={self.MIXED[precision]!r}) on {device} does not autocast "
                       "(native_amp is False): it would train in fp32")
        model = task.build_model()
        self.model, self.opt = self.acc.prepare(model, task.build_optimizer(model))

    def step(self, batch: Any) -> None:
        loss = self.task.loss(self.model, batch)
        self.acc.backward(loss)
        self.acc.clip_grad_norm_(self.model.parameters(), CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class Fabric:
    """(c) Lightning Fabric."""

    NAMES = {"fp32": "32-true", "bf16-mixed": "bf16-mixed", "fp16-mixed": "16-mixed"}

    def __init__(self, task: mixprec.Task, precision: str, device: str) -> None:
        from lightning_fabric import Fabric as _Fabric
        from lightning_fabric.plugins.precision import MixedPrecision

        logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
        self.task, self.note = task, None
        wanted = self.NAMES[precision]
        fabric = _Fabric(accelerator=device, devices=1, precision=wanted)
        got = getattr(fabric._precision, "precision", None)
        if got != wanted:
            # Fabric(precision="16-mixed") on a CPU becomes bf16-mixed; ask its plugin directly.
            self.note = f"Fabric(precision={wanted!r}) gives {got!r} here; used MixedPrecision({wanted!r}) instead"
            scaler = torch.amp.GradScaler(device)
            fabric = _Fabric(accelerator=device, devices=1, plugins=MixedPrecision(wanted, device, scaler=scaler))
        self.fabric = fabric
        model = task.build_model()
        self.model, self.opt = fabric.setup(model, task.build_optimizer(model))

    def step(self, batch: Any) -> None:
        loss = self.task.loss(self.model, batch)
        self.fabric.backward(loss)
        self.fabric.clip_gradients(self.model, self.opt, max_norm=CLIP, error_if_nonfinite=False)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class Mixprec:
    """(d) mixprec's engine."""

    def __init__(self, task: mixprec.Task, precision: str, device: str) -> None:
        self.task = task
        self.model = task.build_model().to(device)
        self.engine = mixprec.Engine(precision, clip_grad_norm=CLIP, device=device)
        self.engine.setup(self.model, task.build_optimizer(self.model))

    def step(self, batch: Any) -> None:
        with self.engine.autocast():
            loss = self.task.loss(self.model, batch)
        self.engine.backward(loss)
        self.engine.step()


CLASSES = {"torch.amp": TorchAmp, "accelerate": Accelerate, "fabric": Fabric, "mixprec": Mixprec}
LIBRARY = {"accelerate": "accelerate", "fabric": "lightning_fabric"}


def installed(peer: str) -> str | None:
    """None if the peer can be imported, else why not."""
    lib = LIBRARY.get(peer)
    if lib is None or importlib.util.find_spec(lib) is not None:
        return None
    return f"{lib} is not installed (pip install -e '.[bench]')"


def build(peer: str, task: mixprec.Task, precision: str, device: str) -> Any:
    torch.manual_seed(0)  # the same initial weights for every peer
    return CLASSES[peer](task, precision, device)


# -- peak memory, one fresh process per run ------------------------------------------------
def memory_run(model: str, peer: str, precision: str, smoke: bool, device: str) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    task, _ = build_task(model, smoke)
    batches = task.train_batches(0)
    first = [next(batches), next(batches)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = _common.rss_now()
    reset = _common.reset_peak_rss()
    loop = build(peer, task, precision, device)
    for batch in first:
        loop.step(batch)
    out = {"peak_rss_bytes": _common.peak_rss(), "rss_start_bytes": start, "peak_reset": reset}
    out["rss_rise_bytes"] = out["peak_rss_bytes"] - start if start is not None else None
    if device == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


# -- the measurement -----------------------------------------------------------------------
def measure(model: str, precision: str, rounds: int, warmup: int, smoke: bool, device: str,
            with_memory: bool) -> dict[str, Any]:
    task, described = build_task(model, smoke)
    loops: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    notes: dict[str, str] = {}
    for peer in PEERS:
        why = installed(peer)
        if why is None:
            try:
                loops[peer] = build(peer, task, precision, device)
                if getattr(loops[peer], "note", None):
                    notes[peer] = loops[peer].note
            except Skip as exc:
                why = str(exc)
            except ImportError as exc:  # installed but broken
                why = f"{LIBRARY[peer]} does not import: {exc}"
        if why is not None:
            skipped[peer] = why
    sync = torch.cuda.synchronize if device == "cuda" else None
    times = _stats.interleave({p: loop.step for p, loop in loops.items()}, task.train_batches(0), rounds, warmup,
                              sync=sync)
    base = loops["torch.amp"].model
    rows = []
    for peer in PEERS:
        row: dict[str, Any] = {"peer": peer, "precision": precision}
        if peer in skipped:
            row.update(skipped=skipped[peer])
            rows.append(row)
            continue
        row["note"] = notes.get(peer)
        row["step_s"] = _stats.summary(times[peer])
        row["ratio_to_torch_amp"] = _stats.ratio(times[peer], times["torch.amp"])
        row["params_equal_to_torch_amp"] = all(
            torch.equal(a.detach().float().cpu(), b.detach().float().cpu())
            for a, b in zip(base.parameters(), loops[peer].model.parameters()))
        rows.append(row)
    # mixprec against each peer directly (its own per-round ratios, not a ratio of ratios).
    versus = {p: _stats.ratio(times["mixprec"], times[p]) for p in loops if p != "mixprec"}
    if with_memory:
        for row in rows:
            if "skipped" not in row:
                row["memory"] = _common.fresh_process(memory_run, model, row["peer"], precision, smoke, device,
                                                      preload=PRELOAD)
    del loops
    return {"model": model, "task": described, "precision": precision, "rounds": rounds, "warmup": warmup,
            "memory_measured": with_memory, "rows": rows, "mixprec_versus": versus}


# (rounds, warm-up rounds) by size, model and whether the precision is slow here (native fp16
# on a CPU without AVX512-FP16). BERT's step is several times lm's, so --quick gives it
# fewer rounds (its interval is wider, and says so) to stay within run_all's 10 minutes.
ROUNDS = {
    "full": {("lm", False): (60, 5), ("lm", True): (8, 1), ("bert", False): (60, 5), ("bert", True): (3, 1)},
    "quick": {("lm", False): (60, 5), ("lm", True): (4, 1), ("bert", False): (20, 2), ("bert", True): (1, 1)},
    "smoke": {("lm", False): (2, 1), ("lm", True): (1, 1), ("bert", False): (2, 1), ("bert", True): (1, 1)},
}

PRELOAD = ("torch", "mixprec", "mixprec.engine", "transformers", "accelerate", "lightning_fabric")


def markdown(doc: dict[str, Any]) -> str:
    out = []
    for model in doc["models"]:
        groups = [g for g in doc["results"] if g["model"] == model]
        if not groups:
            continue
        out.append(f"**{model}**: {groups[0]['task']}; rounds per precision: "
                   + ", ".join(f"{g['precision']} {g['rounds']}" for g in groups) + "\n")
        rows = []
        for g in groups:
            for r in g["rows"]:
                if "skipped" in r:
                    rows.append([g["precision"], r["peer"], "skipped", "", "", "", "", r["skipped"]])
                    continue
                mem = r.get("memory") or {}
                if not mem and not r.get("note") and g.get("memory_measured") is False:
                    r = {**r, "note": "memory not measured (slow precision here, --quick)"}
                peak = "n/a" if not mem or "error" in mem else _common.fmt_bytes(
                    mem.get("cuda_max_allocated_bytes") or mem["peak_rss_bytes"])
                rise = "n/a" if not mem or "error" in mem or mem.get("rss_rise_bytes") is None else \
                    _common.fmt_bytes(mem["rss_rise_bytes"])
                note = r.get("note") or (mem.get("error") if mem and "error" in mem else "")
                rows.append([g["precision"], r["peer"], _common.fmt_ms(r["step_s"]["median"]),
                             _common.fmt_ci(r["ratio_to_torch_amp"]), peak, rise,
                             "yes" if r["params_equal_to_torch_amp"] else "no", note])
        out.append(_common.table(["precision", "peer", "step", "x torch.amp [95% CI]", "peak RSS", "RSS rise",
                                  "params = (a)", "note"], rows, right=(2, 4, 5)))
        out.append("")
        vrows = []
        for g in groups:
            for peer, s in g["mixprec_versus"].items():
                lo, hi = s["ci95"]
                verdict = "faster" if hi < 1 else "slower" if lo > 1 else "no measurable difference"
                target = ("<= 1.02: " + ("met" if s["median"] <= 1.02 else "MISSED")) if peer == "torch.amp" else \
                    ("no slower: " + ("met" if lo <= 1.0 else "MISSED"))
                if not _common.judgeable(s):
                    verdict, target = f"too few rounds to tell ({s['rounds']})", "n/a"
                vrows.append([g["precision"], f"mixprec / {peer}", _common.fmt_ci(s), verdict, target])
        out.append(_common.table(["precision", "step-time ratio", "median [95% CI]", "verdict", "target"], vrows))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--models", default="lm,bert")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak memory runs")
    args = p.parse_args()
    warnings.simplefilter("ignore")  # fp16-on-CPU and the peers' own notices
    size = _common.size(args)
    fast_fp16 = args.device == "cuda" or cpu_has_fast_fp16()
    results = []
    models = args.models.split(",")
    for model in models:
        for precision in args.precisions.split(","):
            slow = precision == "fp16-mixed" and not fast_fp16
            n, warmup = ROUNDS[size][model, slow] if args.rounds is None else (args.rounds, 1 if slow else 5)
            print(f"{model} {precision}: {warmup} warm-up + {n} rounds ...", file=sys.stderr, flush=True)
            # --smoke measures memory for the first precision only, --quick not in slow fp16 (each
            # run is a process, a slow-fp16 step takes seconds here, and fp16-mixed holds the same
            # tensor sizes as bf16-mixed): that keeps run_all --quick within its 10 minutes.
            memory = not args.no_memory and (precision == "fp32" if size == "smoke" else
                                             not (size == "quick" and slow))
            results.append(measure(model, precision, n, warmup, size == "smoke", args.device, memory))
    doc = _common.document("mixprec.bench.peers/1", args, args.device, models=models, clip_grad_norm=CLIP,
                           fp16_is_slow_here=not fast_fp16, results=results,
                           versions={m: _version(m) for m in ("torch", "accelerate", "lightning_fabric", "mixprec")})
    _common.write(doc, args.json)
    print(markdown(doc))
    return 0


def _version(module: str) -> str | None:
    with contextlib.suppress(Exception):
        import importlib.metadata

        return importlib.metadata.version(module.replace("_", "-"))
    return None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
