"""Remote tiers die, hang and come back while the tiered store keeps serving.

Each test owns its Redis or S3 process (``fresh_*`` fixtures) and SIGKILLs or
SIGSTOPs it mid-run. What must hold: reads still come from the tiers that are
up; keys only the dead tier had are "unknown" while it is away (BackendUnavailable,
UNAVAILABLE on the wire: it may hold them) and plain misses once it is back empty,
never wrong bytes; writes still land in the remaining tiers; errors are counted;
the circuit breaker stops the store from hammering a dead server; and when the
server returns the backend recovers by itself, with no restart of the store.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from kvstore.backends.base import BlobKey
from kvstore.backends.breaker import CircuitBreaker
from kvstore.backends.disk import DiskBackend
from kvstore.backends.guard import Guard
from kvstore.backends.memory import MemoryBackend
from kvstore.backends.redis import RedisBackend
from kvstore.backends.s3 import S3Backend
from kvstore.backends.tiered import TieredStore
from kvstore.errors import BackendUnavailable
from kvstore.integrity import seal
from kvstore.retry import ExponentialBackoff, NoBackoff, Retry
from kvstore.testing.services import RedisProcess, S3Process

NS = "tenant-a/smollm2-135m/fp16"
LAYERS = 4

pytestmark = pytest.mark.timeout(120)


def items(i: int) -> list[tuple[BlobKey, bytes]]:
    return [
        (BlobKey(NS, i.to_bytes(4, "big") * 8, layer), seal(bytes([i % 256, layer]) * 1500))
        for layer in range(LAYERS)
    ]


def keys(i: int) -> list[BlobKey]:
    return [k for k, _ in items(i)]


def blobs(i: int) -> list[bytes]:
    return [b for _, b in items(i)]


def wait_until(predicate: Callable[[], bool], deadline_s: float = 30.0) -> None:
    """Poll ``predicate`` until true; fail the test when the deadline passes."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {deadline_s}s")


@dataclass
class Stack:
    memory: MemoryBackend
    disk: DiskBackend
    redis: RedisBackend
    s3: S3Backend
    store: TieredStore


@pytest.fixture
def make_stack(tmp_path: Path, unique_name: str) -> Iterator[Callable[[RedisProcess, S3Process], Stack]]:
    built: list[Stack] = []

    def build(redis_server: RedisProcess, s3_server: S3Process) -> Stack:
        memory = MemoryBackend(max_bytes=64 << 20)
        disk = DiskBackend(path=tmp_path / "disk", max_bytes=0)
        # Short timeouts and cool-downs: a dead tier must not stall the suite.
        rds = RedisBackend(
            url=redis_server.url, key_prefix=f"{unique_name}:", socket_timeout_s=0.5, breaker_reset_s=0.2
        )
        s3 = s3_server.backend(unique_name, timeout_s=1.0, breaker_reset_s=0.2)
        stack = Stack(memory, disk, rds, s3, TieredStore([memory, disk, rds, s3]))
        built.append(stack)
        return stack

    yield build
    for stack in built:
        stack.store.close()


def test_redis_killed_mid_run(
    fresh_redis_server: RedisProcess, s3_server: S3Process, make_stack: Callable[..., Stack]
) -> None:
    st = make_stack(fresh_redis_server, s3_server)
    st.store.put_many(items(1))  # everywhere
    st.redis.put_many(items(2))  # only in Redis
    st.redis.put_many(items(3))  # in Redis and S3, not above
    st.s3.put_many(items(3))

    fresh_redis_server.kill()

    assert st.store.get_many(keys(1)) == blobs(1)  # from RAM
    assert st.store.get_many(keys(3)) == blobs(3)  # Redis is skipped, S3 answers
    with pytest.raises(BackendUnavailable, match="redis"):
        st.store.get_many(keys(2))  # only the dead tier had it: unknown, not absent
    st.store.put_many(items(4))  # writes still land in the live tiers
    for live in (st.memory, st.disk, st.s3):
        assert live.get_many(keys(4)) == blobs(4), live.name
    assert st.redis.counters.errors >= 3
    [redis_stat] = [s for s in st.store.tier_stats() if s.name == "redis"]
    assert not redis_stat.healthy and redis_stat.counters.errors >= 3

    # After a few failures the breaker fails fast instead of dialling a dead server.
    # (A long cool-down for this check only, so a slow machine cannot turn it into a probe.)
    assert st.redis.breaker.num_trips >= 1
    st.redis.breaker.reset_timeout_s = 60
    with pytest.raises(BackendUnavailable):
        st.redis.get(keys(1)[0])
    assert st.redis.breaker.state == CircuitBreaker.OPEN
    with pytest.raises(BackendUnavailable, match="circuit open"):
        st.redis.get(keys(1)[0])
    st.redis.breaker.reset_timeout_s = 0.2

    fresh_redis_server.restart()  # same port, empty
    wait_until(st.redis.healthy)
    assert st.redis.breaker.state == CircuitBreaker.CLOSED
    st.store.put_many(items(5))
    assert st.redis.get_many(keys(5)) == blobs(5)  # the same backend object serves again
    st.redis.put_many(items(6))
    assert st.store.get_many(keys(6)) == blobs(6)
    assert st.store.get_many(keys(2)) == [None] * LAYERS  # lost with the server, never invented


