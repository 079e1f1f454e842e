"""The client's logic without I/O: options, validation, request building, checks and results.

Everything here is plain computation on values: nothing opens a channel,
awaits or sleeps. :mod:`transfer.rpc.ops` builds the client's operations (retry,
windowing, Put batching, Get assembly) from these pieces as generators of
effects, and the two front-ends, :class:`transfer.rpc.client.KVClient` (blocking)
and :class:`transfer.rpc.aio_client.AsyncKVClient` (asyncio), only carry the
effects out. A rule changed here changes both clients; they cannot drift apart.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from kvstore import integrity
from kvstore.keys import KEY_BYTES, Namespace
from kvstore.retry import Backoff, ExponentialBackoff
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire import (
    PACK_HEADROOM,
    Blob,
    GetResponseView,
    PutRequestView,
    commit_request,
    encode_put_request,
    parse_get_response,
)
from transfer.errors import (
    BlobIntegrityError,
    InvalidArgument,
    TransferError,
    Unavailable,
    from_rpc_error,
)

MiB = 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 72 * MiB  # matches the server's default
DEFAULT_PUT_BATCH_BYTES = 64 * MiB  # well under the server's max_put_stream_bytes (512 MiB)
DEFAULT_MAX_KEYS_PER_REQUEST = 4096  # the server's default limit
DEFAULT_GET_PACK_BYTES = 1 * MiB  # blobs of one layer per Get message (GetRequest.pack_bytes)
MAX_LAYERS = 1 << 20
#: ``ack`` values a Put may ask for (kvstore.v1.Ack); None leaves it to the server's ``server.ack``.
ACKS = {None: pb.ACK_UNSPECIFIED, "memory": pb.ACK_MEMORY, "durable": pb.ACK_DURABLE}
PUT_METHOD = "/kvstore.v1.KVStore/Put"
GET_METHOD = "/kvstore.v1.KVStore/Get"


class PutItem(NamedTuple):
    """One (chunk key, layer) blob to store; plain 4-tuples are accepted too."""

    key: bytes
    layer: int
    num_layers: int
    blob: Blob


@dataclass(frozen=True)
class PutResult:
    num_stored: int
    bytes_stored: int
    #: Put streams used (one per ``put_batch_bytes``), retries not counted.
    num_requests: int
    #: Whether a persistent tier (disk, Redis, S3) took every blob (the server says so per stream).
    durable: bool = False
    #: Tiers that took every blob of every stream, fastest first.
    tiers: tuple[str, ...] = ()


@dataclass(frozen=True)
class TierStats:
    name: str
    bytes: int
    objects: int
    capacity_bytes: int
    hits: int
    misses: int
    evictions: int
    errors: int
    integrity_failures: int
    healthy: bool
    #: Records a start-up recovery skipped as corrupt (each lost only itself).
    corrupt_records: int = 0
    #: Times the tier's circuit breaker opened.
    breaker_trips: int = 0


@dataclass(frozen=True)
class StoreStats:
    tiers: list[TierStats]
    counters: dict[str, int] = field(default_factory=dict)
    version: str = ""


class RetryPolicy:
    """Which failures get another attempt, how many, and how long to wait between.

    It only decides (:meth:`should_retry`, :meth:`delay`); the loop that applies
    it is :func:`transfer.rpc.ops.retrying` (as effects: the drivers sleep), and the
    wait comes from a :class:`kvstore.retry.Backoff` (the vocabulary is listed in
    :mod:`kvstore.retry`).

    Only failures that leave nothing half-done on the server are worth a retry:
    by default :class:`Unavailable` (no server, connection reset). A caller that
    wants deadlines or transit corruption retried adds those classes to
    ``retry_on``; ``INVALID_ARGUMENT``-like errors never succeed on a retry and
    should not be listed.
    """

    def __init__(
        self,
        backoff: Backoff | None = None,
        max_attempts: int = 4,
        retry_on: tuple[type[TransferError], ...] = (Unavailable,),
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.backoff = backoff if backoff is not None else ExponentialBackoff(base_s=0.05, cap_s=1.0)
        self.max_attempts = max_attempts
        self.retry_on = retry_on

    def should_retry(self, error: TransferError, failures: int) -> bool:
        """True when attempt ``failures + 1`` may run after ``error``."""
        return failures < self.max_attempts and isinstance(error, self.retry_on)

    def delay(self, failures: int) -> float:
        return self.backoff.compute(failures)


NO_RETRY = RetryPolicy(max_attempts=1)


def _read_pem(value: bytes | str | Path | None) -> bytes | None:
    """PEM bytes from bytes, or from a path given as str/Path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class ClientCore:
    """Everything of a client that does not depend on sync vs async I/O."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls_root_cert: bytes | str | Path | None = None,
        tls_client_cert: bytes | str | Path | None = None,
        tls_client_key: bytes | str | Path | None = None,
        tls_server_name: str | None = None,
        tls: bool | None = None,
        timeout_s: float = 10.0,
        stream_timeout_s: float = 300.0,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        put_batch_bytes: int = DEFAULT_PUT_BATCH_BYTES,
        max_keys_per_request: int = DEFAULT_MAX_KEYS_PER_REQUEST,
        get_pack_bytes: int = DEFAULT_GET_PACK_BYTES,
        interceptors: Sequence[Any] = (),
        ack: str | None = None,
    ) -> None:
        if not target:
            raise ValueError("target must be 'host:port'")
        if timeout_s <= 0 or stream_timeout_s <= 0:
            raise ValueError("timeout_s and stream_timeout_s must be > 0")
        if max_message_bytes <= 0 or put_batch_bytes <= 0 or max_keys_per_request <= 0:
            raise ValueError("max_message_bytes, put_batch_bytes and max_keys_per_request must be > 0")
        if get_pack_bytes < 0:
            raise ValueError("get_pack_bytes must be >= 0 (0: one blob per Get message)")
        if (tls_client_cert is None) != (tls_client_key is None):
            raise ValueError("tls_client_cert and tls_client_key go together (mutual TLS)")
        #: Default acknowledgement of this client's Puts: "memory", "durable" or None (the server's).
        self.ack = self.ack_value(ack)
        self.target = target
        self.timeout_s = timeout_s
        self.stream_timeout_s = stream_timeout_s
        self.retry = retry if retry is not None else RetryPolicy()
        self.max_message_bytes = max_message_bytes
        self.put_batch_bytes = put_batch_bytes
        self.max_keys_per_request = max_keys_per_request
        #: Asked of the server for each Get; never more than this client accepts in one message.
        self.get_pack_bytes = min(get_pack_bytes, max(0, max_message_bytes - PACK_HEADROOM))
        #: Client interceptors (tracing, tests that tamper with bytes in transit), outermost first.
        self.interceptors = tuple(interceptors)
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        use_tls = (
            tls
            if tls is not None
            else any(x is not None for x in (tls_root_cert, tls_client_cert, tls_server_name))
        )
        self.credentials: grpc.ChannelCredentials | None = None
        if use_tls:
            self.credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(tls_root_cert),
                private_key=_read_pem(tls_client_key),
                certificate_chain=_read_pem(tls_client_cert),
            )
        self.options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # gRPC's own reconnect backoff starts at 1 s; while it runs every call fails
            # fast, so a retry a few tens of ms later could never reach a server that just
            # came back. Start it low and let RetryPolicy's backoff do the pacing.
            ("grpc.initial_reconnect_backoff_ms", 50),
            ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if tls_server_name:
            self.options.append(("grpc.ssl_target_name_override", tls_server_name))

    # -- validation and request building ---------------------------------------------------------

    @staticmethod
    def namespace(namespace: Namespace | str) -> str:
        text = str(namespace)
        try:
            Namespace.parse(text)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        return text

    @staticmethod
    def check_keys(keys: Sequence[bytes]) -> list[bytes]:
        out = []
        for i, key in enumerate(keys):
            if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
                raise InvalidArgument(
                    f"key {i} must be {KEY_BYTES} bytes, got {type(key).__name__} "
                    f"of length {len(key) if hasattr(key, '__len__') else '?'}"
                )
            out.append(bytes(key))
        return out

    @staticmethod
    def check_layer_range(layer_start: int, layer_end: int) -> None:
        if not 0 <= layer_start < layer_end <= MAX_LAYERS:
            raise InvalidArgument(f"layer range [{layer_start}, {layer_end}) is empty or out of bounds")

    def get_request(
        self, namespace: str, keys: list[bytes], layer_start: int, layer_end: int
    ) -> pb.GetRequest:
        return pb.GetRequest(
            namespace=namespace,
            keys=keys,
            layer_start=layer_start,
            layer_end=layer_end,
            pack_bytes=self.get_pack_bytes,
        )

    def windows(self, keys: list[bytes]) -> list[tuple[int, list[bytes]]]:
        """``keys`` cut into (offset, window) pieces the server accepts in one request."""
        n = self.max_keys_per_request
        return [(i, keys[i : i + n]) for i in range(0, len(keys), n)] or [(0, [])]

    @staticmethod
    def delete_layers(num_layers: int | None) -> int:
        """DeleteRequest.num_layers for a delete() argument (0: the server searches every tier)."""
        if num_layers is None:
            return 0
        if not isinstance(num_layers, int) or not 1 <= num_layers <= MAX_LAYERS:
            raise InvalidArgument(f"num_layers must be in [1, {MAX_LAYERS}] or None, got {num_layers!r}")
        return num_layers

    @staticmethod
    def ack_value(ack: str | None) -> int:
        if ack not in ACKS:
            raise ValueError(f"ack must be 'memory', 'durable' or None (the server's default), got {ack!r}")
        return ACKS[ack]

    @staticmethod
    def put_result(responses: list[pb.PutResponse]) -> PutResult:
        """The sum of a put()'s streams; durable and tiers only what held for every stream."""
        tiers = [t for t in responses[0].tiers if all(t in r.tiers for r in responses)] if responses else []
        return PutResult(
            sum(r.num_stored for r in responses),
            sum(r.bytes_stored for r in responses),
            len(responses),
            bool(responses) and all(r.durable for r in responses),
            tuple(tiers),
        )

    def put_request(self, namespace: str, item: PutItem | tuple[Any, ...]) -> PutRequestView:
        """Validated request for one item.

        The blob's trailer is not hashed here: the encoder just computed it and the
        server checks it once, refusing the whole stream if it does not match
        (DATA_LOSS, raised as InvalidArgument by :meth:`error`). Only a blob too short
        to carry a trailer at all is refused here.
        """
        try:
            key, layer, num_layers, blob = item
        except (TypeError, ValueError):
            raise InvalidArgument("put items must be (key, layer, num_layers, blob)") from None
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise InvalidArgument(f"put key must be {KEY_BYTES} bytes")
        if not (
            isinstance(layer, int) and isinstance(num_layers, int) and 0 <= layer < num_layers <= MAX_LAYERS
        ):
            raise InvalidArgument(f"put layer {layer} is not in [0, num_layers={num_layers})")
        if len(blob) < integrity.TRAILER_BYTES:
            raise InvalidArgument(
                f"blob for key {bytes(key).hex()[:16]}… layer {layer} has no valid integrity trailer; "
                "encode it with transfer.codec (or seal it with kvstore.integrity.seal)"
            )
        if len(blob) + 1024 > self.max_message_bytes:
            raise InvalidArgument(
                f"blob of {len(blob)} bytes exceeds max_message_bytes={self.max_message_bytes}"
            )
        # bytes are immutable and kept as they are; anything else is copied, since the batch
        # may be replayed after the caller reused its buffer.
        return PutRequestView(
            namespace, bytes(key), layer, num_layers, blob if type(blob) is bytes else bytes(blob)
        )

    def bulk_methods(self, channel: Any) -> tuple[Any, Any]:
        """Put and Get callables on ``channel`` (sync or asyncio) that move blobs with
        :mod:`kvstore.wire` instead of protobuf: same bytes on the wire, two fewer copies."""
        put = channel.stream_unary(
            PUT_METHOD, request_serializer=encode_put_request, response_deserializer=pb.PutResponse.FromString
        )
        get = channel.unary_stream(
            GET_METHOD,
            request_serializer=pb.GetRequest.SerializeToString,
            response_deserializer=parse_get_response,
        )
        return put, get

    def check_blob(self, namespace: str, key: bytes, layer: int, blob: Blob) -> Blob:
        if not integrity.is_intact(blob):
            raise BlobIntegrityError(namespace, key, layer, len(blob))
        return blob

    @staticmethod
    def stats_result(resp: pb.StatsResponse) -> StoreStats:
        tiers = [
            TierStats(
                t.name,
                t.bytes,
                t.objects,
                t.capacity_bytes,
                t.hits,
                t.misses,
                t.evictions,
                t.errors,
                t.integrity_failures,
                t.healthy,
                t.corrupt_records,
                t.breaker_trips,
            )
            for t in resp.tiers
        ]
        return StoreStats(tiers=tiers, counters=dict(resp.counters), version=resp.version)

    def timeout(self, override: float | None, *, stream: bool = False) -> float:
        if override is not None:
            return override
        return self.stream_timeout_s if stream else self.timeout_s

    def error(self, err: grpc.RpcError, rpc: str) -> TransferError:
        out = from_rpc_error(err, rpc=rpc)
        if rpc == "Put" and out.code is grpc.StatusCode.DATA_LOSS:
            # The server's one check of the trailers (see put_request): a blob the caller handed in
            # was not sealed, or was changed after sealing. The caller's to fix, like any bad argument.
            return InvalidArgument(
                f"Put: a blob has no valid integrity trailer, nothing of its Put stream was stored; encode "
                f"blobs with transfer.codec (or seal them with kvstore.integrity.seal). Server: {out.details}",
                details=out.details,
            )
        return out


