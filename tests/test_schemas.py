"""docs/schemas.md lists the keys of the JSON documents; the real documents must have them."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

import mixprec
from tasks.planted import overflow_task

DOC = (Path(__file__).resolve().parents[1] / "docs" / "schemas.md").read_text()


def documented_keys(section: str) -> set[str]:
    """The backticked names in the first column of a section's table."""
    body = DOC.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    keys = set()
    for line in body.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            keys |= set(re.findall(r"`([a-z_0-9.<>]+)`", first_cell))
    return keys


@pytest.fixture(scope="module")
def result() -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mixprec.train(overflow_task(), mixprec.policy_from_options("fp16-mixed", controller="adaptive"),
                             steps=4, monitor_every=2)


def test_train_document_has_every_documented_key(result):
    keys = documented_keys("mixprec.train/1")
    assert {"task", "losses", "policy", "localizations"} <= keys  # the table was found
    assert keys <= set(result), keys - set(result)
    assert result["schema"] == "mixprec.train/1"


def test_monitor_record_has_every_documented_key(result, tmp_path):
    from mixprec.monitor import load_records

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixprec.train(overflow_task(), "fp16-mixed", steps=2, monitor_every=1, run_dir=tmp_path / "run")
    record = load_records(tmp_path / "run" / "monitor.jsonl")[0]
    keys = documented_keys("mixprec.monitor/1")
    assert {"modules", "params", "replay"} <= keys
    assert keys <= set(record), keys - set(record)
    assert record["schema"] == "mixprec.monitor/1"
