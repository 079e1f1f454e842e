"""The blocking and asyncio drivers carry out every effect alike, caller errors included.

Each scenario runs once per driver (``driver`` is ``blocking`` or ``asyncio``):
the same public call on :class:`KVClient` / :class:`AsyncKVClient` (or
:class:`ClusterKVClient` / :class:`AsyncClusterKVClient`) over the same scripted
transport, with the same expected outcome and the same effects performed. Only
the transport *under* the driver is scripted, in a blocking and an asyncio form
of one script: for one server the gRPC callables (unary stub methods, the Put
and Get streams, their status errors), for a cluster the member clients. The
operations (:mod:`transfer.rpc.ops`, :mod:`transfer.replicas.ops`) and the drivers
are the real ones.

Every effect type a driver performs is covered: each scenario declares the
effects it must see performed (checked when it ends), and
:func:`test_every_effect_type_is_covered` checks the declarations against the
effect unions.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, get_args

import grpc
import grpc.aio
import pytest

from kvstore import integrity
from kvstore.retry import ExponentialBackoff
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire import GetResponseView
from transfer.errors import (
    BlobIntegrityError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TransferError,
    Unavailable,
)
from transfer.replicas import ops as cops
from transfer.replicas.aio_client import AsyncClusterKVClient
from transfer.replicas.client import ClusterKVClient
from transfer.replicas.membership import StaticMembership
from transfer.rpc import ops
from transfer.rpc.aio_client import AsyncKVClient
from transfer.rpc.client import KVClient
from transfer.rpc.core import PutItem, PutResult, RetryPolicy, StoreStats, TierStats

NS = "t/m/c"
KEYS = [bytes([i]) * 32 for i in range(6)]
DRIVERS = ("blocking", "asyncio")
COVERED: set[type] = set()


def covers(*kinds: type) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The effects a scenario must see its driver perform (checked by the ``h``/``c`` fixtures)."""
    COVERED.update(kinds)

    def mark(fn: Callable[..., None]) -> Callable[..., None]:
        fn.covers = kinds  # type: ignore[attr-defined]
        return fn

    return mark


def blob(key: int, layer: int) -> bytes:
    return integrity.seal(bytes([key, layer]) * 8)


def policy() -> RetryPolicy:
    return RetryPolicy(ExponentialBackoff(base_s=0.001, cap_s=0.001, jitter=False), max_attempts=3)


class Loop:
    """Calls a client's methods synchronously: the asyncio driver's on its own event loop."""

    def __init__(self, driver: str) -> None:
        self.aio = driver == "asyncio"
        self.loop = asyncio.new_event_loop() if self.aio else None

    def __call__(self, result: Any) -> Any:
        """A method's result (``client.lookup(...)``), awaited when the driver is asyncio."""
        return self.loop.run_until_complete(result) if self.loop is not None else result

    def layers(self, stream: Any, take: int | None = None) -> list[tuple[int, list[Any]]]:
        """What a ``get_layers`` iterator yields (the first ``take``), then it is closed."""
        if self.loop is None:
            got: list[tuple[int, list[Any]]] = []
            try:
                for item in stream:
                    got.append(item)
                    if len(got) == take:
                        break
            finally:
                stream.close()
            return got

        async def collect() -> list[tuple[int, list[Any]]]:
            got: list[tuple[int, list[Any]]] = []
            try:
                async for item in stream:
                    got.append(item)
                    if len(got) == take:
                        break
            finally:
                await stream.aclose()
            return got

        return self.loop.run_until_complete(collect())

    def close(self) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


# -- one server: a scripted gRPC transport -------------------------------------------------------------


