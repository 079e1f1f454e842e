"""Redis and S3 frozen (SIGSTOP) under load: every RPC within the budget, then recovery by itself.

A frozen server is worse than a dead one: it accepts connections and never answers,
so without a time budget every call waits for the OS. An in-process server with a
tiny RAM tier and no disk tier (so reads really reach Redis and S3) and the *default*
backend budgets serves 4 client threads while the test freezes Redis, thaws it, then
does the same to S3. Only the private servers of this test's fixtures are signalled.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.config import RedisConfig, S3Config
from kvstore.server import ServerHandle
from kvstore.testing.reliability import roundtrip_ok, run_backend_freeze
from kvstore.testing.services import RedisProcess, S3Process
from tests.fixtures.store import REMOTE_READS, serving, store_config
from transfer.rpc.client import KVClient

#: Scheduling slack on a loaded 2-core CI machine, on top of the configured budget.
SLACK_S = 0.75


@pytest.fixture
def freezable_server(
    tmp_path: Path, fresh_redis_server: RedisProcess, fresh_s3_server: S3Process
) -> Iterator[ServerHandle]:
    overrides = {
        **REMOTE_READS,
        "redis.enabled": True,
        "redis.url": fresh_redis_server.url,
        **fresh_s3_server.tier_config("freezeme"),
    }
    with serving(store_config(tmp_path, **overrides)) as handle:
        yield handle


def test_default_budgets_are_at_most_half_a_second() -> None:
    r, s3 = RedisConfig(), S3Config()
    # A run of 3 failed calls opens the breaker (not one slow call: issue 24); concurrent requests
    # pay those budgets in parallel, as the freeze test below measures.
    assert r.connect_timeout_s + r.socket_timeout_s + 0.15 <= 0.5 and r.breaker_threshold == 3
    assert s3.connect_timeout_s + s3.timeout_s + 0.05 <= 0.5 and s3.breaker_threshold == 3


def test_frozen_redis_then_s3_cost_at_most_the_budget_and_recover(
    freezable_server: ServerHandle, fresh_redis_server: RedisProcess, fresh_s3_server: S3Process
) -> None:
    store = freezable_server.store
    assert store.tier("redis").budget_s <= 0.5 and store.tier("s3").budget_s <= 0.5
    report = run_backend_freeze(
        freezable_server.target,
        store,
        {"redis": fresh_redis_server, "s3": fresh_s3_server},
        freeze_s=3.0,
        clients=4,
        seed=5,
    )
    assert report["violations"] == 0, report
    for name, freeze in report["freezes"].items():
        budget = freeze["budget_s"]
        assert freeze["rpcs"] >= 20, (name, freeze)  # the load really ran through the freeze
        # Every RPC that overlapped the freeze answered within the budget (plus scheduling slack).
        assert freeze["latency_ms_max"] <= (budget + SLACK_S) * 1000, (name, freeze)
        assert freeze["breaker_trips"] >= 1 and freeze["tier_errors"] >= 1, (name, freeze)
        # Reads were served from the other remote tier while this one was frozen.
        assert freeze["answers"].get("get_OK", 0) > 0, (name, freeze)
        assert freeze["answers"].get("put_OK", 0) > 0, (name, freeze)
        # After SIGCONT the breaker closes by itself and the tier takes writes again.
        assert freeze["breaker_closed_after_resume_s"] is not None, (name, freeze)
        assert freeze["used_again"], (name, freeze)
    stats = {s.name: s for s in store.tier_stats()}
    assert stats["redis"].healthy and stats["s3"].healthy
    assert roundtrip_ok(freezable_server.target, "freeze/model/profile", None)


def test_frozen_tier_shows_unhealthy_in_stats_while_open(
    freezable_server: ServerHandle, fresh_redis_server: RedisProcess
) -> None:
    store = freezable_server.store
    redis_tier = store.tier("redis")
    assert roundtrip_ok(freezable_server.target, "freeze/model/profile", None)
    fresh_redis_server.pause()
    try:
        for _ in range(6):  # a run of failed calls (breaker_threshold, 3) trips the breaker
            assert roundtrip_ok(freezable_server.target, "freeze/model/profile", None)
            if redis_tier.breaker.state == "open":
                break
        assert redis_tier.breaker.state == "open"
        stats = {s.name: s for s in store.tier_stats()}
        assert not stats["redis"].healthy and stats["memory"].healthy
        metrics = freezable_server.metrics.render().decode()
        assert 'kvstore_tier_healthy{tier="redis"} 0.0' in metrics
        assert 'kvstore_tier_breaker_trips_total{tier="redis"} 1.0' in metrics
        assert redis_tier.counters.breaker_trips == 1
        with KVClient(freezable_server.target) as client:  # and over gRPC, for `kvstore stats`
            remote = {t.name: t for t in client.stats().tiers}["redis"]
            assert (remote.breaker_trips, remote.healthy) == (1, False)
    finally:
        fresh_redis_server.resume()
    redis_tier.breaker.probe_interval_s = 0.1
    deadline = time.monotonic() + 10
    while redis_tier.breaker.state != "closed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis_tier.breaker.state == "closed"
    assert {s.name: s for s in store.tier_stats()}["redis"].healthy
