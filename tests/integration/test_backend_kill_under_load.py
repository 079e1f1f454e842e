"""Redis and S3 die and come back while clients read and write: never a wrong answer.

An in-process server with a tiny RAM tier (so reads really go to Redis and S3)
and no disk tier serves 4 client threads while the test SIGKILLs Redis, restarts
it (empty), then does the same to S3. Every Put must succeed (the RAM tier always
takes it), every Get must return the exact bytes put, NOT_FOUND, or UNAVAILABLE while a
tier that may hold the key is away; the server must stay healthy, and both tiers must take
writes again once they are back.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.server import ServerHandle
from kvstore.testing.reliability import roundtrip_ok, run_backend_kill
from kvstore.testing.services import RedisProcess, S3Process
from tests.fixtures.store import REMOTE_READS, serving, store_config


@pytest.fixture
def fragile_server(
    tmp_path: Path, fresh_redis_server: RedisProcess, fresh_s3_server: S3Process
) -> Iterator[ServerHandle]:
    overrides = {
        **REMOTE_READS,
        "redis.enabled": True,
        "redis.url": fresh_redis_server.url,
        "redis.socket_timeout_s": 0.5,
        **fresh_s3_server.tier_config("killme"),
        "s3.timeout_s": 1.0,
    }
    with serving(store_config(tmp_path, **overrides)) as handle:
        yield handle


def test_redis_and_s3_killed_and_restarted_under_load(
    fragile_server: ServerHandle, fresh_redis_server: RedisProcess, fresh_s3_server: S3Process
) -> None:
    report = run_backend_kill(
        fragile_server.target,
        fragile_server.store,
        fresh_redis_server,
        fresh_s3_server,
        seconds=5.0,
        clients=4,
        seed=9,
    )
    assert [e for _, e in report["events"]] == [
        "redis killed",
        "redis restarted",
        "s3 killed",
        "s3 restarted",
    ]
    assert report["violations"] == 0, report
    answers = report["answers"]
    assert answers.get("put_OK", 0) > 0 and answers.get("get_OK", 0) > 0, answers
    # The kills really took tiers away: keys only a dead tier held were unknown (UNAVAILABLE)
    # while it was down, or absent (NOT_FOUND) once it was back empty.
    assert answers.get("get_NOT_FOUND", 0) + answers.get("get_UNAVAILABLE", 0) > 0, answers
    assert report["tiers_recovered"] == {"redis": True, "s3": True}, report
    assert roundtrip_ok(fragile_server.target, "kill/model/profile", None)
    errors = {t.name: t.counters.errors for t in fragile_server.store.tier_stats()}
    assert errors["redis"] > 0 and errors["s3"] > 0, errors  # the outages were seen, and absorbed