class SyncRpcError(grpc.RpcError):  # type: ignore[misc]
    """What blocking gRPC raises for a failed call: a status code and its details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Wire:
    """A server as its gRPC callables see it: what is stored, and the statuses scripted per RPC.

    ``fail[rpc]`` lists statuses the next calls of that RPC end with (a Put
    after reading its whole stream; a Get ``fail_after[i]`` messages into its
    i-th stream), one per call.
    """

    def __init__(self, aio: bool) -> None:
        self.aio = aio
        self.stored: dict[tuple[bytes, int], bytes] = {}
        self.fail: dict[str, list[grpc.StatusCode]] = {}
        self.get_fail_after: list[int | None] = []
        self.damaged: set[tuple[int, int]] = set()  # (key index, layer) sent with a broken trailer
        self.streams: list[Any] = []
        self.commits: list[bool] = []  # per Put stream: whether it ended with its commit

    def error(self, code: grpc.StatusCode, details: str) -> Exception:
        if self.aio:
            return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)  # type: ignore[no-any-return]
        return SyncRpcError(code, details)

    def status(self, rpc: str) -> None:
        if self.fail.get(rpc):
            code = self.fail[rpc].pop(0)
            raise self.error(code, f"scripted {code.name}")

    # the RPCs, answered from ``stored``

    def lookup(self, request: pb.LookupRequest) -> pb.LookupResponse:
        self.status("Lookup")
        n = 0
        for key in request.keys:
            if not all((key, layer) in self.stored for layer in range(request.num_layers)):
                break
            n += 1
        return pb.LookupResponse(num_present=n)

    def delete(self, request: pb.DeleteRequest) -> pb.DeleteResponse:
        self.status("Delete")
        gone = {k for k, _ in self.stored if k in request.keys}
        self.stored = {(k, layer): b for (k, layer), b in self.stored.items() if k not in gone}
        return pb.DeleteResponse(num_deleted=len(gone))

    def stats(self, request: pb.StatsRequest) -> pb.StatsResponse:
        self.status("Stats")
        tier = pb.TierStats(name="ram", objects=len(self.stored), healthy=True)
        return pb.StatsResponse(tiers=[tier], version="scripted")

    def put(self, requests: list[Any]) -> pb.PutResponse:
        committed = bool(requests) and requests[-1].commit
        self.commits.append(committed)
        self.status("Put")
        if not committed:
            raise self.error(grpc.StatusCode.ABORTED, "Put: stream ended without its commit")
        items = [r for r in requests if r.has_item]
        for r in items:
            self.stored[(r.key, r.layer)] = bytes(r.blob)
        return pb.PutResponse(
            num_stored=len(items), bytes_stored=sum(len(r.blob) for r in items), tiers=["ram"]
        )

    def get(self, request: pb.GetRequest) -> list[Any]:
        """The messages of one Get stream, then (scripted) a status instead of its end."""
        out: list[Any] = []
        for layer in range(request.layer_start, request.layer_end):
            for i, key in enumerate(request.keys):
                data = self.stored[(key, layer)]
                if (KEYS.index(key), layer) in self.damaged:
                    data = data[:-1] + bytes([data[-1] ^ 1])
                out.append(GetResponseView(i, layer, data))
        after = self.get_fail_after.pop(0) if self.get_fail_after else None
        if after is not None:
            out = [*out[:after], self.error(grpc.StatusCode.UNAVAILABLE, "scripted reset mid-stream")]
        return out


class SyncStream:
    """A blocking gRPC response stream: an iterator with ``cancel``."""

    def __init__(self, request: pb.GetRequest, messages: list[Any]) -> None:
        self.request, self.messages, self.cancelled = request, messages, False

    def __iter__(self) -> SyncStream:
        return self

    def __next__(self) -> Any:
        if not self.messages:
            raise StopIteration
        item = self.messages.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class AioStream(SyncStream):
    """A grpc.aio response stream: ``await read()`` (``EOF`` at its end) and ``cancel``."""

    async def read(self) -> Any:
        await asyncio.sleep(0)
        try:
            return next(self)
        except StopIteration:
            return grpc.aio.EOF


def transport(wire: Wire) -> tuple[dict[ops.Unary, Any], Any, Any]:
    """The driver's gRPC callables (unary methods by name, Put, Get) answering from ``wire``."""
    answer = {"Lookup": wire.lookup, "Delete": wire.delete, "Stats": wire.stats}
    if not wire.aio:

        def sync_unary(rpc: str) -> Any:
            return lambda request, timeout, metadata: answer[rpc](request)

        def sync_put(requests: Iterator[Any], timeout: float, metadata: Any) -> pb.PutResponse:
            return wire.put(list(requests))

        def sync_get(request: pb.GetRequest, timeout: float, metadata: Any) -> SyncStream:
            wire.streams.append(stream := SyncStream(request, wire.get(request)))
            return stream

        return {rpc: sync_unary(rpc) for rpc in answer}, sync_put, sync_get  # type: ignore[misc]

    def aio_unary(rpc: str) -> Any:
        async def call(request: Any, timeout: float, metadata: Any) -> Any:
            await asyncio.sleep(0)
            return answer[rpc](request)

        return call

    async def aio_put(requests: AsyncIterator[Any], timeout: float, metadata: Any) -> pb.PutResponse:
        return wire.put([r async for r in requests])

    def aio_get(request: pb.GetRequest, timeout: float, metadata: Any) -> AioStream:
        wire.streams.append(stream := AioStream(request, wire.get(request)))
        return stream

    return {rpc: aio_unary(rpc) for rpc in answer}, aio_put, aio_get  # type: ignore[misc]


