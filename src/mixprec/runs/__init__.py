"""Runs: what the CLI and Python users call (train today; verify, bench, autotune later)."""

from mixprec.runs.train import StepEvent, train

__all__ = ["StepEvent", "train"]
