"""What each RPC does, independent of gRPC.

The servicer in kvstore/server.py turns wire messages into calls here and maps
the :mod:`kvstore.errors` exceptions raised here to status codes in one place.
Everything a caller can get wrong is checked here *before* the store is touched,
with a message that names the offending field, index and limit.

Put is all-or-nothing per stream: every item is validated (key, namespace, layer,
size, integrity trailer) and buffered up to ``server.max_put_stream_bytes``; only
when the whole stream is good are the blobs charged to the tenant's quota and
written in one ``put_many``. A bad item therefore stores nothing from its stream.
(A backend failing half-way through the write can still leave a prefix of the
stream stored; that is reported as UNAVAILABLE and a retry overwrites it.)
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kvstore import integrity
from kvstore.auth import Authenticator
from kvstore.backends.base import BlobKey
from kvstore.config import ServerConfig
from kvstore.errors import BlobTooLarge, IntegrityError, InvalidRequest, NotFound
from kvstore.keys import KEY_BYTES, Namespace
from kvstore.quotas import QuotaLedger
from kvstore.wire import PACK_HEADROOM

#: Blobs read from the tiers per batch while streaming a Get (bounds server memory per call).
GET_WINDOW_KEYS = 64


@dataclass(frozen=True)
class StagedBlob:
    """One validated layer blob of a Put stream, held until the stream commits.

    (The client's item is :class:`transfer.rpc.core.PutItem`; this is the server's side of it.)
    """

    key: BlobKey
    blob: bytes


class ServerCounters:
    """Server-wide counters reported by Stats (requests, blobs_put, ...)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: Counter[str] = Counter()

    def add(self, **deltas: int) -> None:
        with self._lock:
            self._values.update(deltas)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class StoreService:
    """Validates requests, checks auth and quotas, and drives the tiered store."""

    def __init__(
        self, store: Any, limits: ServerConfig, authenticator: Authenticator, quotas: QuotaLedger
    ) -> None:
        self.store = store
        self.limits = limits
        self.auth = authenticator
        self.quotas = quotas
        self.counters = ServerCounters()
        # Bytes charged per stored blob, kept only with quotas on (about 100 bytes a blob),
        # so overwrites charge the difference and Delete releases exactly what was charged.
        self._charged: dict[BlobKey, int] = {}
        self._quota_lock = threading.Lock()

    # ------------------------------------------------------------ validation

    def namespace(self, text: str, tenant: str | None) -> Namespace:
        try:
            ns = Namespace.parse(text)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        self.auth.authorize(tenant, ns)
        return ns

    def check_keys(self, keys: Sequence[bytes], what: str = "keys") -> None:
        if len(keys) > self.limits.max_keys_per_request:
            raise InvalidRequest(
                f"too many keys: {len(keys)} > server.max_keys_per_request "
                f"({self.limits.max_keys_per_request}); split the request"
            )
        for i, key in enumerate(keys):
            if len(key) != KEY_BYTES:
                raise InvalidRequest(
                    f"{what}[{i}] is {len(key)} bytes; chunk keys must be exactly {KEY_BYTES} bytes "
                    "(compute them with kvstore.keys.chunk_keys)"
                )

    def check_num_layers(self, num_layers: int) -> None:
        if num_layers < 1:
            raise InvalidRequest("num_layers must be >= 1 (the model's layer count)")
        if num_layers > self.limits.max_layers:
            raise InvalidRequest(
                f"num_layers {num_layers} exceeds server.max_layers ({self.limits.max_layers})"
            )

    # ------------------------------------------------------------ RPCs

    def lookup(
        self, tenant: str | None, namespace: str, keys: Sequence[bytes], num_layers: int
    ) -> tuple[int, list[str]]:
        ns = self.namespace(namespace, tenant)
        self.check_keys(keys)
        self.check_num_layers(num_layers)
        if not keys:
            return 0, []
        num_present, tiers = self.store.exists_chunks(str(ns), list(keys), num_layers)
        self.counters.add(lookups=1, keys_looked_up=len(keys), keys_present=num_present)
        return int(num_present), list(tiers)

    def validate_put(
        self, tenant: str | None, items: Iterable[tuple[str, bytes, int, int, bytes]]
    ) -> list[StagedBlob]:
        """Check a whole Put stream; raise on the first bad item, naming its index."""
        namespaces: dict[str, Namespace] = {}
        out: list[StagedBlob] = []
        total = 0
        for i, (namespace, key, layer, num_layers, blob) in enumerate(items):
            where = f"put item {i}"
            ns = namespaces.get(namespace)
            if ns is None:
                try:
                    ns = self.namespace(namespace, tenant)
                except InvalidRequest as exc:
                    raise InvalidRequest(f"{where}: {exc}") from None
                namespaces[namespace] = ns
            if len(key) != KEY_BYTES:
                raise InvalidRequest(
                    f"{where}: key is {len(key)} bytes; chunk keys must be exactly {KEY_BYTES} bytes"
                )
            try:
                self.check_num_layers(num_layers)
            except InvalidRequest as exc:
                raise InvalidRequest(f"{where}: {exc}") from None
            if layer >= num_layers:
                raise InvalidRequest(f"{where}: layer {layer} is out of range for num_layers {num_layers}")
            if len(blob) > self.limits.max_blob_bytes:
                raise BlobTooLarge(
                    f"{where}: blob of {len(blob)} bytes exceeds server.max_blob_bytes "
                    f"({self.limits.max_blob_bytes}); use a denser codec profile or smaller chunks"
                )
            if not integrity.is_intact(blob):
                raise IntegrityError(
                    f"checksum mismatch on put ({where}, layer {layer}, {len(blob)} bytes): the blob's "
                    f"{integrity.TRAILER_BYTES}-byte XXH3 trailer does not match its payload; "
                    "it was corrupted before reaching the server: re-encode and retry"
                )
            total += len(blob)
            if total > self.limits.max_put_stream_bytes:
                raise BlobTooLarge(
                    f"{where}: the Put stream exceeds server.max_put_stream_bytes "
                    f"({self.limits.max_put_stream_bytes}); send fewer blobs per Put call"
                )
            if len(out) >= self.limits.max_keys_per_request * self.limits.max_layers:
                raise InvalidRequest(f"{where}: too many items in one Put stream")
            out.append(StagedBlob(BlobKey(str(ns), bytes(key), int(layer)), blob))
        if not out:
            raise InvalidRequest("empty Put stream: send at least one PutRequest")
        return out

    def put(
        self, tenant: str | None, items: Sequence[StagedBlob], *, durable: bool = False
    ) -> tuple[int, int, list[str]]:
        """Charge quotas, then write the validated stream; returns (blobs, bytes, tiers written).

        Quotas charge what a blob adds: rewriting a block already held (a client
        retrying a whole batch) charges only the size difference. ``durable``
        (``ack: durable``) fails with BackendUnavailable, storing nothing, unless
        a persistent tier takes the write.
        """
        nbytes = sum(len(item.blob) for item in items)
        undo = self._charge(items) if self.quotas.enabled else None
        try:
            pairs = [(item.key, item.blob) for item in items]
            if durable:
                tiers = self.store.put_many(pairs, verified=True, durable=True)  # validate_put checked
            else:
                tiers = self.store.put_many(pairs, verified=True)
        except BaseException:
            if undo is not None:
                undo()
            raise
        self.counters.add(
            puts=1, blobs_put=len(items), bytes_put=nbytes, **({"puts_durable": 1} if durable else {})
        )
        return len(items), nbytes, list(tiers or [])

    def _charge(self, items: Sequence[StagedBlob]) -> Any:
        """Charge each owner the growth its blobs cause; return a callable that undoes it."""
        with self._quota_lock:
            sizes = {item.key: len(item.blob) for item in items}  # last write of a key wins
            previous = {key: self._charged.get(key, 0) for key in sizes}
            growth: Counter[str] = Counter()
            for key, size in sizes.items():
                growth[key.namespace.split("/", 1)[0]] += size - previous[key]
            done: list[tuple[str, int]] = []
            try:
                for owner, delta in growth.items():
                    if delta >= 0:
                        self.quotas.charge(owner, delta)
                    else:
                        self.quotas.release(owner, -delta)
                    done.append((owner, delta))
            except BaseException:
                self._uncharge(done)
                raise
            self._charged.update(sizes)

        def undo() -> None:
            with self._quota_lock:
                self._uncharge(done)
                for key, size in previous.items():
                    if size:
                        self._charged[key] = size
                    else:
                        self._charged.pop(key, None)

        return undo

    def _uncharge(self, done: list[tuple[str, int]]) -> None:
        for owner, delta in done:
            if delta >= 0:
                self.quotas.release(owner, delta)
            else:
                self.quotas.set_usage(owner, self.quotas.usage(owner) - delta)  # re-take a shrink

    def check_get(
        self, tenant: str | None, namespace: str, keys: Sequence[bytes], layer_start: int, layer_end: int
    ) -> Namespace:
        ns = self.namespace(namespace, tenant)
        self.check_keys(keys)
        if not keys:
            raise InvalidRequest("Get needs at least one key")
        if layer_end <= layer_start:
            raise InvalidRequest(
                f"empty layer range [{layer_start}, {layer_end}): layer_end must be > layer_start"
            )
        if layer_end > self.limits.max_layers:
            raise InvalidRequest(
                f"layer_end {layer_end} exceeds server.max_layers ({self.limits.max_layers})"
            )
        return ns

    def get(
        self, ns: Namespace, keys: Sequence[bytes], layer_start: int, layer_end: int
    ) -> Iterator[tuple[int, int, bytes]]:
        """Yield (key_index, layer, blob) in layer order; raise NotFound at the first gap."""
        namespace = str(ns)
        chunks = [bytes(k) for k in keys]
        window = GET_WINDOW_KEYS
        for layer in range(layer_start, layer_end):
            for first in range(0, len(chunks), window):
                # A bounded window at a time: one Get of a million-token layer
                # (~4k blobs) must not hold the whole layer in server memory.
                batch = [BlobKey(namespace, k, layer) for k in chunks[first : first + window]]
                for i, blob in enumerate(self.store.get_many(batch), start=first):
                    if blob is None:
                        self.counters.add(get_misses=1)
                        raise NotFound(
                            f"no blob for keys[{i}] layer {layer} in namespace {namespace!r}: "
                            "Lookup first and fetch only the present prefix"
                        )
                    self.counters.add(blobs_served=1, bytes_served=len(blob))
                    yield i, layer, blob

    def pack_limit(self, requested: int) -> int:
        """Bytes per packed Get message: what the caller asked for, within the message size limit."""
        return max(1, min(requested, self.limits.max_message_bytes - PACK_HEADROOM))

    def delete(self, tenant: str | None, namespace: str, keys: Sequence[bytes], num_layers: int = 0) -> int:
        """Delete layers ``[0, num_layers)`` of each key from every tier; return the chunks deleted.

        ``num_layers`` 0 (an older client) deletes every layer the tiers hold, which
        makes each tier list the namespace to find them: one scan of the RAM and disk
        indexes, and on S3 a listing plus an index read per stored chunk. With the
        layer count the blobs are addressed directly.
        """
        ns = self.namespace(namespace, tenant)
        self.check_keys(keys)
        if num_layers:
            self.check_num_layers(num_layers)
        if not keys:
            return 0
        chunks = [bytes(k) for k in keys]
        freed = self._forget(str(ns), chunks, num_layers) if self.quotas.enabled else 0
        num_deleted = int(self.store.delete_chunks(str(ns), chunks, num_layers or None))
        if freed:
            self.quotas.release(ns.tenant, freed)
        self.counters.add(
            deletes=1, chunks_deleted=num_deleted, **({} if num_layers else {"deletes_scanned": 1})
        )
        return num_deleted

    def _forget(self, namespace: str, chunks: Sequence[bytes], num_layers: int = 0) -> int:
        """Drop the charged sizes of the deleted layers of ``chunks`` (all when ``num_layers`` is 0);
        return the bytes freed."""
        with self._quota_lock:
            if num_layers:
                gone = [
                    k
                    for c in dict.fromkeys(chunks)
                    for layer in range(num_layers)
                    if (k := BlobKey(namespace, c, layer)) in self._charged
                ]
            else:
                wanted = set(chunks)
                gone = [k for k in self._charged if k.namespace == namespace and k.chunk in wanted]
            return sum(self._charged.pop(k) for k in gone)


def pack_blobs(items: Iterable[tuple[int, int, bytes]], limit: int) -> Iterator[tuple[int, int, list[bytes]]]:
    """Group a Get stream into ``(first key_index, layer, [blobs])`` of consecutive keys of one layer.

    A group closes before the blob that would take it over ``limit`` bytes (a
    group always has one blob, whatever its size) and at every layer boundary,
    so a client still sees layer ``L`` complete before anything of ``L + 1``.
    An error from ``items`` propagates as it is: the group being filled is not
    sent, which costs nothing, as clients hand out whole layers only.
    """
    first = layer = -1
    group: list[bytes] = []
    size = 0
    for key_index, item_layer, blob in items:
        if group and (item_layer != layer or key_index != first + len(group) or size + len(blob) > limit):
            yield first, layer, group
            group, size = [], 0
        if not group:
            first, layer = key_index, item_layer
        group.append(blob)
        size += len(blob)
    if group:
        yield first, layer, group
