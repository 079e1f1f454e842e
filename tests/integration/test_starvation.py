"""No tenant can starve the server: stalled streams hold no worker, are capped and time out.

Tenant A opens ten times the server's worker count of streams that stall: Put
streams that send one blob and then nothing, and Get streams whose client never
reads. Meanwhile tenant B's Lookup, Get and Put and the gRPC health check must
answer within 1 s; A's streams past ``server.max_streams_per_tenant`` are refused
with RESOURCE_EXHAUSTED naming the field; every stalled stream ends with
DEADLINE_EXCEEDED naming ``server.stream_idle_timeout_s``; and nothing of a
stalled (uncommitted) Put is stored. Real server, real sockets, auth tokens.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.auth import bearer_metadata
from kvstore.server import ServerHandle, serve
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from tests.fixtures.store import committed, make_blob, store_config
from transfer.errors import ResourceExhausted, from_rpc_error
from transfer.rpc.client import KVClient

WORKERS = 4
STALLED = 10 * WORKERS  # streams tenant A tries to hold open
TENANT_LIMIT = 30  # A's streams past this are refused
IDLE_S = 2.0
TOKENS = {"tok-a": "a", "tok-b": "b"}
NS_A, NS_B = "a/m/p", "b/m/p"
LIVE_S = 1.0  # every call of tenant B and the health check must answer within this


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerHandle]:
    handle = serve(
        store_config(
            tmp_path,
            **{
                "server.workers": WORKERS,
                "auth.tokens": TOKENS,
                "server.max_streams_per_tenant": TENANT_LIMIT,
                "server.max_streams_per_peer": 1000,
                "server.stream_idle_timeout_s": IDLE_S,
            },
        )
    )
    try:
        yield handle
    finally:
        handle.stop(grace=0)


def _timed(fn: Callable[[], Any]) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


class StalledPut:
    """A Put stream that sends one blob (no commit) and then stalls until released."""

    def __init__(self, stub: pb_grpc.KVStoreStub, key: bytes) -> None:
        self.sent = threading.Event()
        self.release = threading.Event()
        self.future = stub.Put.future(self._requests(key), metadata=bearer_metadata("tok-a"))

    def _requests(self, key: bytes) -> Iterator[pb.PutRequest]:
        yield pb.PutRequest(namespace=NS_A, key=key, layer=0, num_layers=1, blob=make_blob(64 * 1024))
        self.sent.set()
        self.release.wait(60)


def _streams_open(stub: pb_grpc.KVStoreStub) -> int:
    return stub.Stats(pb.StatsRequest(), timeout=5, metadata=bearer_metadata("tok-b")).counters[
        "streams_open"
    ]


def _wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_stalled_streams_of_one_tenant_starve_no_one(server: ServerHandle) -> None:
    # Data both tenants read: A's Gets are big enough (packed 1 MiB messages, 16 MiB a stream)
    # to fill the flow-control windows of a client that never reads.
    big = [os.urandom(32) for _ in range(64)]
    blob = make_blob(256 * 1024)
    b_keys = [os.urandom(32) for _ in range(4)]
    with KVClient(server.target, token="tok-a") as a, KVClient(server.target, token="tok-b") as b:
        a.put(NS_A, [(k, 0, 1, blob) for k in big])
        b.put(NS_B, [(k, 0, 1, make_blob(4096)) for k in b_keys])

    # Tenant A's connections: no BDP probing, so an unread stream's window stays at its initial size
    # and the server's writes wait on the client, as they do for a client that stopped reading.
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.http2.bdp_probe", 0)]
    channels = [grpc.insecure_channel(server.target, options=options) for _ in range(4)]
    stubs = [pb_grpc.KVStoreStub(c) for c in channels]
    observer = stubs[0]
    puts: list[StalledPut] = []
    gets: list[Any] = []
    stalled_keys = [os.urandom(32) for _ in range(TENANT_LIMIT // 2)]
    try:
        # Tenant A: half its allowed streams stalled Puts, half unread Gets, spread over 4 connections.
        for i, key in enumerate(stalled_keys):
            puts.append(StalledPut(stubs[i % 4], key))
        for i in range(TENANT_LIMIT - len(puts)):
            gets.append(
                stubs[i % 4].Get(
                    pb.GetRequest(namespace=NS_A, keys=big, layer_start=0, layer_end=1, pack_bytes=1 << 20),
                    metadata=bearer_metadata("tok-a"),
                )
            )
        _wait_for(
            lambda: _streams_open(observer) == TENANT_LIMIT and all(p.sent.is_set() for p in puts),
            "tenant A's streams did not all open",
        )

        # Past the tenant limit: refused at once, the message names the limit and its field.
        refused = 0
        for i in range(STALLED - TENANT_LIMIT):
            extra = StalledPut(stubs[i % 4], os.urandom(32)) if i % 2 else None
            try:
                if extra is not None:
                    extra.future.result(timeout=5)
                else:
                    next(
                        stubs[i % 4].Get(
                            pb.GetRequest(namespace=NS_A, keys=big[:1], layer_start=0, layer_end=1),
                            timeout=5,
                            metadata=bearer_metadata("tok-a"),
                        )
                    )
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, (exc.code(), exc.details())
                assert "server.max_streams_per_tenant" in exc.details() and "'a'" in exc.details()
                refused += 1
            finally:
                if extra is not None:
                    extra.release.set()
        assert refused == STALLED - TENANT_LIMIT

        # Everyone else is served at once while A's streams stall.
        health = health_pb2_grpc.HealthStub(channels[1])
        with KVClient(server.target, token="tok-b", timeout_s=5) as b:
            fresh = os.urandom(32)
            timings = {
                "health": _timed(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5)),
                "lookup": _timed(lambda: b.lookup(NS_B, b_keys, 1)),
                "get": _timed(lambda: list(b.get_layers(NS_B, b_keys, 0, 1))),
                "put": _timed(lambda: b.put(NS_B, [(fresh, 0, 1, make_blob(4096))])),
                "stats": _timed(lambda: b.stats()),
            }
            assert b.lookup(NS_B, [fresh], 1) == 1
        slow = {k: round(v, 3) for k, v in timings.items() if v > LIVE_S}
        assert not slow, f"calls slower than {LIVE_S} s while tenant A stalls {TENANT_LIMIT} streams: {slow}"
        # Tenant A itself is capped on streams, not on unary calls.
        with KVClient(server.target, token="tok-a", timeout_s=5) as a:
            assert _timed(lambda: a.lookup(NS_A, big, 1)) < LIVE_S

        # The stalled streams end after the idle timeout with a status that names it.
        for p in puts:
            with pytest.raises(grpc.RpcError) as err:
                p.future.result(timeout=IDLE_S + 20)
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert (
                "server.stream_idle_timeout_s" in err.value.details() and "not sending" in err.value.details()
            )
        # An unread Get sends nothing more after the timeout; its client, reading again, gets what
        # was in flight and then the status (never the rest of the stream, never a clean end).
        time.sleep(IDLE_S)
        for call in gets:
            received = 0
            with pytest.raises(grpc.RpcError) as err:
                for _ in call:
                    received += 1
            assert received < len(big) * 256 * 1024 // (1 << 20)
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert (
                "server.stream_idle_timeout_s" in err.value.details() and "not reading" in err.value.details()
            )
        _wait_for(lambda: _streams_open(observer) == 0, "stalled streams still counted as open")

        # Nothing of the stalled Puts was stored; A may open streams again and finish them.
        with KVClient(server.target, token="tok-a") as a:
            assert all(a.lookup(NS_A, [k], 1) == 0 for k in stalled_keys)
            assert a.put(NS_A, [(stalled_keys[0], 0, 1, make_blob(100))]).num_stored == 1
            assert a.lookup(NS_A, [stalled_keys[0]], 1) == 1
    finally:
        for p in puts:
            p.release.set()
        for call in gets:
            call.cancel()
        for c in channels:
            c.close()


def test_connection_limit_names_its_field_and_frees_slots(tmp_path: Path) -> None:
    handle = serve(
        store_config(tmp_path, **{"server.max_streams_per_peer": 3, "server.stream_idle_timeout_s": 30})
    )
    try:
        # A channel of its own subchannel pool: a second connection (same-target channels share one otherwise).
        separate = [("grpc.use_local_subchannel_pool", 1)]
        with (
            grpc.insecure_channel(handle.target) as channel,
            grpc.insecure_channel(handle.target, options=separate) as other,
        ):
            stub = pb_grpc.KVStoreStub(channel)
            held = [StalledPut(stub, os.urandom(32)) for _ in range(3)]
            try:
                for p in held:
                    assert p.sent.wait(10)
                _wait_for(lambda: _streams_open(stub) == 3, "streams did not open")
                with pytest.raises(grpc.RpcError) as err:
                    stub.Put(
                        committed(
                            [
                                pb.PutRequest(
                                    namespace=NS_A,
                                    key=os.urandom(32),
                                    layer=0,
                                    num_layers=1,
                                    blob=make_blob(10),
                                )
                            ]
                        ),
                        timeout=5,
                    )
                assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "server.max_streams_per_peer" in err.value.details()
                # Another connection is not affected.
                reply = pb_grpc.KVStoreStub(other).Put(
                    committed(
                        [
                            pb.PutRequest(
                                namespace=NS_A, key=os.urandom(32), layer=0, num_layers=1, blob=make_blob(10)
                            )
                        ]
                    ),
                    timeout=5,
                )
                assert reply.num_stored == 1
            finally:
                for p in held:
                    p.future.cancel()
                    p.release.set()
            _wait_for(lambda: _streams_open(stub) == 0, "cancelled streams still counted as open")
            assert (
                stub.Put(
                    committed(
                        [
                            pb.PutRequest(
                                namespace=NS_A, key=os.urandom(32), layer=0, num_layers=1, blob=make_blob(10)
                            )
                        ]
                    ),
                    timeout=5,
                ).num_stored
                == 1
            )
    finally:
        handle.stop(grace=0)


def test_client_sees_resource_exhausted_as_its_error_class(tmp_path: Path) -> None:
    handle = serve(store_config(tmp_path, **{"server.max_streams_per_peer": 1}))
    try:
        with grpc.insecure_channel(handle.target) as channel:
            held = StalledPut(pb_grpc.KVStoreStub(channel), os.urandom(32))
            try:
                assert held.sent.wait(10)
                _wait_for(lambda: _streams_open(pb_grpc.KVStoreStub(channel)) == 1, "stream did not open")
                with pytest.raises(grpc.RpcError) as err:
                    pb_grpc.KVStoreStub(channel).Put(committed([]), timeout=5)
                assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert isinstance(from_rpc_error(err.value, rpc="Put"), ResourceExhausted)
                # Unary calls are not streams: the same connection still answers them.
                assert (
                    pb_grpc.KVStoreStub(channel)
                    .Lookup(pb.LookupRequest(namespace=NS_A, keys=[os.urandom(32)], num_layers=1), timeout=5)
                    .num_present
                    == 0
                )
            finally:
                held.future.cancel()
                held.release.set()
    finally:
        handle.stop(grace=0)
