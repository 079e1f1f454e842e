"""Four tiers on real media: RAM -> disk -> real redis-server -> real S3 HTTP server (moto).

What the tiered store promises end to end: write-through lands where configured,
a hit in a lower tier is promoted upward, every tier stays within its byte
budget, a corrupted copy in any tier is never served, and S3 stays O(1)
requests per chunk (counted with a botocore event hook, not assumed).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from kvstore.backends.base import BlobKey
from kvstore.backends.disk import DiskBackend
from kvstore.backends.memory import MemoryBackend
from kvstore.backends.redis import RedisBackend
from kvstore.backends.s3 import S3Backend, parse_header
from kvstore.backends.tiered import TieredStore
from kvstore.errors import IntegrityError
from kvstore.integrity import is_intact, seal
from kvstore.testing.services import RedisProcess, S3Process

NS = "tenant-a/smollm2-135m/fp16"
NUM_LAYERS = 30

pytestmark = pytest.mark.timeout(120)


def chunk(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


def blob(i: int, layer: int, size: int = 4096) -> bytes:
    body = bytes((i * 31 + layer * 7 + j) % 251 for j in range(size - 8))
    return seal(body)


def layers_of(i: int, num_layers: int = NUM_LAYERS, size: int = 4096) -> list[tuple[BlobKey, bytes]]:
    return [(BlobKey(NS, chunk(i), layer), blob(i, layer, size)) for layer in range(num_layers)]


@dataclass
class Tiers:
    memory: MemoryBackend
    disk: DiskBackend
    redis: RedisBackend
    s3: S3Backend
    redis_raw: redis.Redis
    s3_raw: object

    @property
    def all(self) -> list:
        return [self.memory, self.disk, self.redis, self.s3]


def _build(
    tmp_path: Path, redis_server: RedisProcess, s3_server: S3Process, name: str, **budgets: int
) -> Tiers:
    return Tiers(
        memory=MemoryBackend(max_bytes=budgets.get("memory", 64 << 20)),
        disk=DiskBackend(path=tmp_path / "disk", max_bytes=budgets.get("disk", 0)),
        redis=RedisBackend(
            url=redis_server.url,
            key_prefix=f"{name}:",
            max_bytes=budgets.get("redis", 0),
            socket_timeout_s=1.0,
        ),
        s3=s3_server.backend(name, region="us-east-1", max_bytes=budgets.get("s3", 0), timeout_s=10.0),
        redis_raw=redis.Redis.from_url(redis_server.url),
        s3_raw=s3_server.client(),
    )


@pytest.fixture
def tiers(
    tmp_path: Path, redis_server: RedisProcess, s3_server: S3Process, unique_name: str
) -> Iterator[Tiers]:
    t = _build(tmp_path, redis_server, s3_server, unique_name)
    yield t
    for backend in t.all:
        backend.close()
    t.redis_raw.close()


def test_write_through_lands_in_configured_tiers_only(tiers: Tiers) -> None:
    store = TieredStore(tiers.all, write_through=["disk", "s3"])
    items = layers_of(1, num_layers=4)
    store.put_many(items)
    keys = [k for k, _ in items]
    want = [b for _, b in items]
    assert tiers.memory.get_many(keys) == want  # tier 0 is always written
    assert tiers.disk.get_many(keys) == want
    assert tiers.s3.get_many(keys) == want
    assert tiers.redis.get_many(keys) == [None] * 4


def test_blobs_put_over_grpc_land_intact_in_every_tier_and_delete_by_address(
    tiers: Tiers, tmp_path: Path
) -> None:
    """The server hands the tiers views into the received Put messages (no copy): every tier must
    still store exactly the blob, and a Delete with num_layers must find it in each of them."""
    from kvstore.server import serve
    from tests.fixtures.store import store_config
    from transfer.rpc.client import KVClient

    store = TieredStore(tiers.all)
    handle = serve(store_config(tmp_path), store=store)
    items = [
        (BlobKey(NS, chunk(300 + c), layer), blob(300 + c, layer, 100_000))
        for c in range(3)
        for layer in range(4)
    ]
    try:
        with KVClient(handle.target) as client:
            client.put(NS, [(k.chunk, k.layer, 4, b) for k, b in items])
            for tier in tiers.all:
                assert [tier.get(k) == b for k, b in items] == [True] * len(items), tier.name
            got = list(client.get_layers(NS, [chunk(300 + c) for c in range(3)], 0, 4))
            assert [bytes(b) for _, blobs in got for b in blobs] == [
                b for layer in range(4) for (k, b) in items if k.layer == layer
            ]
            assert client.delete(NS, [chunk(300), chunk(301)], num_layers=4) == 2
            for tier in tiers.all:
                assert not any(tier.exists(k) for k, _ in items[:8]), tier.name
                assert all(tier.exists(k) for k, _ in items[8:]), tier.name
    finally:
        handle.stop(grace=0)


def test_read_from_lowest_tier_promotes_into_every_faster_tier(tiers: Tiers) -> None:
    store = TieredStore(tiers.all)
    items = layers_of(2, num_layers=3)
    tiers.s3.put_many(items)  # only in S3, as after a restart of everything above it
    keys = [k for k, _ in items]

    assert store.get_many(keys) == [b for _, b in items]
    assert tiers.s3.counters.hits == 3
    for upper in (tiers.memory, tiers.disk, tiers.redis):
        assert upper.get_many(keys) == [b for _, b in items], upper.name

    store.get_many(keys)  # now served by RAM: S3 is not asked again
    assert tiers.memory.counters.hits == 3
    assert tiers.s3.counters.hits == 3


def test_middle_tier_hit_promotes_only_upward(tiers: Tiers) -> None:
    store = TieredStore(tiers.all)
    key, value = layers_of(3, num_layers=1)[0]
    tiers.redis.put(key, value)
    assert store.get(key) == value
    assert tiers.memory.get(key) == value and tiers.disk.get(key) == value
    assert tiers.s3.get(key) is None  # promotion goes up, never down


def test_per_tier_budgets_evict_oldest(
    tmp_path: Path, redis_server: RedisProcess, s3_server: S3Process, unique_name: str
) -> None:
    layer_bytes, per_chunk = 4096, 4
    chunk_bytes = layer_bytes * per_chunk
    t = _build(
        tmp_path,
        redis_server,
        s3_server,
        unique_name,
        memory=2 * chunk_bytes,
        redis=3 * chunk_bytes,
        s3=5 * chunk_bytes,
    )
    try:
        store = TieredStore(t.all)
        for i in range(8):
            store.put_many(layers_of(100 + i, num_layers=per_chunk, size=layer_bytes))
        budgets = {"memory": 2 * chunk_bytes, "redis": 3 * chunk_bytes, "s3": 5 * chunk_bytes}
        for backend in (t.memory, t.redis, t.s3):
            usage = backend.usage()
            assert 0 < usage.bytes <= budgets[backend.name], backend.name
            assert backend.counters.evictions > 0, backend.name
        # The oldest chunk is gone from every bounded tier, the newest is still in all of them.
        oldest = [k for k, _ in layers_of(100, per_chunk, layer_bytes)]
        newest = layers_of(107, per_chunk, layer_bytes)
        for backend in (t.memory, t.redis, t.s3):
            assert backend.get_many(oldest) == [None] * per_chunk, backend.name
            assert backend.get_many([k for k, _ in newest]) == [b for _, b in newest], backend.name
        # S3 eviction really deletes objects: one per kept chunk, nothing else.
        listed = t.s3_raw.list_objects_v2(Bucket=unique_name).get("KeyCount", 0)
        assert listed == t.s3.usage().objects // per_chunk == 5
        # The unbounded disk tier still has everything, so nothing was lost to the store.
        assert store.get_many(oldest) == [b for _, b in layers_of(100, per_chunk, layer_bytes)]
    finally:
        for backend in t.all:
            backend.close()
        t.redis_raw.close()


def test_corrupt_redis_copy_is_never_served(tiers: Tiers) -> None:
    store = TieredStore(tiers.all)
    key, value = layers_of(4, num_layers=1)[0]
    store.put(key, value)
    tiers.memory.delete(key)
    tiers.disk.delete(key)
    raw_key = tiers.redis.key_prefix + key.name()
    flipped = bytes([value[100] ^ 0xFF])
    tiers.redis_raw.setrange(raw_key, 100, flipped)  # bit rot, straight in Redis
    assert not is_intact(tiers.redis_raw.get(raw_key))

    assert store.get(key) == value  # the intact S3 copy, not the rotten Redis one
    assert tiers.redis.counters.integrity_failures == 1
    assert tiers.s3.counters.hits == 1
    # The bad copy was deleted and replaced by the promoted good one.
    assert tiers.redis_raw.get(raw_key) == value


def _corrupt_s3_layer(tiers: Tiers, bucket: str, key: BlobKey) -> None:
    """Flip one byte inside ``key``'s layer of its chunk object, with plain boto3."""
    obj = f"{tiers.s3.prefix}{key.namespace}/{key.chunk.hex()}"
    data = bytearray(tiers.s3_raw.get_object(Bucket=bucket, Key=obj)["Body"].read())
    entries, _ = parse_header(bytes(data))
    offset, length = entries[key.layer]
    data[offset + length // 2] ^= 0x01
    tiers.s3_raw.put_object(Bucket=bucket, Key=obj, Body=bytes(data))


def test_corrupt_s3_layer_is_never_served(tiers: Tiers, unique_name: str) -> None:
    store = TieredStore(tiers.all)
    items = layers_of(5, num_layers=3)
    store.put_many(items)
    for backend in (tiers.memory, tiers.disk, tiers.redis):
        backend.delete_many([k for k, _ in items])
    bad_key = items[1][0]
    _corrupt_s3_layer(tiers, unique_name, bad_key)

    with pytest.raises(IntegrityError):  # no intact copy anywhere: DATA_LOSS, not wrong bytes
        store.get(bad_key)
    assert tiers.s3.counters.integrity_failures == 1
    assert not tiers.s3.exists(bad_key)  # the bad copy was dropped from the chunk object
    # The intact layers of the same object are still served.
    assert store.get_many([items[0][0], items[2][0]]) == [items[0][1], items[2][1]]


def test_corrupt_s3_copy_falls_through_to_good_copy(tiers: Tiers, unique_name: str) -> None:
    # S3 read before Redis here so that the corrupted S3 copy is met first.
    store = TieredStore([tiers.memory, tiers.s3, tiers.redis])
    key, value = layers_of(6, num_layers=1)[0]
    store.put(key, value)
    tiers.memory.delete(key)
    _corrupt_s3_layer(tiers, unique_name, key)

    assert store.get(key) == value
    assert tiers.s3.counters.integrity_failures == 1
    assert tiers.redis.counters.hits == 1
    assert tiers.s3.get(key) == value  # repaired by promotion


def test_corrupt_s3_index_is_a_miss_and_is_removed(
    tiers: Tiers, s3_server: S3Process, unique_name: str
) -> None:
    key, value = layers_of(7, num_layers=1)[0]
    tiers.s3.put(key, value)
    obj = f"{tiers.s3.prefix}{key.namespace}/{key.chunk.hex()}"
    data = bytearray(tiers.s3_raw.get_object(Bucket=unique_name, Key=obj)["Body"].read())
    data[14] ^= 0xFF  # inside the layer index
    tiers.s3_raw.put_object(Bucket=unique_name, Key=obj, Body=bytes(data))
    fresh = s3_server.backend(unique_name)
    try:
        assert fresh.get(key) is None
        assert fresh.counters.integrity_failures == 1
        assert tiers.s3_raw.list_objects_v2(Bucket=unique_name).get("KeyCount", 0) == 0
        fresh.put(key, value)  # and the chunk can be written again
        assert fresh.get(key) == value
    finally:
        fresh.close()


class _RequestCounter:
    """Counts HTTP requests a boto3 client really sends (botocore's before-send event)."""

    def __init__(self, backend: S3Backend) -> None:
        self.count = 0
        backend.client.meta.events.register("before-send.s3.*", self._hook)

    def _hook(self, **_: object) -> None:
        self.count += 1

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


def test_s3_requests_per_chunk_are_constant(tiers: Tiers, s3_server: S3Process, unique_name: str) -> None:
    counter = _RequestCounter(tiers.s3)
    items = layers_of(8)  # 30 layers of one chunk
    keys = [k for k, _ in items]

    tiers.s3.put_many(items)
    assert counter.take() == 1  # one PUT for all 30 layers
    assert tiers.s3.get_many(keys) == [b for _, b in items]
    assert counter.take() == 1  # one ranged GET covering them
    assert tiers.s3.get(keys[17]) == items[17][1]
    assert counter.take() == 1  # one ranged GET with the cached index
    assert tiers.s3.exists_many(keys) == [True] * NUM_LAYERS
    assert counter.take() == 0  # answered from the cached index
    tiers.s3.put_many(items)
    assert counter.take() == 1  # rewriting every layer: one conditional PUT

    cold = s3_server.backend(unique_name)
    try:
        cold_counter = _RequestCounter(cold)
        assert cold.get_many(keys) == [b for _, b in items]
        assert cold_counter.take() == 1  # no index yet: one GET of the whole object
        other = s3_server.backend(unique_name)
        try:
            other_counter = _RequestCounter(other)
            assert other.get(keys[29]) == items[29][1]
            assert other_counter.take() == 2  # index (first 64 KiB) + the layer's range
            assert other.get(keys[28]) == items[28][1]
            assert other_counter.take() == 1
        finally:
            other.close()
        # Adding layers to a chunk stored by another process: create fails, read, merge, write.
        extra = [(BlobKey(NS, chunk(8), NUM_LAYERS + n), blob(8, NUM_LAYERS + n)) for n in range(2)]
        cold.put_many(extra)
        assert cold_counter.take() == 2  # index cached by the GET above: read + conditional PUT
        assert tiers.s3.get_many(keys + [k for k, _ in extra]) == [b for _, b in items + extra]
    finally:
        cold.close()


def test_s3_batch_over_many_chunks_runs_one_request_per_chunk(tiers: Tiers) -> None:
    counter = _RequestCounter(tiers.s3)
    items = [item for i in range(6) for item in layers_of(200 + i, num_layers=5)]
    tiers.s3.put_many(items)
    assert counter.take() == 6
    assert tiers.s3.get_many([k for k, _ in items]) == [b for _, b in items]
    assert counter.take() == 6
    assert tiers.s3.delete_many([k for k, _ in items]) == 30
    assert tiers.s3.usage().objects == 0


def test_s3_multipart_upload_for_large_chunks(tiers: Tiers, s3_server: S3Process, unique_name: str) -> None:
    backend = s3_server.backend(unique_name + "-mp", multipart_threshold_bytes=1 << 20)
    try:
        names: list[str] = []
        backend.client.meta.events.register("before-send.s3.*", lambda **kw: names.append(kw["event_name"]))
        items = layers_of(9, num_layers=6, size=1 << 20)  # ~6 MiB object: two parts
        backend.put_many(items)
        assert any("UploadPart" in n for n in names) and any("CompleteMultipartUpload" in n for n in names)
        assert backend.get_many([k for k, _ in items]) == [b for _, b in items]
        assert backend.get(items[3][0]) == items[3][1]
    finally:
        backend.close()


# -- tier-specific behaviour the contract suite does not pin down ----------------------------


def test_redis_eviction_is_least_recently_used(redis_server: RedisProcess, unique_name: str) -> None:
    size = 1000
    backend = RedisBackend(url=redis_server.url, key_prefix=f"{unique_name}:", max_bytes=3 * size)
    try:
        a, b, c, d = (BlobKey(NS, chunk(300 + i), 0) for i in range(4))
        for k in (a, b, c):
            backend.put(k, b"x" * size)
        assert backend.get(a) is not None  # a is now the most recently used
        backend.put(d, b"y" * size)
        assert backend.exists_many([a, b, c, d]) == [True, False, True, True]
        assert backend.usage().bytes == 3 * size and backend.usage().objects == 3
        assert backend.counters.evictions == 1
        backend.put(BlobKey(NS, chunk(399), 0), b"z" * (4 * size))  # over the whole budget: not kept
        assert backend.usage().bytes == 3 * size
    finally:
        backend.close()


def test_redis_ttl_expires_blobs_and_their_accounting(redis_server: RedisProcess, unique_name: str) -> None:
    backend = RedisBackend(url=redis_server.url, key_prefix=f"{unique_name}:", ttl_seconds=0.2)
    try:
        key, value = layers_of(310, num_layers=1)[0]
        backend.put(key, value)
        assert backend.get(key) == value
        deadline = time.monotonic() + 10
        while backend.get(key) is not None:  # Redis expires it on its own
            if time.monotonic() > deadline:
                raise AssertionError("blob did not expire")
            time.sleep(0.05)
        assert backend.usage().objects == 0 and backend.usage().bytes == 0  # reaped on the miss
    finally:
        backend.close()


def test_s3_writers_in_two_processes_never_lose_each_others_layers(
    s3_server: S3Process, unique_name: str
) -> None:
    """Two backends (as two servers would) add different layers of the same chunks at once.

    They share no locks, so only the conditional writes (If-None-Match / If-Match) keep
    one writer's read-modify-write from dropping the other's layers.
    """
    a, b, reader = (s3_server.backend(unique_name) for _ in range(3))
    chunks = [400 + i for i in range(4)]
    errors: list[BaseException] = []

    def write(backend: S3Backend, layers: range) -> None:
        try:
            for c in chunks:
                backend.put_many([(BlobKey(NS, chunk(c), n), blob(c, n, 512)) for n in layers])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    try:
        threads = [
            threading.Thread(target=write, args=(a, range(0, 6))),
            threading.Thread(target=write, args=(b, range(6, 12))),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors[0]
        for c in chunks:
            keys = [BlobKey(NS, chunk(c), n) for n in range(12)]
            assert reader.get_many(keys) == [blob(c, n, 512) for n in range(12)], c
    finally:
        for backend in (a, b, reader):
            backend.close()
