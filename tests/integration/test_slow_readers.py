"""Get readers that stop reading and then leave: not a server error, and their memory comes back.

A reader that stops makes the server's write wait on HTTP/2 flow control; when it
then cancels, closes its channel or dies, that write fails. This used to be
logged as ``ERROR ... Get failed unexpectedly`` with a traceback and counted
``kvstore_requests_total{code="INTERNAL"}``, so alerts on INTERNAL fired on
ordinary disconnects (issue 24, item 3). And the multi-MiB messages those streams
held stayed in the allocator's arenas after they left: RSS 800 MiB up after 100
readers had gone (item 8, bench/slow_readers_memory.py).

Real servers (in-process for the metrics and log records, a ``kvstore serve``
process for its RSS), real clients over sockets, one of them a process that is
SIGKILLed mid-stream.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvstore import integrity
from kvstore.server import ServerHandle
from kvstore.testing import slow_readers as slow
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from tests.fixtures.store import REPO_ROOT, serving, start_server_process, store_config

MiB = 1 << 20
BLOB = 1 * MiB
KEYS = 16  # a Get of 16 MiB: far more than a stalled reader's 64 KiB window lets through
READERS = 3


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerHandle]:
    with serving(store_config(tmp_path, **{"disk.enabled": False})) as handle:
        yield handle


def _requests_total(handle: ServerHandle, code: str) -> float:
    text = handle.metrics.render().decode()
    match = re.search(rf'^kvstore_requests_total{{code="{code}",method="Get"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def _killed_reader(target: str, request: pb.GetRequest) -> subprocess.Popen[str]:
    """A client process that reads one message of the Get and then stops reading (until killed)."""
    code = (
        "import sys, grpc, time\n"
        "from kvstore.testing.slow_readers import reader_options\n"
        "from kvstore.v1 import kvstore_pb2 as pb, kvstore_pb2_grpc as pb_grpc\n"
        f"channel = grpc.insecure_channel({target!r}, options=reader_options({BLOB}))\n"
        f"call = pb_grpc.KVStoreStub(channel).Get(pb.GetRequest.FromString({request.SerializeToString()!r}))\n"
        "next(call)\n"
        "print('read one', flush=True)\n"
        "time.sleep(600)  # reads nothing more: the parent SIGKILLs it\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


@pytest.mark.parametrize("how", ["cancel", "close", "killed"])
def test_a_reader_that_stalls_then_leaves_is_cancelled_not_internal(
    server: ServerHandle, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvstore.server")
    with grpc.insecure_channel(server.target) as control:
        stub = pb_grpc.KVStoreStub(control)
        request = slow.store(stub, KEYS, BLOB)
        if how == "killed":
            procs = [_killed_reader(server.target, request) for _ in range(READERS)]
            for proc in procs:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "read one"
            slow.wait_stalled(stub, READERS)
            assert slow.counters(stub)["streams_open"] == READERS
            for proc in procs:
                proc.kill()
                proc.wait(30)
            slow.wait_closed(stub)
        else:
            readers = slow.stall(server.target, stub, request, READERS, BLOB)
            assert slow.counters(stub)["streams_open"] == READERS  # every reader's Get waits on it
            slow.leave(readers, stub, how)

        deadline = time.monotonic() + 10
        while _requests_total(server, "CANCELLED") < READERS:
            assert time.monotonic() < deadline, server.metrics.render().decode()
            time.sleep(0.02)
        assert _requests_total(server, "CANCELLED") == READERS
        assert _requests_total(server, "INTERNAL") == 0
        mine = [r for r in caplog.records if r.name == "kvstore.server"]
        assert not [r for r in mine if r.levelno >= logging.WARNING], [r.getMessage() for r in mine]
        assert sum("Get cancelled" in r.getMessage() for r in mine) == READERS
        assert all(r.exc_info is None for r in mine)

        # The server keeps serving, and every stored blob is intact.
        blobs = [bytes(m.blob) for m in stub.Get(request, timeout=60)]
        assert len(blobs) == KEYS and all(len(b) == BLOB and integrity.is_intact(b) for b in blobs)
        assert _requests_total(server, "OK") == 1


def test_memory_held_for_slow_readers_is_given_back_after_they_leave(tmp_path: Path) -> None:
    blob, readers = 4 * MiB, 20
    with (
        start_server_process(["--no-disk", "--memory-bytes", str(64 * MiB)], workdir=tmp_path) as server,
        grpc.insecure_channel(server.target) as control,
    ):
        stub = pb_grpc.KVStoreStub(control)
        request = slow.store(stub, 8, blob)
        stored = slow.rss_bytes(server.proc.pid)
        waiting = slow.stall(server.target, stub, request, readers, blob)
        held = slow.rss_bytes(server.proc.pid) - stored
        assert held > readers * blob, f"the premise: stalled readers hold memory ({held / MiB:.0f} MiB)"
        slow.leave(waiting, stub)
        deadline = time.monotonic() + 15
        while (kept := slow.rss_bytes(server.proc.pid) - stored) > held // 4:
            assert time.monotonic() < deadline, (
                f"{kept / MiB:.0f} of {held / MiB:.0f} MiB held for {readers} slow readers still held "
                "after they left"
            )
            time.sleep(0.1)
        assert slow.counters(stub)["heap_trims"] == 1  # one trim for the whole burst
        with grpc.insecure_channel(server.target, options=slow.reader_options(blob)) as channel:
            got = [bytes(m.blob) for m in pb_grpc.KVStoreStub(channel).Get(request, timeout=60)]
        assert len(got) == 8 and all(integrity.is_intact(b) for b in got)
