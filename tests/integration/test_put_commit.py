"""The Put protocol's explicit commit and the acknowledgement policy, on a real server.

A Put stream is stored only once its commit message (``PutRequest.commit``) has
arrived: cancelled before the first message, in the middle, or after the last
blob but before the commit, nothing is stored; a stream that simply ends without
the commit is ABORTED with a message that says so; every committed stream is
stored. ``ack: durable`` answers OK only once a persistent tier holds the blobs:
with the Redis tier killed and no disk tier it is UNAVAILABLE (naming what was
missing) and nothing is stored, while ``ack: memory`` still answers OK from RAM.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvstore.server import ServerHandle, serve
from kvstore.testing.services import RedisProcess
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from tests.fixtures.store import committed, make_blob, store_config
from transfer.errors import Unavailable
from transfer.rpc.aio_client import AsyncKVClient
from transfer.rpc.client import KVClient, RetryPolicy

NS = "acme/m/p"
LAYERS = 4


def _requests(key: bytes) -> list[pb.PutRequest]:
    return [
        pb.PutRequest(namespace=NS, key=key, layer=layer, num_layers=LAYERS, blob=make_blob(2000 + layer))
        for layer in range(LAYERS)
    ]


def _present(stub: pb_grpc.KVStoreStub, key: bytes) -> int:
    return stub.Lookup(pb.LookupRequest(namespace=NS, keys=[key], num_layers=1), timeout=5).num_present


def _settled(stub: pb_grpc.KVStoreStub) -> None:
    """Wait until the server has finished every stream (so a Lookup sees any write it made)."""
    deadline = time.monotonic() + 10
    while stub.Stats(pb.StatsRequest(), timeout=5).counters["streams_open"]:
        assert time.monotonic() < deadline, "a Put stream is still open on the server"
        time.sleep(0.02)


@pytest.fixture
def server(kvstore_server: ServerHandle) -> ServerHandle:
    """The suite's plain server (RAM + disk in a fresh tmp dir)."""
    return kvstore_server


@pytest.mark.parametrize("sent", [0, 2, LAYERS], ids=["before-first", "mid-stream", "after-last-blob"])
def test_a_put_cancelled_before_its_commit_stores_nothing(server: ServerHandle, sent: int) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        key = os.urandom(32)
        reached, release = threading.Event(), threading.Event()

        def stream() -> Iterator[pb.PutRequest]:
            yield from _requests(key)[:sent]
            reached.set()
            release.wait(30)  # never sends the commit

        future = stub.Put.future(stream(), timeout=30)
        assert reached.wait(10)
        time.sleep(0.2)  # the messages are on the server
        future.cancel()
        release.set()
        with pytest.raises(grpc.FutureCancelledError):
            future.result()
        _settled(stub)
        assert _present(stub, key) == 0
        # The server keeps serving; the same blobs, committed, are stored.
        assert stub.Put(committed(_requests(key)), timeout=10).num_stored == LAYERS
        assert _present(stub, key) == 1


def test_a_stream_that_ends_without_commit_is_aborted_and_stores_nothing(server: ServerHandle) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        key = os.urandom(32)
        with pytest.raises(grpc.RpcError) as err:
            stub.Put(iter(_requests(key)), timeout=10)
        assert err.value.code() is grpc.StatusCode.ABORTED
        assert (
            "without a commit message" in err.value.details() and "nothing was stored" in err.value.details()
        )
        assert _present(stub, key) == 0
        # A commit on the last blob's own message works as well as a bare commit message.
        last = _requests(key)
        last[-1].commit = True
        assert stub.Put(iter(last), timeout=10).num_stored == LAYERS
        assert _present(stub, key) == 1


def _after_commit(key: bytes, case: str) -> list[pb.PutRequest]:
    """A Put stream of ``key`` that has something after its commit message."""
    items = _requests(key)
    if case == "items-after-commit-on-first-item":  # [item(commit), item, item, item]
        items[0].commit = True
        return items
    if case == "bad-checksum-item-after-commit":
        bad = bytearray(make_blob(300))
        bad[0] ^= 0xFF
        extra = pb.PutRequest(namespace=NS, key=key, layer=0, num_layers=LAYERS, blob=bytes(bad))
        return [*items, pb.PutRequest(commit=True), extra]
    assert case == "two-commits"
    return [*items, pb.PutRequest(commit=True), pb.PutRequest(commit=True)]


@pytest.mark.parametrize(
    "case", ["items-after-commit-on-first-item", "bad-checksum-item-after-commit", "two-commits"]
)
def test_anything_after_the_commit_refuses_the_whole_stream(server: ServerHandle, case: str) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        kept = os.urandom(32)
        kept_requests = _requests(kept)
        assert stub.Put(committed(kept_requests), timeout=10).num_stored == LAYERS

        key = os.urandom(32)
        with pytest.raises(grpc.RpcError) as err:
            stub.Put(iter(_after_commit(key, case)), timeout=10)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "nothing may follow the commit" in err.value.details()
        assert "nothing of this stream was stored" in err.value.details()
        _settled(stub)
        for layers in (1, LAYERS):  # not even the blobs before the commit
            assert (
                stub.Lookup(
                    pb.LookupRequest(namespace=NS, keys=[key], num_layers=layers), timeout=5
                ).num_present
                == 0
            )

        # Earlier data is intact, byte for byte, and the server keeps serving.
        got = list(
            stub.Get(pb.GetRequest(namespace=NS, keys=[kept], layer_start=0, layer_end=LAYERS), timeout=10)
        )
        assert [bytes(r.blob) for r in got] == [r.blob for r in kept_requests]
        assert stub.Put(committed(_requests(key)), timeout=10).num_stored == LAYERS
        assert _present(stub, key) == 1


