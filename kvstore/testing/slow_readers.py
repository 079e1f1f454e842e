"""Slow Get readers against a real server: open them, stall them, make them leave.

Shared by tests/integration/test_slow_readers.py and bench/slow_readers_memory.py.
A slow reader is a Get stream whose client reads one message and then stops:
with BDP probing off its HTTP/2 window stays at gRPC's 64 KiB, as on a slow link,
so the server's next write waits on flow control (with probing on, a loopback
client soaks a whole 128 MiB Get into its own buffers unread). :func:`stall`
returns once every stream is open on the server and the server has stopped
reading blobs for them; :func:`leave` cancels each call (or closes its channel)
and returns once the server has closed every stream.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from kvstore.testing.store import committed, make_blob
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

NS = "slow/m/p"


def reader_options(blob_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", blob_bytes + (1 << 20)), ("grpc.http2.bdp_probe", 0)]


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def counters(stub: pb_grpc.KVStoreStub) -> dict[str, int]:
    return dict(stub.Stats(pb.StatsRequest(), timeout=10).counters)


def store(stub: pb_grpc.KVStoreStub, num_keys: int, blob_bytes: int) -> pb.GetRequest:
    """Store ``num_keys`` one-layer chunks of one sealed blob each; return a Get of all of them."""
    keys = [os.urandom(32) for _ in range(num_keys)]
    for key in keys:
        item = pb.PutRequest(namespace=NS, key=key, layer=0, num_layers=1, blob=make_blob(blob_bytes - 8))
        stub.Put(committed([item]), timeout=60)
    return pb.GetRequest(namespace=NS, keys=keys, layer_start=0, layer_end=1)


@dataclass
class Reader:
    channel: grpc.Channel
    call: Any  # the Get call: a grpc.Call and an iterator of GetResponse
    first: pb.GetResponse


def stall(
    target: str, stub: pb_grpc.KVStoreStub, request: pb.GetRequest, num: int, blob_bytes: int
) -> list[Reader]:
    """Open ``num`` Get streams that read one message each and stop; return once the server waits on them."""
    readers = []
    for _ in range(num):
        channel = grpc.insecure_channel(target, options=reader_options(blob_bytes))
        call = pb_grpc.KVStoreStub(channel).Get(request, timeout=300)
        readers.append(Reader(channel, call, next(call)))
    wait_stalled(stub, num)
    return readers


def wait_stalled(stub: pb_grpc.KVStoreStub, num: int, deadline_s: float = 120.0) -> None:
    """Return once ``num`` streams are open on the server and it has stopped reading blobs for them."""
    deadline, last = time.monotonic() + deadline_s, -1
    while True:
        now = counters(stub)
        if now.get("bytes_served", 0) == last and now["streams_open"] >= num:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{num} readers did not stall: {now}")
        last = now.get("bytes_served", 0)
        time.sleep(0.25)


def leave(readers: list[Reader], stub: pb_grpc.KVStoreStub, how: str = "cancel") -> None:
    """``how``: "cancel" each call, or "close" its channel (the client goes away); wait for the server."""
    for reader in readers:
        if how == "cancel":
            reader.call.cancel()
        reader.channel.close()
    wait_closed(stub)


def wait_closed(stub: pb_grpc.KVStoreStub, deadline_s: float = 60.0) -> None:
    """Return once the server has no stream open."""
    deadline = time.monotonic() + deadline_s
    while counters(stub)["streams_open"]:
        if time.monotonic() > deadline:
            raise TimeoutError("the server still holds streams of readers that left")
        time.sleep(0.05)
