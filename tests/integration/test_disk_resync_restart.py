"""One flipped bit in a disk record, then a real server restart: only that record is lost.

End to end through ``kvstore serve`` processes and the gRPC client: 40 one-layer chunks
are stored (fsync always, small segments so there are sealed ones), the server stops, one
bit of one record's header is flipped (length field or key, in a sealed segment or in the
newest one), the server starts again on the same directory, and every chunk is read back
over gRPC: the flipped one is NOT_FOUND, every other one is served byte for byte, and the
server logs the skipped record.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvstore.backends.base import BlobKey
from kvstore.backends.disk import _FIXED, _SUM, DiskBackend
from tests.fixtures.store import make_blob, start_server_process
from transfer.errors import NotFound
from transfer.rpc.client import KVClient, PutItem

NS = "t/m/p"
COUNT = 40


@pytest.mark.parametrize(("part", "where"), [("length", "sealed"), ("key", "newest"), ("magic", "newest")])
def test_flipped_header_bit_loses_only_its_record_across_a_server_restart(
    tmp_path: Path, part: str, where: str
) -> None:
    disk_dir = tmp_path / "disk"
    config = tmp_path / "kv.yaml"
    # A RAM tier far too small to hold the chunks, so reads after the restart come from disk anyway.
    config.write_text(
        f"memory:\n  max_bytes: 4096\ndisk:\n  path: {disk_dir}\n  fsync: always\n  segment_bytes: 48KiB\n"
    )
    keys = [os.urandom(32) for _ in range(COUNT)]
    blobs = [make_blob(3000) for _ in range(COUNT)]
    server = start_server_process(config, workdir=tmp_path)
    try:
        with KVClient(server.target) as client:
            for k, b in zip(keys, blobs, strict=True):
                client.put(NS, [PutItem(k, 0, 1, b)])
    finally:
        assert server.stop() == 0

    disk = DiskBackend(disk_dir, max_bytes=0)  # only to find the records' offsets (server is down)
    places = {i: disk.locate(BlobKey(NS, k, 0)) for i, k in enumerate(keys)}
    disk.close()
    segments = sorted({p[0] for p in places.values() if p is not None})
    assert len(segments) >= 3
    seg = segments[0] if where == "sealed" else segments[-1]
    in_seg = [i for i, p in places.items() if p is not None and p[0] == seg]
    assert len(in_seg) >= 3
    victim = in_seg[len(in_seg) // 2]
    path, payload_at, _ = places[victim]
    name_len = len(BlobKey(NS, keys[victim], 0).name().encode())
    start = payload_at - (_FIXED.size + name_len + _SUM.size)
    at = {"length": start + 9, "key": start + _FIXED.size + 5, "magic": start + 2}[part]
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))

    server = start_server_process(config, workdir=tmp_path)
    try:
        with KVClient(server.target) as client:
            for i, (k, b) in enumerate(zip(keys, blobs, strict=True)):
                if i == victim:
                    with pytest.raises(NotFound):
                        list(client.get_layers(NS, [k], 0, 1))
                    continue
                got = list(client.get_layers(NS, [k], 0, 1))
                assert len(got) == 1 and bytes(got[0][1][0]) == b, i
            assert client.lookup(NS, [keys[victim]], 1) == 0
            # The skipped record is counted where operators look: Stats over gRPC.
            disk = {t.name: t for t in client.stats().tiers}["disk"]
            assert disk.corrupt_records == 1
    finally:
        server.stop()
    assert "corrupt record at offset" in server.log(), server.log()[-2000:]
