"""`mixprec ...`: a thin layer that parses, calls one run, prints, and sets the exit code.

Exit codes: 0 success, 1 the run finished but failed (diverged), 2 bad usage or input
(one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from mixprec import jsonio
from mixprec.errors import UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem, then exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from mixprec import __version__
    from mixprec.policy import CONTROLLERS

    parser = _Parser(prog="mixprec", description="Safe, automatic and measured mixed-precision training for PyTorch.")
    parser.add_argument("--version", action="version", version=f"mixprec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    d = sub.add_parser("demo", help="the main job: probe, autotune and verify the default recipe against fp32; one table")
    d.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                   help="verify steps (default 100, 12 with --quick; at least 10)")
    d.add_argument("--quick", action="store_true", help="a tiny lm, the quick probe and short runs (seconds)")
    d.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the lm recipe (repeatable; with --quick, over the tiny config)")
    d.add_argument("--batch-size", type=_positive_int, default=None, metavar="B")
    d.add_argument("--report", default="mixprec-demo", metavar="DIR",
                   help="write report.json, report.md, report.html and demo.json here (default mixprec-demo)")
    d.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    d.add_argument("--json", default=None, metavar="FILE", help="write the mixprec.demo/1 document (- for stdout)")
    d.set_defaults(handler=_cmd_demo)

    t = sub.add_parser("train", help="train a task under a precision policy")
    t.add_argument("task", nargs="?", default=None, metavar="TASK",
                   help="a recipe name (see `mixprec recipes`; default lm) or package.module:function returning a mixprec.Task")
    t.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the task function (repeatable)")
    t.add_argument("--precision", default=None, metavar="P",
                   help="fp32, tf32, fp16-mixed, bf16-mixed, fp16-true, bf16-true or an alias (default fp32, or the --policy file's mode)")
    t.add_argument("--keep-fp32", action="append", default=[], metavar="PATTERN[,PATTERN]",
                   help="keep modules in fp32: a qualified-name glob (lm_head, blocks.*.attn) or type:ClassName")
    t.add_argument("--policy", default=None, metavar="FILE", help="a policy YAML/JSON file")
    t.add_argument("--steps", type=_positive_int, default=100, metavar="N", help="optimizer steps (default 100)")
    t.add_argument("--batch-size", type=_positive_int, default=None, metavar="B",
                   help="batch size (passed to the task function as batch_size)")
    t.add_argument("--accumulate", type=_positive_int, default=1, metavar="K", help="micro-batches per optimizer step")
    t.add_argument("--clip-grad-norm", type=_positive_float, default=None, metavar="X", help="clip the gradient norm (after unscaling)")
    t.add_argument("--seed", type=int, default=0, metavar="S")
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    t.add_argument("--strategy", default="none", choices=("none", "ddp", "fsdp"),
                   help="data parallel under torchrun: ddp or fsdp (FSDP2); --batch-size is then the global batch, "
                        "split across ranks (default none: one process)")
    t.add_argument("--checkpoint-dir", default=None, metavar="DIR")
    t.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="N",
                   help="checkpoint every N steps (and always at the end) when --checkpoint-dir is set")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    t.add_argument("--monitor-every", type=_nonnegative_int, default=None, metavar="N",
                   help="sample per-module numerics every N steps (default 50; 0 = off); non-finite steps are always localized")
    t.add_argument("--monitor-formats", default=None, metavar="FMT[,FMT]",
                   help="extra formats to measure ranges against (e.g. fp16,fp8_e4m3: how would this run look in them?)")
    t.add_argument("--controller", default=None, choices=CONTROLLERS,
                   help="how precision changes per module during training (default static, or the --policy file's)")
    t.add_argument("--run-dir", default=None, metavar="DIR",
                   help="write monitor.jsonl and train.json here (read them with `mixprec inspect DIR`)")
    t.add_argument("--tensorboard", default=None, metavar="DIR", help="write TensorBoard event files of the monitor here")
    _add_autotune_flags(t, prefix="with --precision auto: ")
    t.add_argument("--json", default=None, metavar="FILE", help="write the mixprec.train/1 result (- for stdout)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(handler=_cmd_train)

    f = sub.add_parser("formats", help="the number formats and their limits")
    f.add_argument("--json", default=None, metavar="FILE")
    f.set_defaults(handler=_cmd_formats)

    v = sub.add_parser("verify", help="verify a precision against an fp32 reference, with a verdict")
    v.add_argument("task", nargs="?", default=None, metavar="TASK", help="a recipe name or package.module:function")
    v.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--batch-size", type=_positive_int, default=None, metavar="B")
    v.add_argument("--precision", default=None, metavar="P",
                   help="the candidate precision (with --inference: a comma-separated list)")
    v.add_argument("--all", action="store_true",
                   help="the parity table: every recipe (or --recipes) in every --precisions against fp32")
    v.add_argument("--precisions", default=None, metavar="P[,P]",
                   help="with --all: the candidates (default bf16-mixed,fp16-mixed; also fp8-mixed)")
    v.add_argument("--recipes", default=None, metavar="NAME[,NAME]", help="with --all: a subset of the recipes")
    v.add_argument("--tiny", action="store_true", help="with --all: each recipe at its tiny test size (seconds)")
    v.add_argument("--emulate", default="auto", choices=("auto", "always", "never"),
                   help="with --all: run a precision this hardware runs slowly emulated (auto, the probe decides)")
    v.add_argument("--inference", action="store_true",
                   help="compare the model's outputs per precision against fp32 instead of training runs")
    v.add_argument("--keep-fp32", action="append", default=[], metavar="PATTERN[,PATTERN]")
    v.add_argument("--policy", default=None, metavar="FILE", help="the candidate's policy file")
    v.add_argument("--controller", default=None, choices=CONTROLLERS)
    v.add_argument("--reference", default="fp32", metavar="P", help="the reference precision (default fp32)")
    v.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                   help="optimizer steps (default 60; with --all each recipe's own)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--noise-floor", action="store_true",
                   help="also run the reference under seed+1 and judge relative to fp32's own drift")
    v.add_argument("--loss-tolerance", type=_positive_float, default=0.02, metavar="X")
    v.add_argument("--metric-tolerance", type=_positive_float, default=0.02, metavar="X")
    v.add_argument("--noise-multiple", type=_positive_float, default=3.0, metavar="K")
    v.add_argument("--device", default="cpu")
    v.add_argument("--report", default=None, metavar="DIR", help="write report.json, report.md and report.html here")
    v.add_argument("--force", action="store_true", help="write --report into a directory that holds other files")
    v.add_argument("--json", default=None, metavar="FILE")
    v.set_defaults(handler=_cmd_verify)

    pr = sub.add_parser("probe", help="what this machine's hardware does fast, and what it does badly")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (a few seconds)")
    pr.add_argument("--refresh", action="store_true", help="measure again instead of using the cached result")
    pr.add_argument("--json", default=None, metavar="FILE")
    pr.set_defaults(handler=_cmd_probe)

    a = sub.add_parser("autotune", help="pick the fastest policy whose error stays within a budget")
    a.add_argument("task", nargs="?", default=None, metavar="TASK", help="a recipe name or package.module:function")
    a.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE")
    a.add_argument("--batch-size", type=_positive_int, default=None, metavar="B")
    _add_autotune_flags(a)
    a.add_argument("-o", "--output", default=None, metavar="POLICY.yaml", help="write the chosen policy here")
    a.add_argument("--device", default="cpu")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--json", default=None, metavar="FILE")
    a.set_defaults(handler=_cmd_autotune)

    rp = sub.add_parser("report", help="re-render a verify report's HTML and Markdown from its report.json")
    rp.add_argument("report_dir", metavar="DIR")
    rp.set_defaults(handler=_cmd_report)

    i = sub.add_parser("inspect", help="a run's numerics summary and the controller's decisions")
    i.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `mixprec train --run-dir`")
    i.add_argument("--top", type=_positive_int, default=5, metavar="K", help="rows per ranking (default 5)")
    i.add_argument("--json", default=None, metavar="FILE")
    i.set_defaults(handler=_cmd_inspect)

    r = sub.add_parser("recipes", help="the built-in tasks")
    r.add_argument("--json", default=None, metavar="FILE")
    r.set_defaults(handler=_cmd_recipes)
    return parser


# Import-time chatter of dependencies that says nothing about the user's run: torchao
# (imported by transformers too) announcing CUDA-only kernels a CPU build cannot load, and
# torch's deprecation notice about torchao's pytree registration.
_QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def _add_autotune_flags(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument("--candidates", default=None, metavar="MODE[,MODE]",
                        help=f"{prefix}modes autotune may choose (default bf16-mixed,fp16-mixed,fp8-mixed)")
    parser.add_argument("--budget", type=_positive_float, default=0.02, metavar="X",
                        help=f"{prefix}tolerated relative loss error versus fp32 (default 0.02)")


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:  # the user's own logging config wins
            logger.setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or EXIT_OK)
    except UsageError as exc:
        sys.stderr.write(f"mixprec {args.command}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("mixprec: interrupted\n")
        return 130


# -- output helpers ----------------------------------------------------------------------
def _check_json_target(target: str | None) -> None:
    """Fail before the run, not after it, when the --json file cannot be written."""
    if target is None or target == "-":
        return
    parent = Path(target).resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"--json {target!r}: directory {str(parent)!r} does not exist or is not writable")
    if Path(target).is_dir():
        raise UsageError(f"--json {target!r} is a directory; give a file name")


def _write_json(target: str | None, document: dict[str, Any]) -> None:
    if target is None:
        return
    text = jsonio.dumps(document)
    if target == "-":
        sys.stdout.write(text)
    else:
        jsonio.write_atomic(target, text)


# -- commands -----------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    from mixprec.demo import render_demo, run_demo
    _check_json_target(args.json)
    task_args = _task_args(args)
    out = sys.stderr if args.json == "-" else sys.stdout
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fp16 on this CPU")  # autotune measures fp16 and says so itself
        warnings.showwarning = lambda m, *a, **k: sys.stderr.write(f"mixprec: warning: {m}\n")
        doc = run_demo(steps=args.steps, quick=args.quick, report_dir=args.report, task_args=task_args or None,
                       device=args.device, log=lambda line: sys.stderr.write(f"demo: {line}\n"))
    _write_json(args.json, doc)
    out.write(render_demo(doc) + "\n")
    return EXIT_OK if doc["verdict"] == "PASS" else EXIT_FAILED


def _cmd_train(args: argparse.Namespace) -> int:
    from mixprec.distributed import check_strategy, launch_rank
    from mixprec.policy import policy_from_options
    from mixprec.runs.train import train
    from mixprec.taskref import load_task

    check_strategy(args.strategy)
    main_rank = launch_rank() == 0  # under torchrun only rank 0 prints and writes --json
    if main_rank:
        _check_json_target(args.json)
    auto = args.precision is not None and args.precision.strip().lower() == "auto"
    if auto and args.strategy != "none":
        raise UsageError("--precision auto with --strategy: autotune on one process first "
                         "(mixprec autotune ... --output policy.yaml), then train with --policy policy.yaml")
    if not auto:
        policy = policy_from_options(args.precision, args.keep_fp32, args.policy, args.controller)
    task_args = _task_args(args)
    task = load_task(args.task, task_args)
    out = sys.stderr if args.json == "-" else sys.stdout
    if auto:
        from mixprec.autotune import cached_autotune, render_autotune
        from mixprec.policy import Policy, replace_mode_and_rules

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fp16 on a CPU is slow: autotune measures and says so itself
            doc = cached_autotune(task, args.task or "lm", task_args, device=args.device, candidates=args.candidates,
                                  budget=args.budget, log=lambda line: sys.stderr.write(f"autotune: {line}\n"))
        out.write(render_autotune(doc) + "\n")
        if doc.get("cached"):
            out.write(f"(autotune result cached in {doc['cached']})\n")
        chosen = Policy.from_dict(doc["policy"])
        policy = replace_mode_and_rules(policy_from_options(None, args.keep_fp32, args.policy, args.controller), chosen)
        out.write(f"precision auto -> {policy.mode}" + (f", fp32: {', '.join(map(str, policy.rules))}" if policy.rules else "") + "\n")

    from mixprec.progress import TrainProgress

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda m, *a, **k: sys.stderr.write(f"mixprec: warning: {m}\n")
        with TrainProgress(task.name, args.steps, enabled=main_rank and not args.no_progress) as progress:
            result = train(
                task, policy, steps=args.steps, accumulate=args.accumulate, clip_grad_norm=args.clip_grad_norm,
                seed=args.seed, device=args.device, checkpoint_dir=args.checkpoint_dir,
                checkpoint_every=args.checkpoint_every, resume=args.resume, monitor_every=args.monitor_every,
                monitor_formats=_split(args.monitor_formats), run_dir=args.run_dir, tensorboard=args.tensorboard,
                on_step=progress.update if main_rank else None, strategy=args.strategy,
            )
    if main_rank:
        _write_json(args.json, result)
        out.write(summary(result) + "\n")
    return EXIT_OK if result["status"] == "completed" else EXIT_FAILED


def _task_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--task-arg key=value`` pairs, with ``--batch-size`` as ``batch_size``."""
    from mixprec.taskref import parse_task_args

    task_args = parse_task_args(args.task_arg)
    if args.batch_size is not None:
        task_args["batch_size"] = args.batch_size
    return task_args


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def summary(result: dict[str, Any]) -> str:
    """The closing lines of `mixprec train`."""
    p = result["policy"]
    fp32 = f", fp32: {', '.join(p['fp32_modules'])}" if p["fp32_modules"] else ""
    n_skipped = len(result["skipped_steps"])
    lines = [
        f"mixprec train {result['task']}: {p['mode']}{fp32} - {result['steps']} steps "
        f"({result['optimizer_steps']} applied, {n_skipped} skipped) in {result['wall_time_s']:.1f} s",
    ]
    if result["first_loss"] is not None:
        lines.append(f"  loss {result['first_loss']:.4f} -> {result['final_loss']:.4f}")
    if result["eval"]:
        lines.append("  eval " + "  ".join(f"{k} {v:.4g}" for k, v in result["eval"].items()))
    step_time = result["step_time_s"]
    lines.append(
        f"  step time {step_time * 1000:.1f} ms (median)  peak memory {result['peak_memory_bytes'] / 2**20:.0f} MiB"
        f"  loss scale {result['loss_scale']:g}"
    )
    if result["resumed_from_step"] is not None:
        lines.append(f"  resumed from step {result['resumed_from_step']}")
    dist = result.get("distributed")
    if dist:
        lines.append(f"  data parallel: {dist['strategy']} over {dist['world_size']} rank(s) ({dist['backend']}), "
                     "the loss is the mean over ranks")
    share = result.get("low_precision_flop_share")
    if share is not None and p["mode"] not in ("fp32", "tf32"):
        low = "fp8_e4m3 or bf16" if p["mode"] == "fp8-mixed" else p["compute_format"]
        lines.append(f"  matmul FLOPs in low precision ({low}): {share:.0%}")
    locs = result.get("localizations") or []
    if locs:
        more = f" (and {len(locs) - 1} more non-finite steps)" if len(locs) > 1 else ""
        lines.append(f"  step {locs[0]['step']}: {locs[0]['message'].splitlines()[0]}{more}")
    decisions = result.get("decisions") or []
    if decisions:
        lines.append(f"  controller {result['controller']}: {len(decisions)} decisions; now in fp32: "
                     f"{', '.join(p.get('controller_fp32_modules') or []) or ('everything' if p.get('all_fp32') else 'none')}")
    if result["status"] != "completed":
        lines.append(f"  DIVERGED: {result['diagnosis']}")
    return "\n".join(lines)


