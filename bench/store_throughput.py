"""Put/Get throughput of a real kvstore server over loopback gRPC, next to raw TCP.

What it answers: how close does the store come to what the loopback link itself
can move? In the same run it measures

* ``tcp``: raw loopback TCP (``sendall``/``recv_into`` between this process and a
  child process), the ceiling for any protocol on this machine;
* ``grpc``: Put and Get of 64 KiB, 1 MiB and 4 MiB blobs against ``kvstore serve``
  running as a separate process (so client and server do not share a GIL), with
  several parallel streams, for each tier asked for: Put of new keys, Get, then
  Put of the same keys again ("rewrite": memory reused, as in a tier at its budget).
  The memory tier has a 1 GiB budget, prefaulted (``--memory-prefault``, as the
  Helm chart runs it; ``--no-prefault`` to compare). For tiers behind RAM (disk,
  redis, s3) the server's RAM tier is shrunk to 1 byte so every Get really reads
  that tier;
* ``direct`` (redis, s3 only): redis-py SET/GET and boto3 put/get of the same
  blobs, the cost of the medium without kvstore in between.

Prints one JSON document, then a one-line summary. ``--quick`` finishes in well
under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kvstore import integrity
from kvstore.allocator import tune_allocator
from kvstore.config import MiB, format_bytes
from kvstore.testing import bench_args as ba
from transfer.rpc.client import KVClient

ROOT = Path(__file__).resolve().parent.parent

SIZES = {"64KiB": 64 * 1024, "1MiB": MiB, "4MiB": 4 * MiB}
TIERS = ("memory", "disk", "redis", "s3")
NUM_LAYERS = 8
HUGEPAGES = "glibc.malloc.hugetlb=1"
NAMESPACE = "bench/throughput/raw"


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3) if seconds > 0 else 0.0


def run_parallel(num: int, fn: Callable[[int], None]) -> float:
    """Run fn(0..num-1) on threads; return the wall time of the slowest."""
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            fn(i)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(num)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


# ---------------------------------------------------------------- raw TCP baseline

_SINK = r"""
import socket, sys, threading
mode, total, streams = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(streams)
print(srv.getsockname()[1], flush=True)
def serve(conn):
    share = total // streams
    if mode == "in":
        buf = bytearray(4 << 20); view = memoryview(buf); got = 0
        while got < share:
            n = conn.recv_into(view)
            if not n: break
            got += n
        conn.sendall(b"k")
    else:
        blob = b"x" * (4 << 20); sent = 0
        while sent < share:
            n = min(len(blob), share - sent); conn.sendall(memoryview(blob)[:n]); sent += n
    conn.close()
threads = []
for _ in range(streams):
    c, _a = srv.accept(); t = threading.Thread(target=serve, args=(c,)); t.start(); threads.append(t)
