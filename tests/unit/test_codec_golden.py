"""Golden bytes: the codec's frames and decoded tensors must not change by a single byte.

Speed work on transfer/codec must keep every output identical; this test pins
BLAKE2b digests of frames and decoded values for a fixed grid of deterministic
inputs (dtypes, shapes, profiles, offsets, context ends, saliency, batching).
Regenerate (only when the format is meant to change) with::

    PYTHONPATH=. python tests/unit/test_codec_golden.py --regenerate
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from transfer.codec import PROFILES, cpu_kernels, decode_layer, encode, encode_layer

GOLDEN = Path(__file__).parent / "data" / "codec_golden.json"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SHAPES = [(3, 256, 64), (3, 100, 64), (2, 7, 128)]
PLACES = [(0, None), (0, 256), (256, 600), (512, 530), (1024, None)]  # (token_offset, context_end)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _tensor_digest(t: torch.Tensor) -> str:
    return _digest(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _inputs(shape, dtype, seed, outliers=False):
    gen = torch.Generator().manual_seed(seed)
    h, t, d = shape
    k = torch.randn(h, t, d, generator=gen) * 2 + torch.randn(h, 1, d, generator=gen) * 3
    v = torch.randn(h, t, d, generator=gen)
    if outliers:  # a few huge channels, a zero token and a zero head, like real post-RoPE keys
        k[:, :, 3] *= 40
        k[:, :, d - 5] += 25
        v[:, :, 7] *= 30
        k[:, t // 2] = 0
        v[0] = 0
    return k.to(dtype), v.to(dtype)


def _record(blobs) -> list[str]:
    out = []
    for blob in blobs:
        k, v = decode_layer(blob)
        out.append(_digest(blob) + ":" + _tensor_digest(k) + ":" + _tensor_digest(v))
    return out


def compute() -> dict[str, list[str]]:
    """Digests for every case, with the codec as it is now."""
    results: dict[str, list[str]] = {}
    seed = 0
    for dname, dtype in DTYPES.items():
        for shape in SHAPES:
            seed += 1
            k, v = _inputs(shape, dtype, seed)
            for prof in PROFILES:
                for off, end in PLACES:
                    name = f"{dname}/{'x'.join(map(str, shape))}/{prof}/{off}/{end}"
                    results[name] = _record([encode_layer(k, v, prof, token_offset=off, context_end=end)])
    for prof in PROFILES:
        for dname, dtype in DTYPES.items():
            k, v = _inputs((3, 256, 64), dtype, 99, outliers=True)
            results[f"outliers/{dname}/{prof}"] = _record(
                [encode_layer(k, v, prof, token_offset=0, context_end=256)]
            )
            sal = torch.linspace(0, 1, 256).roll(37)
            results[f"saliency/{dname}/{prof}"] = _record(
                [encode_layer(k, v, prof, saliency=sal, token_offset=512, context_end=1000)]
            )
            layers = [_inputs((3, 256, 64), dtype, 200 + i, outliers=i == 1) for i in range(4)]
            results[f"layers/{dname}/{prof}"] = _record(
                encode(layers, prof, token_offset=256, context_end=700, threads=1)
            )
            layers = [_inputs((3, 100, 64), dtype, 300 + i) for i in range(3)]
            results[f"layers-sal/{dname}/{prof}"] = _record(
                encode(layers, prof, saliency=sal[:100], token_offset=0, context_end=None, threads=1)
            )
    return results


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "torch"])
def test_codec_output_matches_golden_digests(kernels: bool) -> None:
    """Both CPU paths: the compiled kernels and the torch stages (the CUDA path) write the pinned bytes."""
    if kernels and not cpu_kernels.AVAILABLE:
        pytest.fail("numba is not installed: `make test` installs it (pyproject dependency)")
    expected = json.loads(GOLDEN.read_text())
    was = cpu_kernels.enabled()
    cpu_kernels.set_enabled(kernels)
    try:
        actual = compute()
    finally:
        cpu_kernels.set_enabled(was)
    assert actual.keys() == expected.keys()
    changed = [name for name in expected if actual[name] != expected[name]]
    assert not changed, f"{len(changed)} cases changed, e.g. {changed[:5]}"


if __name__ == "__main__":
    if "--regenerate" not in sys.argv[1:]:
        raise SystemExit("usage: python tests/unit/test_codec_golden.py --regenerate")
    GOLDEN.write_text(json.dumps(compute(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
