"""A long context offloaded to a real server's disk tier in bounded memory (bench/offload_1m.py, reduced).

The server is a ``kvstore serve`` subprocess whose RAM tier is 4 MiB, so the
context (16k tokens of SmolLM2-shaped KV, ~377 MB in fp16) can only live on
disk. The client writes it chunk by chunk and reads it back layer by layer in
windows; both processes' peak RSS (``VmHWM``) must stay far below the data
size. The server is then killed and restarted on the same directory: the index
is rebuilt from the segment files and every blob comes back intact, and a byte
flipped in one blob on disk costs exactly that blob, detected by its checksum.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from kvstore import integrity
from kvstore.keys import chunk_keys
from tests.fixtures.store import REPO_ROOT, ServerProcess, start_server_process
from transfer.codec import decode_layer, encode_layer
from transfer.engines import longctx
from transfer.errors import DataLoss, NotFound
from transfer.rpc.client import KVClient, RetryPolicy

NUM_LAYERS, KV_HEADS, HEAD_DIM, CHUNK = 30, 3, 64, 256
LAYER_BYTES = longctx.fp16_bytes(CHUNK, 1, KV_HEADS, HEAD_DIM)  # 196,608: one chunk-layer in fp16
NAMESPACE = "offload/smollm2-L30-H3-D64/lossless"
MiB = 1 << 20


def _config(tmp_path: Path) -> Path:
    """RAM tier of 4 MiB (everything lands on disk), 32 MiB segments, fsync=batch."""
    path = tmp_path / "kvstore.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"workers": 8},
                "memory": {"max_bytes": 4 * MiB},
                "disk": {
                    "path": str(tmp_path / "disk"),
                    "fsync": "batch",
                    "segment_bytes": 32 * MiB,
                    "max_bytes": 8 << 30,
                },
            }
        )
    )
    return path


def _start(tmp_path: Path) -> ServerProcess:
    return start_server_process(_config(tmp_path), workdir=tmp_path / "run")


@pytest.fixture(autouse=True)
def _drop_disk_dir(tmp_path: Path) -> Iterator[None]:
    """Segment files are hundreds of MB: don't leave them in pytest's kept tmp dirs."""
    yield
    shutil.rmtree(tmp_path / "disk", ignore_errors=True)


def _client(server: ServerProcess | str) -> KVClient:
    target = server if isinstance(server, str) else server.target
    return KVClient(target, timeout_s=30, stream_timeout_s=120, retry=RetryPolicy(max_attempts=1))


_SHARED = torch.randn(LAYER_BYTES // 2, generator=torch.Generator().manual_seed(7)).to(torch.float16)


def _tagged_blob(chunk: int, layer: int) -> bytes:
    """A sealed chunk-layer-sized blob unique to (chunk, layer): a tag, then fp16 noise shared by all."""
    payload = bytearray(_SHARED.numpy().tobytes())
    payload[:16] = struct.pack("<4sIII", b"TAG!", chunk, layer, 0xC0FFEE)
    return integrity.seal(bytes(payload))


def _real_chunks(count: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """KV-like fp16 tensors (per-channel scales, an outlier channel) for ``count`` chunks."""
    g = torch.Generator().manual_seed(11)
    scale = torch.rand(KV_HEADS, 1, HEAD_DIM, generator=g) * 2 + 0.1
    scale[:, :, 5] = 20.0
    return [
        [
            (
                (torch.randn(KV_HEADS, CHUNK, HEAD_DIM, generator=g) * scale).half(),
                torch.randn(KV_HEADS, CHUNK, HEAD_DIM, generator=g).half(),
            )
            for _ in range(NUM_LAYERS)
        ]
        for _ in range(count)
    ]


def _read_all(client: KVClient, keys: list[bytes], codec_chunks: int) -> tuple[int, int]:
    """Read every layer back in windows; check order and bytes; return (blobs, bytes)."""
    window_keys = 16
    expected = [(layer, first) for layer in range(NUM_LAYERS) for first in range(0, len(keys), window_keys)]
    seen: list[tuple[int, int]] = []
    blobs = nbytes = 0
    for window in longctx.stream_layers(
        client, NAMESPACE, keys, 0, NUM_LAYERS, window_keys=window_keys, prefetch=2
    ):
        seen.append((window.layer, window.first_chunk))
        assert len(window.blobs) == min(window_keys, len(keys) - window.first_chunk)
        for j, blob in enumerate(window.blobs):
            chunk = window.first_chunk + j
            if chunk >= codec_chunks:
                assert blob == _tagged_blob(chunk, window.layer), (
                    f"chunk {chunk} layer {window.layer} differs"
                )
            blobs += 1
            nbytes += len(blob)
    assert seen == expected, "windows must arrive layer by layer, chunks in order within a layer"
    return blobs, nbytes


def _tagged_frames(start: int, stop: int) -> Iterator[list[bytes]]:
    for chunk in range(start, stop):
        yield [_tagged_blob(chunk, layer) for layer in range(NUM_LAYERS)]


OFFLOAD_CHUNKS, CODEC_CHUNKS = 64, 2  # 16,384 tokens: 1,920 blobs, ~377 MB


def _offload_and_read(target: str, disk_dir: str) -> dict[str, int]:
    """The client's side of the bounded-memory test; run in a fresh process by the test.

    Peak RSS is a property of the whole process: measured inside pytest it also
    counts what earlier tests left in the heap (a loaded model, Ray, a dozen malloc
    arenas), which is not what this test is about.
    """
    keys = chunk_keys(list(range(OFFLOAD_CHUNKS * CHUNK)), NAMESPACE)
    real = _real_chunks(CODEC_CHUNKS)
    data_bytes = OFFLOAD_CHUNKS * NUM_LAYERS * LAYER_BYTES
    # One-time costs (numba loading or compiling the codec kernels, ~100 MiB) are not what is measured.
    decode_layer(encode_layer(*real[0][0], "lossless"))
    with _client(target) as client:
        client_start_rss = longctx.rss_bytes()
        if not longctx.reset_peak_rss():
            raise AssertionError("cannot reset VmHWM via /proc/self/clear_refs on this kernel")
        # The first chunks go through the codec (lossless), the rest as pre-encoded frames.
        head = longctx.offload_context(
            client, NAMESPACE, keys, (c for c in real), profile="lossless", batch_bytes=4 * MiB, parallel=2
        )
        tail = longctx.offload_frames(
            client,
            NAMESPACE,
            keys,
            _tagged_frames(CODEC_CHUNKS, OFFLOAD_CHUNKS),
            start_chunk=CODEC_CHUNKS,
            batch_bytes=4 * MiB,
            parallel=2,
        )
        assert (head.num_chunks, tail.num_chunks) == (CODEC_CHUNKS, OFFLOAD_CHUNKS - CODEC_CHUNKS)
        assert head.num_blobs + tail.num_blobs == OFFLOAD_CHUNKS * NUM_LAYERS
        assert tail.num_requests > 10, "a 4 MiB batch limit must split the context into many Put streams"
        assert client.lookup(NAMESPACE, keys, NUM_LAYERS) == OFFLOAD_CHUNKS

        stats = {t.name: t for t in client.stats().tiers}
        assert stats["memory"].bytes <= 4 * MiB
        assert stats["disk"].objects == OFFLOAD_CHUNKS * NUM_LAYERS
        assert stats["disk"].bytes >= data_bytes * 0.9
        assert len(list(Path(disk_dir).glob("*.seg"))) >= 8, "32 MiB segments: the data spans many"

        blobs, nbytes = _read_all(client, keys, CODEC_CHUNKS)
        assert blobs == OFFLOAD_CHUNKS * NUM_LAYERS
        decoded = list(
            longctx.read_layers(client, NAMESPACE, keys[:CODEC_CHUNKS], 0, NUM_LAYERS, window_keys=1)
        )
        assert [layer for layer, _, _ in decoded] == list(range(NUM_LAYERS))
        for layer, k, v in decoded:
            assert torch.equal(k, torch.cat([real[c][layer][0] for c in range(CODEC_CHUNKS)], dim=1))
            assert torch.equal(v, torch.cat([real[c][layer][1] for c in range(CODEC_CHUNKS)], dim=1))
        return {
            "client_growth": longctx.peak_rss_bytes() - client_start_rss,
            "blobs": blobs,
            "nbytes": nbytes,
        }


def _in_fresh_process(fn_name: str, *args: str) -> dict[str, int]:
    """Run ``fn_name(*args)`` of this module in a new Python process; its JSON result, or the test fails."""
    code = (
        "import json, sys\n"
        f"from tests.integration.test_offload import {fn_name}\n"
        f"print('RESULT ' + json.dumps({fn_name}(*sys.argv[1:])))"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"{fn_name} failed in its process:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_offload_streams_in_bounded_memory_and_survives_restart(tmp_path: Path) -> None:
    keys = chunk_keys(list(range(OFFLOAD_CHUNKS * CHUNK)), NAMESPACE)
    data_bytes = OFFLOAD_CHUNKS * NUM_LAYERS * LAYER_BYTES
    server = _start(tmp_path)
    try:
        server_start_rss = longctx.rss_bytes(server.proc.pid)
        longctx.reset_peak_rss(server.proc.pid)
        result = _in_fresh_process("_offload_and_read", server.target, str(tmp_path / "disk"))
        server_growth = longctx.peak_rss_bytes(server.proc.pid) - server_start_rss
        client_growth = result["client_growth"]
        # Holding the context (or one whole layer of it, twice over) would show up here.
        assert client_growth < data_bytes / 4, (
            f"client peak RSS grew {client_growth >> 20} MiB for {data_bytes >> 20} MiB"
        )
        assert server_growth < data_bytes / 4, (
            f"server peak RSS grew {server_growth >> 20} MiB for {data_bytes >> 20} MiB"
        )
    finally:
        server.kill()  # a crash: nothing flushed or drained; the page cache still holds what was written

    real = _real_chunks(CODEC_CHUNKS)
    server = _start(tmp_path)
    try:
        with _client(server) as client:
            assert client.lookup(NAMESPACE, keys, NUM_LAYERS) == OFFLOAD_CHUNKS
            assert _read_all(client, keys, CODEC_CHUNKS) == (result["blobs"], result["nbytes"])
            for layer, k, _ in longctx.read_layers(client, NAMESPACE, keys[:1], 0, 1):
                assert torch.equal(k, real[0][layer][0])
    finally:
        server.kill()


def test_corrupt_blob_on_disk_costs_only_that_blob(tmp_path: Path) -> None:
    num_chunks = 16
    keys = chunk_keys(list(range(num_chunks * CHUNK)), NAMESPACE)
    server = _start(tmp_path)
    try:
        with _client(server) as client:
            longctx.offload_frames(
                client, NAMESPACE, keys, _tagged_frames(0, num_chunks), batch_bytes=4 * MiB
            )
    finally:
        server.kill()
    victim_chunk, victim_layer = 3, 7
    tag = _tagged_blob(victim_chunk, victim_layer)[:16]
    hits = [
        (seg, data.find(tag))
        for seg in sorted((tmp_path / "disk").glob("*.seg"))
        if (data := seg.read_bytes()).find(tag) >= 0
    ]
    assert len(hits) == 1, "the victim blob must be on disk exactly once"
    seg, offset = hits[0]
    with open(seg, "r+b") as f:  # flip one byte in the middle of the blob's payload
        f.seek(offset + LAYER_BYTES // 2)
        byte = f.read(1)
        f.seek(offset + LAYER_BYTES // 2)
        f.write(bytes([byte[0] ^ 0x40]))

    server = _start(tmp_path)
    try:
        with _client(server) as client:
            assert client.lookup(NAMESPACE, keys, NUM_LAYERS) == num_chunks  # the index survived
            good = [k for i, k in enumerate(keys) if i != victim_chunk]
            for window in longctx.stream_layers(client, NAMESPACE, good, 0, NUM_LAYERS, window_keys=8):
                for j, blob in enumerate(window.blobs):
                    chunk = window.first_chunk + j
                    chunk += chunk >= victim_chunk
                    assert blob == _tagged_blob(chunk, window.layer)
            victim = [keys[victim_chunk]]
            assert [
                w.layer for w in longctx.stream_layers(client, NAMESPACE, victim, 0, victim_layer)
            ] == list(range(victim_layer))
            with pytest.raises(DataLoss):
                list(longctx.stream_layers(client, NAMESPACE, victim, victim_layer, victim_layer + 1))
            # The bad copy was dropped: next time it is a plain miss, to be recomputed and re-stored.
            with pytest.raises(NotFound):
                list(longctx.stream_layers(client, NAMESPACE, victim, victim_layer, victim_layer + 1))
            assert client.lookup(NAMESPACE, keys, NUM_LAYERS) == victim_chunk
            assert list(
                longctx.stream_layers(client, NAMESPACE, victim, victim_layer + 1, NUM_LAYERS, window_keys=1)
            )[0].blobs == [_tagged_blob(victim_chunk, victim_layer + 1)]
    finally:
        server.kill()


def test_arguments_are_checked_before_anything_is_sent(tmp_path: Path) -> None:
    client = KVClient("127.0.0.1:1", timeout_s=1, retry=RetryPolicy(max_attempts=1))  # never contacted
    try:
        keys = chunk_keys(list(range(2 * CHUNK)), NAMESPACE)
        with pytest.raises(ValueError, match="more chunks than keys"):
            longctx.offload_frames(client, NAMESPACE, keys, _tagged_frames(0, 3))
        with pytest.raises(ValueError, match="window_keys"):
            longctx.stream_layers(client, NAMESPACE, keys, 0, NUM_LAYERS, window_keys=0)
        with pytest.raises(ValueError, match="empty layer range"):
            longctx.stream_layers(client, NAMESPACE, keys, 3, 3)
        with pytest.raises(ValueError, match="parallel"):
            longctx.offload_frames(client, NAMESPACE, keys, [], parallel=0)
    finally:
        client.close()
    assert longctx.fp16_bytes(1_000_192, NUM_LAYERS, KV_HEADS, HEAD_DIM) == 3907 * NUM_LAYERS * LAYER_BYTES
