"""Chained prefix keys and namespaces.

``key[i] = BLAKE2b-256(key[i-1] || namespace || token_ids[chunk i] as uint32 LE)``
with ``key[-1]`` a fixed root derived from the seed. A key therefore names a whole
prefix, not a chunk in isolation: two contexts share ``key[i]`` only if they share
every token up to the end of chunk ``i`` *and* the namespace. 256 bits keep
accidental collisions (which would serve one user another user's context) out of
reach; Python's ``hash()`` is per-process and 64 bits, so it is never used.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

ChunkKey = NewType("ChunkKey", bytes)

KEY_BYTES = 32
DEFAULT_CHUNK_TOKENS = 256
DEFAULT_SEED = b"kvstore/v1"

_PART = r"[A-Za-z0-9._:-]"
NAMESPACE_RE = re.compile(rf"^({_PART}{{1,64}})/({_PART}{{1,128}})/({_PART}{{1,64}})$")


@dataclass(frozen=True)
class Namespace:
    """Who owns a key space: tenant, model fingerprint and codec profile.

    KV computed by one model (or one codec profile) is meaningless to another,
    so they must never share keys; tenants are kept apart for privacy.
    """

    tenant: str
    model: str
    profile: str

    def __post_init__(self) -> None:
        if not NAMESPACE_RE.fullmatch(str(self)):
            raise ValueError(
                f"invalid namespace {str(self)!r}: each of tenant/model/profile must be 1-64 "
                "(model: 1-128) characters of [A-Za-z0-9._:-]"
            )

    def __str__(self) -> str:
        return f"{self.tenant}/{self.model}/{self.profile}"

    @classmethod
    def parse(cls, text: str) -> Namespace:
        m = NAMESPACE_RE.fullmatch(text)
        if not m:
            raise ValueError(
                f"invalid namespace {text!r}: expected '<tenant>/<model>/<profile>' "
                "with parts of [A-Za-z0-9._:-]"
            )
        return cls(*m.groups())


def model_fingerprint(
    architecture: str, num_layers: int, num_kv_heads: int, head_dim: int, dtype: str, weights_digest: str = ""
) -> str:
    """A short, stable name for 'KV produced by exactly this model'.

    Shape alone is not enough (two fine-tunes share it), so callers pass a digest
    of the weights file when they have one.
    """
    text = f"{architecture}|{num_layers}|{num_kv_heads}|{head_dim}|{dtype}|{weights_digest}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    arch = re.sub(r"[^A-Za-z0-9._-]", "-", architecture)[:40]
    return f"{arch}-L{num_layers}-H{num_kv_heads}-D{head_dim}-{dtype}-{digest}"


def chunk_keys(
    token_ids: Sequence[int],
    namespace: Namespace | str,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    seed: bytes = DEFAULT_SEED,
) -> list[ChunkKey]:
    """Keys of every *full* chunk of ``token_ids``; a trailing partial chunk gets none."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    ns = str(namespace).encode()
    parent = hashlib.blake2b(seed, digest_size=KEY_BYTES).digest()
    keys: list[ChunkKey] = []
    for start in range(0, len(token_ids) - chunk_tokens + 1, chunk_tokens):
        chunk = token_ids[start : start + chunk_tokens]
        h = hashlib.blake2b(digest_size=KEY_BYTES)
        h.update(parent)
        h.update(struct.pack("<I", len(ns)))
        h.update(ns)
        h.update(struct.pack(f"<{len(chunk)}I", *chunk))
        parent = h.digest()
        keys.append(ChunkKey(parent))
    return keys