def test_s3_killed_mid_run(
    redis_server: RedisProcess, fresh_s3_server: S3Process, make_stack: Callable[..., Stack]
) -> None:
    st = make_stack(redis_server, fresh_s3_server)
    st.store.put_many(items(11))
    st.s3.put_many(items(12))  # only in S3
    requests: list[str] = []
    st.s3.client.meta.events.register("before-send.s3.*", lambda **kw: requests.append(kw["event_name"]))

    fresh_s3_server.kill()

    assert st.store.get_many(keys(11)) == blobs(11)
    with pytest.raises(BackendUnavailable, match="s3"):
        st.store.get_many(keys(12))  # only in the dead tier: unknown, not absent
    st.store.put_many(items(13))
    for live in (st.memory, st.disk, st.redis):
        assert live.get_many(keys(13)) == blobs(13), live.name
    # The failed read and the failed write, counted by the store (and any failed write-behind).
    assert st.s3.counters.errors >= 2

    # A third failure in a row opens the breaker (if the write-behind of items 13 has not
    # already); while open, S3 is not even dialled
    # (long cool-down for this check only, so a slow machine cannot turn it into a probe).
    st.s3.breaker.reset_timeout_s = 60
    with pytest.raises(BackendUnavailable):
        st.s3.get(keys(12)[0])
    assert st.s3.breaker.state == CircuitBreaker.OPEN
    requests.clear()
    with pytest.raises(BackendUnavailable, match="circuit open"):
        st.store.get_many(keys(12))
    assert requests == []
    st.s3.breaker.reset_timeout_s = 0.2

    fresh_s3_server.restart()  # same port, and moto starts empty: the bucket is gone too
    wait_until(st.s3.healthy)
    st.store.put_many(items(14))
    assert st.s3.get_many(keys(14)) == blobs(14)  # bucket re-created by the backend itself
    assert st.store.get_many(keys(12)) == [None] * LAYERS


def test_hung_redis_times_out_then_recovers(
    fresh_redis_server: RedisProcess, s3_server: S3Process, make_stack: Callable[..., Stack]
) -> None:
    st = make_stack(fresh_redis_server, s3_server)
    st.redis.put_many(items(21))
    st.s3.put_many(items(21))
    st.redis.put_many(items(22))

    fresh_redis_server.pause()  # accepts nothing, answers nothing: only timeouts tell
    try:
        start = time.monotonic()
        assert st.store.get_many(keys(21)) == blobs(21)  # S3 serves while Redis hangs
        with pytest.raises(BackendUnavailable, match="redis"):
            st.store.get_many(keys(22))  # only the hung tier has it: unknown
        # Bounded by the socket timeout and retry deadline (0.5 s, 1 s), far below the test timeout.
        assert time.monotonic() - start < 10
        assert st.redis.counters.errors >= 2
    finally:
        fresh_redis_server.resume()
    wait_until(st.redis.healthy)
    assert st.store.get_many(keys(22)) == blobs(22)


def test_both_remote_tiers_down_store_still_reads_and_writes(
    fresh_redis_server: RedisProcess, fresh_s3_server: S3Process, make_stack: Callable[..., Stack]
) -> None:
    st = make_stack(fresh_redis_server, fresh_s3_server)
    st.store.put_many(items(31))
    fresh_redis_server.kill()
    fresh_s3_server.kill()

    st.store.put_many(items(32))
    st.memory.delete_many(keys(31))  # force reads below RAM: disk still has it
    assert st.store.get_many(keys(31)) == blobs(31)
    assert st.store.get_many(keys(32)) == blobs(32)
    count, _ = st.store.exists_chunks(NS, [keys(31)[0].chunk, keys(32)[0].chunk], LAYERS)
    assert count == 2
    stats = {s.name: s for s in st.store.tier_stats()}
    assert not stats["redis"].healthy and not stats["s3"].healthy
    assert stats["memory"].healthy and stats["disk"].healthy

    fresh_redis_server.restart()
    fresh_s3_server.restart()
    wait_until(lambda: st.redis.healthy() and st.s3.healthy())
    st.store.put_many(items(33))
    assert st.redis.get_many(keys(33)) == blobs(33)
    assert st.s3.get_many(keys(33)) == blobs(33)


