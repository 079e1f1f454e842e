"""The tiered store on real RAM and disk tiers: integrity repair, promotion, write-through, dead tiers."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.backends.base import BlobKey
from kvstore.backends.disk import DiskBackend
from kvstore.backends.memory import MemoryBackend
from kvstore.backends.tiered import TieredStore
from kvstore.errors import BackendUnavailable, IntegrityError
from kvstore.integrity import is_intact, seal
from tests.threads import run_threads

NS = "t/m/p"


def key(i: int, layer: int = 0, namespace: str = NS) -> BlobKey:
    return BlobKey(namespace, i.to_bytes(2, "big") * 16, layer)


def blob(i: int, size: int = 4096) -> bytes:
    return seal(i.to_bytes(4, "little") * ((size - 8) // 4))


def flipped(data: bytes, at: int = 100) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x40
    return bytes(out)


def flip_on_disk(disk: DiskBackend, k: BlobKey, at: int = 100) -> None:
    path, offset, _ = disk.locate(k)
    with open(path, "r+b") as f:
        f.seek(offset + at)
        byte = f.read(1)[0]
        f.seek(offset + at)
        f.write(bytes([byte ^ 0x01]))


@pytest.fixture
def tiers(tmp_path: Path) -> Iterator[tuple[MemoryBackend, DiskBackend, DiskBackend]]:
    """RAM -> disk -> a second disk standing in for a slower persistent tier."""
    mem = MemoryBackend(max_bytes=64 << 20)
    disk = DiskBackend(tmp_path / "disk", max_bytes=0, fsync="never")
    cold = DiskBackend(tmp_path / "cold", max_bytes=0, fsync="never")
    cold.name = "cold"
    yield mem, disk, cold
    for t in (mem, disk, cold):
        t.close()


def test_corrupt_ram_copy_is_replaced_from_disk(tiers: tuple) -> None:
    mem, disk, cold = tiers
    store = TieredStore([mem, disk])
    good = blob(1)
    store.put(key(1), good)
    mem.put(key(1), flipped(good))  # bit rot in RAM
    assert store.get(key(1)) == good
    assert mem.counters.integrity_failures == 1
    assert disk.counters.hits == 1
    assert mem.get(key(1)) == good  # re-promoted
    assert store.get(key(1)) == good and mem.counters.hits == 1


def test_corrupt_disk_file_is_never_served(tiers: tuple) -> None:
    mem, disk, cold = tiers
    store = TieredStore([mem, disk, cold])
    good = blob(2, 200_000)
    store.put(key(2), good)
    mem.delete(key(2))
    flip_on_disk(disk, key(2), at=150_000)
    assert not is_intact(disk.get(key(2)))  # the medium really holds bad bytes now
    assert store.get(key(2)) == good  # served from the next tier
    assert disk.counters.integrity_failures == 1
    assert cold.counters.hits == 1
    assert disk.get(key(2)) == good and mem.get(key(2)) == good  # both faster tiers repaired


def test_corrupt_everywhere_raises_integrity_error(tiers: tuple) -> None:
    mem, disk, _ = tiers
    store = TieredStore([mem, disk])
    good = blob(3)
    store.put(key(3), good)
    mem.put(key(3), flipped(good, 10))
    flip_on_disk(disk, key(3), at=20)
    with pytest.raises(IntegrityError) as info:
        store.get(key(3))
    assert info.value.keys == [key(3)]
    assert mem.counters.integrity_failures == 1 and disk.counters.integrity_failures == 1
    assert not mem.exists(key(3)) and not disk.exists(key(3))  # bad copies evicted
    assert store.get(key(3)) is None  # now a plain miss: the client recomputes


def test_plain_miss_is_none_and_counts_misses(tiers: tuple) -> None:
    mem, disk, _ = tiers
    store = TieredStore([mem, disk])
    assert store.get(key(4)) is None
    assert mem.counters.misses == 1 and disk.counters.misses == 1


def test_hit_in_lower_tier_is_promoted(tiers: tuple) -> None:
    mem, disk, cold = tiers
    store = TieredStore([mem, disk, cold])
    cold.put(key(5), blob(5))
    assert store.get(key(5)) == blob(5)
    assert mem.get(key(5)) == blob(5) and disk.get(key(5)) == blob(5)
    assert (mem.counters.misses, disk.counters.misses, cold.counters.hits) == (1, 1, 1)


def test_write_through_names_the_tiers_written(tiers: tuple) -> None:
    mem, disk, cold = tiers
    store = TieredStore([mem, disk, cold], write_through=["cold"])
    store.put(key(6), blob(6))
    assert mem.exists(key(6)) and cold.exists(key(6)) and not disk.exists(key(6))
    all_tiers = TieredStore([mem, disk, cold])
    all_tiers.put(key(7), blob(7))
    assert mem.exists(key(7)) and disk.exists(key(7)) and cold.exists(key(7))
    with pytest.raises(ValueError):
        TieredStore([mem, disk], write_through=["s3"])


def test_corrupt_write_is_refused_everywhere(tiers: tuple) -> None:
    mem, disk, _ = tiers
    store = TieredStore([mem, disk])
    with pytest.raises(IntegrityError):
        store.put_many([(key(8), blob(8)), (key(9), flipped(blob(9)))])
    assert not mem.exists(key(8)) and not disk.exists(key(8))


def test_dead_disk_degrades_to_miss_and_error(tiers: tuple, tmp_path: Path) -> None:
    mem, disk, cold = tiers
    store = TieredStore([mem, disk, cold])
    store.put(key(10), blob(10))
    mem.delete(key(10))
    shutil.rmtree(tmp_path / "disk")  # the disk tier's medium is gone
    assert store.get(key(10)) == blob(10)  # from the cold tier
    assert disk.counters.errors >= 1 and cold.counters.hits == 1
    errors = disk.counters.errors
    store.put(key(11), blob(11))  # memory and cold still take writes
    assert disk.counters.errors == errors + 1
    assert mem.exists(key(11)) and cold.exists(key(11))
    assert [s.healthy for s in store.tier_stats()] == [True, False, True]


def test_write_fails_only_when_no_tier_takes_it(tmp_path: Path) -> None:
    disk = DiskBackend(tmp_path / "only", max_bytes=0)
    try:
        store = TieredStore([disk])
        shutil.rmtree(tmp_path / "only")
        with pytest.raises(BackendUnavailable):
            store.put(key(12), blob(12))
        assert disk.counters.errors == 1
    finally:
        disk.close()


def test_get_many_batches_across_tiers(tiers: tuple) -> None:
    mem, disk, cold = tiers
    store = TieredStore([mem, disk, cold])
    mem.put(key(20), blob(20))
    disk.put(key(21), blob(21))
    cold.put(key(22), blob(22))
    cold.put(key(23), flipped(blob(23)))
    disk.put(key(23), blob(23))
    got = store.get_many([key(20), key(21), key(22), key(23), key(24)])
    assert got == [blob(20), blob(21), blob(22), blob(23), None]
    assert mem.exists(key(22)) and disk.exists(key(22)) and mem.exists(key(21))
    assert cold.counters.integrity_failures == 0  # key 23 was found intact before reaching cold


def test_exists_chunks_counts_leading_complete_chunks(tiers: tuple) -> None:
    mem, disk, cold = tiers
    store = TieredStore([mem, disk, cold])
    chunks = [key(30 + c).chunk for c in range(5)]
    layers = 4
    for c in range(5):
        for layer in range(layers):
            if c == 3 and layer == 2:
                continue  # chunk 3 is incomplete
            target = {0: mem, 1: disk, 2: cold}.get(c, mem)
            target.put(BlobKey(NS, chunks[c], layer), blob(c * 10 + layer))
    cold.put(BlobKey(NS, chunks[2], 0), blob(99))
    mem.put(BlobKey(NS, chunks[1], 3), blob(98))  # layers split over tiers still count
    assert store.exists_chunks(NS, chunks, layers) == (3, ["memory", "disk", "cold"])
    assert store.exists_chunks("other/m/p", chunks, layers) == (0, [])
    assert store.exists_chunks(NS, chunks[4:], layers) == (1, ["memory"])


def test_delete_chunks_removes_every_layer_everywhere(tiers: tuple) -> None:
    mem, disk, cold = tiers
    store = TieredStore([mem, disk, cold])
    chunks = [key(40 + c).chunk for c in range(3)]
    store.put_many([(BlobKey(NS, c, layer), blob(layer)) for c in chunks for layer in range(3)])
    store.put(BlobKey("other/m/p", chunks[0], 0), blob(1))
    assert store.delete_chunks(NS, chunks[:1], num_layers=3) == 1
    assert store.delete_chunks(NS, chunks[1:] + [b"\0" * 32]) == 2  # found by listing
    assert not any(t.exists(BlobKey(NS, c, 0)) for t in (mem, disk, cold) for c in chunks)
    assert store.get(BlobKey("other/m/p", chunks[0], 0)) == blob(1)


def test_delete_chunks_with_the_layer_count_lists_no_tier(tiers: tuple) -> None:
    """With num_layers every tier is asked by address; only without it does each tier list the namespace
    (on S3: a listing plus an index read per stored chunk)."""
    mem, disk, cold = tiers
    store = TieredStore([mem, disk, cold])
    listed: list[str] = []
    for tier in (mem, disk, cold):
        real = tier.iter_keys
        tier.iter_keys = lambda namespace=None, real=real, name=tier.name: (
            listed.append(name) or real(namespace)
        )
    chunks = [key(60 + c).chunk for c in range(3)]
    store.put_many([(BlobKey(NS, c, layer), blob(layer)) for c in chunks for layer in range(4)])
    assert store.delete_chunks(NS, chunks[:2], num_layers=2) == 2
    assert listed == []
    # Layers [0, 2) went from every tier; layers 2 and 3 stay (the caller said the model has 2).
    assert not any(
        t.exists(BlobKey(NS, c, layer)) for t in (mem, disk, cold) for c in chunks[:2] for layer in (0, 1)
    )
    assert all(t.exists(BlobKey(NS, c, 3)) for t in (mem, disk, cold) for c in chunks)
    assert store.delete_chunks(NS, chunks) == 3  # no layer count: every tier lists the namespace
    assert listed == ["memory", "disk", "cold"]
    assert not any(
        t.exists(BlobKey(NS, c, layer)) for t in (mem, disk, cold) for c in chunks for layer in range(4)
    )


def test_tier_stats_report_usage_and_counters(tiers: tuple) -> None:
    mem, disk, _ = tiers
    store = TieredStore([mem, disk])
    store.put(key(50), blob(50, 10_000))
    store.get(key(50))
    (m_name, m_usage, m_counters, m_ok), (d_name, d_usage, _, d_ok) = store.tier_stats()
    assert (m_name, d_name) == ("memory", "disk") and m_ok and d_ok
    assert m_usage.objects == 1 and m_usage.bytes == 10_000 and d_usage.bytes >= 10_000
    assert m_counters.hits == 1


def test_concurrent_use_never_returns_wrong_bytes(tmp_path: Path) -> None:
    mem = MemoryBackend(max_bytes=200_000)  # small: constant eviction and promotion
    disk = DiskBackend(tmp_path / "d", max_bytes=0, fsync="never")
    store = TieredStore([mem, disk])

    def worker(t: int) -> None:
        for i in range(40):
            n = t * 100 + i
            store.put(key(n), blob(n, 20_000))
            for back in range(min(i, 5)):
                if store.get(key(n - back)) != blob(n - back, 20_000):
                    raise AssertionError(f"bad read for {n - back}")

    try:
        run_threads(worker, 4)
        assert mem.counters.evictions > 0
        # Whether the threads' own read-backs reached the disk depends on how they interleaved;
        # the first blob, written 160 puts of a 10-blob RAM tier ago, must come from the disk.
        assert store.get(key(0)) == blob(0, 20_000) and disk.counters.hits > 0
    finally:
        store.close()


def test_put_many_reports_the_tiers_that_took_the_write(tiers: tuple, tmp_path: Path) -> None:
    mem, disk, cold = tiers
    store = TieredStore([mem, disk, cold])
    assert store.put_many([(key(40), blob(40))]) == ["memory", "disk", "cold"]
    assert store.persistent(["memory", "disk"]) and not store.persistent(["memory"])
    shutil.rmtree(tmp_path / "disk")
    assert store.put_many([(key(41), blob(41))], durable=True) == ["memory", "cold"]


def test_durable_write_with_no_persistent_tier_stores_nothing(tiers: tuple, tmp_path: Path) -> None:
    mem, disk, _ = tiers
    store = TieredStore([mem, disk])
    shutil.rmtree(tmp_path / "disk")  # the only persistent tier is gone
    with pytest.raises(BackendUnavailable, match="no persistent tier took it.*disk"):
        store.put_many([(key(42), blob(42))], durable=True)
    assert not mem.exists(key(42))  # RAM is written only after a persistent tier
    assert store.put_many([(key(42), blob(42))]) == ["memory"]  # ack: memory still answers from RAM
    ram_only = TieredStore([MemoryBackend(max_bytes=1 << 20)])
    with pytest.raises(BackendUnavailable, match="no persistent tier .* is configured"):
        ram_only.put_many([(key(43), blob(43))], durable=True)


def test_a_miss_with_a_tier_skipped_is_unknown_not_absent(tiers: tuple, tmp_path: Path) -> None:
    """A key in no tier that answered, while a tier that may hold it could not be read, is
    BackendUnavailable (UNAVAILABLE, retry) -- not None (NOT_FOUND): an acknowledged Put may
    have put it exactly in the tier that was skipped."""
    mem, disk, cold = tiers
    store = TieredStore([mem, disk, cold])
    cold.put(key(30), blob(30))  # only the cold tier holds it
    store.put(key(31), blob(31))
    assert store.get(key(32)) is None  # every tier answered: absent
    shutil.rmtree(tmp_path / "cold")  # the cold tier cannot be read any more
    with pytest.raises(BackendUnavailable, match=r"cold .*may hold"):
        store.get(key(30))
    # A disk tier's index still says what it holds: a key it never had is absent, not unknown.
    assert store.get(key(32)) is None
    assert store.get(key(31)) == blob(31)  # found above the skipped tier: served
    assert store.get_many([key(31)]) == [blob(31)]


def test_a_skipped_write_is_kept_served_and_bounded(tiers: tuple, tmp_path: Path) -> None:
    mem, disk, cold = tiers
    size = 4096
    cold.write_behind_max_bytes = 3 * size  # room for three blobs
    store = TieredStore([mem, disk, cold])
    try:
        shutil.rmtree(tmp_path / "cold")  # every write now skips the cold tier
        store.put_many([(key(40), blob(40)), (key(41), blob(41))])
        assert store.write_behind_pending() == {"cold": (2, 2 * size)}
        assert cold.counters.write_behind_queued == 2 and cold.counters.write_behind_dropped == 0
        mem.delete(key(40))
        disk.delete(key(40))
        # Only the backlog holds it now: served from there, and found by Lookup, not "unknown".
        assert store.get(key(40)) == blob(40)
        assert store.exists_chunks(NS, [key(40).chunk], 1)[0] == 1
        store.put_many([(key(42), blob(42)), (key(43), blob(43))])  # one over the bound
        assert store.write_behind_pending() == {"cold": (3, 3 * size)}
        assert cold.counters.write_behind_dropped == 1  # the oldest, key 40
        mem.delete(key(40))  # (the read above promoted it)
        disk.delete(key(40))
        assert store.get(key(40)) is None  # dropped (and counted): in no tier now
        assert store.delete_chunks(NS, [key(41).chunk], 1) == 1
        assert store.write_behind_pending() == {"cold": (2, 2 * size)}  # a delete forgets kept blobs
    finally:
        store.close()
