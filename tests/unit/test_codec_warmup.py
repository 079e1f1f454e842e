"""warm_up leaves nothing for the first real request to compile.

A request after :func:`warm_up` must not add a compiled signature to any codec
kernel: if it did, the first timed request of a demo or benchmark would still
pay the compilation the warm-up is there to take out of the timing.
"""

from __future__ import annotations

import numba
import pytest
import torch

from transfer.codec import cpu_kernels, decode_into, decode_layer, encode
from transfer.codec.warmup import warm_up


def _compiled() -> dict[str, int]:
    kernels = {
        name: obj
        for name, obj in vars(cpu_kernels).items()
        if isinstance(obj, numba.core.registry.CPUDispatcher)
    }
    assert kernels, "no numba kernels found in transfer.codec.cpu_kernels"
    return {name: len(k.signatures) for name, k in kernels.items()}


@pytest.mark.parametrize("profile", ["balanced", "int8", "lossless", "dense"])
def test_a_request_after_warm_up_compiles_nothing(profile: str) -> None:
    seconds = warm_up([profile], heads=3, head_dim=64, chunk_tokens=64)
    assert seconds > 0
    before = _compiled()
    assert sum(before.values()) > 0
    gen = torch.Generator().manual_seed(1)
    # A real request's shape: SmolLM2's 3 KV heads x 64, a 256-token chunk, 30 layers.
    layers = [
        (torch.randn(3, 256, 64, generator=gen), torch.randn(3, 256, 64, generator=gen)) for _ in range(30)
    ]
    chunks = [encode(layers, profile, token_offset=i * 256) for i in range(2)]
    k, v = decode_into([chunks[0][5], chunks[1][5]])
    decode_into([chunks[1][6], chunks[0][6]], (torch.empty_like(k), torch.empty_like(v)))
    window = (torch.empty(3, 4096, 64, dtype=torch.float16), torch.empty(3, 4096, 64, dtype=torch.float16))
    decode_into(chunks[0][:4], window, token_offset=256)  # frames of one chunk, as any 4 same-shaped frames
    decode_layer(chunks[1][0])
    decode_into([chunks[1][6]])  # one frame of a one-chunk prefix: its own kernel (decode_frame)
    assert _compiled() == before


def test_unknown_profile_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown codec profile.*nope"):
        warm_up(["nope"])
