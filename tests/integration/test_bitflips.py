"""Bit flips in every tier are never served: each read is the right bytes or a loss.

A server runs in-process with all four tiers (RAM, disk, Redis, S3) written
through. bench/reliability.py corrupts stored copies through each tier's raw
medium (the RAM tier's dict, the disk segment file at ``DiskBackend.locate``,
Redis ``SETRANGE``, an S3 object rewritten with boto3) and reads every blob back
over gRPC. The bench runs >= 10,000 flips; the suite a few hundred.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kvstore.server import ServerHandle, serve
from kvstore.testing.reliability import FlipReport, TierCorruptor, run_bitflips
from kvstore.testing.services import RedisProcess, S3Process
from tests.fixtures.store import committed, serving, store_config


@contextlib.contextmanager
def _server(
    tmp_path: Path, redis_server: RedisProcess, s3_server: S3Process | None, name: str
) -> Iterator[tuple[ServerHandle, TierCorruptor]]:
    overrides = {"redis.enabled": True, "redis.url": redis_server.url, "redis.key_prefix": f"{name}:"}
    if s3_server is not None:
        overrides.update(s3_server.tier_config(name))
    with (
        contextlib.closing(redis.Redis.from_url(redis_server.url)) as raw_redis,
        serving(store_config(tmp_path, **overrides)) as handle,
    ):
        yield handle, TierCorruptor(handle.store, raw_redis, s3_server.client() if s3_server else None)


@pytest.fixture
def local_tiers(
    tmp_path: Path, redis_server: RedisProcess, unique_name: str
) -> Iterator[tuple[ServerHandle, TierCorruptor]]:
    """RAM + disk + Redis: cheap flips, so most of them run here."""
    with _server(tmp_path, redis_server, None, unique_name) as tiers:
        yield tiers


@pytest.fixture
def all_tiers(
    tmp_path: Path, redis_server: RedisProcess, s3_server: S3Process, unique_name: str
) -> Iterator[tuple[ServerHandle, TierCorruptor]]:
    """RAM + disk + Redis + S3 (each S3 flip costs ~7 requests to moto, so fewer of them)."""
    with _server(tmp_path, redis_server, s3_server, unique_name) as tiers:
        yield tiers


def _check(handle: ServerHandle, report: FlipReport, flips: int, tiers: set[str]) -> None:
    details = report.as_dict()
    assert report.baseline_reads > 0 and report.baseline_wrong == 0, details
    assert report.flips >= flips, details
    assert report.corrupt_served == 0, details
    assert not report.other_status, details
    assert set(report.by_tier) == tiers, details
    # Both outcomes happened: repaired from an intact lower copy, and lost when none was left;
    # an intact lower copy was never passed over.
    assert report.repaired > 0 and report.lost > 0, details
    assert report.unavailable_after_repair == 0, details
    failures = {t.name: t.counters.integrity_failures for t in handle.store.tier_stats()}
    assert sum(failures.values()) > 0, failures


def test_bit_flips_in_ram_disk_redis_are_never_served(
    local_tiers: tuple[ServerHandle, TierCorruptor],
) -> None:
    handle, corruptor = local_tiers
    assert corruptor.names() == ["memory", "disk", "redis"]
    report = run_bitflips(handle.target, handle.store, corruptor, 300, seed=3, num_keys=32, batch=32)
    _check(handle, report, 300, {"memory", "disk", "redis"})


def test_bit_flips_in_s3_are_never_served(all_tiers: tuple[ServerHandle, TierCorruptor]) -> None:
    handle, corruptor = all_tiers
    assert corruptor.names() == ["memory", "disk", "redis", "s3"]
    report = run_bitflips(
        handle.target,
        handle.store,
        corruptor,
        40,
        seed=5,
        num_keys=16,
        batch=16,
        tier_weights={"memory": 0.2, "disk": 0.2, "redis": 0.2, "s3": 1.0},
    )
    _check(handle, report, 40, {"memory", "disk", "redis", "s3"})
    assert report.by_tier["s3"] >= 10, report.as_dict()


def test_flipped_ram_copy_is_repaired_from_disk(tmp_path: Path) -> None:
    """One flip, end to end: the server deletes the bad RAM copy and serves the disk copy."""
    import grpc

    from kvstore import integrity
    from kvstore.backends.base import BlobKey
    from kvstore.v1 import kvstore_pb2 as pb
    from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

    handle = serve(store_config(tmp_path))
    try:
        corruptor = TierCorruptor(handle.store)
        key, blob = b"k" * 32, integrity.seal(b"payload" * 100)
        with grpc.insecure_channel(handle.target) as channel:
            stub = pb_grpc.KVStoreStub(channel)
            stub.Put(committed([pb.PutRequest(namespace="t/m/p", key=key, layer=0, num_layers=1, blob=blob)]))
            import random

            assert corruptor.flip("memory", BlobKey("t/m/p", key, 0), random.Random(0))
            got = list(stub.Get(pb.GetRequest(namespace="t/m/p", keys=[key], layer_start=0, layer_end=1)))
            assert got[0].blob == blob
            assert handle.store.tier("memory").counters.integrity_failures == 1
            # Corrupt both copies: DATA_LOSS, never the bad bytes.
            assert corruptor.flip("memory", BlobKey("t/m/p", key, 0), random.Random(1))
            assert corruptor.flip("disk", BlobKey("t/m/p", key, 0), random.Random(2))
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Get(pb.GetRequest(namespace="t/m/p", keys=[key], layer_start=0, layer_end=1)))
            assert err.value.code() is grpc.StatusCode.DATA_LOSS
    finally:
        handle.stop(grace=0)
