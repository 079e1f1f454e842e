"""Behaviour of the RAM and disk tiers beyond the shared contract: eviction, restart, crash, fsync."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from kvstore.backends.base import BlobKey
from kvstore.backends.disk import DiskBackend
from kvstore.backends.memory import MemoryBackend
from kvstore.errors import BackendUnavailable
from kvstore.integrity import seal
from tests.threads import run_threads

NS = "t/m/p"
KIB = 1024


def key(i: int, layer: int = 0) -> BlobKey:
    return BlobKey(NS, i.to_bytes(2, "big") * 16, layer)


def blob(i: int, size: int = 4 * KIB) -> bytes:
    return seal((bytes([i % 251]) + i.to_bytes(4, "little")) * ((size - 8) // 5) + b"\0" * ((size - 8) % 5))


def segment_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.seg"))


# ---------------------------------------------------------------------- memory
def test_memory_evicts_least_recently_used_by_bytes() -> None:
    mem = MemoryBackend(max_bytes=10 * KIB)
    for i in range(3):
        mem.put(key(i), blob(i, 3 * KIB))
    assert mem.usage().bytes == 9 * KIB
    assert mem.get(key(0)) is not None  # key 0 is now the most recently used
    mem.put(key(3), blob(3, 3 * KIB))  # 12 KiB > 10 KiB: the LRU one (key 1) goes
    assert mem.get(key(1)) is None
    assert [mem.exists(key(i)) for i in (0, 2, 3)] == [True, True, True]
    assert mem.counters.evictions == 1
    assert mem.usage().bytes == 9 * KIB and mem.usage().objects == 3


def test_memory_refuses_blob_larger_than_budget_without_flushing() -> None:
    mem = MemoryBackend(max_bytes=8 * KIB)
    mem.put(key(0), blob(0, 4 * KIB))
    mem.put(key(1), blob(1, 9 * KIB))
    assert mem.get(key(1)) is None and mem.get(key(0)) == blob(0, 4 * KIB)
    assert mem.counters.evictions == 1


def test_memory_keeps_immutable_views_and_copies_mutable_buffers() -> None:
    """The server hands the RAM tier read-only views into received messages: kept as they are (no copy);
    anything that could change under the store is copied."""
    mem = MemoryBackend(max_bytes=0)
    message = b"header" + blob(1)
    view = memoryview(message)[6:]
    buffer = bytearray(blob(2))
    mem.put_many([(key(1), view), (key(2), buffer), (key(3), memoryview(buffer))])
    assert mem.get(key(1)) is view and mem.usage().bytes == 3 * len(blob(1))
    buffer[:] = bytes(len(buffer))  # the caller reuses its buffer
    assert mem.get(key(2)) == blob(2) and mem.get(key(3)) == blob(2)
    assert type(mem.get(key(2))) is bytes and type(mem.get(key(3))) is bytes


# ------------------------------------------------------------------ disk basics
def test_disk_sealed_put_takes_the_trailer_as_its_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """put_sealed_many (the tiered store's writes of verified blobs) hashes no payload on the way in;
    a restart still checks the newest segment's payloads against their trailers."""
    import kvstore.backends.disk as disk_module

    hashed: list[int] = []
    real = disk_module.xxhash.xxh3_64_intdigest

    class _Counting:
        @staticmethod
        def xxh3_64_intdigest(data: bytes | memoryview) -> int:
            hashed.append(len(data))
            return real(data)

    disk = DiskBackend(tmp_path, max_bytes=0, fsync="always")
    items = [(key(c), blob(c, 16 * KIB)) for c in range(3)]
    monkeypatch.setattr(disk_module, "xxhash", _Counting)
    disk.put_sealed_many(items)
    assert hashed and max(hashed) < 1 * KIB  # record headers only, never a 16 KiB payload
    disk.put(key(9), blob(9, 16 * KIB))  # a direct put (a blob the tier knows nothing about) hashes it
    assert max(hashed) == 16 * KIB
    path, offset, length = disk.locate(key(1))
    disk.close()
    with open(path, "r+b") as f:  # one flipped payload bit in the newest segment
        f.seek(offset + length // 2)
        byte = f.read(1)[0]
        f.seek(offset + length // 2)
        f.write(bytes([byte ^ 0x10]))
    disk = DiskBackend(tmp_path, max_bytes=0, fsync="always")
    try:
        assert disk.counters.corrupt_records == 1  # caught at recovery by the blob's own trailer
        assert disk.get(key(1)) is None
        assert [disk.get(k) == b for k, b in items if k != key(1)] == [True, True]
        assert disk.get(key(9)) == blob(9, 16 * KIB)
    finally:
        disk.close()


def test_disk_restart_rebuilds_index(tmp_path: Path) -> None:
    disk = DiskBackend(tmp_path, max_bytes=0, fsync="always", segment_bytes=64 * KIB)
    items = [(key(c, layer), blob(c * 100 + layer, 10 * KIB)) for c in range(4) for layer in range(6)]
    disk.put_many(items)
    disk.put(key(0, 0), blob(7777, 5 * KIB))  # overwrite: the newer version must win after restart
    disk.delete(key(1, 1))
    disk.close()
    assert len(segment_files(tmp_path)) > 1  # rolled across segments

    disk = DiskBackend(tmp_path, max_bytes=0, fsync="always", segment_bytes=64 * KIB)
    try:
        expected = dict(items)
        expected[key(0, 0)] = blob(7777, 5 * KIB)
        del expected[key(1, 1)]
        assert set(disk.iter_keys(NS)) == set(expected)
        for k, b in expected.items():
            assert disk.get(k) == b
        assert disk.get(key(1, 1)) is None
        assert disk.usage().objects == len(expected)
    finally:
        disk.close()


def test_disk_single_read_reads_exactly_the_blob(tmp_path: Path) -> None:
    disk = DiskBackend(tmp_path, max_bytes=0)
    try:
        disk.put_many([(key(1, layer), blob(layer, 3 * KIB + layer)) for layer in range(3)])
        path, offset, length = disk.locate(key(1, 1))
        with open(path, "rb") as f:
            f.seek(offset)
            assert f.read(length) == blob(1, 3 * KIB + 1)
        assert disk.locate(key(9)) is None
    finally:
        disk.close()


@pytest.mark.parametrize("damage", ["cut_payload", "cut_header", "zeroed_payload", "garbage_tail"])
def test_disk_discards_torn_tail_after_crash(tmp_path: Path, damage: str) -> None:
    disk = DiskBackend(tmp_path, max_bytes=0, fsync="always")
    for i in range(3):
        disk.put(key(i), blob(i, 8 * KIB))
    path, offset, length = disk.locate(key(2))
    disk.close()
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if damage == "cut_payload":
            f.truncate(offset + length // 2)
        elif damage == "cut_header":
            f.truncate(offset - 10)
        elif damage == "zeroed_payload":  # file length survived the crash but the data did not
            f.seek(offset)
            f.write(b"\0" * length)
        else:
            f.seek(0, os.SEEK_END)
            f.write(os.urandom(300))

    disk = DiskBackend(tmp_path, max_bytes=0, fsync="always")
    try:
        assert disk.get(key(0)) == blob(0, 8 * KIB) and disk.get(key(1)) == blob(1, 8 * KIB)
        if damage == "garbage_tail":
            assert disk.get(key(2)) == blob(2, 8 * KIB)
            assert os.path.getsize(path) == size
        else:
            assert disk.get(key(2)) is None
            assert os.path.getsize(path) < offset  # truncated at the start of the torn record
        disk.put(key(3), blob(3))
    finally:
        disk.close()
    disk = DiskBackend(tmp_path, max_bytes=0)  # and the repaired files reopen cleanly
    try:
        assert disk.get(key(3)) == blob(3) and disk.get(key(0)) == blob(0, 8 * KIB)
    finally:
        disk.close()


def test_disk_evicts_oldest_segments_within_budget(tmp_path: Path) -> None:
    disk = DiskBackend(tmp_path, max_bytes=256 * KIB, fsync="never", segment_bytes=1 << 20)
    try:
        for i in range(40):
            disk.put(key(i), blob(i, 16 * KIB))
            assert disk.usage().bytes <= 256 * KIB
            assert sum(p.stat().st_size for p in segment_files(tmp_path)) <= 256 * KIB
        assert disk.get(key(0)) is None  # oldest gone
        assert disk.get(key(39)) == blob(39, 16 * KIB)  # newest kept
        assert disk.counters.evictions >= 40 - (256 // 16)
        assert disk.usage().objects + disk.counters.evictions == 40
    finally:
        disk.close()


def test_disk_gives_recently_read_blobs_a_second_chance(tmp_path: Path) -> None:
    disk = DiskBackend(tmp_path, max_bytes=256 * KIB, fsync="never")
    try:
        disk.put(key(0), blob(0, 16 * KIB))
        disk.put(key(1), blob(1, 16 * KIB))
        for i in range(2, 60):
            assert disk.get(key(0)) == blob(0, 16 * KIB)  # key 0 stays hot
            disk.put(key(i), blob(i, 16 * KIB))
        assert disk.get(key(0)) == blob(0, 16 * KIB)
        assert disk.get(key(1)) is None
    finally:
        disk.close()


def test_disk_deletes_survive_restart_after_segments_are_reclaimed(tmp_path: Path) -> None:
    seg = 32 * KIB
    disk = DiskBackend(tmp_path, max_bytes=0, fsync="batch", segment_bytes=seg)
    disk.put(key(0), blob(0, 12 * KIB))  # segment 1: key 0 (to be deleted) and key 1 (kept)
    disk.put(key(1), blob(1, 12 * KIB))
    disk.put(key(10), blob(10, 12 * KIB))  # rolls to segment 2
    disk.delete(key(0))  # so the tombstone lands in segment 2, after the put it shadows
    for i in range(11, 16):  # fill later segments, then kill them so they are reclaimed
        disk.put(key(i), blob(i, 12 * KIB))
    first = segment_files(tmp_path)[0]
    assert disk.locate(key(1))[0] == str(first) and disk.locate(key(10))[0] != str(first)
    disk.delete_many([key(i) for i in range(10, 16)])
    assert first.exists()  # still holds live key 1 (and the dead put of key 0)
    assert len(segment_files(tmp_path)) < 5  # dead segments were removed
    disk.close()

    disk = DiskBackend(tmp_path, max_bytes=0, segment_bytes=seg)
    try:
        assert disk.get(key(0)) is None
        assert disk.get(key(1)) == blob(1, 12 * KIB)
        assert not any(disk.exists(key(i)) for i in range(10, 16))
    finally:
        disk.close()


def test_disk_concurrent_readers_and_writers_under_eviction(tmp_path: Path) -> None:
    disk = DiskBackend(tmp_path, max_bytes=512 * KIB, fsync="never")

    def worker(t: int) -> None:
        for i in range(60):
            n = t * 1000 + i
            disk.put(key(n), blob(n, 8 * KIB))
            for back in range(0, min(i, 10)):
                got = disk.get(key(n - back))
                if got is not None and got != blob(n - back, 8 * KIB):
                    raise AssertionError(f"wrong bytes for {n - back}")

    try:
        run_threads(worker, 4)
        assert disk.usage().bytes <= 512 * KIB
        assert disk.counters.evictions > 0
    finally:
        disk.close()


# ------------------------------------------------------------------ fsync modes
class FsyncSpy:
    """Counts fsync calls on segment files while still performing them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self._real = os.fsync
        self._lock = threading.Lock()
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd: int) -> None:
        if os.path.isfile(f"/proc/self/fd/{fd}") and os.readlink(f"/proc/self/fd/{fd}").endswith(".seg"):
            with self._lock:
                self.calls += 1
        self._real(fd)


def test_fsync_always_syncs_every_put(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = FsyncSpy(monkeypatch)
    disk = DiskBackend(tmp_path, max_bytes=0, fsync="always")
    try:
        for i in range(5):
            disk.put(key(i), blob(i))
            assert spy.calls == i + 1
    finally:
        disk.close()


def test_fsync_never_leaves_it_to_the_os(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = FsyncSpy(monkeypatch)
    disk = DiskBackend(tmp_path, max_bytes=0, fsync="never", segment_bytes=16 * KIB)
    for i in range(10):
        disk.put(key(i), blob(i))
    disk.close()
    assert spy.calls == 0


def test_fsync_batch_syncs_in_background_and_on_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = FsyncSpy(monkeypatch)
    disk = DiskBackend(tmp_path, max_bytes=0, fsync="batch", fsync_interval_ms=20)
    try:
        for i in range(20):
            disk.put(key(i), blob(i))
        assert spy.calls < 20  # puts do not wait for the disk
        deadline = time.monotonic() + 5
        while spy.calls == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert spy.calls >= 1
        synced = spy.calls
        disk.put(key(99), blob(99))
    finally:
        disk.close()
    assert spy.calls > synced


def test_disk_rejects_bad_settings_and_second_opener(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        DiskBackend(tmp_path, fsync="sometimes")
    disk = DiskBackend(tmp_path)
    try:
        with pytest.raises(BackendUnavailable):
            DiskBackend(tmp_path)  # one process owns a directory
    finally:
        disk.close()


def test_disk_reports_unavailable_when_its_directory_vanishes(tmp_path: Path) -> None:
    path = tmp_path / "d"
    disk = DiskBackend(path, max_bytes=0)
    try:
        disk.put(key(0), blob(0))
        assert disk.healthy()
        shutil.rmtree(path)
        assert not disk.healthy()
        with pytest.raises(BackendUnavailable):
            disk.put(key(1), blob(1))
        with pytest.raises(BackendUnavailable):
            disk.get(key(0))
    finally:
        disk.close()


# ---------------------------------------------------------------------- batches (Put streams)
def test_disk_batch_without_its_commit_record_is_voided_on_restart(tmp_path: Path) -> None:
    """A crash between a batch's blobs and its commit record: a restart shows none of the batch,
    keeps every earlier blob, and a later batch's commit does not bring the voided records back."""
    from kvstore.backends.disk import encode_commit

    disk = DiskBackend(tmp_path, max_bytes=0, fsync="always")
    before = [(key(c), blob(c)) for c in range(3)]
    disk.put_sealed_many(before)  # committed
    disk.put(key(9), blob(9))  # a single record: no batch
    torn = [(key(c), blob(c + 100)) for c in range(10, 14)]
    disk.put_sealed_many(torn)
    [seg] = segment_files(tmp_path)
    disk.close()
    # The raw hook: cut the batch's commit record (the last record) off, as a crash before it would.
    with open(seg, "r+b") as f:
        f.truncate(seg.stat().st_size - len(encode_commit(2)))
    disk = DiskBackend(tmp_path, max_bytes=0, fsync="always")
    try:
        assert disk.num_uncommitted_voided == len(torn)
        assert [disk.get(k) for k, _ in torn] == [None] * len(torn)
        assert [disk.get(k) for k, _ in before] == [b for _, b in before]
        assert disk.get(key(9)) == blob(9)
        assert disk.counters.corrupt_records == 0  # voided, not corrupt
        disk.put_sealed_many([(key(20), blob(20)), (key(21), blob(21))])  # a newer batch commits
    finally:
        disk.close()
    disk = DiskBackend(tmp_path, max_bytes=0, fsync="always")
    try:
        assert disk.num_uncommitted_voided == 0  # voided for good the first time
        assert [disk.get(k) for k, _ in torn] == [None] * len(torn)
        assert disk.get(key(20)) == blob(20) and disk.get(key(0)) == blob(0)
    finally:
        disk.close()


def test_disk_batch_commit_in_a_reclaimed_segment_is_carried_forward(tmp_path: Path) -> None:
    """A batch's blobs in one segment, its commit record in the next; that next segment is then
    reclaimed (everything in it overwritten). The batch must stay visible after a restart."""
    from kvstore.backends.disk import KIND_PUT_BATCH, encode_header

    record = len(encode_header(KIND_PUT_BATCH, key(1).name().encode(), blob(1), 1)) + len(blob(1))
    disk = DiskBackend(tmp_path, max_bytes=0, fsync="never", segment_bytes=2 * record + 16)
    batch = [(key(1), blob(1)), (key(2), blob(2))]
    disk.put_sealed_many(batch)  # both blobs fill segment 1; the commit record starts segment 2
    disk.put(key(3), blob(3))  # segment 2
    disk.put(key(3), blob(4))  # segment 3; segment 2 now holds nothing live and is reclaimed
    names = [p.name for p in segment_files(tmp_path)]
    disk.close()
    assert names == ["0000000001.seg", "0000000003.seg"], names
    disk = DiskBackend(tmp_path, max_bytes=0, fsync="never")
    try:
        assert disk.num_uncommitted_voided == 0
        assert [disk.get(k) for k, _ in batch] == [b for _, b in batch]
        assert disk.get(key(3)) == blob(4)
    finally:
        disk.close()


def test_disk_batch_is_invisible_until_its_commit(tmp_path: Path) -> None:
    """Readers never see part of a batch: each read sees all of it or none of it, also when the
    batch is written in several appends across segment rolls (two blobs per segment here)."""
    disk = DiskBackend(tmp_path, max_bytes=0, fsync="never", segment_bytes=2 * 4 * KIB + 400)
    seen: set[int] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(sum(disk.exists_many([key(c, layer) for c in range(20) for layer in range(4)])))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for c in range(20):
            disk.put_sealed_many([(key(c, layer), blob(c * 4 + layer)) for layer in range(4)])
    finally:
        stop.set()
        t.join()
        disk.close()
    assert seen and all(n % 4 == 0 for n in seen), sorted(seen)