for t in threads: t.join()
"""


def tcp_baseline(total: int, streams: int) -> dict[str, float]:
    """GB/s of raw loopback TCP, client -> child ('put') and child -> client ('get')."""
    out: dict[str, float] = {}
    for mode, label in (("in", "put_gbps"), ("out", "get_gbps")):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SINK, mode, str(total), str(streams)], stdout=subprocess.PIPE, text=True
        )
        try:
            port = int(proc.stdout.readline())  # type: ignore[union-attr]
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
            share = total // streams
            payload = memoryview(b"y" * (4 << 20))

            def one(
                i: int,
                socks: list[socket.socket] = socks,
                mode: str = mode,
                share: int = share,
                blob: memoryview = payload,
            ) -> None:
                s = socks[i]
                if mode == "in":
                    sent = 0
                    while sent < share:
                        n = min(len(blob), share - sent)
                        s.sendall(blob[:n])
                        sent += n
                    s.recv(1)
                else:
                    buf = memoryview(bytearray(4 << 20))
                    got = 0
                    while got < share:
                        n = s.recv_into(buf)
                        if not n:
                            break
                        got += n
                s.close()

            out[label] = gbps(share * streams, run_parallel(streams, one))
        finally:
            proc.wait(timeout=30)
    return out


# ---------------------------------------------------------------- kvstore server


@contextlib.contextmanager
def kvstore_server(args: list[str], extra_env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """``python -m kvstore serve ARGS`` on a free port; yields its target and pid."""
    with tempfile.TemporaryDirectory(prefix="kvbench-") as tmp:
        ready = Path(tmp) / "ready.json"
        env = dict(
            os.environ,
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            **(extra_env or {}),
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvstore",
                "serve",
                "--port",
                "0",
                "--log-level",
                "WARNING",
                "--ready-file",
                str(ready),
                "--grace",
                "1",
                *args,
            ],
            env=env,
            cwd=str(ROOT),
        )
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"kvstore serve exited with {proc.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError("kvstore serve did not become ready in 60 s")
                time.sleep(0.05)
            info = json.loads(ready.read_text())
            yield info["target"], int(info["pid"])
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def grpc_row(target: str, pid: int, size: int, total: int, streams: int, reps: int) -> dict[str, float]:
    """Put then Get ``total`` bytes of ``size``-byte blobs over ``streams`` parallel RPCs."""
    blob = integrity.seal(os.urandom(size - integrity.TRAILER_BYTES))
    num_blobs = max(streams * NUM_LAYERS, total // size)
    num_chunks = max(streams, num_blobs // NUM_LAYERS)
    keys = [os.urandom(32) for _ in range(num_chunks)]
    per_stream = [keys[i::streams] for i in range(streams)]
    clients = [KVClient(target, max_message_bytes=80 * MiB) for _ in range(streams)]
    moved = num_chunks * NUM_LAYERS * size

    def put(i: int) -> None:
        # The real client: trailers checked, Put streams of put_batch_bytes, blobs by kvstore.wire.
        clients[i].put(
            NAMESPACE, ((k, layer, NUM_LAYERS, blob) for k in per_stream[i] for layer in range(NUM_LAYERS))
        )

    def get(i: int) -> None:
        n = 0
        for _layer, blobs in clients[i].get_layers(NAMESPACE, per_stream[i], 0, NUM_LAYERS):
            n += sum(len(b) for b in blobs)
        if n != len(per_stream[i]) * NUM_LAYERS * size:
            raise RuntimeError(f"Get returned {n} bytes, expected {len(per_stream[i]) * NUM_LAYERS * size}")

    try:
        cpu0, client0 = cpu_seconds(pid), time.process_time()
        put_s = run_parallel(streams, put)
        cpu1, client1 = cpu_seconds(pid), time.process_time()
        get_times = []
        for _ in range(reps):
            get_times.append(run_parallel(streams, get))
        cpu2, client2 = cpu_seconds(pid), time.process_time()
        get_s = min(get_times)
        # The same keys again: the tier already holds this much, so memory is reused rather than
        # grown (new pages cost a fault and a clear each), as in a RAM tier at its budget evicting LRU.
        rewrite_s = run_parallel(streams, put)
        cpu3 = cpu_seconds(pid)
        clients[0].delete(NAMESPACE, keys, num_layers=NUM_LAYERS)
    finally:
        for c in clients:
            c.close()
    gb = moved / 1e9
    # CPU seconds per GB moved: robust on a shared, loaded machine where wall-clock GB/s is not.
    return {
        "put_gbps": gbps(moved, put_s),
        "get_gbps": gbps(moved, get_s),
        "put_rewrite_gbps": gbps(moved, rewrite_s),
        "bytes": moved,
        "server_cpu_s_per_gb_put": round((cpu1 - cpu0) / gb, 3),
        "server_cpu_s_per_gb_put_rewrite": round((cpu3 - cpu2) / gb, 3),
        "server_cpu_s_per_gb_get": round((cpu2 - cpu1) / gb / reps, 3),
        "client_cpu_s_per_gb_put": round((client1 - client0) / gb, 3),
        "client_cpu_s_per_gb_get": round((client2 - client1) / gb / reps, 3),
    }


def direct_redis_row(url: str, size: int, total: int, streams: int) -> dict[str, float]:
    import redis

    blob = os.urandom(size)
    n = max(streams, total // size)
    client = redis.Redis.from_url(url, max_connections=streams * 2)
    names = [f"direct:{i}" for i in range(n)]
    put_s = run_parallel(streams, lambda i: [client.set(k, blob) for k in names[i::streams]])
    get_s = run_parallel(streams, lambda i: [client.get(k) for k in names[i::streams]])
    rewrite_s = run_parallel(streams, lambda i: [client.set(k, blob) for k in names[i::streams]])
    client.delete(*names)
    client.close()
    return {
        "put_gbps": gbps(n * size, put_s),
        "get_gbps": gbps(n * size, get_s),
        "put_rewrite_gbps": gbps(n * size, rewrite_s),
        "bytes": n * size,
    }


def direct_s3_row(endpoint: str, size: int, total: int, streams: int) -> dict[str, float]:
    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=Config(max_pool_connections=streams * 2),
    )
    bucket = "kvbench-direct"
    with contextlib.suppress(Exception):
        s3.create_bucket(Bucket=bucket)
    blob = os.urandom(size)
    n = max(streams, total // size)
    names = [f"direct/{i}" for i in range(n)]
    put_s = run_parallel(
        streams, lambda i: [s3.put_object(Bucket=bucket, Key=k, Body=blob) for k in names[i::streams]]
    )
    get_s = run_parallel(
        streams, lambda i: [s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in names[i::streams]]
    )
    rewrite_s = run_parallel(
        streams, lambda i: [s3.put_object(Bucket=bucket, Key=k, Body=blob) for k in names[i::streams]]
    )
    return {
        "put_gbps": gbps(n * size, put_s),
        "get_gbps": gbps(n * size, get_s),
        "put_rewrite_gbps": gbps(n * size, rewrite_s),
        "bytes": n * size,
    }


def server_args(tier: str, tmp: str, services: dict[str, object], prefault: bool = True) -> list[str]:
    if tier == "memory":
        return ["--no-disk", "--memory-bytes", "1GiB", *(["--memory-prefault"] if prefault else [])]
    behind_ram = ["--memory-bytes", "1"]  # every Get must reach the tier under test
    if tier == "disk":
        return [*behind_ram, "--disk-path", str(Path(tmp) / "disk"), "--fsync", "never"]
    if tier == "redis":
        return [*behind_ram, "--no-disk", "--redis-url", services["redis"].url]  # type: ignore[attr-defined]
    if tier == "s3":
        return [
            *behind_ram,
            "--no-disk",
            "--s3-endpoint",
            services["s3"].endpoint_url,  # type: ignore[attr-defined]
            "--s3-bucket",
            "kvbench",
        ]
    raise ValueError(f"unknown tier {tier!r} (memory, disk, redis, s3)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="reduced sizes; finishes in well under a minute")
    parser.add_argument(
        "--tiers",
        type=ba.names(TIERS, "tier"),
        default="memory,disk",
        help="comma list of memory,disk,redis,s3",
    )
    parser.add_argument(
        "--streams", type=ba.positive_int, default=4, help="parallel RPCs (and TCP connections)"
    )
    parser.add_argument(
        "--total",
        type=ba.byte_size,
        default=None,
        help="bytes moved per size and tier (default 512MiB, quick 96MiB)",
    )
    parser.add_argument(
        "--sizes",
        type=ba.names(SIZES, "size"),
        default=",".join(SIZES),
        help="comma list of " + ",".join(SIZES),
    )
    parser.add_argument(
        "--no-prefault",
        action="store_true",
        help="memory tier without --memory-prefault (its RAM then grows page by page)",
    )
    parser.add_argument(
        "--hugepages",
        action="store_true",
        help=f"start the server with GLIBC_TUNABLES={HUGEPAGES} (transparent huge pages for "
        "its heap; see docs/operations.md)",
    )
    args = parser.parse_args(argv)

    # The server tunes its allocator at start-up; this process (store client and direct baselines
    # alike) gets the same settings, as a worker would (kvstore/allocator.py).
    tuned = tune_allocator()

    total = args.total if args.total else (96 * MiB if args.quick else 512 * MiB)
    reps = 1 if args.quick else 3
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    sizes = {name: SIZES[name] for name in args.sizes.split(",")}
    result: dict[str, object] = {
        "benchmark": "store_throughput",
        "quick": args.quick,
        "streams": args.streams,
        "bytes_per_row": total,
        "cpus": os.cpu_count(),
        "client_allocator_tuned": tuned,
        "server_hugepages": args.hugepages,
        "memory_prefault": not args.no_prefault,
        "tcp": tcp_baseline(total, args.streams),
        "grpc": {},
        "direct": {},
    }
    with contextlib.ExitStack() as stack:
        services: dict[str, object] = {}
        if "redis" in tiers or "s3" in tiers:
            from kvstore.testing.services import RedisProcess, S3Process

            if "redis" in tiers:
                services["redis"] = stack.enter_context(RedisProcess())
            if "s3" in tiers:
                services["s3"] = stack.enter_context(S3Process())
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="kvbench-"))
        for tier in tiers:
            tier_total = total if tier in ("memory", "disk") else min(total, 64 * MiB)
            # moto accepts any credentials; the server reads them from its config (here: env).
            creds = {"KVSTORE_S3__ACCESS_KEY_ID": "bench", "KVSTORE_S3__SECRET_ACCESS_KEY": "bench"}
            env = dict(
                creds if tier == "s3" else {}, **({"GLIBC_TUNABLES": HUGEPAGES} if args.hugepages else {})
            )
            with kvstore_server(server_args(tier, tmp, services, not args.no_prefault), env) as (target, pid):
                rows = {
                    name: grpc_row(target, pid, size, tier_total, args.streams, reps)
                    for name, size in sizes.items()
                }
            result["grpc"][tier] = rows  # type: ignore[index]
            if tier in ("redis", "s3"):
                # The same transfers straight to the medium, no kvstore in between: the baseline.
                row, address = (
                    (direct_redis_row, services["redis"].url)
                    if tier == "redis"
                    else (direct_s3_row, services["s3"].endpoint_url)
                )
                result["direct"][tier] = {  # type: ignore[index]
                    n: row(address, s, tier_total, args.streams)  # type: ignore[arg-type]
                    for n, s in sizes.items()
                }
    print(json.dumps(result, indent=2))
    tcp = result["tcp"]
    parts = [f"tcp put {tcp['put_gbps']} / get {tcp['get_gbps']} GB/s"]  # type: ignore[index]
    for tier, rows in result["grpc"].items():  # type: ignore[union-attr]
        cells = ", ".join(
            f"{n} {r['put_gbps']}/{r['get_gbps']}/{r['put_rewrite_gbps']}" for n, r in rows.items()
        )
        parts.append(f"{tier} put/get/rewrite GB/s: {cells}")
        direct = result["direct"].get(tier)  # type: ignore[union-attr]
        if direct:
            parts.append(
                f"direct {tier}: "
                + ", ".join(
                    f"{n} {r['put_gbps']}/{r['get_gbps']}/{r['put_rewrite_gbps']}" for n, r in direct.items()
                )
            )
    print(f"store_throughput ({args.streams} streams, {format_bytes(total)} per row): " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