class LayerAssembler:
    """Groups a Get stream (all keys of layer L, then L+1, ...) into whole layers.

    Verifies each blob's trailer and that the server keeps its promised order,
    so a consumer sees complete, intact layers or an error, never a partial one.
    """

    def __init__(
        self, core: ClientCore, namespace: str, keys: list[bytes], layer_start: int, layer_end: int
    ) -> None:
        self._core = core
        self._namespace = namespace
        self._keys = keys
        self.next_layer = layer_start
        self._end = layer_end
        self._slots: list[Blob | None] = [None] * len(keys)
        self._filled = 0

    def feed(self, resp: GetResponseView) -> tuple[int, list[Blob]] | None:
        """Take one message (one blob, or a packed run of them); return ``(layer, blobs)`` when it
        completes a layer. A packed message never spans layers (the server closes packs there)."""
        if len(resp.blobs) > 1:
            # Copied out: a view would keep the whole packed message alive for as long as any one of
            # its blobs is, and a consumer that keeps a few blobs would keep many (measured: a
            # million-token offload's client RSS doubled). One copy of small blobs costs little.
            blobs: list[Blob] = [bytes(b) for b in resp.blobs]
        else:
            blobs = resp.blobs or [resp.blob]
        last = resp.key_index + len(blobs) - 1
        if resp.layer != self.next_layer or last >= len(self._keys):
            raise TransferError(
                f"Get: server sent layer {resp.layer} keys {resp.key_index}..{last} while layer "
                f"{self.next_layer} ({self._filled}/{len(self._keys)} keys) was incomplete; the stream is out of order"
            )
        for index, blob in enumerate(blobs, start=resp.key_index):
            if self._slots[index] is not None:
                raise TransferError(f"Get: server sent key {index} of layer {resp.layer} twice")
            self._slots[index] = self._core.check_blob(self._namespace, self._keys[index], resp.layer, blob)
            self._filled += 1
        if self._filled < len(self._keys):
            return None
        done = (self.next_layer, self._slots)
        self.next_layer += 1
        self._slots = [None] * len(self._keys)
        self._filled = 0
        return done  # type: ignore[return-value]

    def finish(self) -> None:
        """The stream ended normally: every requested layer must have been seen."""
        if self.next_layer != self._end:
            raise TransferError(
                f"Get: stream ended at layer {self.next_layer} of [.., {self._end}) without an error status"
            )


