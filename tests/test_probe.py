"""The probe: document shape, strict JSON, caching, fingerprint, and the findings logic.

Measurements here are tiny (quick=True, size=256, repeats=2) and never asserted on: the
findings logic is tested as a pure function on synthetic measurements instead, so these
tests do not depend on what this machine happens to be fast at.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixprec import probe as probe_mod
from mixprec.errors import UsageError
from mixprec.probe import MATMUL_FORMATS, SCHEMA, analyze, fingerprint, probe, render_probe

SMALL = {"quick": True, "size": 256, "repeats": 2}
ENTRY_KEYS = {"available", "tflops", "seconds_median", "size", "ratio_to_fp32", "reason"}
DOC_KEYS = {"schema", "environment", "fingerprint", "cached", "matmul", "memory_bandwidth_gbs",
            "fast", "slow", "pitfalls", "lacks", "recommended", "why"}


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return probe(cache_dir=tmp_path_factory.mktemp("probe-cache"), **SMALL)


@pytest.fixture
def count_timings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the probe's timing function (the real one still runs)."""
    calls = [0]
    real = probe_mod._time_calls

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_mod, "_time_calls", counting)
    return calls


def test_schema_and_keys(doc: dict) -> None:
    assert doc["schema"] == SCHEMA == "mixprec.probe/1"
    assert DOC_KEYS <= set(doc)
    assert doc["environment"]["device"] == "cpu"
    assert doc["environment"]["threads"] == torch.get_num_threads()
    assert doc["cached"] is False
    assert list(doc["matmul"]) == list(MATMUL_FORMATS)
    for fmt, m in doc["matmul"].items():
        assert ENTRY_KEYS <= set(m), fmt
    assert doc["recommended"] in ("bf16-mixed", "fp16-mixed", "fp32")
    assert isinstance(doc["why"], str) and doc["why"]
    assert doc["memory_bandwidth_gbs"] > 0
    assert all(isinstance(p, str) for p in doc["pitfalls"])
    if not torch.cuda.is_available():
        assert "cuda" in doc["lacks"]


def test_strict_json_round_trip(doc: dict) -> None:
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text) == doc


def test_fp32_is_the_reference(doc: dict) -> None:
    fp32 = doc["matmul"]["fp32"]
    assert fp32["available"] and fp32["ratio_to_fp32"] == 1.0
    assert fp32["tflops"] > 0 and fp32["size"] <= 256


def test_entries_are_consistent(doc: dict) -> None:
    for fmt, m in doc["matmul"].items():
        if m["available"]:
            assert m["tflops"] > 0 and m["seconds_median"] > 0 and m["reason"] is None, fmt
            assert m["ratio_to_fp32"] == pytest.approx(m["tflops"] / doc["matmul"]["fp32"]["tflops"])
        else:
            assert m["tflops"] is None and m["ratio_to_fp32"] is None, fmt
            assert isinstance(m["reason"], str) and m["reason"], fmt
    for fmt in doc["fast"]:
        assert doc["matmul"][fmt]["ratio_to_fp32"] >= 1.2
    for fmt in doc["slow"]:
        assert doc["matmul"][fmt]["ratio_to_fp32"] < 0.5


def test_tf32_unavailable_on_cpu(doc: dict) -> None:
    tf32 = doc["matmul"]["tf32"]
    assert tf32["available"] is False and "CUDA" in tf32["reason"]
    assert any(p.startswith("tf32 unavailable") for p in doc["pitfalls"])


def test_cache_hit_does_not_measure_and_refresh_does(tmp_path: Path, count_timings: list[int]) -> None:
    first = probe(cache_dir=tmp_path, **SMALL)
    assert first["cached"] is False and count_timings[0] > 0
    cache_file = tmp_path / f"probe-{first['fingerprint']}.json"
    assert cache_file.is_file() and first["cache_file"] == str(cache_file)

    count_timings[0] = 0
    second = probe(cache_dir=tmp_path, **SMALL)
    assert second["cached"] is True and count_timings[0] == 0
    assert second["matmul"] == first["matmul"]

    third = probe(cache_dir=tmp_path, refresh=True, **SMALL)
    assert third["cached"] is False and count_timings[0] > 0


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path: Path, count_timings: list[int]) -> None:
    path = tmp_path / f"probe-{fingerprint('cpu')}.json"
    path.write_text('{"schema": "mixprec.probe/1", "matm')  # truncated
    got = probe(cache_dir=tmp_path, **SMALL)
    assert got["cached"] is False and count_timings[0] > 0
    assert json.loads(path.read_text())["schema"] == SCHEMA