def _cmd_verify(args: argparse.Namespace) -> int:
    from mixprec.policy import parse_policy, policy_from_options
    from mixprec.runs.verify import render_verify, verify
    from mixprec.taskref import load_task

    _check_json_target(args.json)
    if args.all:
        return _verify_all(args)
    for flag, value in (("--precisions", args.precisions), ("--recipes", args.recipes),
                        ("--tiny", args.tiny or None)):
        if value is not None:
            raise UsageError(f"{flag} goes with --all (the parity table); for one task use --precision")
    if args.precision is None:
        raise UsageError("verify needs --precision P (the candidate), or --all for the parity table")
    if args.steps is None:
        args.steps = 60
    if args.inference:
        return _verify_inference(args)
    candidate = policy_from_options(args.precision, args.keep_fp32, args.policy, args.controller)
    reference = parse_policy(args.reference)
    from mixprec.report import prepare_report_dir

    report_dir = prepare_report_dir(args.report, force=args.force) if args.report else None
    task_args = _task_args(args)
    task = load_task(args.task, task_args)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda m, *a, **k: sys.stderr.write(f"mixprec: warning: {m}\n")
        doc = verify(task, candidate, reference=reference, steps=args.steps, seed=args.seed,
                     noise_floor=args.noise_floor, loss_tolerance=args.loss_tolerance,
                     metric_tolerance=args.metric_tolerance, noise_multiple=args.noise_multiple, device=args.device)
    if report_dir is not None:
        from mixprec.report import write_report

        write_report(doc, report_dir)
    _write_json(args.json, doc)
    out = sys.stderr if args.json == "-" else sys.stdout
    out.write(render_verify(doc) + "\n")
    if report_dir is not None:
        out.write(f"report: {report_dir / 'report.html'} (and report.md, report.json)\n")
    return EXIT_OK if doc["verdict"] == "PASS" else EXIT_FAILED