_END = object()


class PutBatch:
    """The requests of one Put stream, pulled lazily from the caller's items.

    Requests are kept until the stream succeeds so a retry can replay them; the
    batch closes once ``max_bytes`` of blobs are in it or the source runs dry.
    Several attempts may iterate concurrently (gRPC consumes request iterators
    on its own thread and an aborted attempt's thread may still be pulling):
    they share one list under a lock, so no item is lost or sent twice per
    attempt. The source is a plain iterator (:meth:`step`, :meth:`attempt`) or,
    for the asyncio client, a plain or async one (:meth:`astep`, :meth:`aattempt`).
    """

    def __init__(self, core: ClientCore, namespace: str, source: Any, ack: int = 0) -> None:
        self._core = core
        self._ack = ack
        self._namespace = namespace
        self._source = source
        self._sent: list[PutRequestView] = []
        self._bytes = 0
        self._closed = False
        self.exhausted = False
        #: An exception raised by the caller's iterator or by validation; it is
        #: what the caller sees, not the CANCELLED status gRPC turns it into.
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._alock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self._sent)

    def step(self, index: int) -> PutRequestView | None:
        """Request ``index`` of the batch (pulling it if new), or ``None`` at its end (see commit())."""
        with self._lock:
            if index < len(self._sent):
                return self._sent[index]
            if self._closed:
                return None
            try:
                item = next(self._source, _END)
            except BaseException as exc:
                self._abort(exc)
                return None
            return self._take(item)

    async def astep(self, index: int) -> PutRequestView | None:
        """:meth:`step` for the asyncio client: an async source is awaited on the event loop."""
        async with self._alock:
            if index < len(self._sent):
                return self._sent[index]
            if self._closed:
                return None
            try:
                if isinstance(self._source, AsyncIterator):
                    item = await anext(self._source, _END)
                else:
                    item = next(self._source, _END)
            except BaseException as exc:
                self._abort(exc)
                return None
            return self._take(item)

    def _abort(self, exc: BaseException) -> None:
        """Record the source's failure and end the stream without its commit message.

        The server stores nothing from a stream that ends uncommitted (and says
        ABORTED); put() then raises the source's own exception.
        """
        self.error = exc
        self._closed = True

    def _take(self, item: Any) -> PutRequestView | None:
        if item is _END:
            self.exhausted = self._closed = True
            return None
        try:
            req = self._core.put_request(self._namespace, item)
        except BaseException as exc:
            self._abort(exc)
            return None
        self._sent.append(req)
        self._bytes += len(req.blob)
        if self._bytes >= self._core.put_batch_bytes:
            self._closed = True
        return req

    def commit(self) -> PutRequestView | None:
        """The message that ends an attempt: the commit, or nothing when the source failed
        (a stream ended without a commit stores nothing on the server)."""
        return None if self.error is not None else commit_request(self._ack)

    def attempt(self) -> Iterator[PutRequestView]:
        """The requests of one attempt, for a blocking gRPC stream."""
        index = 0
        while (req := self.step(index)) is not None:
            yield req
            index += 1
        if (end := self.commit()) is not None:
            yield end

    async def aattempt(self) -> AsyncIterator[PutRequestView]:
        """The requests of one attempt, for a grpc.aio stream."""
        index = 0
        while (req := await self.astep(index)) is not None:
            yield req
            index += 1
        if (end := self.commit()) is not None:
            yield end
