"""SIGKILL under load loses no acknowledged block of the disk tier.

``kvstore serve`` runs as a child process with ``disk.fsync=always`` (a Put is
acknowledged only after its bytes are fsynced, so not even a power cut loses it;
a SIGKILL alone would also spare anything written with ``batch``/``never``, since
the kernel keeps the page cache). Writers put chunks and delete some, the server
is SIGKILLed at a random moment, restarted on the same directory, and every
acknowledged chunk must read back byte for byte, every acknowledged delete must
stay deleted. bench/reliability.py runs more rounds, for ``always`` and ``batch``.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from kvstore.keys import KEY_BYTES
from kvstore.testing.reliability import run_crash_restart
from kvstore.testing.reliability.calls import C, rpc_code
from kvstore.testing.store import committed, make_blob
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from tests.fixtures.store import ServerProcess, start_server_process


def test_sigkill_loses_no_acknowledged_block(tmp_path: Path) -> None:
    args = [
        "--disk-path",
        str(tmp_path / "disk"),
        "--fsync",
        "always",
        "--log-level",
        "WARNING",
        "--memory-bytes",
        "64MiB",
    ]

    def start() -> ServerProcess:
        return start_server_process(args, workdir=tmp_path)

    report = run_crash_restart(start, rounds=2, seed=11, writers=2, layers=4, blob_bytes=4096)
    assert report["kills"] == 2
    assert report["puts_acked"] > 10, report  # the crash really came under load
    assert report["acked_blocks_checked"] > 40, report
    assert report["acked_blocks_lost"] == 0, report
    assert report["acked_blocks_corrupt"] == 0, report
    assert report["deleted_resurrected"] == 0, report


HELD_NS = "held/model/profile"
ACKED_NS = "acked/model/profile"


def _put_stream(stub: Any, namespace: str, chunks: dict[bytes, list[bytes]], timeout_s: float = 30.0) -> None:
    stub.Put(
        committed(
            pb.PutRequest(namespace=namespace, key=k, layer=i, num_layers=len(blobs), blob=b)
            for k, blobs in chunks.items()
            for i, b in enumerate(blobs)
        ),
        timeout=timeout_s,
    )


def test_sigkill_between_a_streams_blobs_and_its_commit_shows_none_of_the_stream(tmp_path: Path) -> None:
    """A Put stream is all-or-nothing across a crash too (issue 24, item 6).

    A real ``kvstore serve`` (fsync always) with the disk tier's test-only hook on for one
    namespace: a Put stream there stops after its blobs are written and fsynced, before its
    commit record, and the server is SIGKILLed right then. After a restart on the same
    directory none of that stream's blobs is visible (Lookup 0, Get NOT_FOUND) although its
    bytes are in the segment file, and every stream acknowledged before it reads back intact.
    """
    disk = tmp_path / "disk"
    args = [
        "--disk-path",
        str(disk),
        "--fsync",
        "always",
        "--log-level",
        "WARNING",
        "--memory-bytes",
        "64MiB",
    ]
    env = dict(os.environ, _KVSTORE_TEST_HOLD_BEFORE_COMMIT=HELD_NS)
    rng = random.Random(24)
    acked: dict[bytes, list[bytes]] = {}
    server = start_server_process(args, env=env, workdir=tmp_path)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.KVStoreStub(channel)
            for _ in range(6):  # acknowledged streams of 3 chunks x 4 layers each
                chunks = {
                    rng.randbytes(KEY_BYTES): [make_blob(rng.randbytes(3000)) for _ in range(4)]
                    for _ in range(3)
                }
                _put_stream(stub, ACKED_NS, chunks)
                acked.update(chunks)
            held = {
                rng.randbytes(KEY_BYTES): [make_blob(rng.randbytes(3000)) for _ in range(4)] for _ in range(3)
            }
            outcome: list[BaseException | None] = []

            def put_held() -> None:
                try:
                    _put_stream(stub, HELD_NS, held)
                    outcome.append(None)
                except grpc.RpcError as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=put_held)
            thread.start()
            marker = disk / "HELD-BEFORE-COMMIT"
            deadline = time.monotonic() + 30
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert marker.exists(), server.log()[-2000:]
            on_disk = b"".join(p.read_bytes() for p in sorted(disk.glob("*.seg")))
            assert all(b in on_disk for blobs in held.values() for b in blobs)  # the blobs were written
            server.kill()  # SIGKILL between the stream's blobs and its commit record
            thread.join(timeout=30)
            assert outcome and outcome[0] is not None  # never acknowledged
    finally:
        server.kill()
    server = start_server_process(args, workdir=tmp_path)  # the hook off
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.KVStoreStub(channel)
            for key in held:
                reply = stub.Lookup(pb.LookupRequest(namespace=HELD_NS, keys=[key], num_layers=1), timeout=10)
                assert reply.num_present == 0
                code, _, _ = rpc_code(
                    lambda k=key: list(
                        stub.Get(
                            pb.GetRequest(namespace=HELD_NS, keys=[k], layer_start=0, layer_end=4), timeout=10
                        )
                    )
                )
                assert code is C.NOT_FOUND
            for key, blobs in acked.items():
                got = list(
                    stub.Get(
                        pb.GetRequest(namespace=ACKED_NS, keys=[key], layer_start=0, layer_end=4), timeout=10
                    )
                )
                assert [r.blob for r in got] == blobs
        assert "voided 12 record(s) of 1 Put batch(es)" in server.log()
    finally:
        server.kill()
