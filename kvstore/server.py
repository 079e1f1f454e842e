"""The gRPC face of kvstore: the ``kvstore.v1.KVStore`` servicer and its wiring.

This module owns three things and nothing else:

1. **Status codes.** :data:`STATUS_OF` is the one table from :mod:`kvstore.errors`
   to gRPC codes; handlers raise project exceptions and :func:`_rpc` turns them
   into a status, a metric and a log line. Anything unexpected is INTERNAL and the
   server keeps serving.
2. **Transport tuning.** Explicit message-size limits from the config, large
   HTTP/2 windows, no SO_REUSEPORT (two servers must never silently share a port).
3. **Lifecycle.** :func:`serve` builds the tiered store from the config, starts
   the server plus the standard health and reflection services and returns a
   :class:`ServerHandle`; :func:`run` blocks until SIGTERM/SIGINT and drains.

Request semantics (validation, auth, quotas, all-or-nothing Put) live in
:mod:`kvstore.service`.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import kvstore
from kvstore.allocator import prefault_heap, tune_allocator
from kvstore.auth import Authenticator, server_credentials
from kvstore.config import StoreConfig
from kvstore.errors import (
    BackendUnavailable,
    BlobTooLarge,
    IntegrityError,
    InvalidRequest,
    KVStoreError,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    Unauthenticated,
)
from kvstore.metrics import ServerMetrics, tier_fields
from kvstore.quotas import QuotaLedger
from kvstore.service import StoreService, pack_blobs
from kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc
from kvstore.wire import PutRequestView, encode_get_response, parse_put_request

log = logging.getLogger("kvstore.server")

SERVICE_NAME = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name

#: The one mapping from project errors to wire status codes (first match wins).
STATUS_OF: tuple[tuple[type[KVStoreError], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (BlobTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (BackendUnavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_of(exc: BaseException) -> grpc.StatusCode:
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _tier_enum(name: str) -> int:
    try:
        return kvstore_pb2.Tier.Value(f"TIER_{name.upper()}")
    except ValueError:
        return kvstore_pb2.TIER_UNSPECIFIED


def _fail(context: grpc.ServicerContext, method: str, exc: BaseException, metrics: ServerMetrics,
          started: float) -> None:
    code = status_of(exc)
    if code is grpc.StatusCode.INTERNAL and not context.is_active():
        # The client went away (cancelled, deadline) while we read its stream: not a server bug.
        metrics.observe(method, grpc.StatusCode.CANCELLED.name, started)
        context.abort(grpc.StatusCode.CANCELLED, f"{method} cancelled by the client")
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed unexpectedly", method)
        message = f"internal error in {method}: {type(exc).__name__}: {exc}"
    else:
        log.info("%s -> %s: %s", method, code.name, exc)
        message = str(exc)
    metrics.observe(method, code.name, started)
    context.abort(code, message)


def _rpc(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Time a unary-response handler and map its exceptions to a status, in one place."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def handler(self: KVStoreServicer, request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                tenant = self.service.auth.tenant_of(context.invocation_metadata())
                response = fn(self, tenant, _well_formed(request), context)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                self.service.counters.add(rejected=1)
                _fail(context, method, exc, self.metrics, started)
            self.metrics.observe(method, "OK", started)
            return response

        return handler

    return wrap


def _rpc_stream(method: str) -> Callable[[Callable[..., Iterator[Any]]], Callable[..., Iterator[Any]]]:
    """Like _rpc, for server-streaming handlers: an error ends the stream with a status."""

    def wrap(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        @functools.wraps(fn)
        def handler(self: KVStoreServicer, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.perf_counter()
            try:
                tenant = self.service.auth.tenant_of(context.invocation_metadata())
                yield from fn(self, tenant, _well_formed(request), context)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                self.service.counters.add(rejected=1)
                _fail(context, method, exc, self.metrics, started)
            self.metrics.observe(method, "OK", started)

        return handler

    return wrap


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    """Translates wire messages to :class:`StoreService` calls and back."""

    def __init__(self, service: StoreService, metrics: ServerMetrics) -> None:
        self.service = service
        self.metrics = metrics

    @_rpc("Lookup")
    def Lookup(self, tenant: str | None, request: kvstore_pb2.LookupRequest, context: Any
               ) -> kvstore_pb2.LookupResponse:
        num_present, tiers = self.service.lookup(tenant, request.namespace, request.keys, request.num_layers)
        return kvstore_pb2.LookupResponse(num_present=num_present, tiers=[_tier_enum(t) for t in tiers])

    @_rpc("Put")
    def Put(self, tenant: str | None, request_iterator: Iterator[PutRequestView], context: Any
            ) -> kvstore_pb2.PutResponse:
        items = self.service.validate_put(
            tenant, ((r.namespace, r.key, r.layer, r.num_layers, r.blob)
                     for r in map(_well_formed, request_iterator))
        )
        if _cancelled(context):
            # A client whose source fails mid-stream cancels the call, and gRPC may hand that to us as
            # a clean end of the request stream: storing it would keep half a batch. Store nothing.
            raise StreamAbandoned("Put stream ended by the client's cancel; nothing stored")
        num_stored, nbytes = self.service.put(tenant, items)
        self.metrics.add_bytes("in", nbytes)
        return kvstore_pb2.PutResponse(num_stored=num_stored, bytes_stored=nbytes)

    @_rpc_stream("Get")
    def Get(self, tenant: str | None, request: kvstore_pb2.GetRequest, context: Any
            ) -> Iterator[tuple[int, int, bytes | list[bytes]]]:
        ns = self.service.check_get(tenant, request.namespace, request.keys, request.layer_start,
                                    request.layer_end)
        add_bytes = self.metrics.add_bytes
        items = self.service.get(ns, request.keys, request.layer_start, request.layer_end)
        if request.pack_bytes:
            for first, layer, blobs in pack_blobs(items, self.service.pack_limit(request.pack_bytes)):
                add_bytes("out", sum(len(b) for b in blobs))
                yield first, layer, blobs  # a packed GetResponse (encode_get_response)
            return
        for key_index, layer, blob in items:
            add_bytes("out", len(blob))
            yield key_index, layer, blob  # serialised by encode_get_response

    @_rpc("Delete")
    def Delete(self, tenant: str | None, request: kvstore_pb2.DeleteRequest, context: Any
               ) -> kvstore_pb2.DeleteResponse:
        return kvstore_pb2.DeleteResponse(num_deleted=self.service.delete(tenant, request.namespace,
                                                                          request.keys))

    @_rpc("Stats")
    def Stats(self, tenant: str | None, request: kvstore_pb2.StatsRequest, context: Any
              ) -> kvstore_pb2.StatsResponse:
        # Server-wide figures: any authenticated caller may read them (tenant_of ran).
        tiers = [kvstore_pb2.TierStats(**tier_fields(t)) for t in self.service.store.tier_stats()]
        counters = {k: max(0, int(v)) for k, v in self.service.counters.snapshot().items()}
        return kvstore_pb2.StatsResponse(tiers=tiers, counters=counters, version=kvstore.__version__)


def _cancelled(context: Any) -> bool:
    """Whether the client cancelled the call, with a moment for gRPC to tell us.

    grpcio's sync server reports a cancelled client stream as an ordinary end of
    the request iterator and marks the call cancelled from its polling thread a
    moment later; 1 ms per Put stream lets that land first. It narrows the race,
    it does not close it: only an explicit end-of-stream marker in the protocol
    would (our KVClient already ends a failing stream with a request the server
    must reject, see transfer.client.ABORT_REQUEST).
    """
    if not context.is_active():
        return True
    time.sleep(0.001)
    return not context.is_active()


class StreamAbandoned(Exception):
    """A Put's request stream ended because the client cancelled (answered CANCELLED by _fail)."""


