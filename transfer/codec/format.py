"""The frame layout: a fixed little-endian header, a body, and the kvstore trailer.

::

    header (28 bytes)
      magic      4s   b"KVCF"
      version    u8   FORMAT_VERSION
      profile    u8   profile id (informational: the frame describes itself)
      dtype      u8   source dtype: 0 fp16, 1 bf16, 2 fp32
      flags      u8   ZSTD | ROTATE_K | ROTATE_V | CENTER_K | CENTER_V | LOSSLESS
      heads      u16
      tokens     u32
      head_dim   u16
      seed       u32  rotation seed
      raw_len    u32  length of the body before zstd
      stored_len u32  length of the body as stored (after zstd, if any)
    body (zstd-compressed when the ZSTD flag is set)
      lossless:   the K then V bytes, byte-shuffled (all first bytes, then all second bytes, ...)
      quantized:  n_tiers u8, then per tier (k_scheme, k_bits, v_scheme, v_bits) u8 each,
                  group u8 (tokens per channel group),
                  precision map (tier index per token, 4-bit packed),
                  then for K and for V: [channel means fp16 [heads, head_dim] if centered],
                  then per non-empty tier, on that tier's tokens in order:
                    token scheme:   base i8, scale bytes u8 [heads, n], codes
                    channel scheme: channel max fp16 [heads, dim], low and high i8
                                    [heads, groups, dim] each, codes
                  codes bit-packed at the tier's width, [heads, n, dim] order
    trailer: XXH3-64 of everything before it (kvstore.integrity.seal)

Every section's size follows from the header and the tier table, so a decoder
checks the exact length before touching a tensor and refuses anything else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from transfer.codec.errors import CorruptFrame, TruncatedFrame, UnknownProfile, UnknownVersion

MAGIC = b"KVCF"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBBBBHIHIII")
HEADER_BYTES = _HEADER.size

FLAG_ZSTD = 1
FLAG_ROTATE_K = 2
FLAG_ROTATE_V = 4
FLAG_CENTER_K = 8
FLAG_CENTER_V = 16
FLAG_LOSSLESS = 32
_KNOWN_FLAGS = FLAG_ZSTD | FLAG_ROTATE_K | FLAG_ROTATE_V | FLAG_CENTER_K | FLAG_CENTER_V | FLAG_LOSSLESS

DTYPE_CODES: dict[torch.dtype, int] = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
DTYPES_BY_CODE: dict[int, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}


@dataclass(frozen=True)
class FrameHeader:
    """What a frame holds, readable without decoding it."""

    version: int
    profile_id: int
    dtype: torch.dtype
    flags: int
    heads: int
    tokens: int
    head_dim: int
    seed: int
    raw_len: int
    stored_len: int

    @property
    def profile(self) -> str:
        from transfer.codec.profiles import PROFILE_BY_ID

        p = PROFILE_BY_ID.get(self.profile_id)
        return p.name if p is not None else f"unknown-{self.profile_id}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.heads, self.tokens, self.head_dim)

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            self.version,
            self.profile_id,
            DTYPE_CODES[self.dtype],
            self.flags,
            self.heads,
            self.tokens,
            self.head_dim,
            self.seed,
            self.raw_len,
            self.stored_len,
        )


def parse_header(payload: bytes | memoryview) -> FrameHeader:
    """Parse and sanity-check the header of a payload (trailer already stripped)."""
    if len(payload) < HEADER_BYTES:
        raise TruncatedFrame(f"frame of {len(payload)} bytes is shorter than its {HEADER_BYTES}-byte header")
    (magic, version, profile_id, dtype_code, flags, heads, tokens, head_dim, seed, raw_len, stored_len) = (
        _HEADER.unpack_from(payload, 0)
    )
    if magic != MAGIC:
        raise CorruptFrame(f"bad magic {bytes(magic)!r}: not a kvstore codec frame")
    if version != FORMAT_VERSION:
        raise UnknownVersion(f"frame format version {version}; this decoder reads version {FORMAT_VERSION}")
    from transfer.codec.profiles import PROFILE_BY_ID

    if profile_id not in PROFILE_BY_ID:
        raise UnknownProfile(f"frame names profile id {profile_id}, which this decoder does not know")
    if dtype_code not in DTYPES_BY_CODE:
        raise CorruptFrame(f"unknown source dtype code {dtype_code}")
    if flags & ~_KNOWN_FLAGS:
        raise CorruptFrame(f"unknown flag bits {flags & ~_KNOWN_FLAGS:#x}")
    return FrameHeader(
        version,
        profile_id,
        DTYPES_BY_CODE[dtype_code],
        flags,
        heads,
        tokens,
        head_dim,
        seed,
        raw_len,
        stored_len,
    )