def _verify_all(args: argparse.Namespace) -> int:
    from mixprec.runs.parity import render_summary, verify_all

    for flag, given in (("TASK", args.task), ("--precision", args.precision), ("--inference", args.inference or None),
                        ("--keep-fp32", args.keep_fp32 or None), ("--policy", args.policy),
                        ("--controller", args.controller), ("--task-arg", args.task_arg or None),
                        ("--batch-size", args.batch_size)):
        if given is not None:
            raise UsageError(f"verify --all runs the built-in recipes at their own settings; drop {flag} "
                             "(use --recipes and --precisions to choose)")
    if args.reference != "fp32":
        raise UsageError(f"verify --all compares against fp32; --reference {args.reference!r} is not supported there")
    from mixprec.report import prepare_report_dir

    report_dir = prepare_report_dir(args.report, force=args.force) if args.report else None
    out = sys.stderr if args.json == "-" else sys.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every row says what ran (emulated or native)
        doc = verify_all(args.recipes, args.precisions, size="tiny" if args.tiny else "default", steps=args.steps,
                         seed=args.seed, emulate=args.emulate, device=args.device, report_dir=report_dir,
                         log=lambda line: (out.write(line + "\n"), out.flush()))
    doc["command"] = _parity_command(args)
    if report_dir is not None:
        from mixprec.runs.parity import write_table

        write_table(doc, report_dir)
    _write_json(args.json, doc)
    out.write(render_summary(doc) + "\n")
    if report_dir is not None:
        out.write(f"report: {report_dir / 'index.html'} (and results.md, one report per recipe and precision)\n")
    return EXIT_OK if doc["verdict"] == "PASS" else EXIT_FAILED


