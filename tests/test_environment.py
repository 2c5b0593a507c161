"""The environment block: complete, JSON-serializable, and consistent with torch."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mixprec.environment import (
    PRECISION_CPU_FLAGS,
    _parse_cpuinfo,
    cpu_flags,
    cpu_has_fast_bf16,
    cpu_has_fast_fp16,
    environment,
)
from mixprec.errors import UsageError

KEYS = {"mixprec", "torch", "python", "platform", "device", "device_name", "cpu_model",
        "gpu_model", "threads", "cpu_count", "cpu_flags", "cpu_capability"}


def test_keys_and_json() -> None:
    env = environment()
    assert set(env) == KEYS
    assert json.loads(json.dumps(env)) == env
    assert env["device"] == "cpu"
    assert env["device_name"] == env["cpu_model"] and env["device_name"]
    assert env["torch"] == torch.__version__
    assert env["threads"] == torch.get_num_threads()
    assert env["cpu_count"] == os.cpu_count()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(env["mixprec"], str) and env["mixprec"]
    if not torch.cuda.is_available():
        assert env["gpu_model"] is None


def test_threads_follow_torch() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert environment()["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_cpu_flags_subset_and_fast_paths() -> None:
    flags = cpu_flags()
    assert set(flags) <= set(PRECISION_CPU_FLAGS)
    assert flags == [f for f in PRECISION_CPU_FLAGS if f in flags]  # stable order
    assert cpu_has_fast_fp16() == bool({"avx512_fp16", "amx_fp16"} & set(flags))
    assert cpu_has_fast_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_parse_cpuinfo() -> None:
    text = (
        "processor\t: 0\nmodel name\t: Example CPU @ 2.0GHz\n"
        "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n\n"
        "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n"
    )
    model, flags = _parse_cpuinfo(text)
    assert model == "Example CPU @ 2.0GHz"
    assert {"avx2", "avx512f", "avx512_bf16", "amx_tile"} <= flags and "avx512_fp16" not in flags
    assert _parse_cpuinfo("") == (None, frozenset())


def test_bad_device() -> None:
    with pytest.raises(UsageError, match="nonsense"):
        environment("nonsense")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable_is_an_error() -> None:
    with pytest.raises(UsageError, match="CUDA"):
        environment("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device() -> None:
    env = environment("cuda")
    assert env["device"] == f"cuda:{torch.cuda.current_device()}"
    assert env["device_name"] == env["gpu_model"] == torch.cuda.get_device_name(0)
    json.dumps(env)