def test_full_redis_refuses_writes_store_keeps_writing_elsewhere(
    fresh_redis_server: RedisProcess, s3_server: S3Process, make_stack: Callable[..., Stack]
) -> None:
    st = make_stack(fresh_redis_server, s3_server)
    raw = redis.Redis.from_url(fresh_redis_server.url)
    try:
        used = int(raw.info("memory")["used_memory"])
        raw.config_set("maxmemory-policy", "noeviction")
        raw.config_set("maxmemory", str(used + 4096))  # full: the OOM reply, not a dead socket
        st.store.put_many(items(41))
        for live in (st.memory, st.disk, st.s3):
            assert live.get_many(keys(41)) == blobs(41), live.name
        assert st.redis.counters.errors >= 1
        assert raw.dbsize() == 0  # nothing half-written into Redis

        raw.config_set("maxmemory", "0")  # room again
        wait_until(st.redis.healthy)
        st.store.put_many(items(42))
        assert st.redis.get_many(keys(42)) == blobs(42)
    finally:
        raw.close()


# -- the retry objects themselves, on a fake clock (no servers, no sleeping) -------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_retry_backs_off_exponentially_and_stops_at_max_attempts() -> None:
    clock = FakeClock()
    retry = Retry(
        ExponentialBackoff(base_s=0.1, cap_s=0.3, jitter=False),
        max_attempts=4,
        retry_on=(ConnectionError,),
        sleep=clock.sleep,
        clock=clock,
    )
    calls = 0

    def always_down() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("refused")

    with pytest.raises(ConnectionError):
        retry(always_down)
    assert calls == 4
    assert clock.sleeps == [0.1, 0.2, 0.3]


def test_retry_respects_deadline_and_ignores_other_errors() -> None:
    clock = FakeClock()
    retry = Retry(
        ExponentialBackoff(base_s=1.0, cap_s=1.0, jitter=False),
        max_attempts=10,
        deadline_s=2.5,
        retry_on=(ConnectionError,),
        sleep=clock.sleep,
        clock=clock,
    )
    with pytest.raises(ConnectionError):
        retry(lambda: (_ for _ in ()).throw(ConnectionError("down")))
    assert clock.sleeps == [1.0, 1.0]  # a third wait would pass the deadline

    calls = 0

    def bug() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("not an outage")

    with pytest.raises(ValueError):
        retry(bug)
    assert calls == 1


def test_jitter_stays_within_half_to_full_delay() -> None:
    backoff = ExponentialBackoff(base_s=0.2, cap_s=1.0, jitter=True)
    for failures in range(1, 8):
        full = min(1.0, 0.2 * 2 ** (failures - 1))
        assert all(full / 2 <= backoff.compute(failures) <= full for _ in range(50))


def test_breaker_opens_fails_fast_probes_once_and_closes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("t", failure_threshold=2, reset_timeout_s=5.0, clock=clock)
    guard = Guard(
        Retry(NoBackoff(), max_attempts=1, retry_on=(ConnectionError,)),
        breaker,
        lambda exc: BackendUnavailable(str(exc)) if isinstance(exc, ConnectionError) else None,
    )
    calls = 0
    up = False

    def call() -> str:
        nonlocal calls
        calls += 1
        if not up:
            raise ConnectionError("refused")
        return "ok"

    for _ in range(2):
        with pytest.raises(BackendUnavailable):
            guard(call)
    assert breaker.state == CircuitBreaker.OPEN and calls == 2
    with pytest.raises(BackendUnavailable, match="circuit open"):
        guard(call)
    assert calls == 2  # failed fast, server not dialled

    clock.now += 5.0
    breaker.before_call()  # this caller is the probe ...
    with pytest.raises(BackendUnavailable, match="circuit open"):
        breaker.before_call()  # ... everyone else still fails fast
    breaker.record_failure()  # the probe failed: open for another cool-down
    assert breaker.state == CircuitBreaker.OPEN

    up = True
    clock.now += 5.0
    assert guard(call) == "ok"  # the probe succeeds and closes the breaker
    assert breaker.state == CircuitBreaker.CLOSED
    assert guard(call) == "ok"
    assert breaker.num_trips == 2