class BlockingServerClient(KVClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.performed: list[type] = []
        super().__init__(*args, **kwargs)

    def _perform(self, effect: ops.Action) -> Any:
        self.performed.append(type(effect))
        return super()._perform(effect)


class AsyncServerClient(AsyncKVClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.performed: list[type] = []
        super().__init__(*args, **kwargs)

    async def _perform(self, effect: ops.Action) -> Any:
        self.performed.append(type(effect))
        return await super()._perform(effect)


class Server:
    """One driver (``client``) over a scripted ``wire``; ``call`` runs a method synchronously."""

    def __init__(self, driver: str, **options: Any) -> None:
        self.call = Loop(driver)
        self.wire = Wire(self.call.aio)
        options.setdefault("retry", policy())
        if self.call.aio:

            async def make() -> AsyncServerClient:
                return AsyncServerClient("scripted:1", **options)

            self.client: Any = self.call(make())
        else:
            self.client = BlockingServerClient("scripted:1", **options)
        self.client._unary, self.client._put, self.client._get = transport(self.wire)

    @property
    def performed(self) -> list[type]:
        return list(self.client.performed)

    def store(self, keys: int, layers: int) -> None:
        for i in range(keys):
            for layer in range(layers):
                self.wire.stored[(KEYS[i], layer)] = blob(i, layer)

    def close(self) -> None:
        self.call(self.client.close())
        self.call.close()


@pytest.fixture(params=DRIVERS)
def h(request: pytest.FixtureRequest) -> Iterator[Server]:
    server = Server(request.param)
    yield server
    server.close()
    missing = set(getattr(request.function, "covers", ())) - set(server.performed)
    assert not missing, f"{request.param} driver never performed {sorted(k.__name__ for k in missing)}"


@covers(ops.Call, ops.Sleep)
def test_unary_call_retried_after_unavailable(h: Server) -> None:
    h.store(3, 2)
    h.wire.fail["Lookup"] = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    assert h.call(h.client.lookup(NS, KEYS[:4], 2)) == 3
    assert h.performed == [ops.Call, ops.Sleep, ops.Call, ops.Sleep, ops.Call]


@covers(ops.Call)
def test_unary_caller_error_raised_at_once(h: Server) -> None:
    h.wire.fail["Lookup"] = [grpc.StatusCode.INVALID_ARGUMENT]
    with pytest.raises(InvalidArgument, match="Lookup: INVALID_ARGUMENT: scripted"):
        h.call(h.client.lookup(NS, KEYS[:2], 1))
    h.wire.fail["Delete"] = [grpc.StatusCode.PERMISSION_DENIED]
    with pytest.raises(PermissionDenied):
        h.call(h.client.delete(NS, KEYS[:2], num_layers=1))
    h.wire.fail["Stats"] = [grpc.StatusCode.UNAVAILABLE] * 3
    with pytest.raises(Unavailable):  # the budget spent: the last failure is raised
        h.call(h.client.stats())
    assert h.performed == [ops.Call, ops.Call, ops.Call, ops.Sleep, ops.Call, ops.Sleep, ops.Call]


@covers(ops.Call)
def test_delete_and_stats(h: Server) -> None:
    h.store(3, 2)
    assert h.call(h.client.delete(NS, KEYS[:2], num_layers=2)) == 2
    stats = h.call(h.client.stats())
    assert isinstance(stats, StoreStats) and stats.tiers[0].objects == 2 and stats.version == "scripted"
    assert h.performed == [ops.Call, ops.Call]


def put_items(n: int) -> list[PutItem]:
    return [PutItem(KEYS[i % 3], i // 3, 4, blob(i % 3, i // 3)) for i in range(n)]


@covers(ops.FirstItem, ops.SendBatch, ops.Sleep)
def test_put_batches_replayed_whole_after_a_failure(h: Server) -> None:
    h.client.core.put_batch_bytes = 2 * len(blob(0, 0)) - 1  # two blobs per batch
    h.wire.fail["Put"] = [grpc.StatusCode.UNAVAILABLE]
    result = h.call(h.client.put(NS, put_items(3)))
    assert result == PutResult(3, 3 * len(blob(0, 0)), 2, False, ("ram",))
    assert h.wire.stored == {(KEYS[i % 3], i // 3): blob(i % 3, i // 3) for i in range(3)}
    assert h.wire.commits == [True, True, True]  # the first batch twice
    assert h.performed == [
        ops.FirstItem,
        ops.SendBatch,
        ops.Sleep,
        ops.SendBatch,
        ops.FirstItem,
        ops.SendBatch,
    ]


@covers(ops.FirstItem, ops.SendBatch)
def test_put_raises_the_sources_own_error_and_commits_nothing(h: Server) -> None:
    def items() -> Iterator[PutItem]:
        yield from put_items(2)
        raise KeyError("the caller's iterator broke")

    with pytest.raises(KeyError, match="iterator broke"):
        h.call(h.client.put(NS, items()))
    assert h.wire.commits == [False] and h.wire.stored == {}
    assert h.performed == [ops.FirstItem, ops.SendBatch]


@covers(ops.FirstItem, ops.SendBatch)
def test_put_caller_error_from_the_server(h: Server) -> None:
    h.wire.fail["Put"] = [grpc.StatusCode.DATA_LOSS]  # a blob the server found unsealed: the caller's
    with pytest.raises(InvalidArgument, match="no valid integrity trailer"):
        h.call(h.client.put(NS, put_items(2)))
    assert h.performed == [ops.FirstItem, ops.SendBatch]


@covers(ops.OpenGet, ops.Receive, ops.Cancel, ops.Sleep)
def test_get_resumes_at_the_first_layer_not_yet_emitted(h: Server) -> None:
    h.store(2, 3)
    h.wire.get_fail_after = [3]  # layer 0 whole, then one blob of layer 1, then a reset
    got = h.call.layers(h.client.get_layers(NS, KEYS[:2], 0, 3))
    assert [(layer, [bytes(b) for b in blobs]) for layer, blobs in got] == [
        (layer, [blob(0, layer), blob(1, layer)]) for layer in range(3)
    ]
    assert [(s.request.layer_start, s.request.layer_end) for s in h.wire.streams] == [(0, 3), (1, 3)]
    assert all(s.cancelled for s in h.wire.streams)
    receives = [ops.Receive] * 4  # 3 messages and the failure; then 4 messages and the end
    assert h.performed == [
        ops.OpenGet,
        *receives,
        ops.Cancel,
        ops.Sleep,
        ops.OpenGet,
        *receives,
        ops.Receive,
        ops.Cancel,
    ]


@covers(ops.OpenGet, ops.Receive)
def test_get_abandoned_by_its_consumer_releases_the_stream(h: Server) -> None:
    h.store(2, 3)
    got = h.call.layers(h.client.get_layers(NS, KEYS[:2], 0, 3), take=1)
    assert [layer for layer, _ in got] == [0]
    assert [s.cancelled for s in h.wire.streams] == [True]
    assert h.performed == [ops.OpenGet, ops.Receive, ops.Receive]


@covers(ops.OpenGet, ops.Receive)
def test_get_damaged_blob_raised_and_the_stream_released(h: Server) -> None:
    h.store(2, 2)
    h.wire.damaged = {(1, 1)}
    with pytest.raises(BlobIntegrityError):
        h.call.layers(h.client.get_layers(NS, KEYS[:2], 0, 2))
    assert [s.cancelled for s in h.wire.streams] == [True]
    assert h.performed == [ops.OpenGet] + [ops.Receive] * 4


def test_get_arguments_checked_before_any_effect(h: Server) -> None:
    with pytest.raises(InvalidArgument, match="layer range"):
        h.client.get_layers(NS, KEYS[:1], 2, 2)
    assert h.performed == []


# -- a cluster: scripted member clients ----------------------------------------------------------------


class Replica:
    """One member as the cluster driver sees it: what it holds, and how it answers.

    ``refuse`` is raised by every call (a caller error: auth, quota); ``down``
    fails every call with Unavailable; each call takes ``delay_s``. ``running``
    counts calls in progress (a cancelled one ends too).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.holds: set[bytes] = set()
        self.refuse: TransferError | None = None
        self.bug: Exception | None = None  # raised by put: not a TransferError, nobody handles it
        self.down = False
        self.delay_s = 0.0
        #: Calls wait for this (then ``delay_s``) before answering; ``refused`` is set once it refused.
        self.gate: threading.Event | None = None
        self.refused = threading.Event()
        self.running = 0
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            self.running += 1

    def leave(self) -> None:
        with self.lock:
            self.running -= 1

    def check(self) -> None:
        if self.refuse is not None:
            self.refused.set()
            raise self.refuse
        if self.down:
            raise Unavailable(f"{self.name} is down")

    def lookup(self, keys: list[bytes]) -> int:
        self.check()
        return next((i for i, k in enumerate(keys) if k not in self.holds), len(keys))

    def put(self, items: list[Any]) -> PutResult:
        self.check()
        if self.bug is not None:
            raise self.bug
        self.holds.update(bytes(item[0]) for item in items)
        return PutResult(len(items), sum(len(item[3]) for item in items), 1, False, ("ram",))

    def delete(self, keys: list[bytes]) -> int:
        self.check()
        gone = self.holds & set(keys)
        self.holds -= gone
        return len(gone)

    def stats(self) -> StoreStats:
        self.check()
        return StoreStats([TierStats("ram", 0, len(self.holds), 0, 0, 0, 0, 0, 0, True)])

    def layers(self, keys: list[bytes], start: int, end: int) -> Iterator[tuple[int, list[bytes]]]:
        self.check()
        if any(k not in self.holds for k in keys):
            raise NotFound(f"{self.name} misses a key")
        for layer in range(start, end):
            yield layer, [blob(KEYS.index(k), layer) for k in keys]


class SyncMember:
    """The blocking member client's methods, answered by a :class:`Replica`."""

    def __init__(self, replica: Replica) -> None:
        self.r = replica

    def _call(self, fn: Callable[[], Any]) -> Any:
        self.r.enter()
        try:
            if self.r.gate is not None:
                self.r.gate.wait(10.0)
            time.sleep(self.r.delay_s)
            return fn()
        finally:
            self.r.leave()

    def lookup(self, ns: str, keys: list[bytes], num_layers: int, *, timeout_s: float | None = None) -> int:
        return self._call(lambda: self.r.lookup(keys))  # type: ignore[no-any-return]

    def put(self, ns: str, items: Any, *, ack: str | None = None, timeout_s: float | None = None) -> Any:
        return self._call(lambda: self.r.put(list(items)))

    def delete(self, ns: str, keys: list[bytes], *, num_layers: Any = None, timeout_s: Any = None) -> Any:
        return self._call(lambda: self.r.delete(keys))

    def stats(self, *, timeout_s: float | None = None) -> Any:
        return self._call(self.r.stats)

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        self._call(self.r.check)

    def get_layers(self, ns: str, keys: list[bytes], start: int, end: int, *, timeout_s: Any = None) -> Any:
        return self.r.layers(list(keys), start, end)

    def close(self) -> None:
        pass


class AsyncMember(SyncMember):
    """The asyncio member client's methods over the same :class:`Replica`."""

    async def _acall(self, fn: Callable[[], Any]) -> Any:
        self.r.enter()
        try:
            deadline = time.monotonic() + 10.0
            while self.r.gate is not None and not self.r.gate.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            await asyncio.sleep(self.r.delay_s)
            return fn()
        finally:
            self.r.leave()

    async def lookup(self, ns: str, keys: list[bytes], num_layers: int, *, timeout_s: Any = None) -> int:  # type: ignore[override]
        return await self._acall(lambda: self.r.lookup(keys))  # type: ignore[no-any-return]

    async def put(self, ns: str, items: Any, *, ack: str | None = None, timeout_s: Any = None) -> Any:
        got = [i async for i in items] if isinstance(items, AsyncIterator) else list(items)
        return await self._acall(lambda: self.r.put(got))

    async def delete(
        self, ns: str, keys: list[bytes], *, num_layers: Any = None, timeout_s: Any = None
    ) -> Any:
        return await self._acall(lambda: self.r.delete(keys))

    async def stats(self, *, timeout_s: float | None = None) -> Any:
        return await self._acall(self.r.stats)

    async def wait_ready(self, timeout_s: float = 10.0) -> None:  # type: ignore[override]
        await self._acall(self.r.check)

    def get_layers(self, ns: str, keys: list[bytes], start: int, end: int, *, timeout_s: Any = None) -> Any:
        source = self.r.layers(list(keys), start, end)

        async def layers() -> AsyncIterator[tuple[int, list[bytes]]]:
            for item in source:
                await asyncio.sleep(0)
                yield item

        return layers()

    async def close(self) -> None:  # type: ignore[override]
        pass


class BlockingCluster(ClusterKVClient):
    def __init__(self, replicas: dict[str, Replica], *args: Any, **kwargs: Any) -> None:
        self.performed: list[type] = []
        self.members_ = {m: SyncMember(r) for m, r in replicas.items()}
        super().__init__(*args, **kwargs)

    def _client(self, member: str) -> Any:
        return self.members_[member]

    def _perform(self, effect: cops.ClusterAction) -> Any:
        self.performed.append(type(effect))
        return super()._perform(effect)


class AsyncCluster(AsyncClusterKVClient):
    def __init__(self, replicas: dict[str, Replica], *args: Any, **kwargs: Any) -> None:
        self.performed: list[type] = []
        self.members_ = {m: AsyncMember(r) for m, r in replicas.items()}
        super().__init__(*args, **kwargs)

    def _client(self, member: str) -> Any:
        return self.members_[member]

    async def _perform(self, effect: cops.ClusterAction) -> Any:
        self.performed.append(type(effect))
        return await super()._perform(effect)


MEMBERS = ["a:1", "b:1"]


class Cluster:
    """One cluster driver over two scripted replicas (R=2: both own every key)."""

    def __init__(self, driver: str) -> None:
        self.call = Loop(driver)
        self.replicas = {m: Replica(m) for m in MEMBERS}
        self.driver = driver
        self._clients: list[Any] = []

    def client(self, **options: Any) -> Any:
        options = {"retry": policy(), "replication": 2, **options}
        membership = StaticMembership(MEMBERS)
        if self.call.aio:

            async def make() -> AsyncCluster:
                return AsyncCluster(self.replicas, membership, **options)

            client: Any = self.call(make())
        else:
            client = BlockingCluster(self.replicas, membership, **options)
        self._clients.append(client)
        return client

    def performed(self) -> set[type]:
        return {kind for c in self._clients for kind in c.performed}

    def running(self) -> int:
        return sum(r.running for r in self.replicas.values())

    def close(self) -> None:
        for client in self._clients:
            self.call(client.close())
        self.call.close()


@pytest.fixture(params=DRIVERS)
def c(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    cluster = Cluster(request.param)
    yield cluster
    cluster.close()
    missing = set(getattr(request.function, "covers", ())) - cluster.performed()
    assert not missing, f"{request.param} driver never performed {sorted(k.__name__ for k in missing)}"


@covers(cops.CurrentView, cops.Fan, cops.MemberLookup)
def test_cluster_lookup(c: Cluster) -> None:
    for r in c.replicas.values():
        r.holds = set(KEYS[:4])
    client = c.client()
    assert c.call(client.lookup(NS, KEYS, 2)) == 4


@covers(cops.CurrentView, cops.Fan, cops.MemberDelete)
def test_cluster_fan_ends_every_call_before_raising_a_caller_error(c: Cluster) -> None:
    # a refused replica answers at once, the other takes a while: the caller error is raised once
    # both calls have ended, never with one still running behind the caller's back
    slow, refusing = c.replicas["a:1"], c.replicas["b:1"]
    slow.gate, slow.delay_s, slow.holds = refusing.refused, 0.2, set(KEYS)
    refusing.refuse = PermissionDenied("b:1 says no")
    client = c.client()
    with pytest.raises(PermissionDenied, match="b:1 says no"):
        c.call(client.delete(NS, KEYS[:2], num_layers=1))
    assert c.running() == 0
    assert slow.holds == set(KEYS[2:])  # its delete was not abandoned
    refusing.refuse = None
    assert c.call(client.delete(NS, KEYS[2:3], num_layers=1)) == 1


@covers(cops.CurrentView, cops.Next, cops.Spawn, cops.WaitAny, cops.MemberPut, cops.Drain)
def test_cluster_put_to_every_owner(c: Cluster) -> None:
    client = c.client(write_ack="all")
    items = [(k, layer, 2, blob(i, layer)) for i, k in enumerate(KEYS[:3]) for layer in range(2)]
    result = c.call(client.put(NS, iter(items)))
    assert (result.num_stored, result.num_requests, result.tiers) == (6, 2, ("ram",))
    assert all(r.holds == set(KEYS[:3]) for r in c.replicas.values())


@covers(cops.Spawn, cops.WaitAny, cops.Detach, cops.Drain)
def test_cluster_put_ack_one_leaves_the_other_copy_to_drain(c: Cluster) -> None:
    c.replicas["a:1"].delay_s = 0.2
    client = c.client(write_ack="one")
    items = [(KEYS[0], 0, 1, blob(0, 0))]
    assert c.call(client.put(NS, iter(items))).num_stored == 1
    c.call(client.drain())
    assert c.running() == 0
    assert all(r.holds == {KEYS[0]} for r in c.replicas.values())


@covers(cops.Spawn, cops.WaitAny, cops.Abandon, cops.MemberPut)
def test_cluster_put_caller_error_abandons_the_other_copies_and_drain_waits_for_them(c: Cluster) -> None:
    # The drift this pins down: the asyncio driver cancelled the other copies, the blocking one
    # left them running untracked. Now the operation abandons them (Abandon) and both drivers
    # cancel what has not finished and keep it for drain(): nothing runs once drain() returns.
    slow, refusing = c.replicas["a:1"], c.replicas["b:1"]
    slow.gate, slow.delay_s = refusing.refused, 0.5  # it answers 0.5 s after the refusal
    refusing.refuse = InvalidArgument("b:1: namespace quota")
    client = c.client(write_ack="all")
    with pytest.raises(InvalidArgument, match="namespace quota"):
        c.call(client.put(NS, iter([(KEYS[0], 0, 1, blob(0, 0))])))
    # (a blocking copy already sending cannot be stopped, one not started yet is cancelled: either way
    # drain() returns once nothing runs)
    c.call(client.drain())
    assert c.running() == 0


@covers(
    cops.CurrentView, cops.OpenLayers, cops.Next, cops.Close, cops.Background, cops.Copy, cops.MemberLookup
)
def test_cluster_get_falls_back_past_a_missing_owner_and_repairs_it(c: Cluster) -> None:
    client = c.client()
    first = next(iter(client.cluster.plan_get(KEYS[:2], range(2), client.cluster.view(), {})))
    other = next(m for m in MEMBERS if m != first)
    c.replicas[first].holds, c.replicas[other].holds = set(), set(KEYS[:2])
    got = c.call.layers(client.get_layers(NS, KEYS[:2], 0, 3))
    assert [(layer, [bytes(b) for b in blobs]) for layer, blobs in got] == [
        (layer, [blob(0, layer), blob(1, layer)]) for layer in range(3)
    ]
    assert c.call(client.drain_repairs(5.0)) is True
    assert c.replicas[first].holds == set(KEYS[:2])  # copied back from the other owner
    assert client.replica_counters()[first]["chunks_repaired"] == 2


@covers(cops.Background, cops.Copy)
def test_cluster_background_failure_logged_not_raised(c: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    client = c.client()
    first = next(iter(client.cluster.plan_get(KEYS[:2], range(2), client.cluster.view(), {})))
    other = next(m for m in MEMBERS if m != first)
    c.replicas[other].holds = set(KEYS[:2])
    c.replicas[first].bug = RuntimeError("a bug in the copy")
    assert len(c.call.layers(client.get_layers(NS, KEYS[:2], 0, 2))) == 2  # the reader sees nothing
    assert c.call(client.drain_repairs(5.0)) is True
    failures = [r for r in caplog.records if "background operation failed" in r.getMessage()]
    assert [r.exc_info[1] for r in failures if r.exc_info] == [c.replicas[first].bug]
    assert c.replicas[first].holds == set()


@covers(cops.OpenLayers, cops.Close)
def test_cluster_get_caller_error_raised_and_every_stream_closed(c: Cluster) -> None:
    for r in c.replicas.values():
        r.holds = set(KEYS[:2])
    client = c.client()
    first = next(iter(client.cluster.plan_get(KEYS[:2], range(2), client.cluster.view(), {})))
    c.replicas[first].refuse = PermissionDenied(f"{first} says no")
    with pytest.raises(PermissionDenied, match="says no"):
        c.call.layers(client.get_layers(NS, KEYS[:2], 0, 2))
    assert cops.Close in c.performed()


@covers(cops.CurrentView, cops.Fan, cops.MemberStats, cops.MemberReady)
def test_cluster_stats_and_readiness_with_a_replica_down(c: Cluster) -> None:
    c.replicas["a:1"].holds = set(KEYS[:2])
    c.replicas["b:1"].down = True
    client = c.client()
    assert c.call(client.stats()).tiers[0].objects == 2
    per_member = c.call(client.replica_stats())
    assert isinstance(per_member["a:1"], StoreStats) and isinstance(per_member["b:1"], Unavailable)
    with pytest.raises(Unavailable, match=r"b:1 \(1 of 2 ready\)"):
        c.call(client.wait_ready(1.0))
    c.call(client.wait_ready(1.0, members=["a:1"]))


# -- coverage --------------------------------------------------------------------------------------------


def test_every_effect_type_is_covered() -> None:
    performed = set(get_args(ops.Action)) | set(get_args(cops.ClusterAction))
    assert performed == COVERED, sorted(k.__name__ for k in COVERED ^ performed)
