"""The one interface every storage tier implements.

Lifecycle: a backend is built from its config section, serves ``get``/``put``/
``exists``/``delete``/``iter_keys`` from any thread, and is ``close``d once.
Bytes in, bytes out: a backend never interprets a blob (the tiered store checks
integrity), a miss is ``None`` (never an exception), and ``delete`` is idempotent.

Failures of the medium itself (connection refused, timeout, disk I/O error) are
raised as :class:`kvstore.errors.BackendUnavailable`; the tiered store turns them
into misses and error metrics so a dead tier never takes the server down.

Batch methods have defaults built on the single-key ones; tiers where a round
trip is expensive (Redis pipelines, S3 packed chunk objects) override them.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, order=True)
class BlobKey:
    """Address of one stored blob: one layer of one chunk in one namespace."""

    namespace: str
    chunk: bytes
    layer: int

    def name(self) -> str:
        """A flat, filesystem- and URL-safe name, stable across processes."""
        return f"{self.namespace}/{self.chunk.hex()}/{self.layer}"


@dataclass
class BackendUsage:
    bytes: int = 0
    objects: int = 0
    capacity_bytes: int = 0  # 0: unbounded


@dataclass
class BackendCounters:
    """Counters the tiered store and the backend itself bump; read by Stats/metrics."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    errors: int = 0
    integrity_failures: int = 0
    #: Records a recovery skipped because they failed their checks (disk tier; each loses only itself).
    corrupt_records: int = 0
    #: Times the tier's circuit breaker opened (remote tiers).
    breaker_trips: int = 0
    #: Blobs a write skipped this tier for (breaker open, failed call), kept to write behind;
    #: of those, written once the tier answered again, and dropped past the bounded backlog.
    write_behind_queued: int = 0
    write_behind_written: int = 0
    write_behind_dropped: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


class Backend(ABC):
    """A storage tier. Subclasses set the class attributes that describe them."""

    #: Short tier name used in stats and metrics ("memory", "disk", "redis", "s3").
    name: str = "backend"
    #: Survives a restart of the server process.
    persistent: bool = False
    #: Evicts by itself to stay within a byte budget.
    bounded: bool = False
    #: Blob bytes the tiered store keeps for this tier while a write skips it, to write them
    #: behind once it answers again (0: none). Remote tiers take it from their config section.
    write_behind_max_bytes: int = 0

    def __init__(self) -> None:
        self.counters = BackendCounters()

    @classmethod
    def from_config(cls, section: Any) -> Backend:
        """Build the tier from its config section (a dataclass in kvstore/config.py).

        Every section field that names a constructor parameter is passed; fields the
        constructor does not take (``enabled``) are the store's business, and
        parameters the config does not expose keep their defaults. One rule for
        every tier, so a new config field reaches its backend without glue code.
        """
        accepted = inspect.signature(cls.__init__).parameters
        fields = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name in accepted}
        return cls(**fields)

    @abstractmethod
    def get(self, key: BlobKey) -> bytes | None: ...

    @abstractmethod
    def put(self, key: BlobKey, blob: bytes) -> None:
        """Store ``blob``; replaces an existing blob under the same key."""

    @abstractmethod
    def exists(self, key: BlobKey) -> bool: ...

    @abstractmethod
    def delete(self, key: BlobKey) -> bool:
        """Remove ``key``; True if it was there. Deleting a missing key is fine."""

    @abstractmethod
    def iter_keys(self, namespace: str | None = None) -> Iterator[BlobKey]: ...

    @abstractmethod
    def usage(self) -> BackendUsage: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files; further calls are undefined."""

    def healthy(self) -> bool:
        """Cheap liveness probe used by Stats and the health service."""
        return True

    # Batch defaults built on the single-key methods.
    def get_many(self, keys: Sequence[BlobKey]) -> list[bytes | None]:
        return [self.get(k) for k in keys]

    def put_many(self, items: Sequence[tuple[BlobKey, bytes]]) -> None:
        """Store several blobs; callers pass all layers of a chunk together when they can."""
        for key, blob in items:
            self.put(key, blob)

    def exists_many(self, keys: Sequence[BlobKey]) -> list[bool]:
        return [self.exists(k) for k in keys]

    def delete_many(self, keys: Sequence[BlobKey]) -> int:
        return sum(1 for k in keys if self.delete(k))
