"""bench/gpu_check.py: its CPU half runs and passes here, and its comparisons report real differences.

The script's GPU half needs a CUDA device; what CPU CI can check is that the CPU half (determinism,
the compiled kernels against the torch stages CUDA runs) passes, and that a difference in bytes or
bits is reported as a failure with its position, so the check on a GPU can fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _module()


@pytest.fixture(scope="module")
def quick_run() -> tuple[int, dict, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--kv", "random"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    document, _, summary = proc.stdout.rstrip().rpartition("\n")
    assert document, f"no JSON on stdout; stderr: {proc.stderr[-2000:]}"
    return proc.returncode, json.loads(document), summary


def test_quick_cpu_half_passes(quick_run) -> None:
    rc, report, summary = quick_run
    assert rc == 0, summary
    assert report["ok"] is True and report["failures"] == [], summary
    assert summary.startswith("summary: ") and summary.endswith("PASS")
    assert report["cuda"] is torch.cuda.is_available()  # False on the development machine
    if not report["cuda"]:
        assert report["message"] == "no CUDA device: ran the CPU half only"
        assert report["connector"]["device"] == "cpu"  # the connector's device path, run on the CPU
        assert "host_device" not in report
    assert report["connector"]["ok"] is True and len(report["connector"]["cases"]) == 3
    assert report["cpu_kernels"] is True  # else "kernels vs torch stages" would compare torch with itself
    # every input x dtype x profile x position, each layer: 5 layers x 3 x 4 x 3
    frames = sum(i["layers"] for i in report["inputs"].values()) * 3 * len(gpu_check.PROFILES) * 3
    encode_paths = report["encode_parity"]["paths"]
    assert {"cpu again, on the codec threads", "cpu torch stages (what CUDA runs)"} <= set(encode_paths)
    for path, counts in encode_paths.items():
        assert counts == {"compared": frames, "mismatches": 0}, path
    assert report["encode_parity"]["ok"] and report["encode_parity"]["mismatches"] == []
    decode_paths = report["decode_parity"]["paths"]
    assert "cpu torch stages" in decode_paths
    assert all(c["compared"] > 0 and c["mismatches"] == 0 for c in decode_paths.values()), decode_paths
    for rows in report["codec_speed"].values():
        assert set(rows) == set(gpu_check.PROFILES)
        assert all(r["cpu"]["encode_gbps"] > 0 and r["cpu"]["decode_gbps"] > 0 for r in rows.values())


def test_first_difference_and_frame_mismatch_locate_the_byte() -> None:
    assert gpu_check.first_difference(b"abcd", b"abcd") is None
    assert gpu_check.first_difference(b"abcd", b"abXd") == 2
    assert gpu_check.first_difference(b"abcd", b"abc") == 3  # a truncated frame differs where it ends
    k = torch.randn(2, 16, 8, dtype=torch.float16)
    frame = gpu_check.encode_layer(k, -k, "int8")
    assert gpu_check.frame_mismatch(frame, bytes(frame)) is None
    for offset, region in ((5, "header"), (40, "body"), (len(frame) - 1, "trailer")):
        broken = frame[:offset] + bytes([frame[offset] ^ 0x10]) + frame[offset + 1 :]
        found = gpu_check.frame_mismatch(frame, broken)
        assert found["first_differing_byte"] == offset and found["region"] == region
        assert (found["expected_byte"], found["got_byte"]) == (frame[offset], frame[offset] ^ 0x10)


def test_tensor_mismatch_compares_bits() -> None:
    a = torch.tensor([1.0, 0.0, 2.0], dtype=torch.bfloat16)
    assert gpu_check.tensor_mismatch(a, a.clone()) is None
    found = gpu_check.tensor_mismatch(a, torch.tensor([1.0, -0.0, 2.0], dtype=torch.bfloat16))
    assert found["first_differing_element"] == 1 and found["elements_differing"] == 1  # -0 is not +0
    assert gpu_check.tensor_mismatch(a, a.float()) is not None  # a decode in the wrong dtype


def test_a_differing_encoder_fails_the_check(monkeypatch) -> None:
    """Frames of the torch stages with one byte flipped (int8 only): reported, with the offset, as failed."""
    real = gpu_check.encode

    def encode_flipping_byte_30_on_torch_stages(layers, profile, **kwargs):
        frames = real(layers, profile, **kwargs)
        if profile == "int8" and not gpu_check.cpu_kernels.enabled():
            frames = [f[:30] + bytes([f[30] ^ 1]) + f[31:] for f in frames]
        return frames

    monkeypatch.setattr(gpu_check, "encode", encode_flipping_byte_30_on_torch_stages)
    sets = [("tiny", gpu_check.random_layers(2, 16, 8, 1, seed=0))]
    enc, dec = gpu_check.parity(sets, cuda=False)
    assert not enc["ok"] and dec["ok"]
    assert enc["paths"]["cpu torch stages (what CUDA runs)"]["mismatches"] == 3 * 3  # dtypes x positions
    assert enc["paths"]["cpu again, on the codec threads"]["mismatches"] == 0
    assert {(r["profile"], r["first_differing_byte"], r["region"]) for r in enc["mismatches"]} == {
        ("int8", 30, "body")
    }
    assert {r["dtype"] for r in enc["mismatches"]} == {"float16", "bfloat16", "float32"}
    report = {"encode_parity": enc, "decode_parity": dec, "connector": {"ok": True}}
    assert gpu_check._failures(report) == ["encode_parity"]
    assert gpu_check._failures({**report, "connector": {"ok": False}}) == ["encode_parity", "connector"]
