"""What the client costs over the bare gRPC stub: Lookup and a small layer-ordered Get.

The clients run every call through :mod:`transfer.rpc.ops` (generators of effects,
carried out by a thin blocking or asyncio front-end) and add validation,
retry bookkeeping, Get assembly and the trailer check of every blob. This bench
measures that cost against the baseline of the same RPCs made with the bare
stub on the same kind of channel to the same server, the arms interleaved
call by call so they share the machine's background load:

* ``lookup``: ``--keys`` keys, all present; raw ``KVStoreStub.Lookup`` vs
  ``KVClient.lookup`` (and the asyncio pair).
* ``get``: ``--keys`` keys x ``--layers`` layers of ``--blob-bytes`` blobs,
  packed 1 MiB per message as the clients ask; raw: iterate the stream (blobs
  parsed by kvstore.wire, nothing else) vs ``KVClient.get_layers`` (assembled
  per layer, every trailer verified).

Reported per (case, arm): wall p50/p99 in microseconds and client-process CPU
microseconds per call (all threads, gRPC's included), and the client/raw
ratios. The server is a ``kvstore serve`` child process (RAM tier), so its CPU
is not counted. Prints one JSON document, then a one-line summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from kvstore import integrity
from kvstore.keys import chunk_keys
from kvstore.testing import bench_args as ba
from kvstore.testing.store import start_server_process
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire import parse_get_response
from transfer.rpc.aio_client import AsyncKVClient
from transfer.rpc.client import KVClient

NAMESPACE = "bench/client/lossless"
SERVE_ARGS = ["--no-disk", "--memory-bytes", "256MiB", "--workers", "4", "--log-level", "WARNING"]
GET_METHOD = "/kvstore.v1.KVStore/Get"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(wall: list[float], cpu_s: float) -> dict[str, float]:
    return {
        "p50_us": round(pct(wall, 0.5) * 1e6, 1),
        "p99_us": round(pct(wall, 0.99) * 1e6, 1),
        "cpu_us_per_call": round(cpu_s / len(wall) * 1e6, 1),
    }


def interleave(arms: dict[str, Callable[[], Any]], calls: int, warmup: int) -> dict[str, dict[str, float]]:
    """Each arm called ``calls`` times, arms alternating call by call; CPU time attributed per call."""
    for _ in range(warmup):
        for fn in arms.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in arms}
    cpu: dict[str, float] = dict.fromkeys(arms, 0.0)
    for _ in range(calls):
        for name, fn in arms.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name] += time.process_time() - c0
    return {name: summarize(wall[name], cpu[name]) for name in arms}


def ratios(result: dict[str, dict[str, float]], arm: str, base: str) -> dict[str, float]:
    return {
        f"{k}_ratio": round(result[arm][k] / result[base][k], 2) if result[base][k] else 0.0
        for k in result[arm]
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    server = start_server_process(SERVE_ARGS)
    try:
        target = server.target
        keys = chunk_keys(list(range(args.keys * 16)), NAMESPACE, 16)
        blob = integrity.seal(bytes(args.blob_bytes))
        with KVClient(target) as client:
            client.put(
                NAMESPACE, [(k, layer, args.layers, blob) for k in keys for layer in range(args.layers)]
            )
            channel = grpc.insecure_channel(target)
            stub = pb_grpc.KVStoreStub(channel)
            raw_get = channel.unary_stream(
                GET_METHOD,
                request_serializer=pb.GetRequest.SerializeToString,
                response_deserializer=parse_get_response,
            )
            lookup_req = pb.LookupRequest(namespace=NAMESPACE, keys=keys, num_layers=args.layers)
            get_req = pb.GetRequest(
                namespace=NAMESPACE, keys=keys, layer_start=0, layer_end=args.layers, pack_bytes=1 << 20
            )

            def raw_lookup() -> None:
                assert stub.Lookup(lookup_req, timeout=10).num_present == len(keys)

            def client_lookup() -> None:
                assert client.lookup(NAMESPACE, keys, args.layers) == len(keys)

            def raw_get_all() -> None:
                n = sum(len(m.blobs) or 1 for m in raw_get(get_req, timeout=10))
                assert n == len(keys) * args.layers

            def client_get_all() -> None:
                n = sum(len(blobs) for _, blobs in client.get_layers(NAMESPACE, keys, 0, args.layers))
                assert n == len(keys) * args.layers

            out: dict[str, Any] = {
                "lookup": interleave({"raw": raw_lookup, "client": client_lookup}, args.calls, args.warmup),
                "get": interleave(
                    {"raw": raw_get_all, "client": client_get_all}, args.calls // 4, args.warmup
                ),
            }
            channel.close()
        out["lookup_async"] = asyncio.run(async_lookup(target, keys, args))
        for case in out.values():
            case["ratios"] = ratios(case, "client", "raw")
        return out
    finally:
        server.stop()


async def async_lookup(target: str, keys: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    request = pb.LookupRequest(namespace=NAMESPACE, keys=keys, num_layers=args.layers)
    async with grpc.aio.insecure_channel(target) as channel, AsyncKVClient(target) as client:
        stub = pb_grpc.KVStoreStub(channel)
        arms = {
            "raw": lambda: stub.Lookup(request, timeout=10),
            "client": lambda: client.lookup(NAMESPACE, keys, args.layers),
        }
        for _ in range(args.warmup):
            for fn in arms.values():
                await fn()
        wall: dict[str, list[float]] = {name: [] for name in arms}
        cpu: dict[str, float] = dict.fromkeys(arms, 0.0)
        for _ in range(args.calls):
            for name, fn in arms.items():
                c0, t0 = time.process_time(), time.perf_counter()
                await fn()
                wall[name].append(time.perf_counter() - t0)
                cpu[name] += time.process_time() - c0
        return {name: summarize(wall[name], cpu[name]) for name in arms}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=ba.positive_int, default=16, help="keys per Lookup and Get")
    p.add_argument("--layers", type=ba.positive_int, default=8)
    p.add_argument("--blob-bytes", type=ba.byte_size, default=4096)
    p.add_argument("--calls", type=ba.positive_int, default=2000, help="timed calls per arm (Get: a quarter)")
    p.add_argument("--warmup", type=ba.non_negative_int, default=50)
    p.add_argument("--quick", action="store_true", help="500 calls per arm")
    args = p.parse_args(argv)
    if args.quick:
        args.calls = 500
    result = run(args)
    print(json.dumps(result, indent=2))
    parts = [
        f"{case}: client/raw p50 {r['ratios']['p50_us_ratio']}x, CPU {r['ratios']['cpu_us_per_call_ratio']}x "
        f"({r['client']['cpu_us_per_call']} vs {r['raw']['cpu_us_per_call']} us)"
        for case, r in result.items()
    ]
    print("client overhead: " + "; ".join(parts))


if __name__ == "__main__":
    main()
