"""S3 tier: one object per (namespace, chunk) packing every layer, read by byte ranges.

Why packing: S3 bills and rate-limits per request and each request costs a round
trip of milliseconds, so one object per layer would make a 30-layer chunk cost 30
requests each way. Here a chunk is one object ``<prefix><namespace>/<chunk hex>``:

    header  "KVS3" | version u16 | reserved u16 | count u32          (12 bytes)
    index   count x (layer u32 | offset u64 | length u64)            (20 bytes each)
    xxh3    XXH3-64 of header + index                                (8 bytes)
    blobs   the layers' blobs back to back, in layer order

Request counts (see docs/tiers-redis-s3.md):

* put of a new chunk (any number of layers): 1 ``PUT`` with ``If-None-Match: *``;
  adding layers to an existing chunk: ``GET`` + ``PUT If-Match`` (read-modify-write,
  retried if another writer got there first); rewriting all layers of a chunk
  whose index is cached: 1 ``PUT If-Match``;
* get of one layer: 1 ranged ``GET`` once the chunk's index is cached (a bounded
  LRU), else 1 ranged ``GET`` of the first 4 KiB (index, and small layers
  outright) + 1 ranged ``GET``; get of several layers of a chunk: 1 ``GET`` of the
  covering range (or of the whole object when the index is not cached);
* batches are grouped per chunk and chunks run in parallel (``max_concurrency``);
* delete of every stored layer of a chunk deletes the object; deleting some
  layers rewrites it without them (``GET`` + ``PUT If-Match``).

``max_bytes`` is enforced on the blob bytes this process knows of (its catalog is
built by listing the prefix once, then kept current by its own writes, deletes and
reads); the least recently used objects go first. Objects above
``multipart_threshold_bytes`` are uploaded in parts.

Transport errors, timeouts, throttling and 5xx are retried with backoff and then
raised as :class:`~kvstore.errors.BackendUnavailable`; a 404 is a miss.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import xxhash

from kvstore.backends.base import Backend, BackendUsage, BlobKey
from kvstore.backends.breaker import BreakerPolicy, CircuitBreaker, ProbingBreaker
from kvstore.backends.guard import call_budget, remote_guard
from kvstore.errors import BackendUnavailable
from kvstore.retry import Backoff, ExponentialBackoff, Retry

T = TypeVar("T")

MAGIC = b"KVS3"
VERSION = 1
_HEAD = struct.Struct("<4sHHI")
_ENTRY = struct.Struct("<IQQ")
_SUM_BYTES = 8
#: First ranged read of an uncached chunk: the index (up to ~3,000 layers) and, for small
#: objects, every layer. On S3 the first byte costs far more than 64 KiB of transfer.
HEAD_READ_BYTES = 64 << 10
_MIN_PART_BYTES = 5 << 20
#: Conditional writes that lost to a concurrent writer are redone this many times (with backoff).
_RACE_ATTEMPTS = 16  # S3's minimum multipart part size
_RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ServiceUnavailable",
        "InternalError",
        "Throttling",
    }
)


class CorruptObject(Exception):
    """An object's header or index failed its checksum: treated as absent, then replaced."""


class _Fetched(NamedTuple):
    data: bytes
    etag: str
    total: int  # size of the whole object


@dataclass(frozen=True)
class ChunkIndex:
    """Where each layer's blob lies in one chunk object (plus the ETag it was read from)."""

    etag: str
    entries: dict[int, tuple[int, int]]  # layer -> (offset, length)
    header_bytes: int
    fetched_at: float

    @property
    def payload_bytes(self) -> int:
        return sum(length for _, length in self.entries.values())


def header_size(count: int) -> int:
    return _HEAD.size + count * _ENTRY.size + _SUM_BYTES