def test_every_committed_stream_is_stored(server: ServerHandle) -> None:
    keys = [os.urandom(32) for _ in range(25)]
    with KVClient(server.target) as kv:
        for key in keys:
            result = kv.put(NS, [(key, layer, LAYERS, make_blob(500)) for layer in range(LAYERS)])
            assert (result.num_stored, result.num_requests) == (LAYERS, 1)
            assert result.tiers == ("memory", "disk") and result.durable
        assert kv.lookup(NS, keys, LAYERS) == len(keys)


def test_client_source_failing_midway_stores_nothing_and_raises_its_error(server: ServerHandle) -> None:
    key = os.urandom(32)

    def source() -> Iterator[tuple[bytes, int, int, bytes]]:
        yield key, 0, LAYERS, make_blob(100)
        yield key, 1, LAYERS, make_blob(100)
        raise KeyError("encoder failed")

    with KVClient(server.target) as kv:
        with pytest.raises(KeyError, match="encoder failed"):
            kv.put(NS, source())
        assert kv.lookup(NS, [key], 1) == 0

    async def run() -> None:
        async def asource():  # noqa: ANN202 - an async generator
            yield key, 0, LAYERS, make_blob(100)
            raise KeyError("async encoder failed")

        async with AsyncKVClient(server.target) as akv:
            with pytest.raises(KeyError, match="async encoder failed"):
                await akv.put(NS, asource())
            assert await akv.lookup(NS, [key], 1) == 0

    asyncio.run(run())


def test_unknown_ack_value_is_invalid_argument(server: ServerHandle) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Put(committed(_requests(os.urandom(32)), ack=9), timeout=10)
        assert (
            err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "PutRequest.ack" in err.value.details()
        )


def test_durable_ack_with_redis_killed_and_no_disk(tmp_path: Path) -> None:
    redis = RedisProcess().start()
    config = store_config(
        tmp_path,
        **{
            "disk.enabled": False,
            "redis.enabled": True,
            "redis.url": redis.url,
            "redis.socket_timeout_s": 0.5,
        },
    )
    handle = serve(config)
    try:
        with KVClient(handle.target, retry=RetryPolicy(max_attempts=1)) as kv:
            up = os.urandom(32)
            result = kv.put(NS, [(up, 0, 1, make_blob(1000))], ack="durable")
            assert result.durable and result.tiers == ("memory", "redis")
            redis.kill()

            lost = os.urandom(32)
            with pytest.raises(Unavailable) as err:
                kv.put(NS, [(lost, 0, 1, make_blob(1000))], ack="durable")
            assert "durable" in str(err.value) and "redis" in str(err.value)
            assert kv.lookup(NS, [lost], 1) == 0  # nothing claimed, nothing kept

            result = kv.put(NS, [(lost, 0, 1, make_blob(1000))], ack="memory")
            assert not result.durable and result.tiers == ("memory",)
            assert kv.lookup(NS, [lost], 1) == 1
            assert kv.stats().counters.get("puts_durable", 0) == 1
    finally:
        handle.stop(grace=0)
        redis.close()


def test_server_default_ack_durable_applies_unless_the_client_asks(tmp_path: Path) -> None:
    redis = RedisProcess().start()
    overrides = {
        "disk.enabled": False,
        "redis.enabled": True,
        "redis.url": redis.url,
        "server.ack": "durable",
    }
    handle = serve(store_config(tmp_path, **overrides, **{"redis.socket_timeout_s": 0.5}))
    try:
        with KVClient(handle.target, retry=RetryPolicy(max_attempts=1)) as kv:
            assert kv.put(NS, [(os.urandom(32), 0, 1, make_blob(100))]).durable
            redis.kill()
            with pytest.raises(Unavailable, match="no persistent tier took it"):
                kv.put(NS, [(os.urandom(32), 0, 1, make_blob(100))])
            assert kv.put(NS, [(os.urandom(32), 0, 1, make_blob(100))], ack="memory").num_stored == 1
        with KVClient(handle.target, ack="memory") as kv:
            assert kv.put(NS, [(os.urandom(32), 0, 1, make_blob(100))]).tiers == ("memory",)
    finally:
        handle.stop(grace=0)
        redis.close()


def test_ack_durable_without_a_persistent_tier_is_a_config_error(tmp_path: Path) -> None:
    """It used to start and then refuse every Put; now it does not start, naming the field."""
    with pytest.raises(ValueError, match=r"server\.ack is durable but no persistent tier"):
        store_config(tmp_path, **{"disk.enabled": False, "server.ack": "durable"})
    assert store_config(tmp_path, **{"disk.enabled": True, "server.ack": "durable"}).server.ack == "durable"
