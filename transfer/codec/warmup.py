"""Bring the codec to its steady speed before anything is timed.

The CPU kernels are numba functions compiled on first use and cached on disk
(``cache=True``): on a fresh machine the first frame of a quantized profile
pays several seconds of compilation, and every new process pays for loading
the cache. A demo or benchmark that times its first request would report that
one-off cost as the codec's speed (the first ``make demo`` on a fresh machine
showed balanced prefix reuse at 0.5x recompute, the second run at 2.2x).

:func:`warm_up` runs each profile once through the codec's entries as the data
path calls them (``encode`` for a chunk's layers, ``decode_into`` for a layer of
consecutive chunks, both allocating and into a caller's tensors, and
``decode_layer`` and ``decode_into`` for a single frame), on a layer of the
caller's shape, and returns how long that took so callers can report it
separately from their timings. One frame and several frames are decoded by
different kernels (``decode_frame`` / ``decode_frames``): a warm-up that
skipped the single frame left a 9 s compilation in the first demo request
that reused exactly one chunk.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from transfer.codec.frame import decode_layer
from transfer.codec.parallel import decode_into, encode
from transfer.codec.profiles import PROFILES


def warm_up(
    profiles: Iterable[str] = tuple(PROFILES),
    *,
    heads: int = 3,
    head_dim: int = 64,
    chunk_tokens: int = 256,
    num_layers: int = 2,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Encode and decode one small chunk per profile; returns the seconds it took.

    Two chunks of ``num_layers`` layers are enough to reach every kernel a real
    request reaches (several frames per call, several tiers per frame); the data
    is seeded so a warm-up never differs from run to run.
    """
    names = list(dict.fromkeys(profiles))
    unknown = [p for p in names if p not in PROFILES]
    if unknown:
        raise ValueError(f"unknown codec profile(s) {unknown}; profiles are {sorted(PROFILES)}")
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    shape = (heads, chunk_tokens, head_dim)
    chunks = [
        [
            (
                torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype),
                torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype),
            )
            for _ in range(num_layers)
        ]
        for _ in range(2)
    ]
    for profile in names:
        frames = [encode(layers, profile, token_offset=i * chunk_tokens) for i, layers in enumerate(chunks)]
        for layer in range(num_layers):
            decode_into([frames[0][layer]])  # one frame: its own kernel (decode_frame)
            k, v = decode_into([frames[0][layer], frames[1][layer]])
            decode_into([frames[0][layer], frames[1][layer]], (torch.empty_like(k), torch.empty_like(v)))
        for blob in frames[0]:
            decode_layer(blob)
    return time.perf_counter() - started
