"""The connector's device path, run on the CPU: the GPU check's round trip (bench/vllm_device_roundtrip.py)
through a real in-process store, FlashAttention-layout caches, lossless bit-exact. On a CUDA machine
``make gpu-check`` runs the same code on the GPU; CI has none, so this keeps its logic and format tested."""

from __future__ import annotations

import pytest

from bench import vllm_device_roundtrip as gpu_roundtrip

pytestmark = pytest.mark.slow


def test_device_round_trip_on_cpu_is_bit_exact():
    result = gpu_roundtrip.run("cpu")
    assert result["ok"], result
    assert {(c["layout"], c["profile"]) for c in result["cases"]} == {
        ("LBNHC", "lossless"),
        ("LBHNC", "lossless"),
        ("LBNHC", "balanced"),
    }
    assert all(c["invalid_blocks"] == 0 for c in result["cases"])
