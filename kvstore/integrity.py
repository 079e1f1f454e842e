"""The integrity trailer every stored blob carries.

A blob is ``payload || XXH3-64(payload)`` (8 bytes, little-endian). The encoder
seals, the server verifies on Put and on every read from every tier, and the
client verifies after Get. XXH3 detects accidental corruption (bit rot, torn
writes, bad RAM) at memory speed; it is not a MAC and does not need to be: keys
are cryptographic, and tenants are separated by auth, not by the checksum.
"""

from __future__ import annotations

import xxhash

TRAILER_BYTES = 8


def checksum(payload: bytes | bytearray | memoryview) -> bytes:
    return xxhash.xxh3_64_digest(payload)[::-1]  # xxhash digests are big-endian


def seal(payload: bytes | bytearray | memoryview) -> bytes:
    """Return ``payload`` with its trailer appended (one copy of the payload, whatever its type)."""
    return b"".join((payload, checksum(payload)))


def is_intact(blob: bytes | memoryview) -> bool:
    """True when ``blob`` is at least a trailer long and its trailer matches."""
    if len(blob) < TRAILER_BYTES:
        return False
    view = memoryview(blob)
    return checksum(view[:-TRAILER_BYTES]) == bytes(view[-TRAILER_BYTES:])


def payload_of(blob: bytes | memoryview) -> memoryview:
    """The payload of a blob already known to be intact (no copy)."""
    return memoryview(blob)[:-TRAILER_BYTES]
