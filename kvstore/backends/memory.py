"""RAM tier: a byte-bounded LRU of immutable blobs.

The fastest tier and the first one every read tries, so every operation is a
dict operation under one short lock. Blobs are stored as the objects callers
hand in when those are immutable: ``bytes``, or a read-only memoryview of
``bytes`` (the server's Put hands in views into the received message, see
kvstore/wire.py); anything else (a bytearray, a view of one) is copied. A ``get``
returns the stored object, which is safe because it cannot change.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from kvstore.backends.base import Backend, BackendUsage, BlobKey

DEFAULT_MAX_BYTES = 2 << 30


def _immutable(blob: object) -> bool:
    """True for ``bytes`` and for a read-only memoryview of ``bytes``: safe to keep without a copy."""
    if type(blob) is bytes:
        return True
    return (
        type(blob) is memoryview
        and type(blob.obj) is bytes
        and blob.readonly
        and blob.contiguous
        and blob.itemsize == 1
    )


class MemoryBackend(Backend):
    """Least-recently-used blobs are evicted once their total size exceeds ``max_bytes``.

    ``max_bytes=0`` means unbounded. A blob larger than the whole budget is not
    stored (and counted as an eviction): caching it would flush everything else.
    """

    name = "memory"
    persistent = False
    bounded = True

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__()
        if max_bytes < 0:
            raise ValueError(f"memory max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._blobs: OrderedDict[BlobKey, bytes | memoryview] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: BlobKey) -> bytes | None:
        with self._lock:
            blob = self._blobs.get(key)
            if blob is not None:
                self._blobs.move_to_end(key)
            return blob

    def get_many(self, keys: Sequence[BlobKey]) -> list[bytes | None]:
        out: list[bytes | None] = []
        with self._lock:
            for key in keys:
                blob = self._blobs.get(key)
                if blob is not None:
                    self._blobs.move_to_end(key)
                out.append(blob)
        return out

    def put(self, key: BlobKey, blob: bytes) -> None:
        self.put_many([(key, blob)])

    def put_many(self, items: Sequence[tuple[BlobKey, bytes]]) -> None:
        evicted = 0
        with self._lock:
            for key, blob in items:
                data = blob if _immutable(blob) else bytes(blob)
                old = self._blobs.pop(key, None)
                if old is not None:
                    self._bytes -= len(old)
                if self.max_bytes and len(data) > self.max_bytes:
                    evicted += 1
                    continue
                self._blobs[key] = data
                self._bytes += len(data)
                while self.max_bytes and self._bytes > self.max_bytes:
                    _, dropped = self._blobs.popitem(last=False)
                    self._bytes -= len(dropped)
                    evicted += 1
        if evicted:
            self.counters.add(evictions=evicted)

    def exists(self, key: BlobKey) -> bool:
        with self._lock:
            return key in self._blobs

    def exists_many(self, keys: Sequence[BlobKey]) -> list[bool]:
        with self._lock:
            return [k in self._blobs for k in keys]

    def delete(self, key: BlobKey) -> bool:
        with self._lock:
            old = self._blobs.pop(key, None)
            if old is None:
                return False
            self._bytes -= len(old)
            return True

    def delete_many(self, keys: Sequence[BlobKey]) -> int:
        return sum(1 for k in keys if self.delete(k))

    def iter_keys(self, namespace: str | None = None) -> Iterator[BlobKey]:
        with self._lock:
            snapshot = list(self._blobs)
        return iter([k for k in snapshot if namespace is None or k.namespace == namespace])

    def usage(self) -> BackendUsage:
        with self._lock:
            return BackendUsage(bytes=self._bytes, objects=len(self._blobs), capacity_bytes=self.max_bytes)

    def close(self) -> None:
        with self._lock:
            self._blobs.clear()
            self._bytes = 0
