"""Which replicas own a chunk key: rendezvous (highest-random-weight) hashing.

Every (member, key) pair gets a weight from a keyed BLAKE2b; a key's owners are
the ``replication`` members with the highest weights. Why this scheme:

* **Per chunk, not per prefix.** Each chunk key is placed on its own, so a
  system prompt shared by every request spreads its chunks over the whole
  cluster instead of pinning all traffic to one replica.
* **Minimal movement.** Adding or removing one member of ``N`` changes the
  owners of about ``R/N`` of the keys (only keys where that member is, or
  becomes, one of the top ``R``); every other key keeps its owners.
* **No shared state.** Two clients with the same member list agree on every
  key's owners without talking to each other or to a coordinator, in any
  process and on any machine: the hash is fixed (no per-process seed), and
  the member order given does not matter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache

WEIGHT_BYTES = 8


@lru_cache(maxsize=1024)
def _member_key(member: str) -> bytes:
    # BLAKE2b keys are at most 64 bytes; a digest of the name fits whatever its length.
    return hashlib.blake2b(member.encode(), digest_size=32, person=b"kvstore-member").digest()


def weight(member: str, key: bytes) -> int:
    """The rendezvous weight of ``member`` for ``key``: a stable 64-bit integer."""
    digest = hashlib.blake2b(key, digest_size=WEIGHT_BYTES, key=_member_key(member)).digest()
    return int.from_bytes(digest, "big")


def rank(key: bytes, members: Sequence[str]) -> list[str]:
    """Every member, best owner of ``key`` first (ties, which need a 64-bit collision, by name)."""
    return sorted(members, key=lambda m: (-weight(m, key), m))


def owners(key: bytes, members: Sequence[str], replication: int) -> list[str]:
    """The ``replication`` owners of ``key`` among ``members``, best first.

    ``replication`` above the member count gives every member; below 1 is an error.
    """
    if replication < 1:
        raise ValueError(f"replication must be >= 1, got {replication}")
    return rank(key, members)[:replication]