def test_quick_result_does_not_answer_a_thorough_request() -> None:
    fp = "0123456789abcdef"
    quick_doc = {"schema": SCHEMA, "fingerprint": fp, "matmul": {},
                 "settings": {"size": None, "repeats": 3, "quick": True}}
    full_doc = {**quick_doc, "settings": {"size": None, "repeats": 5, "quick": False}}
    full, quick = {"size": None, "repeats": 5, "quick": False}, {"size": None, "repeats": 5, "quick": True}
    assert not probe_mod._reusable(quick_doc, fp, full)
    assert probe_mod._reusable(full_doc, fp, full) and probe_mod._reusable(full_doc, fp, quick)
    assert not probe_mod._reusable(full_doc, "fedcba9876543210", full)
    assert not probe_mod._reusable(full_doc, fp, {**full, "size": 512})
    assert not probe_mod._reusable(["not", "a", "dict"], fp, full)


def test_fingerprint_is_stable_and_follows_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    base = fingerprint("cpu")
    assert base == fingerprint("cpu") and len(base) == 16
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    assert fingerprint("cpu") != base


def test_bad_input() -> None:
    with pytest.raises(UsageError, match="repeats"):
        probe(repeats=0)
    with pytest.raises(UsageError, match="size"):
        probe(size=4)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA"):
            probe("cuda")


# ---------------------------------------------------------------- findings, pure


def _m(tflops: float | None, fp32: float = 1.0, reason: str | None = None) -> dict:
    if tflops is None:
        return {"available": False, "tflops": None, "ratio_to_fp32": None,
                "reason": reason or "no kernel"}
    return {"available": True, "tflops": tflops, "ratio_to_fp32": tflops / fp32, "reason": None}


def synthetic(**tflops: float | None) -> dict:
    out = {"fp32": _m(1.0)}
    for fmt in ("tf32", "bf16", "fp16", "fp8_e4m3"):
        out[fmt] = _m(tflops.get(fmt))
    return out


def test_slow_fp16_pitfall() -> None:
    found = analyze(synthetic(bf16=2.4, fp16=1 / 38), cpu_flags=["avx2", "avx512f", "avx512_bf16"])
    fp16 = [p for p in found["pitfalls"] if p.startswith("fp16")]
    assert len(fp16) == 1
    assert "38x slower than fp32" in fp16[0] and "AVX512-FP16" in fp16[0]
    assert "bf16-mixed" in fp16[0]
    assert any("bf16 runs 2.4x faster" in p and "AVX512_BF16" in p for p in found["pitfalls"])
    assert found["fast"] == ["bf16"] and found["slow"] == ["fp16"]
    assert found["recommended"] == "bf16-mixed" and "2.4x" in found["why"]
    assert {"avx512_fp16", "amx_fp16", "amx_bf16", "cuda"} <= set(found["lacks"])
    assert "avx512_bf16" not in found["lacks"]


def test_fp16_not_blamed_when_it_is_fast() -> None:
    found = analyze(synthetic(bf16=1.0, fp16=3.0), cpu_flags=["avx512_fp16", "avx512_bf16"])
    assert not any("slower" in p for p in found["pitfalls"])
    assert found["recommended"] == "fp16-mixed" and found["slow"] == []
    assert "avx512_fp16" not in found["lacks"]


def test_nothing_faster_means_fp32() -> None:
    found = analyze(synthetic(bf16=1.05, fp16=0.02))
    assert found["recommended"] == "fp32" and found["fast"] == []
    assert any("bf16 runs at only 1.05x" in p for p in found["pitfalls"])


def test_near_tie_prefers_bf16() -> None:
    found = analyze(synthetic(bf16=3.0, fp16=3.1), device_type="cuda", gpu_capability=(9, 0))
    assert found["recommended"] == "bf16-mixed"
    assert found["lacks"] == []


def test_unavailable_format_pitfall_carries_reason() -> None:
    matmul = synthetic(bf16=2.0)
    matmul["fp8_e4m3"] = _m(None, reason="RuntimeError: no fp8 kernel")
    found = analyze(matmul)
    assert "fp8 matmul (_scaled_mm) unavailable on this CPU: RuntimeError: no fp8 kernel" in found["pitfalls"]


def test_busy_machine_is_flagged() -> None:
    busy = analyze(synthetic(bf16=2.0), other_load=0.9, cpus=2, threads=2)
    idle = analyze(synthetic(bf16=2.0), other_load=0.05, cpus=2, threads=2)
    spare = analyze(synthetic(bf16=2.0), other_load=3.0, cpus=16, threads=8)
    assert any("busy" in p for p in busy["pitfalls"])
    assert not any("busy" in p for p in idle["pitfalls"])
    assert not any("busy" in p for p in spare["pitfalls"])  # others on cores the probe left free


def test_render_lists_every_format(doc: dict) -> None:
    text = render_probe(doc)
    for fmt in MATMUL_FORMATS:
        assert fmt in text
    assert "recommended: " + doc["recommended"] in text
    assert "memory bandwidth" in text
    for pitfall in doc["pitfalls"]:
        assert pitfall in text