def pack(layers: dict[int, bytes]) -> tuple[bytes, dict[int, tuple[int, int]]]:
    """One object holding ``layers`` (layer -> blob), and its index."""
    order = sorted(layers)
    offset = header_size(len(order))
    entries: dict[int, tuple[int, int]] = {}
    head = [_HEAD.pack(MAGIC, VERSION, 0, len(order))]
    for layer in order:
        entries[layer] = (offset, len(layers[layer]))
        head.append(_ENTRY.pack(layer, offset, len(layers[layer])))
        offset += len(layers[layer])
    header = b"".join(head)
    header += xxhash.xxh3_64_digest(header)
    return b"".join([header, *(layers[layer] for layer in order)]), entries


def parse_header(data: bytes) -> tuple[dict[int, tuple[int, int]], int] | int:
    """The index and header size, or the number of bytes needed when ``data`` is too short.

    Raises :class:`CorruptObject` when the header is not ours or fails its checksum.
    """
    if len(data) < _HEAD.size:
        return _HEAD.size
    magic, version, _, count = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise CorruptObject(f"not a kvstore chunk object (magic {magic!r}, version {version})")
    size = header_size(count)
    if len(data) < size:
        return size
    if xxhash.xxh3_64_digest(data[: size - _SUM_BYTES]) != data[size - _SUM_BYTES : size]:
        raise CorruptObject("chunk object index failed its checksum")
    entries: dict[int, tuple[int, int]] = {}
    for i in range(count):
        layer, offset, length = _ENTRY.unpack_from(data, _HEAD.size + i * _ENTRY.size)
        entries[layer] = (offset, length)
    return entries, size


def unpack(data: bytes) -> dict[int, bytes]:
    """Every layer of a whole object (raises CorruptObject if it is not one of ours)."""
    parsed = parse_header(data)
    if isinstance(parsed, int):
        raise CorruptObject("chunk object truncated inside its header")
    entries, _ = parsed
    out: dict[int, bytes] = {}
    for layer, (offset, length) in entries.items():
        if offset + length > len(data):
            raise CorruptObject(f"layer {layer} runs past the end of the object")
        out[layer] = data[offset : offset + length]
    return out


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _status(exc: BaseException) -> int:
    if isinstance(exc, botocore.exceptions.ClientError):
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return 0


def _is_missing(exc: BaseException) -> bool:
    return _error_code(exc) in {"NoSuchKey", "404", "NotFound"}


def _is_precondition_failed(exc: BaseException) -> bool:
    return _error_code(exc) in {"PreconditionFailed", "412", "ConditionalRequestConflict"} or _status(
        exc
    ) in {
        409,
        412,
    }


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)):
        return True
    return _status(exc) >= 500 or _error_code(exc) in _RETRYABLE_CODES


def translate_s3_error(exc: BaseException) -> BackendUnavailable | None:
    """Whatever reaches here kept S3 from answering usefully: the tier is unavailable.

    ``NoSuchBucket`` is the exception: it passes through so the backend can make
    the bucket again (an emptied or replaced server) instead of reporting an outage.
    """
    if _error_code(exc) == "NoSuchBucket":
        return None
    if isinstance(exc, (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)):
        return BackendUnavailable(f"s3: {type(exc).__name__}: {exc}")
    return None


def _no_expect_continue(request: Any, **_: Any) -> None:
    """``before-send`` hook (runs after every header is set; SigV4 never signs Expect). Returns None,
    which lets the request go out (a returned value would stand in for the response)."""
    if "Expect" in request.headers:
        del request.headers["Expect"]


class _Catalog:
    """Objects under the prefix known to this process: LRU order and blob bytes, for budgets."""

    def __init__(self) -> None:
        # object -> (blob bytes, layers, etag); insertion order = least recently used first
        self.entries: OrderedDict[str, tuple[int, int, str]] = OrderedDict()
        self.loaded_at: float | None = None
        self.total_bytes = 0
        self.total_layers = 0
        self.lock = threading.Lock()

    def get(self, obj: str) -> tuple[int, int, str] | None:
        with self.lock:
            return self.entries.get(obj)

    def set(self, obj: str, payload_bytes: int, layers: int, etag: str) -> None:
        with self.lock:
            self._drop(obj)
            self.entries[obj] = (payload_bytes, layers, etag)
            self.total_bytes += payload_bytes
            self.total_layers += layers

    def touch(self, obj: str) -> None:
        with self.lock:
            if obj in self.entries:
                self.entries.move_to_end(obj)

    def drop(self, obj: str) -> None:
        with self.lock:
            self._drop(obj)

    def _drop(self, obj: str) -> None:
        old = self.entries.pop(obj, None)
        if old is not None:
            self.total_bytes -= old[0]
            self.total_layers -= old[1]

    def victims(self, budget: int, keep: set[str]) -> list[tuple[str, int]]:
        """Least recently used objects to delete so the total fits ``budget``: (object, layers)."""
        with self.lock:
            excess = self.total_bytes - budget
            out: list[tuple[str, int]] = []
            for obj, (size, layers, _) in self.entries.items():
                if excess <= 0:
                    break
                if obj not in keep:
                    out.append((obj, layers))
                    excess -= size
            return out


