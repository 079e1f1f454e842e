"""The gRPC face of kvstore: the ``kvstore.v1.KVStore`` servicer and its wiring.

This module owns four things and nothing else:

1. **Status codes.** :data:`STATUS_OF` is the one table from :mod:`kvstore.errors`
   to gRPC codes; handlers raise project exceptions and :func:`_fail` turns them
   into a status, a metric and a log line. Anything unexpected is INTERNAL and the
   server keeps serving.
2. **Concurrency.** The server is grpc's asyncio server on an event loop of its
   own thread. A stream waiting on its client (a Put that stalls, a Get nobody
   reads) holds no thread: the blocking store work (tier I/O, validation) runs on
   a bounded pool of ``server.workers`` threads, one hop per RPC or per batch of
   Get blobs. Streams are capped per tenant and per connection and timed out when
   idle (:mod:`kvstore.streams`), so health checks, Stats and other tenants keep
   answering whatever one caller does.
3. **Transport tuning.** Explicit message-size limits from the config, large
   HTTP/2 windows, no SO_REUSEPORT (two servers must never silently share a port).
4. **Lifecycle.** :func:`serve` builds the tiered store from the config, starts
   the server plus the standard health and reflection services and returns a
   :class:`ServerHandle`; :func:`run` blocks until SIGTERM/SIGINT and drains.

Request semantics (validation, auth, quotas, all-or-nothing Put) live in
:mod:`kvstore.service`. A Put stream is stored only once its commit message
(``PutRequest.commit``) has arrived: a stream that ends or is cancelled without
it stores nothing, and so does one with anything after it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import kvstore
from kvstore.auth import Authenticator, server_credentials
from kvstore.config import ServerConfig, StoreConfig
from kvstore.errors import BlobTooLarge, InvalidRequest, StreamNotCommitted, status_of
from kvstore.malloc_tuning import prefault_heap, tune_allocator
from kvstore.metrics import ServerMetrics, tier_fields
from kvstore.quotas import QuotaLedger
from kvstore.service import StoreService, pack_blobs
from kvstore.streams import HeapTrimmer, StreamClock, StreamLimiter
from kvstore.v1 import kvstore_pb2
from kvstore.wire import PutRequestView, encode_get_response, parse_put_request

log = logging.getLogger("kvstore.server")

SERVICE_NAME = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name

#: Bytes of Get blobs read from the tiers per trip to the worker pool: large enough that the
#: thread hop is amortised over many messages, small enough to bound a stalled Get's memory.
GET_BATCH_BYTES = 8 * 1024 * 1024
GET_BATCH_ITEMS = 256

ACK_NAMES = {kvstore_pb2.ACK_MEMORY: "memory", kvstore_pb2.ACK_DURABLE: "durable"}


def _tier_enum(name: str) -> int:
    try:
        return kvstore_pb2.Tier.Value(f"TIER_{name.upper()}")
    except ValueError:
        return kvstore_pb2.TIER_UNSPECIFIED


async def _fail(
    context: grpc.aio.ServicerContext, method: str, exc: BaseException, metrics: ServerMetrics, started: float
) -> None:
    code = status_of(exc)
    if code is grpc.StatusCode.INTERNAL and context.cancelled():
        # The client went away (cancelled, deadline) while we read its stream: not a server bug.
        metrics.observe(method, grpc.StatusCode.CANCELLED.name, started)
        await context.abort(grpc.StatusCode.CANCELLED, f"{method} cancelled by the client")
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed unexpectedly", method, exc_info=exc)
        message = f"internal error in {method}: {type(exc).__name__}: {exc}"
    else:
        log.info("%s -> %s: %s", method, code.name, exc)
        message = str(exc)
    metrics.observe(method, code.name, started)
    await context.abort(code, message)


class _ClientGone(Exception):
    """A stream's client is gone: a write failed because the call is over on the wire.

    grpc.aio fails a send (``grpc.aio.InternalError``) only when the call has ended
    under it: the client cancelled, its deadline passed or its connection closed,
    typically while the write waited on flow control for a reader that had stopped.
    grpc may not have marked the call cancelled yet at that moment, so without this
    the failure looked like a server bug (INTERNAL, an ERROR with a traceback), and
    alerts on INTERNAL fired on ordinary disconnects (issue 24).
    """


async def _write(context: grpc.aio.ServicerContext, message: Any, sent: int) -> None:
    """``context.write``, with a failed send (the client left) raised as :class:`_ClientGone`."""
    try:
        await context.write(message)
    except grpc.aio.InternalError as exc:
        raise _ClientGone(f"the client went away after {sent} message(s): {type(exc).__name__}") from None


def _rpc(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Time a handler and map its exceptions to a status, in one place.

    A client that cancels (or whose deadline passes) cancels the handler's task, or
    makes its next write fail (:class:`_ClientGone`): counted as CANCELLED and logged
    at INFO, nothing more to send.
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def handler(self: KVStoreServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                tenant = self.service.auth.tenant_of(context.invocation_metadata() or ())
                response = await fn(self, tenant, request, context)
            except asyncio.CancelledError:
                self.metrics.observe(method, grpc.StatusCode.CANCELLED.name, started)
                raise
            except _ClientGone as exc:
                log.info("%s cancelled: %s", method, exc)
                self.metrics.observe(method, grpc.StatusCode.CANCELLED.name, started)
                await context.abort(grpc.StatusCode.CANCELLED, f"{method} cancelled by the client")
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                self.service.counters.add(rejected=1)
                await _fail(context, method, exc, self.metrics, started)
            self.metrics.observe(method, "OK", started)
            return response

        return handler

    return wrap


def _take(
    source: Iterator[Any], max_bytes: int, max_items: int
) -> tuple[list[Any], BaseException | None, bool]:
    """Pull Get items on a worker thread: (items, the error that ended the source, source done)."""
    out: list[Any] = []
    size = 0
    try:
        for item in source:
            out.append(item)
            blob = item[2]
            size += sum(len(b) for b in blob) if isinstance(blob, list) else len(blob)
            if size >= max_bytes or len(out) >= max_items:
                return out, None, False
    except Exception as exc:  # noqa: BLE001 - sent after the items that preceded it
        return out, exc, True
    return out, None, True


class KVStoreServicer:
    """Translates wire messages to :class:`StoreService` calls and back, on the event loop.

    Only cheap checks run on the loop; anything that may touch a tier goes to
    ``executor`` so that a slow disk or a remote tier never stalls other RPCs.
    """

    def __init__(
        self,
        service: StoreService,
        metrics: ServerMetrics,
        limits: ServerConfig,
        executor: futures.ThreadPoolExecutor,
        release_memory: bool = True,
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.limits = limits
        self.executor = executor
        self.streams = StreamLimiter(limits)
        self.default_durable = limits.ack == "durable"
        #: Gives the heap pages of streams that ended early back to the OS (kvstore.streams);
        #: off with memory.prefault, whose heap is the RAM tier's on purpose.
        self.trimmer = HeapTrimmer(executor, service.counters, enabled=release_memory)

    async def _work(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @_rpc("Lookup")
    async def Lookup(self, tenant: str | None, request: Any, context: Any) -> kvstore_pb2.LookupResponse:
        request = _well_formed(request)
        num_present, tiers = await self._work(
            self.service.lookup, tenant, request.namespace, request.keys, request.num_layers
        )
        return kvstore_pb2.LookupResponse(num_present=num_present, tiers=[_tier_enum(t) for t in tiers])

    @_rpc("Put")
    async def Put(
        self, tenant: str | None, request_iterator: AsyncIterator[Any], context: Any
    ) -> kvstore_pb2.PutResponse:
        with self.streams.open("Put", tenant, context.peer()):
            received: list[PutRequestView] = []
            try:
                ack = await self._read_put(request_iterator, received)
                durable = self._durable(ack)
                num_stored, nbytes, tiers, persisted = await self._work(
                    self._store_put, tenant, received, durable
                )
            except BaseException:
                self.trimmer.abandoned(sum(len(r.blob) for r in received))
                raise
        self.metrics.add_bytes("in", nbytes)
        return kvstore_pb2.PutResponse(
            num_stored=num_stored, bytes_stored=nbytes, tiers=tiers, durable=persisted
        )

    async def _read_put(self, request_iterator: AsyncIterator[Any], received: list[PutRequestView]) -> int:
        """Buffer a Put stream's items into ``received`` up to its commit message, then read on to
        the stream's end; return the commit's ``ack``.

        Only cheap size checks run here. The commit must be the last message: anything
        after it (another item, a second commit) refuses the whole stream with
        INVALID_ARGUMENT, so a client that misorders its stream learns it instead of
        losing the items that followed (they used to be dropped with OK).
        """
        total = 0
        limit = self.limits.max_put_stream_bytes
        clock = StreamClock("Put", self.limits)
        touch = clock.touch
        ack: int | None = None
        count = 0
        try:
            async with clock.watch():
                async for request in request_iterator:
                    touch()
                    count += 1
                    if ack is not None:
                        raise InvalidRequest(
                            f"Put stream message {count - 1} follows the commit (message {count - 2} had "
                            "commit = true): nothing may follow the commit, it must be the stream's last "
                            "message; nothing of this stream was stored"
                        )
                    if type(request) is not PutRequestView:
                        request = _well_formed(request)
                    if request.has_item:
                        total += len(request.blob)
                        if total > limit:
                            raise BlobTooLarge(
                                f"put item {len(received)}: the Put stream exceeds server.max_put_stream_bytes "
                                f"({limit}); send fewer blobs per Put call"
                            )
                        received.append(request)
                    if request.commit:
                        ack = request.ack
        except TimeoutError:
            raise clock.expired("not sending") from None
        if ack is not None:
            return ack
        raise StreamNotCommitted(
            f"Put stream ended after {len(received)} message(s) without a commit message (a PutRequest with "
            "commit = true must end every Put stream); nothing was stored. Update the client, or if it was "
            "cancelled, retry the whole batch"
        )

    def _durable(self, ack: int) -> bool:
        if ack == kvstore_pb2.ACK_UNSPECIFIED:
            return self.default_durable
        if ack not in ACK_NAMES:
            raise InvalidRequest(
                f"unknown PutRequest.ack {ack}: use ACK_MEMORY (1) or ACK_DURABLE (2), "
                "or leave it unset for the server's default (server.ack)"
            )
        return ack == kvstore_pb2.ACK_DURABLE

    def _store_put(
        self, tenant: str | None, received: list[PutRequestView], durable: bool
    ) -> tuple[int, int, list[str], bool]:
        """Validate the whole committed stream, then write it (a worker thread: hashing and tier I/O)."""
        items = self.service.validate_put(
            tenant, ((r.namespace, r.key, r.layer, r.num_layers, r.blob) for r in received)
        )
        num_stored, nbytes, tiers = self.service.put(tenant, items, durable=durable)
        persistent = getattr(self.service.store, "persistent", None)
        return num_stored, nbytes, tiers, bool(tiers and callable(persistent) and persistent(tiers))

    @_rpc("Get")
    async def Get(self, tenant: str | None, request: Any, context: Any) -> None:
        request = _well_formed(request)
        with self.streams.open("Get", tenant, context.peer()):
            ns = self.service.check_get(
                tenant, request.namespace, request.keys, request.layer_start, request.layer_end
            )
            source: Iterator[Any] = self.service.get(ns, request.keys, request.layer_start, request.layer_end)
            if request.pack_bytes:
                source = pack_blobs(source, self.service.pack_limit(request.pack_bytes))
            add_bytes = self.metrics.add_bytes
            clock = StreamClock("Get", self.limits)
            touch = clock.touch
            held = 0  # bytes of the batch being sent: what this stream holds while a write waits
            try:
                async with clock.watch(on_expiry=self._get_stalled):
                    done = False
                    sent = 0
                    while not done:
                        clock.busy = True
                        batch, error, done = await self._work(_take, source, GET_BATCH_BYTES, GET_BATCH_ITEMS)
                        clock.busy = False
                        touch()
                        held = 0
                        for item in batch:
                            blob = item[2]
                            size = sum(len(b) for b in blob) if isinstance(blob, list) else len(blob)
                            held += size
                            add_bytes("out", size)
                            # A write waits while the client does not read (HTTP/2 flow control). grpc
                            # cannot send a status while a write is blocked (the client would hang) and the
                            # asyncio server cannot cancel one call, so a stalled Get is counted as timed out
                            # when its deadline passes (_get_stalled), sends nothing more, and ends with
                            # DEADLINE_EXCEEDED once its client reads the message in flight (or goes away).
                            await _write(context, item, sent)  # serialised by encode_get_response
                            sent += 1
                            if clock.fired:
                                raise clock.expired("not reading")
                            touch()
                        if error is not None:
                            raise error
            except BaseException:
                self.trimmer.abandoned(held)
                raise

    def _get_stalled(self) -> None:
        """A Get's client stopped reading: count it now; the stream ends when its write completes."""
        self.service.counters.add(get_streams_timed_out=1)
        log.info("Get stream stalled: its client read nothing for %g s", self.limits.stream_idle_timeout_s)

    @_rpc("Delete")
    async def Delete(self, tenant: str | None, request: Any, context: Any) -> kvstore_pb2.DeleteResponse:
        request = _well_formed(request)
        num = await self._work(
            self.service.delete, tenant, request.namespace, request.keys, request.num_layers
        )
        return kvstore_pb2.DeleteResponse(num_deleted=num)

    @_rpc("Stats")
    async def Stats(self, tenant: str | None, request: Any, context: Any) -> kvstore_pb2.StatsResponse:
        # Server-wide figures: any authenticated caller may read them (tenant_of ran).
        _well_formed(request)
        tier_stats = await self._work(self.service.store.tier_stats)
        tiers = [kvstore_pb2.TierStats(**tier_fields(t)) for t in tier_stats]
        counters = {k: max(0, int(v)) for k, v in self.service.counters.snapshot().items()}
        counters["streams_open"] = self.streams.open_streams()
        return kvstore_pb2.StatsResponse(tiers=tiers, counters=counters, version=kvstore.__version__)


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
            return _Malformed(
                f"malformed {message} ({len(data)} bytes): {type(exc).__name__}: {exc}; "
                f"send a serialized kvstore.v1.{message}"
            )

    return deserialize


