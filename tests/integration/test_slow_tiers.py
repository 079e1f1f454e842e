"""Slow but healthy remote tiers, and tiers that were down and come back (issue 24, item 7).

Real servers throughout: an in-process kvstore server with a 64 KiB RAM tier and no disk tier
(so reads really reach the remote tier) in front of a real Redis or the real S3 server (moto).

* **Slow, not dead.** A :class:`~kvstore.testing.proxy.DelayProxy` between the tier and its
  server holds back one reply every 0.4 s for longer than the tier's read timeout, as a
  loaded server does now and then. Those calls fail (their Gets answer UNAVAILABLE, which a
  client retries), but the breaker stays closed, so no other read skips the tier, and no Get
  of a key acknowledged with ``ack: durable`` ever answers NOT_FOUND. Before issue 24 the first
  slow call opened the breaker and the Gets in that window answered NOT_FOUND.
* **Frozen.** While the only tier holding a key acknowledged ``ack: durable`` cannot be read
  (SIGSTOP), its Get answers UNAVAILABLE, never NOT_FOUND (before issue 24: 25 of 40 NOT_FOUND),
  and is served once the tier answers again.
* **Down, then back.** With the tier's server killed, Puts acknowledged in RAM
  (``ack: memory``) skip it; they are kept for it (served from there to Gets although the
  tiny RAM tier evicted them) and written to it once it answers again. Before issue 24 they
  stayed in RAM only and were lost at eviction.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from kvstore.backends.base import BlobKey
from kvstore.keys import KEY_BYTES
from kvstore.server import ServerHandle
from kvstore.testing.proxy import DelayProxy
from kvstore.testing.reliability.calls import C, rpc_code
from kvstore.testing.services import RedisProcess, S3Process
from kvstore.testing.store import committed, make_blob
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from tests.fixtures.store import REMOTE_READS, serving, store_config

NS = "slow/model/profile"
BLOB_BYTES = 4096

pytestmark = pytest.mark.timeout(180)


def _tier_overrides(tier: str, host: str, port: int, name: str, s3: S3Process | None) -> dict[str, Any]:
    if tier == "redis":
        return {
            "redis.enabled": True,
            "redis.url": f"redis://{host}:{port}/0",
            "redis.key_prefix": f"{name}:",
        }
    assert s3 is not None
    return {**s3.tier_config(name), "s3.endpoint_url": f"http://{host}:{port}"}


def _put(stub: Any, key: bytes, blob: bytes, ack: int) -> tuple[Any, str]:
    code, details, _ = rpc_code(
        lambda: stub.Put(
            committed([pb.PutRequest(namespace=NS, key=key, layer=0, num_layers=1, blob=blob)], ack=ack),
            timeout=10,
        )
    )
    return code, details


def _get(stub: Any, key: bytes) -> tuple[Any, bytes | None]:
    code, _, got = rpc_code(
        lambda: list(
            stub.Get(pb.GetRequest(namespace=NS, keys=[key], layer_start=0, layer_end=1), timeout=10)
        )
    )
    return code, (got[0].blob if code is C.OK and got else None)


def _wait(predicate: Callable[[], bool], deadline_s: float = 30.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)  # polling interval, bounded by the deadline
    return predicate()


# ====================================================================== slow, not dead


@pytest.fixture(params=["redis", "s3"])
def slow_tier(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    redis_server: RedisProcess,
    s3_server: S3Process,
    unique_name: str,
) -> Iterator[tuple[str, ServerHandle, DelayProxy]]:
    tier = request.param
    upstream = urlsplit(redis_server.url if tier == "redis" else s3_server.endpoint_url)
    with DelayProxy(upstream.hostname or "127.0.0.1", int(upstream.port or 0)) as proxy:
        overrides = {**REMOTE_READS, **_tier_overrides(tier, "127.0.0.1", proxy.port, unique_name, s3_server)}
        with serving(store_config(tmp_path, **overrides)) as handle:
            yield tier, handle, proxy


def test_a_slow_tier_never_answers_not_found_for_durable_keys_nor_opens_its_breaker(
    slow_tier: tuple[str, ServerHandle, DelayProxy],
) -> None:
    name, server, proxy = slow_tier
    tier = server.store.tier(name)
    rng = random.Random(24)
    truth = {rng.randbytes(KEY_BYTES): make_blob(rng.randbytes(BLOB_BYTES)) for _ in range(120)}
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        for key, blob in truth.items():
            assert _put(stub, key, blob, pb.ACK_DURABLE)[0] is C.OK  # the remote tier holds each one
    read_timeout = float(getattr(tier, "budget_s", 0.5))
    proxy.slow(read_timeout + 0.25, every_s=0.4)  # isolated replies later than the whole budget
    answers: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def reader(seed: int) -> None:
        wrng = random.Random(seed)
        keys = list(truth)
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.KVStoreStub(channel)
            while not stop.is_set():
                key = wrng.choice(keys)
                code, got = _get(stub, key)
                answer = code.name if code is not C.OK else ("OK" if got == truth[key] else "WRONG_BYTES")
                with lock:
                    answers[answer] += 1

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        assert _wait(lambda: proxy.num_slowed >= 6 and tier.counters.errors >= 3, deadline_s=60), (
            proxy.num_slowed,
            tier.counters.errors,
            dict(answers),
        )
    finally:
        stop.set()
        for t in threads:
            t.join()
        proxy.fast()
    report = (name, dict(answers), proxy.num_slowed, tier.counters.errors, tier.counters.breaker_trips)
    print(
        f"\nslow {name}: answers {dict(answers)}; replies slowed {proxy.num_slowed}; "
        f"tier errors {tier.counters.errors}; breaker trips {tier.counters.breaker_trips}"
    )
    assert answers["NOT_FOUND"] == 0 and answers["WRONG_BYTES"] == 0, report
    assert tier.counters.breaker_trips == 0 and tier.breaker.state == "closed", report
    assert answers["OK"] >= 50, report
    assert set(answers) <= {"OK", "UNAVAILABLE"}, report  # a slow call's Get is retryable, nothing else
    # Every acknowledged key reads back, now that the tier is fast again.
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        assert all(_get(stub, key) == (C.OK, blob) for key, blob in truth.items())


# ====================================================================== down, then back


@pytest.fixture(params=["redis", "s3"])
def returning_tier(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    fresh_redis_server: RedisProcess,
    fresh_s3_server: S3Process,
    unique_name: str,
) -> Iterator[tuple[str, ServerHandle, RedisProcess | S3Process]]:
    tier = request.param
    proc: RedisProcess | S3Process = fresh_redis_server if tier == "redis" else fresh_s3_server
    overrides = {
        **REMOTE_READS,
        **_tier_overrides(tier, "127.0.0.1", proc.port, unique_name, fresh_s3_server),
        f"{tier}.breaker_reset_s": 0.1,
    }
    with serving(store_config(tmp_path, **overrides)) as handle:
        yield tier, handle, proc


def test_blobs_that_skipped_a_dead_tier_are_written_behind_once_it_returns(
    returning_tier: tuple[str, ServerHandle, RedisProcess | S3Process],
) -> None:
    name, server, proc = returning_tier
    store = server.store
    tier = store.tier(name)
    rng = random.Random(7)
    truth = {rng.randbytes(KEY_BYTES): make_blob(rng.randbytes(BLOB_BYTES)) for _ in range(150)}
    proc.kill()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        for key, blob in truth.items():
            assert _put(stub, key, blob, pb.ACK_MEMORY)[0] is C.OK  # RAM took it; the tier is down
        assert tier.breaker.state != "closed"
        pending, pending_bytes = store.write_behind_pending()[name]
        assert pending == len(truth), store.write_behind_pending()
        # 600 KiB through a 64 KiB RAM tier: evicted there, served from what is kept for the tier.
        assert all(_get(stub, key) == (C.OK, blob) for key, blob in truth.items())
        proc.restart()  # same port, empty
        back_at = time.monotonic()
        assert _wait(lambda: store.write_behind_pending()[name] == (0, 0)), store.write_behind_pending()
        print(
            f"\n{name} down then back: {pending} blobs ({pending_bytes} bytes) kept, all in the tier "
            f"{time.monotonic() - back_at:.2f} s after its restart returned; "
            f"dropped {tier.counters.write_behind_dropped}"
        )
        keys = [BlobKey(NS, key, 0) for key in truth]
        assert tier.get_many(keys) == list(truth.values())  # in the tier itself now
        assert tier.counters.write_behind_written >= len(truth)
        assert tier.counters.write_behind_dropped == 0
        assert all(_get(stub, key) == (C.OK, blob) for key, blob in truth.items())


def test_a_key_only_a_frozen_tier_holds_is_unavailable_not_not_found(
    tmp_path: Path, fresh_redis_server: RedisProcess, unique_name: str
) -> None:
    """While the only tier holding a durably acknowledged key cannot be read, its Get is
    UNAVAILABLE (retry), never NOT_FOUND; once the tier answers again the same Get is served."""
    overrides = {
        **REMOTE_READS,
        **_tier_overrides("redis", "127.0.0.1", fresh_redis_server.port, unique_name, None),
        "redis.breaker_reset_s": 0.1,
    }
    rng = random.Random(3)
    truth = {rng.randbytes(KEY_BYTES): make_blob(rng.randbytes(BLOB_BYTES)) for _ in range(40)}
    with serving(store_config(tmp_path, **overrides)) as server:
        tier = server.store.tier("redis")
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.KVStoreStub(channel)
            for key, blob in truth.items():
                assert _put(stub, key, blob, pb.ACK_DURABLE)[0] is C.OK
            fresh_redis_server.pause()
            try:
                answers: Counter[str] = Counter()
                details: set[str] = set()
                for key, blob in truth.items():
                    code, text, got = rpc_code(
                        lambda k=key: list(
                            stub.Get(
                                pb.GetRequest(namespace=NS, keys=[k], layer_start=0, layer_end=1), timeout=10
                            )
                        )
                    )
                    answers[code.name] += 1
                    if code is C.OK:
                        assert got[0].blob == blob
                    else:
                        details.add(text)
            finally:
                fresh_redis_server.resume()
            # The 64 KiB RAM tier holds a few of the 40 (served); the rest only Redis holds.
            assert answers["NOT_FOUND"] == 0 and answers["UNAVAILABLE"] >= 20, dict(answers)
            assert set(answers) <= {"OK", "UNAVAILABLE"}, dict(answers)
            assert all("redis" in d and "may hold" in d for d in details), details
            assert _wait(lambda: tier.breaker.state == "closed")
            assert all(_get(stub, key) == (C.OK, blob) for key, blob in truth.items())