class S3Backend(Backend):
    """A shared, durable tier on any S3-compatible object store.

    ``backoff``, ``max_attempts`` and ``breaker_*`` tune the default :class:`Retry`
    (which retries only transport errors, throttling and 5xx) and
    :class:`CircuitBreaker`; ``retry=`` / ``breaker=`` replace them outright.
    ``index_cache_size``/``index_ttl_s`` bound the chunk index cache and
    ``catalog_refresh_s`` how often the budget catalog is re-listed.
    """

    name = "s3"
    persistent = True
    bounded = True

    def __init__(
        self,
        endpoint_url: str = "",
        bucket: str = "kvstore",
        prefix: str = "kv/",
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        max_bytes: int = 0,
        timeout_s: float = 0.35,
        max_concurrency: int = 16,
        multipart_threshold_bytes: int = 64 << 20,
        backoff: Backoff | None = None,
        max_attempts: int = 3,
        breaker_threshold: int = 3,
        breaker_reset_s: float = 0.5,
        breaker_error_rate: float = 0.5,
        breaker_window_s: float = 10.0,
        breaker_min_calls: int = 20,
        write_behind_max_bytes: int = 256 << 20,
        retry: Retry | None = None,
        breaker: CircuitBreaker | None = None,
        index_cache_size: int = 65536,
        index_ttl_s: float = 30.0,
        catalog_refresh_s: float = 300.0,
        connect_timeout_s: float = 0.1,
        budget_s: float = 0.0,
    ) -> None:
        super().__init__()
        if max_bytes < 0 or timeout_s <= 0 or max_concurrency <= 0 or multipart_threshold_bytes <= 0:
            raise ValueError("s3: max_bytes >= 0, timeout_s, max_concurrency, multipart_threshold_bytes > 0")
        if connect_timeout_s <= 0:
            raise ValueError("s3: connect_timeout_s must be > 0")
        # ``timeout_s`` bounds each wait for bytes. 0: connect + read + 0.05 s.
        attempt_s, budget_s = call_budget(
            "s3:", connect_timeout_s, timeout_s, "timeout_s", budget_s, slack_s=0.05
        )
        self.budget_s = budget_s
        self.bucket = bucket
        self.prefix = prefix
        self.region = region
        self.max_bytes = max_bytes
        self.multipart_threshold_bytes = multipart_threshold_bytes
        self.part_bytes = max(_MIN_PART_BYTES, min(multipart_threshold_bytes, 64 << 20))
        self.index_cache_size = index_cache_size
        self.index_ttl_s = index_ttl_s
        self.catalog_refresh_s = catalog_refresh_s
        config = botocore.config.Config(
            region_name=region,
            connect_timeout=connect_timeout_s,
            read_timeout=timeout_s,
            retries={"total_max_attempts": 1},  # our Retry decides; botocore must not retry too
            max_pool_connections=max_concurrency * 2,
            request_checksum_calculation="when_required",  # blobs carry their own checksum
            response_checksum_validation="when_required",
        )
        credentials: dict[str, str] = {}
        if access_key_id is not None and secret_access_key is not None:
            credentials = {"aws_access_key_id": access_key_id, "aws_secret_access_key": secret_access_key}
        #: The boto3 client (public so tests can count requests with an event hook).
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url or None, config=config, **credentials
        )
        # botocore sends uploads with "Expect: 100-continue" and then waits up to a fixed 1 s
        # for the interim answer before sending the body anyway: against a hung server that
        # second is outside every timeout and would double the budget. Drop the header.
        for op in ("PutObject", "UploadPart"):
            self.client.meta.events.register(f"before-send.s3.{op}", _no_expect_continue)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="kvstore-s3")
        self._indexes: OrderedDict[str, ChunkIndex] = OrderedDict()
        self._index_lock = threading.Lock()
        self._catalog = _Catalog()
        self._bucket_ready = False
        self._race_backoff = ExponentialBackoff(base_s=0.005, cap_s=0.2)
        self._object_locks = [threading.Lock() for _ in range(256)]
        # While the breaker is open no request touches S3; a daemon thread asks for the bucket.
        self._guard = remote_guard(
            "s3",
            self._probe,
            translate_s3_error,
            on_open=lambda: self.counters.add(breaker_trips=1),
            retry_on=(botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError),
            retry_if=_is_transient,
            deadline_s=budget_s - attempt_s,
            backoff=backoff,
            max_attempts=max_attempts,
            breaker_reset_s=breaker_reset_s,
            policy=BreakerPolicy(breaker_threshold, breaker_error_rate, breaker_window_s, breaker_min_calls),
            retry=retry,
            breaker=breaker,
        )
        self.breaker = self._guard.breaker
        #: Bytes of blobs the tiered store may hold for this tier while it is skipped (write-behind).
        self.write_behind_max_bytes = write_behind_max_bytes
        # S3 down at start-up: the server still starts; the bucket is made on first use.
        with contextlib.suppress(BackendUnavailable):
            self._ensure_bucket()

    # -- plumbing --------------------------------------------------------------------
    def _ensure_bucket(self) -> None:
        self._guard(self._make_bucket)
        self._bucket_ready = True

    def _probe(self) -> None:
        """The background breaker probe: the bucket check under the call timeouts, not guarded."""
        self._make_bucket()
        self._bucket_ready = True

    def _make_bucket(self) -> None:
        """Head the bucket, creating it when missing (a fresh or emptied server)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as exc:
            if _status(exc) != 404 and _error_code(exc) not in {"404", "NoSuchBucket", "NotFound"}:
                raise
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if self.region and self.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            try:
                self.client.create_bucket(**kwargs)
            except botocore.exceptions.ClientError as create_exc:
                if _error_code(create_exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise

    def _call(self, fn: Callable[[], T]) -> T:
        """One guarded S3 operation; recreates the bucket once if it vanished (e.g. a fresh server)."""
        if not self._bucket_ready:
            self._ensure_bucket()
        try:
            return self._guard(fn)
        except botocore.exceptions.ClientError as exc:
            if _error_code(exc) != "NoSuchBucket":
                raise
            self._bucket_ready = False
            self._forget_all()
            self._ensure_bucket()
            return self._guard(fn)

    def _object(self, namespace: str, chunk: bytes) -> str:
        return f"{self.prefix}{namespace}/{chunk.hex()}"

    def _parse_object(self, obj: str) -> tuple[str, bytes] | None:
        if not obj.startswith(self.prefix):
            return None
        namespace, _, chunk_hex = obj[len(self.prefix) :].rpartition("/")
        try:
            return namespace, bytes.fromhex(chunk_hex)
        except ValueError:
            return None

    def _map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        """Run per-chunk work in parallel; one chunk runs inline (no thread hop)."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))

    @staticmethod
    def _group(keys: Sequence[BlobKey]) -> dict[tuple[str, bytes], list[int]]:
        groups: dict[tuple[str, bytes], list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault((key.namespace, key.chunk), []).append(i)
        return groups

    # -- index cache ------------------------------------------------------------------
    def _cached(self, obj: str) -> ChunkIndex | None:
        with self._index_lock:
            index = self._indexes.get(obj)
            if index is None:
                return None
            if time.monotonic() - index.fetched_at > self.index_ttl_s:
                del self._indexes[obj]
                return None
            self._indexes.move_to_end(obj)
            return index

    def _remember(
        self, obj: str, etag: str, entries: dict[int, tuple[int, int]], header_bytes: int
    ) -> ChunkIndex:
        index = ChunkIndex(etag, entries, header_bytes, time.monotonic())
        with self._index_lock:
            self._indexes[obj] = index
            self._indexes.move_to_end(obj)
            while len(self._indexes) > self.index_cache_size:
                self._indexes.popitem(last=False)
        return index

    def _forget(self, obj: str) -> None:
        with self._index_lock:
            self._indexes.pop(obj, None)

    def _forget_all(self) -> None:
        with self._index_lock:
            self._indexes.clear()

    # -- raw requests (run inside the guard) --------------------------------------------
    def _get_range(self, obj: str, start: int, end: int | None, etag: str | None = None) -> _Fetched:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": obj}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        if etag:
            kwargs["IfMatch"] = etag
        response = self.client.get_object(**kwargs)
        data = response["Body"].read()
        content_range = response.get("ContentRange") or ""
        total = int(content_range.rpartition("/")[2]) if "/" in content_range else start + len(data)
        return _Fetched(data, response["ETag"], total)

    def _fetch_head(self, obj: str) -> _Fetched | None:
        """The object's first bytes, its index remembered; None if the object is absent.

        One ranged GET of ``HEAD_READ_BYTES`` (a second one only for an index of
        hundreds of layers). Objects smaller than that come back whole.
        """

        def run() -> _Fetched | None:
            try:
                head = self._get_range(obj, 0, HEAD_READ_BYTES)
                parsed = parse_header(head.data)
                if isinstance(parsed, int):
                    if parsed > head.total:
                        raise CorruptObject("chunk object shorter than its own header")
                    head = self._get_range(obj, 0, max(parsed, HEAD_READ_BYTES), head.etag)
                    parsed = parse_header(head.data)
                    if isinstance(parsed, int):
                        raise CorruptObject("chunk object shorter than its own header")
            except botocore.exceptions.ClientError as exc:
                if _is_missing(exc):
                    return None
                raise
            self._remember(obj, head.etag, parsed[0], parsed[1])
            return head

        try:
            return self._call(run)
        except CorruptObject:
            self._discard_corrupt(obj)
            return None

    def _load(self, obj: str) -> tuple[dict[int, bytes], str] | None:
        """Every layer of an object and its ETag (one GET); None if absent or unreadable."""

        def run() -> _Fetched | None:
            try:
                return self._get_range(obj, 0, None)
            except botocore.exceptions.ClientError as exc:
                if _is_missing(exc):
                    return None
                raise

        fetched = self._call(run)
        if fetched is None:
            self._forget(obj)
            return None
        return self._unpack_fetched(obj, fetched)

    def _unpack_fetched(self, obj: str, fetched: _Fetched) -> tuple[dict[int, bytes], str] | None:
        try:
            layers = unpack(fetched.data)
            parsed = parse_header(fetched.data)
        except CorruptObject:
            self._discard_corrupt(obj)
            return None
        if not isinstance(parsed, int):
            self._remember(obj, fetched.etag, parsed[0], parsed[1])
        return layers, fetched.etag

    def _discard_corrupt(self, obj: str) -> None:
        """An object whose own header is damaged can serve nothing: count it and delete it."""
        self.counters.add(integrity_failures=1)
        with contextlib.suppress(BackendUnavailable):
            self._delete_objects([obj])

    def _index(self, obj: str) -> ChunkIndex | None:
        cached = self._cached(obj)
        if cached is not None:
            return cached
        if self._fetch_head(obj) is None:
            return None
        return self._cached(obj)

    # -- reads --------------------------------------------------------------------------
    def get(self, key: BlobKey) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[BlobKey]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)
        groups = self._group(keys)

        def fetch(item: tuple[tuple[str, bytes], list[int]]) -> None:
            (namespace, chunk), positions = item
            obj = self._object(namespace, chunk)
            blobs = self._read_layers(obj, sorted({keys[i].layer for i in positions}))
            for i in positions:
                out[i] = blobs.get(keys[i].layer)
            if blobs:
                self._catalog.touch(obj)

        self._map(fetch, list(groups.items()))
        return out

    def _read_layers(self, obj: str, layers: list[int]) -> dict[int, bytes]:
        """The wanted layers of one chunk object that exist, in the fewest requests.

        Index cached: one ranged GET covering the wanted layers (If-Match its ETag,
        so a rewritten object is never sliced with a stale index). Not cached: one
        GET of the whole object for several layers, or of its head for one layer
        (enough when the object is small) plus one ranged GET.
        """
        for _ in range(3):  # the object changed under a cached index: look again
            index = self._cached(obj)
            head = b""
            if index is None:
                if len(layers) > 1:
                    stored = self._load(obj)
                    return {} if stored is None else {n: stored[0][n] for n in layers if n in stored[0]}
                fetched = self._fetch_head(obj)
                index = self._cached(obj)
                if fetched is None or index is None:
                    return {}
                head = fetched.data
            present = [layer for layer in layers if layer in index.entries]
            if not present:
                return {}
            start = min(index.entries[layer][0] for layer in present)
            end = max(sum(index.entries[layer]) for layer in present)
            base = 0
            if end > len(head):
                span = self._read_span(obj, index, start, end)
                if span is None:
                    self._forget(obj)
                    continue
                head, base = span, start
            return {
                layer: head[index.entries[layer][0] - base : sum(index.entries[layer]) - base]
                for layer in present
            }
        return {}

    def _read_span(self, obj: str, index: ChunkIndex, start: int, end: int) -> bytes | None:
        def run() -> bytes | None:
            try:
                return self._get_range(obj, start, end, index.etag).data
            except botocore.exceptions.ClientError as exc:
                if _is_missing(exc) or _is_precondition_failed(exc):
                    return None
                raise

        return self._call(run)

    def exists(self, key: BlobKey) -> bool:
        return self.exists_many([key])[0]

    def exists_many(self, keys: Sequence[BlobKey]) -> list[bool]:
        out = [False] * len(keys)

        def check(item: tuple[tuple[str, bytes], list[int]]) -> None:
            (namespace, chunk), positions = item
            index = self._index(self._object(namespace, chunk))
            for i in positions:
                out[i] = index is not None and keys[i].layer in index.entries

        self._map(check, list(self._group(keys).items()))
        return out

    # -- writes -------------------------------------------------------------------------
    def put(self, key: BlobKey, blob: bytes) -> None:
        self.put_many([(key, blob)])

    def put_many(self, items: Sequence[tuple[BlobKey, bytes]]) -> None:
        if not items:
            return
        too_big = [key for key, blob in items if self.max_bytes and len(blob) > self.max_bytes]
        batches: dict[str, dict[int, bytes]] = {}
        for key, blob in items:
            if not (self.max_bytes and len(blob) > self.max_bytes):
                batches.setdefault(self._object(key.namespace, key.chunk), {})[key.layer] = bytes(blob)
        self._map(lambda item: self._merge_write(item[0], item[1]), list(batches.items()))
        evicted = len(too_big)
        if too_big:  # like the RAM tier: a blob over the whole budget is not cached
            self.delete_many(too_big)
        if self.max_bytes:
            evicted += self._evict(keep=set(batches))
        if evicted:
            self.counters.add(evictions=evicted)

    def _lock_for(self, obj: str) -> threading.Lock:
        return self._object_locks[hash(obj) % len(self._object_locks)]

    def _merge_write(self, obj: str, layers: dict[int, bytes]) -> None:
        """Write ``layers`` into the chunk object, keeping the other layers stored there.

        Writers in this process take the object's lock, so they never race each
        other (and the cached ETag stays current). Across processes every write is conditional: ``If-None-Match: *`` when we believe the object
        is absent, ``If-Match: <etag>`` of the version we merged with otherwise. A
        failed condition means another writer got there first: re-read and redo.
        """
        with self._lock_for(obj):
            self._merge_write_locked(obj, layers)

    def _merge_write_locked(self, obj: str, layers: dict[int, bytes]) -> None:
        index = self._cached(obj)
        # What we believe is stored: None (absent) or (its layers if read, their numbers, ETag).
        base: tuple[dict[int, bytes] | None, set[int], str] | None = (
            None if index is None else (None, set(index.entries), index.etag)
        )
        for attempt in range(_RACE_ATTEMPTS):
            if attempt > 1:  # the first retry follows a cache miss, not a race
                time.sleep(self._race_backoff.compute(attempt - 1))
            if base is None:
                if self._write(obj, layers, if_none_match=True):
                    return
            else:
                stored, numbers, etag = base
                body = (
                    layers if numbers <= layers.keys() else None if stored is None else {**stored, **layers}
                )
                if body is not None and self._write(obj, body, etag=etag):
                    return
            loaded = self._load(obj)
            base = None if loaded is None else (loaded[0], set(loaded[0]), loaded[1])
        raise BackendUnavailable(f"s3: {obj} kept changing under concurrent writers; write abandoned")

    def _write(
        self, obj: str, layers: dict[int, bytes], etag: str | None = None, if_none_match: bool = False
    ) -> bool:
        """One conditional write; False if the condition failed (someone else wrote first)."""
        body, entries = pack(layers)
        conditions: dict[str, str] = {}
        if etag is not None:
            conditions["IfMatch"] = etag
        if if_none_match:
            conditions["IfNoneMatch"] = "*"

        def run() -> str | None:
            try:
                if len(body) > self.multipart_threshold_bytes:
                    return self._multipart(obj, body, conditions)
                return self.client.put_object(Bucket=self.bucket, Key=obj, Body=body, **conditions)["ETag"]
            except botocore.exceptions.ClientError as exc:
                if _is_precondition_failed(exc) or (etag is not None and _is_missing(exc)):
                    return None
                raise

        new_etag = self._call(run)
        if new_etag is None:
            self._forget(obj)
            return False
        index = self._remember(obj, new_etag, entries, header_size(len(entries)))
        self._catalog.set(obj, index.payload_bytes, len(entries), new_etag)
        return True

    def _multipart(self, obj: str, body: bytes, conditions: dict[str, str]) -> str:
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=obj)["UploadId"]
        try:
            parts = []
            view = memoryview(body)
            for number, start in enumerate(range(0, len(body), self.part_bytes), start=1):
                part = self.client.upload_part(
                    Bucket=self.bucket,
                    Key=obj,
                    UploadId=upload,
                    PartNumber=number,
                    Body=bytes(view[start : start + self.part_bytes]),
                )
                parts.append({"PartNumber": number, "ETag": part["ETag"]})
            return self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=obj, UploadId=upload, MultipartUpload={"Parts": parts}, **conditions
            )["ETag"]
        except BaseException:
            # If this fails too, the bucket's lifecycle rule for incomplete uploads cleans up.
            with contextlib.suppress(botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=obj, UploadId=upload)
            raise

    def delete(self, key: BlobKey) -> bool:
        return self.delete_many([key]) == 1

    def delete_many(self, keys: Sequence[BlobKey]) -> int:
        def remove(item: tuple[tuple[str, bytes], list[int]]) -> int:
            (namespace, chunk), positions = item
            return self._remove_layers(self._object(namespace, chunk), {keys[i].layer for i in positions})

        return sum(self._map(remove, list(self._group(keys).items())))

    def _remove_layers(self, obj: str, layers: set[int]) -> int:
        """Drop ``layers`` from one chunk object: delete it if nothing else is left, else rewrite it."""
        with self._lock_for(obj):
            return self._remove_layers_locked(obj, layers)

    def _remove_layers_locked(self, obj: str, layers: set[int]) -> int:
        for attempt in range(_RACE_ATTEMPTS):
            if attempt:
                time.sleep(self._race_backoff.compute(attempt))
            self._forget(obj)  # a delete must see the current object, not a cached index
            head = self._fetch_head(obj)
            index = self._cached(obj)
            if head is None or index is None:
                return 0
            gone = layers & set(index.entries)
            if not gone:
                return 0
            if gone == set(index.entries):
                self._delete_objects([obj])
                return len(gone)
            # Small objects came back whole with the head read: no second GET needed.
            stored = self._unpack_fetched(obj, head) if len(head.data) >= head.total else self._load(obj)
            if stored is None:
                continue
            kept = {layer: blob for layer, blob in stored[0].items() if layer not in layers}
            if self._write(obj, kept, etag=stored[1]):
                return len(gone)
        raise BackendUnavailable(f"s3: {obj} kept changing under concurrent writers; delete abandoned")

    def _delete_objects(self, objs: list[str]) -> None:
        for start in range(0, len(objs), 1000):
            batch = objs[start : start + 1000]
            if len(batch) == 1:
                self._call(lambda b=batch: self.client.delete_object(Bucket=self.bucket, Key=b[0]))
            else:
                self._call(
                    lambda b=batch: self.client.delete_objects(
                        Bucket=self.bucket, Delete={"Objects": [{"Key": o} for o in b], "Quiet": True}
                    )
                )
            for obj in batch:
                self._forget(obj)
                self._catalog.drop(obj)

    def _evict(self, keep: set[str]) -> int:
        """Delete least recently used objects until the budget holds; returns layers evicted."""
        self._ensure_catalog()
        victims = self._catalog.victims(self.max_bytes, keep)
        if victims:
            self._delete_objects([obj for obj, _ in victims])
        return sum(layers for _, layers in victims)

    # -- listing and accounting ----------------------------------------------------------
    def _list_objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(lambda kw=kwargs: self.client.list_objects_v2(**kw))
            yield from page.get("Contents", [])
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def iter_keys(self, namespace: str | None = None) -> Iterator[BlobKey]:
        prefix = self.prefix + (f"{namespace}/" if namespace else "")
        objs = [o["Key"] for o in self._list_objects(prefix)]
        for start in range(0, len(objs), 256):
            batch = objs[start : start + 256]
            for obj, index in zip(batch, self._map(self._index, batch), strict=True):
                parsed = self._parse_object(obj)
                if index is None or parsed is None:
                    continue
                if namespace is not None and parsed[0] != namespace:
                    continue
                for layer in sorted(index.entries):
                    yield BlobKey(parsed[0], parsed[1], layer)

    def _ensure_catalog(self) -> None:
        """(Re)build the catalog from a listing, at most every ``catalog_refresh_s``.

        A refresh costs one list request per 1,000 objects: objects whose ETag is
        unchanged keep what this process knew (sizes and LRU position); only objects
        new to it have their index read. Objects other writers added count as the
        least recently used.
        """
        old = self._catalog
        if old.loaded_at is not None and time.monotonic() - old.loaded_at < self.catalog_refresh_s:
            return
        listed = {o["Key"]: o for o in self._list_objects(self.prefix)}
        unknown = sorted(
            (o for key, o in listed.items() if (old.get(key) or (0, 0, ""))[2] != o["ETag"]),
            key=lambda o: o["LastModified"],
        )
        indexes = self._map(self._index, [o["Key"] for o in unknown])
        catalog = _Catalog()
        for o, index in zip(unknown, indexes, strict=True):
            if index is not None:
                catalog.set(o["Key"], index.payload_bytes, len(index.entries), index.etag)
        with old.lock:
            known = [(obj, entry) for obj, entry in old.entries.items() if obj in listed]
        changed = {o["Key"] for o in unknown}
        for obj, entry in known:
            if obj not in changed:
                catalog.set(obj, *entry)
        catalog.loaded_at = time.monotonic()
        self._catalog = catalog

    def usage(self) -> BackendUsage:
        self._ensure_catalog()
        return BackendUsage(
            bytes=self._catalog.total_bytes,
            objects=self._catalog.total_layers,
            capacity_bytes=self.max_bytes,
        )

    def healthy(self) -> bool:
        try:
            self._ensure_bucket()
            return True
        except BackendUnavailable:
            return False

    def close(self) -> None:
        if isinstance(self.breaker, ProbingBreaker):
            self.breaker.close()
        self._pool.shutdown(wait=True)
        self.client.close()