def _well_formed(request: Any) -> Any:
    if isinstance(request, _Malformed):
        raise InvalidRequest(request.reason)
    return request


def add_servicer(servicer: KVStoreServicer, server: grpc.aio.Server) -> None:
    """Register the servicer like the generated ``add_KVStoreServicer_to_server``, but with
    the blob fast path for Put requests and Get responses."""
    pb = kvstore_pb2
    handlers = {
        "Lookup": grpc.unary_unary_rpc_method_handler(
            servicer.Lookup,
            request_deserializer=_tolerant(pb.LookupRequest.FromString, "LookupRequest"),
            response_serializer=pb.LookupResponse.SerializeToString,
        ),
        "Put": grpc.stream_unary_rpc_method_handler(
            servicer.Put,
            request_deserializer=_tolerant(parse_put_request, "PutRequest"),
            response_serializer=pb.PutResponse.SerializeToString,
        ),
        "Get": grpc.unary_stream_rpc_method_handler(
            servicer.Get,
            request_deserializer=_tolerant(pb.GetRequest.FromString, "GetRequest"),
            response_serializer=encode_get_response,
        ),
        "Delete": grpc.unary_unary_rpc_method_handler(
            servicer.Delete,
            request_deserializer=_tolerant(pb.DeleteRequest.FromString, "DeleteRequest"),
            response_serializer=pb.DeleteResponse.SerializeToString,
        ),
        "Stats": grpc.unary_unary_rpc_method_handler(
            servicer.Stats,
            request_deserializer=_tolerant(pb.StatsRequest.FromString, "StatsRequest"),
            response_serializer=pb.StatsResponse.SerializeToString,
        ),
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
            from kvstore.backends import build_backend

            tiers.append(build_backend("redis", config.redis))
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


class _LoopThread:
    """An asyncio event loop running on a thread of its own (the server's), driven from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="kvstore-aio", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


#: Server-side HTTP/2 keepalive: a ping every minute finds connections whose client died without a
#: FIN (its stalled streams then end). Server only: clients keep their own settings.
KEEPALIVE = [("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000)]


@dataclass
class ServerHandle:
    """A running server. ``stop`` drains in-flight RPCs for ``grace`` seconds.

    The server runs on its own event loop thread; every method here may be called
    from any other thread.
    """

    server: grpc.aio.Server
    port: int
    host: str
    config: StoreConfig
    service: StoreService
    metrics: ServerMetrics
    health: health_async.HealthServicer
    servicer: KVStoreServicer
    executor: futures.ThreadPoolExecutor
    runner: _LoopThread
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

        async def drain() -> None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace)

        try:
            self.runner.call(drain())
        finally:
            self.runner.close()
            self.executor.shutdown(wait=True)
            self.metrics.close()
            self.service.store.close()

    def wait(self) -> None:
        self._stopped.wait()

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
    runner: _LoopThread | None = None
    executor: futures.ThreadPoolExecutor | None = None
    try:
        service = StoreService(store, config.server, authenticator, quotas)
        metrics = ServerMetrics(store.tier_stats)
        executor = futures.ThreadPoolExecutor(
            max_workers=config.server.workers, thread_name_prefix="kvstore-io"
        )
        servicer = KVStoreServicer(
            service, metrics, config.server, executor, release_memory=not config.memory.prefault
        )
        runner = _LoopThread()
        server, port, health_servicer = runner.call(_start(config, servicer, credentials))
        if config.metrics.port:
            metrics.serve_http(config.metrics.port, config.metrics.host)
    except BaseException:
        if runner is not None:
            runner.close()
        if executor is not None:
            executor.shutdown(wait=False)
        store.close()
        raise
    return ServerHandle(
        server=server,
        port=port,
        host=config.server.host,
        config=config,
        service=service,
        metrics=metrics,
        health=health_servicer,
        servicer=servicer,
        executor=executor,
        runner=runner,
    )


async def _start(
    config: StoreConfig, servicer: KVStoreServicer, credentials: grpc.ServerCredentials | None
) -> tuple[grpc.aio.Server, int, health_async.HealthServicer]:
    """Create and start the asyncio server on the running loop (grpc.aio objects belong to one loop)."""
    server = grpc.aio.server(options=grpc_options(config) + KEEPALIVE)
    try:
        add_servicer(servicer, server)
        health_servicer = health_async.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
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
            # The TLS files were loaded and matched with the config (config.check_tls_files), so
            # this is the address: taken, or not one of this host's.
            raise OSError(f"cannot listen on {address} (is another server using the port?)")
        await server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    except BaseException:
        await server.stop(None)
        raise
    return server, port, health_servicer


def run(
    config: StoreConfig, grace: float = 10.0, on_ready: Callable[[ServerHandle], None] | None = None
) -> None:
    """Serve until SIGTERM or SIGINT, then stop taking RPCs and drain for ``grace`` seconds."""
    tune_allocator()
    if config.memory.prefault:
        started = time.monotonic()
        done = prefault_heap(config.memory.max_bytes)
        log.info(
            "prefaulted %d MiB of heap for the RAM tier in %.1f s", done >> 20, time.monotonic() - started
        )
    handle = serve(config)
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("received %s, draining for up to %.0fs", signal.Signals(signum).name, grace)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.info(
            "kvstore %s serving on %s (tiers: %s)%s",
            kvstore.__version__,
            handle.target,
            ", ".join(tier_fields(t)["name"] for t in handle.store.tier_stats()),
            f", metrics on :{handle.metrics.port}" if handle.metrics.port else "",
        )
        if on_ready is not None:
            on_ready(handle)
        while not stop.wait(0.5):
            pass
    finally:
        handle.stop(grace)
        for sig, old in previous.items():
            signal.signal(sig, old)
        log.info("kvstore stopped")