def _parity_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this parity table (for docs/results.md)."""
    parts = ["mixprec", "verify", "--all"]
    for flag, value in (("--recipes", args.recipes), ("--precisions", args.precisions), ("--steps", args.steps)):
        if value is not None:
            parts += [flag, str(value)]
    if args.tiny:
        parts.append("--tiny")
    if args.seed:
        parts += ["--seed", str(args.seed)]
    if args.emulate != "auto":
        parts += ["--emulate", args.emulate]
    if args.device != "cpu":
        parts += ["--device", args.device]
    return " ".join(shlex.quote(p) for p in parts)


def _verify_inference(args: argparse.Namespace) -> int:
    from mixprec.policy import policy_from_options
    from mixprec.runs.inference import render_inference, verify_inference
    from mixprec.taskref import load_task

    policies = [policy_from_options(p, args.keep_fp32) for p in _split(args.precision) or []]
    task_args = _task_args(args)
    task = load_task(args.task, task_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 on a CPU is slow; inference verification measures numerics
        doc = verify_inference(task, policies, steps=args.steps, seed=args.seed, device=args.device)
    _write_json(args.json, doc)
    (sys.stderr if args.json == "-" else sys.stdout).write(render_inference(doc) + "\n")
    return EXIT_OK if all(r["finite"] for r in doc["precisions"]) else EXIT_FAILED


def _cmd_report(args: argparse.Namespace) -> int:
    from mixprec.report import rerender

    paths = rerender(args.report_dir)
    print(f"re-rendered {paths['html']} and {paths['md']}")
    return EXIT_OK


def _cmd_probe(args: argparse.Namespace) -> int:
    from mixprec.probe import probe, render_probe

    _check_json_target(args.json)
    doc = probe(args.device, quick=args.quick, refresh=args.refresh)
    if args.json != "-":
        print(render_probe(doc))
    _write_json(args.json, doc)
    return EXIT_OK


def _cmd_autotune(args: argparse.Namespace) -> int:
    from mixprec.autotune import autotune, parse_candidates, render_autotune
    from mixprec.policy import Policy
    from mixprec.taskref import load_task

    _check_json_target(args.json)
    candidates = parse_candidates(args.candidates)
    if args.output is not None:
        _check_json_target(args.output)
    task_args = _task_args(args)
    task = load_task(args.task, task_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 on a CPU is slow: autotune measures and says so itself
        doc = autotune(task, candidates=candidates, budget=args.budget, seed=args.seed, device=args.device,
                       log=lambda line: sys.stderr.write(f"autotune: {line}\n"))
    if args.json != "-":
        print(render_autotune(doc))
    if args.output is not None:
        Policy.from_dict(doc["policy"]).save(args.output)
        if args.json != "-":
            print(f"policy written to {args.output} (train with --policy {args.output})")
    _write_json(args.json, doc)
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from mixprec.inspection import inspect_run, render_inspection

    _check_json_target(args.json)
    report = inspect_run(args.run_dir, top=args.top)
    if args.json != "-":
        print(render_inspection(report))
    _write_json(args.json, report)
    return EXIT_OK


def _cmd_formats(args: argparse.Namespace) -> int:
    from mixprec.environment import environment
    from mixprec.formats import formats_table, render_formats_table

    _check_json_target(args.json)
    if args.json != "-":
        print(render_formats_table())
    _write_json(args.json, {"schema": "mixprec.formats/1", "formats": formats_table(), "environment": environment()})
    return EXIT_OK


def _cmd_recipes(args: argparse.Namespace) -> int:
    from mixprec.environment import environment
    from mixprec.recipes import DEFAULT_RECIPE, RECIPES

    _check_json_target(args.json)
    rows = [
        {"name": r.name, "default": r.name == DEFAULT_RECIPE, "domain": r.domain, "model": r.model,
         "data": r.data, "metric": r.metric, "description": r.description, "metric_key": r.metric_key,
         "higher_is_better": r.higher_is_better,
         "expected_fp32": list(r.expected_fp32) if r.expected_fp32 else None, "verify_steps": r.verify_steps,
         "scaler": dict(r.scaler)}
        for r in RECIPES.values()
    ]
    if args.json != "-":
        for row in rows:
            mark = " (default)" if row["default"] else ""
            print(f"{row['name']}{mark}: {row['domain']} - {row['model']}\n    data: {row['data']}\n    metric: {row['metric']}")
    _write_json(args.json, {"schema": "mixprec.recipes/1", "recipes": rows, "environment": environment()})
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
