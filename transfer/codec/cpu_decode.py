"""Decoding a quantized frame body on CPU in a handful of compiled calls.

Why a second decoder: the torch decoder (frame._decode_quantized) spends most
of a 256-token frame's time in Python and in small torch ops (about 300 calls
per frame), not on the data. This one parses the tier table in Python, takes
the token order of each tier from a cache keyed by the precision map's bytes
(every chunk of a context shares a handful of maps), and hands each tier to
one kernel that unpacks, dequantizes and scatters it; the rotation is undone
in place. The result is the same float32 tensors as the torch decoder, bit
for bit (tests/unit/test_codec_golden.py runs both), and every malformed body
raises the same ``CorruptFrame`` before any kernel reads past its end.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from transfer.codec import cpu_kernels
from transfer.codec.errors import CorruptFrame
from transfer.codec.format import FLAG_CENTER_K, FLAG_CENTER_V, FLAG_ROTATE_K, FLAG_ROTATE_V, FrameHeader
from transfer.codec.pack import packed_size
from transfer.codec.profiles import CHANNEL, TOKEN
from transfer.codec.quantize import _SCALE_TABLE
from transfer.codec.rotate import _signs

_TABLE = _SCALE_TABLE.numpy()


@functools.lru_cache(maxsize=1024)
def _tier_order(packed_map: bytes, tokens: int, n_tiers: int) -> tuple[np.ndarray, ...]:
    """Token indices of each tier, from the 4-bit precision map (cached: maps repeat across frames)."""
    tiers = np.empty(tokens, np.uint8)
    if tokens:
        cpu_kernels.unpack(np.frombuffer(packed_map, np.uint8), 4, tokens, tiers)
        if int(tiers.max()) >= n_tiers:
            raise CorruptFrame("precision map names a tier the table does not have")
    return tuple(np.flatnonzero(tiers == i).astype(np.int64) for i in range(n_tiers))


def _pow2(exponent: int) -> np.float32:
    """``2**exponent`` built from the bits, as quantize.pow2 does (same value for any stored byte)."""
    return np.array([(exponent + 127) << 23], np.int32).view(np.float32)[0]


def decode_quantized(body: np.ndarray, header: FrameHeader) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) as float32 [heads, tokens, head_dim] from a quantized frame body (uint8 array)."""
    h, t, d = header.shape
    size = body.size
    cur = _Cursor(size)
    cur.need(1)
    n_tiers = int(body[0])
    cur.need(4 * n_tiers + 1)
    table = body[1:1 + 4 * n_tiers].reshape(n_tiers, 4).tolist()
    group = int(body[1 + 4 * n_tiers])
    if n_tiers == 0 or group == 0 or any(row[0] not in (TOKEN, CHANNEL) or row[2] not in (TOKEN, CHANNEL)
                                         or not 1 <= row[1] <= 8 or not 1 <= row[3] <= 8 for row in table):
        raise CorruptFrame(f"bad tier table {table} (group {group})")
    map_start = cur.pos
    cur.need(packed_size(t, 4))
    order = _tier_order(body[map_start:cur.pos].tobytes(), t, n_tiers)
    out = []
    for col, center_flag, rot_flag in ((0, FLAG_CENTER_K, FLAG_ROTATE_K), (2, FLAG_CENTER_V, FLAG_ROTATE_V)):
        mean = None
        if header.flags & center_flag:
            start = cur.pos
            cur.need(h * d * 2)
            mean = body[start:cur.pos].view(np.float16).astype(np.float32).reshape(h, 1, d)
        x = np.empty((h, t, d), np.float32)
        for row, idx in zip(table, order, strict=True):
            n = idx.size
            if n:
                _decode_tier(body, cur, row[col], row[col + 1], h, n, d, group, idx, x)
        if header.flags & rot_flag:
            flat = x.reshape(-1, d)
            rotated = np.empty_like(flat)
            if flat.shape[0]:
                cpu_kernels.hadamard_rows(flat, _signs(d, header.seed).numpy(), 1.0 / math.sqrt(d), False, rotated)
            x = rotated.reshape(h, t, d)
        if mean is not None:
            x += mean
        out.append(torch.from_numpy(x))
    if cur.pos != size:
        raise CorruptFrame(f"body has {size - cur.pos} trailing bytes")
    return out[0], out[1]


class _Cursor:
    """Position in the body; every overrun is a CorruptFrame raised before a kernel reads it."""

    def __init__(self, size: int) -> None:
        self.size, self.pos = size, 0

    def need(self, count: int) -> None:
        if self.pos + count > self.size:
            raise CorruptFrame(f"body ends at {self.size} bytes, needed {self.pos + count}")
        self.pos += count


def _decode_tier(body, cur: _Cursor, scheme: int, bits: int, h: int, n: int, d: int, group: int,
                 idx: np.ndarray, x: np.ndarray) -> None:
    count = h * n * d
    start = cur.pos
    if scheme == TOKEN:
        cur.need(1)
        base = int(np.int8(body[start]))
        cur.need(h * n + packed_size(count, bits))
        cpu_kernels.token_tier(body, start + 1, bits, h, n, d, _pow2(base), _TABLE, idx, x)
        return
    groups = (n + group - 1) // group
    cur.need(h * d * 2)
    cmax = body[start:cur.pos].view(np.float16).astype(np.float32).reshape(h, d)
    tier_start = cur.pos
    cur.need(2 * h * groups * d + packed_size(count, bits))
    cpu_kernels.channel_tier(body, tier_start, bits, h, n, d, group, cmax, idx, x)
