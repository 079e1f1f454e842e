"""One contract, every tier: what any Backend must do, run against real media.

memory and disk run in-process; redis and s3 run against the real redis-server
and the real S3 HTTP server started by tests/fixtures/services.py; redis-cluster
runs the Redis tier in cluster mode against a real 6-node local Redis Cluster. Each test gets
a fresh backend (own directory, key prefix or bucket), so tests never see each
other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from kvstore.backends import Backend, BlobKey, backend_class
from kvstore.integrity import seal
from tests.threads import run_threads

NS = "tenant-a/model-x/fp16"
OTHER_NS = "tenant-b/model-x/fp16"
# Sized so the slowest medium (a moto S3 server sharing two cores) stays within seconds.
THREADS, ROUNDS = 6, 8


def _make(name: str, request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Backend:
    cls = backend_class(name.removesuffix("-cluster"))
    tag = uuid.uuid4().hex[:12]
    if name == "memory":
        return cls(max_bytes=256 << 20)
    if name == "disk":
        return cls(
            path=os.path.join(tmp_path, "disk"), max_bytes=1 << 30, fsync="batch", segment_bytes=64 << 20
        )
    if name == "redis":
        server = request.getfixturevalue("redis_server")
        return cls(url=server.url, key_prefix=f"test-{tag}:")
    if name == "redis-cluster":
        from kvstore.backends.redis_cluster import RedisClusterBackend

        cluster = request.getfixturevalue("redis_cluster")
        return RedisClusterBackend(
            url=cluster.url, cluster_nodes=",".join(cluster.startup_nodes[1:]), key_prefix=f"test-{tag}:"
        )
    server = request.getfixturevalue("s3_server")
    return cls(
        endpoint_url=server.endpoint_url,
        bucket=f"test-{tag}",
        access_key_id="test",
        secret_access_key="test",
        region="us-east-1",
    )


@pytest.fixture(params=["memory", "disk", "redis", "redis-cluster", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[Backend]:
    b = _make(request.param, request, tmp_path)
    try:
        yield b
    finally:
        b.close()


def key(i: int, layer: int = 0, namespace: str = NS) -> BlobKey:
    return BlobKey(namespace, i.to_bytes(4, "big") * 8, layer)


def blob(i: int, size: int = 1024) -> bytes:
    body = (i.to_bytes(4, "little") * (size // 4 + 1))[: max(size - 8, 0)]
    return seal(body)


class TestBackendContract:
    def test_round_trip_and_miss(self, backend: Backend) -> None:
        assert backend.get(key(1)) is None
        assert not backend.exists(key(1))
        backend.put(key(1), blob(1))
        assert backend.get(key(1)) == blob(1)
        assert backend.exists(key(1))
        assert backend.get(key(1, layer=1)) is None

    def test_overwrite_replaces(self, backend: Backend) -> None:
        backend.put(key(2), blob(2, 2048))
        backend.put(key(2), blob(3, 512))
        assert backend.get(key(2)) == blob(3, 512)
        assert sum(1 for _ in backend.iter_keys(NS)) == 1

    def test_delete_is_idempotent(self, backend: Backend) -> None:
        backend.put(key(4), blob(4))
        assert backend.delete(key(4)) is True
        assert backend.get(key(4)) is None
        assert not backend.exists(key(4))
        assert backend.delete(key(4)) is False
        assert backend.delete(key(5)) is False

    def test_iter_keys_filters_by_namespace(self, backend: Backend) -> None:
        mine = {key(i, layer) for i in range(3) for layer in range(2)}
        theirs = {key(i, namespace=OTHER_NS) for i in range(2)}
        backend.put_many([(k, blob(n)) for n, k in enumerate(sorted(mine | theirs))])
        assert set(backend.iter_keys(NS)) == mine
        assert set(backend.iter_keys(OTHER_NS)) == theirs
        assert set(backend.iter_keys()) >= mine | theirs

    def test_batch_methods(self, backend: Backend) -> None:
        keys = [key(10, layer) for layer in range(30)]
        blobs = [blob(layer, 4096 + layer) for layer in range(30)]
        backend.put_many(list(zip(keys, blobs, strict=True)))
        missing = key(11)
        assert backend.get_many([*keys, missing]) == [*blobs, None]
        assert backend.exists_many([missing, *keys]) == [False] + [True] * 30
        assert backend.delete_many([*keys[:10], missing]) == 10
        assert backend.exists_many(keys) == [False] * 10 + [True] * 20
        assert backend.get_many(keys[:10]) == [None] * 10

    def test_usage_counts_objects_and_bytes(self, backend: Backend) -> None:
        before = backend.usage()
        sizes = [1000, 20_000, 300_000]
        backend.put_many([(key(20 + n), blob(n, s)) for n, s in enumerate(sizes)])
        after = backend.usage()
        assert after.objects - before.objects == len(sizes)
        assert after.bytes - before.bytes >= sum(sizes)
        backend.delete(key(20))
        assert backend.usage().objects - before.objects == len(sizes) - 1

    def test_binary_safety(self, backend: Backend) -> None:
        every_byte = seal(bytes(range(256)) * 4)
        empty = seal(b"")  # the smallest blob there is: only the trailer
        big = seal(os.urandom((4 << 20) - 8))
        backend.put_many([(key(30), every_byte), (key(31), empty), (key(32), big)])
        assert backend.get(key(30)) == every_byte
        assert backend.get(key(31)) == empty and len(empty) == 8
        assert backend.get(key(32)) == big

    def test_same_chunk_in_two_namespaces_stays_apart(self, backend: Backend) -> None:
        a, b = key(40, 3, NS), key(40, 3, OTHER_NS)
        backend.put(a, blob(1))
        backend.put(b, blob(2))
        assert backend.get(a) == blob(1) and backend.get(b) == blob(2)
        backend.delete(a)
        assert backend.get(a) is None and backend.get(b) == blob(2)

    def test_concurrent_puts_and_gets(self, backend: Backend) -> None:
        shared = key(99)
        shared_versions = {blob(v, 8192) for v in range(THREADS)}

        def worker(t: int) -> None:
            for i in range(ROUNDS):
                k, b = key(1000 + t * 100 + i, layer=t), blob(t * 100 + i, 16_384)
                backend.put(k, b)
                backend.put(shared, blob(t, 8192))
                got = backend.get(k)
                if got != b:
                    raise AssertionError(f"thread {t} read back a different blob for {k.name()}")
                s = backend.get(shared)
                if s is not None and s not in shared_versions:
                    raise AssertionError("shared key returned a torn or foreign blob")

        run_threads(worker, THREADS)
        assert backend.usage().objects >= THREADS * ROUNDS + 1