class _Malformed:
    """Stands in for a request message that did not parse.

    grpc answers a deserializer exception with INTERNAL, which blames the server for
    the caller's bytes; passing this marker on lets the handler say INVALID_ARGUMENT.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(parse: Callable[[bytes], Any], message: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's
            return _Malformed(f"malformed {message} ({len(data)} bytes): {type(exc).__name__}: {exc}; "
                              f"send a serialized kvstore.v1.{message}")

    return deserialize


def _well_formed(request: Any) -> Any:
    if isinstance(request, _Malformed):
        raise InvalidRequest(request.reason)
    return request


def add_servicer(servicer: KVStoreServicer, server: grpc.Server) -> None:
    """Register the servicer like the generated ``add_KVStoreServicer_to_server``, but with
    the blob fast path for Put requests and Get responses."""
    pb = kvstore_pb2
    handlers = {
        "Lookup": grpc.unary_unary_rpc_method_handler(
            servicer.Lookup, request_deserializer=_tolerant(pb.LookupRequest.FromString, "LookupRequest"),
            response_serializer=pb.LookupResponse.SerializeToString),
        "Put": grpc.stream_unary_rpc_method_handler(
            servicer.Put, request_deserializer=_tolerant(parse_put_request, "PutRequest"),
            response_serializer=pb.PutResponse.SerializeToString),
        "Get": grpc.unary_stream_rpc_method_handler(
            servicer.Get, request_deserializer=_tolerant(pb.GetRequest.FromString, "GetRequest"),
            response_serializer=encode_get_response),
        "Delete": grpc.unary_unary_rpc_method_handler(
            servicer.Delete, request_deserializer=_tolerant(pb.DeleteRequest.FromString, "DeleteRequest"),
            response_serializer=pb.DeleteResponse.SerializeToString),
        "Stats": grpc.unary_unary_rpc_method_handler(
            servicer.Stats, request_deserializer=_tolerant(pb.StatsRequest.FromString, "StatsRequest"),
            response_serializer=pb.StatsResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


# ---------------------------------------------------------------- wiring


def build_store(config: StoreConfig) -> Any:
    """The tiered store the config describes: RAM first, then disk, Redis, S3.

    Optional backends are imported only when enabled, so a RAM+disk server needs
    neither redis-py nor boto3 at import time. Every enabled persistent tier is
    written through, so a restart (or a RAM eviction) loses nothing the disk holds.
    """
    from kvstore.backends.memory import MemoryBackend
    from kvstore.backends.tiered import TieredStore

    tiers: list[Any] = [MemoryBackend.from_config(config.memory)]
    try:
        if config.disk.enabled:
            from kvstore.backends.disk import DiskBackend

            tiers.append(DiskBackend.from_config(config.disk))
        if config.redis.enabled:
            from kvstore.backends.redis import RedisBackend

            tiers.append(RedisBackend.from_config(config.redis))
        if config.s3.enabled:
            from kvstore.backends.s3 import S3Backend

            tiers.append(S3Backend.from_config(config.s3))
    except BaseException:
        for tier in tiers:
            tier.close()
        raise
    return TieredStore(tiers=tiers, write_through=[t.name for t in tiers if t.persistent])


def grpc_options(config: StoreConfig) -> list[tuple[str, Any]]:
    """Channel arguments of the server; shared with the bench client for like-for-like runs."""
    limit = config.server.max_message_bytes
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),
        # Large per-stream flow-control windows: multi-MiB blobs should not stall on
        # WINDOW_UPDATE round trips (BDP probing grows them further on real links).
        ("grpc.http2.lookahead_bytes", 16 * 1024 * 1024),
        ("grpc.http2.bdp_probe", 1),
        ("grpc.max_concurrent_streams", 1024),
    ]


@dataclass
class ServerHandle:
    """A running server. ``stop`` drains in-flight RPCs for ``grace`` seconds."""

    server: grpc.Server
    port: int
    host: str
    config: StoreConfig
    service: StoreService
    metrics: ServerMetrics
    health: health.HealthServicer
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def target(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "[::]", "::") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def store(self) -> Any:
        return self.service.store

    def stop(self, grace: float | None = 1.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.metrics.close()
        self.service.store.close()

    def wait(self) -> None:
        self.server.wait_for_termination()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(config: StoreConfig, store: Any | None = None) -> ServerHandle:
    """Start a server for ``config`` (non-blocking); ``store`` overrides the tiers (tests)."""
    authenticator = Authenticator(config.auth.tokens)
    quotas = QuotaLedger(config.quotas.default_max_bytes, config.quotas.per_tenant)
    credentials = server_credentials(config.auth)
    store = build_store(config) if store is None else store
    server: grpc.Server | None = None
    try:
        service = StoreService(store, config.server, authenticator, quotas)
        metrics = ServerMetrics(store.tier_stats)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.server.workers, thread_name_prefix="kvstore-rpc"),
            options=grpc_options(config),
        )
        add_servicer(KVStoreServicer(service, metrics), server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        host = config.server.host
        address = f"[{host}]:{config.server.port}" if ":" in host else f"{host}:{config.server.port}"
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc} (is another server using the port?)") from None
        if port == 0:
            raise OSError(f"cannot listen on {address} (is another server using the port?)")
        server.start()
        if config.metrics.port:
            metrics.serve_http(config.metrics.port, config.metrics.host)
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    except BaseException:
        if server is not None:
            server.stop(None)
        store.close()
        raise
    return ServerHandle(server=server, port=port, host=host, config=config, service=service,
                        metrics=metrics, health=health_servicer)


def run(config: StoreConfig, grace: float = 10.0, on_ready: Callable[[ServerHandle], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop taking RPCs and drain for ``grace`` seconds."""
    tune_allocator()
    if config.memory.prefault:
        started = time.monotonic()
        done = prefault_heap(config.memory.max_bytes)
        log.info("prefaulted %d MiB of heap for the RAM tier in %.1f s", done >> 20, time.monotonic() - started)
    handle = serve(config)
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("received %s, draining for up to %.0fs", signal.Signals(signum).name, grace)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.info("kvstore %s serving on %s (tiers: %s)%s", kvstore.__version__, handle.target,
                 ", ".join(tier_fields(t)["name"] for t in handle.store.tier_stats()),
                 f", metrics on :{handle.metrics.port}" if handle.metrics.port else "")
        if on_ready is not None:
            on_ready(handle)
        while not stop.wait(0.5):
            pass
    finally:
        handle.stop(grace)
        for sig, old in previous.items():
            signal.signal(sig, old)
        log.info("kvstore stopped")
