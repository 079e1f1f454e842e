"""``concurrency`` and ``starvation``: many clients at once, and one tenant that stalls its streams."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore import integrity
from kvstore.auth import bearer_metadata
from kvstore.keys import KEY_BYTES
from kvstore.testing.reliability.calls import percentile, rpc_code
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from transfer.rpc.client import KVClient, PutItem

# ====================================================================== concurrency


def run_concurrency(
    target: str,
    clients: int,
    seconds: float,
    *,
    seed: int = 0,
    token: str | None = None,
    namespace: str = "conc/model/profile",
    layers: int = 4,
    blob_bytes: int = 16 * 1024,
    client_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``clients`` threads, each with its own KVClient: put a chunk, look it up, read it back, and
    read a chunk another client wrote; every answer is checked against the bytes put."""
    shared: dict[bytes, list[bytes]] = {}
    shared_lock = threading.Lock()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: Counter[str] = Counter()
    wrong: Counter[str] = Counter()
    ops = [0] * clients
    moved = [0] * clients
    barrier = threading.Barrier(clients + 1)
    deadline: list[float] = [0.0]

    def client(idx: int) -> None:
        rng = random.Random(seed * 1000 + idx)
        kv = KVClient(target, token=token, **(client_options or {}))
        lat = latencies[idx]
        try:
            barrier.wait()
            while time.perf_counter() < deadline[0]:
                key = rng.randbytes(KEY_BYTES)
                blobs = [integrity.seal(rng.randbytes(blob_bytes)) for _ in range(layers)]
                try:
                    t0 = time.perf_counter()
                    kv.put(namespace, [PutItem(key, i, layers, b) for i, b in enumerate(blobs)])
                    t1 = time.perf_counter()
                    present = kv.lookup(namespace, [key], layers)
                    t2 = time.perf_counter()
                    got = [b for _, part in kv.get_layers(namespace, [key], 0, layers) for b in part]
                    t3 = time.perf_counter()
                    lat += [t1 - t0, t2 - t1, t3 - t2]
                    wrong["lookup"] += int(present != 1)
                    wrong["get"] += int(got != blobs)
                    with shared_lock:
                        shared[key] = blobs
                        other = rng.choice(list(shared))
                        expected = shared[other]
                    t4 = time.perf_counter()
                    got = [b for _, part in kv.get_layers(namespace, [other], 0, layers) for b in part]
                    lat.append(time.perf_counter() - t4)
                    wrong["get_other"] += int(got != expected)
                    ops[idx] += 4
                    moved[idx] += 3 * layers * len(blobs[0])
                except Exception as exc:  # noqa: BLE001 - every failure is a figure
                    errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
        finally:
            kv.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds
    barrier.wait()
    for t in threads:
        t.join()
    all_lat = [x for lat in latencies for x in lat]
    total_ops = sum(ops)
    return {
        "clients": clients,
        "seconds": seconds,
        "ops": total_ops,
        "ops_per_s": round(total_ops / seconds, 1),
        "mb_per_s": round(sum(moved) / seconds / 1e6, 2),
        "latency_ms_p50": round(percentile(all_lat, 0.5) * 1e3, 2),
        "latency_ms_p99": round(percentile(all_lat, 0.99) * 1e3, 2),
        "errors": sum(errors.values()),
        "error_examples": dict(errors.most_common(5)),
        "wrong_answers": sum(wrong.values()),
    }


# ---------------------------------------------------------------- starvation (issue 16)


def run_starvation(
    target: str,
    observer_token: str,
    *,
    workers: int,
    tenant_limit: int,
    idle_s: float,
    probe_s: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Tenant "a" stalls 10x ``workers`` streams while tenant "b" keeps calling; what held, how fast.

    Half of a's streams are Puts that send one blob and stop (no commit), half are
    Gets never read (on connections without BDP probing, so their flow-control
    windows fill). Measured: streams the server held and refused
    (RESOURCE_EXHAUSTED past ``tenant_limit``), b's health/Lookup/Get/Put/Stats
    latency before (baseline) and during the stall, how a's streams ended and
    after how long, and whether anything of the stalled Puts was stored.
    """
    rng = random.Random(seed)
    ns_a, ns_b = "a/m/p", "b/m/p"
    md_a = bearer_metadata("tok-a")
    blob = integrity.seal(rng.randbytes(256 * 1024 - 8))
    big = [rng.randbytes(KEY_BYTES) for _ in range(64)]
    b_keys = [rng.randbytes(KEY_BYTES) for _ in range(4)]
    with KVClient(target, token="tok-a") as a, KVClient(target, token="tok-b") as b:
        a.put(ns_a, [(k, 0, 1, blob) for k in big])
        b.put(ns_b, [(k, 0, 1, integrity.seal(rng.randbytes(4088))) for k in b_keys])

    def probe(seconds: float) -> dict[str, Any]:
        lat: dict[str, list[float]] = {m: [] for m in ("health", "lookup", "get", "put", "stats")}
        failures = 0
        with grpc.insecure_channel(target) as ch, KVClient(target, token="tok-b", timeout_s=5) as kv:
            health = health_pb2_grpc.HealthStub(ch)
            calls: dict[str, Callable[[], object]] = {
                "health": lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5),
                "lookup": lambda: kv.lookup(ns_b, b_keys, 1),
                "get": lambda: list(kv.get_layers(ns_b, b_keys, 0, 1)),
                "put": lambda: kv.put(ns_b, [(rng.randbytes(KEY_BYTES), 0, 1, integrity.seal(b"x" * 1000))]),
                "stats": lambda: kv.stats(),
            }
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for name, call in calls.items():
                    t0 = time.perf_counter()
                    try:
                        call()
                    except Exception:  # noqa: BLE001 - counted, the probe goes on
                        failures += 1
                    lat[name].append(time.perf_counter() - t0)
        every = [x for v in lat.values() for x in v]
        return {
            "calls": len(every),
            "failures": failures,
            "latency_ms_p50": round(percentile(every, 0.5) * 1e3, 2),
            "latency_ms_p99": round(percentile(every, 0.99) * 1e3, 2),
            "latency_ms_max": round(max(every) * 1e3, 2),
            "max_ms_by_call": {k: round(max(v) * 1e3, 2) for k, v in lat.items() if v},
            "over_1s": sum(x > 1.0 for x in every),
        }

    baseline = probe(probe_s)
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.http2.bdp_probe", 0)]
    channels = [grpc.insecure_channel(target, options=options) for _ in range(4)]
    stubs = [pb_grpc.KVStoreStub(c) for c in channels]
    release = threading.Event()
    stalled_keys: list[bytes] = []

    def stalled_put(key: bytes) -> Iterator[pb.PutRequest]:
        yield pb.PutRequest(namespace=ns_a, key=key, layer=0, num_layers=1, blob=blob)
        release.wait(idle_s * 4 + 60)

    attempted = 10 * workers
    puts, gets = [], []
    end_s: list[float] = []  # seconds from opening each stalled Put to its end (refused ones: ~0)
    try:
        for i in range(attempted):
            stub = stubs[i % len(stubs)]
            if i % 2 == 0:
                key = rng.randbytes(KEY_BYTES)
                stalled_keys.append(key)
                future = stub.Put.future(stalled_put(key), metadata=md_a)
                opened = time.monotonic()
                future.add_done_callback(lambda _f, opened=opened: end_s.append(time.monotonic() - opened))
                puts.append(future)
            else:
                gets.append(
                    stub.Get(
                        pb.GetRequest(
                            namespace=ns_a, keys=big, layer_start=0, layer_end=1, pack_bytes=1 << 20
                        ),
                        metadata=md_a,
                    )
                )
        time.sleep(0.5)
        with grpc.insecure_channel(target) as ch:
            held = (
                pb_grpc.KVStoreStub(ch)
                .Stats(pb.StatsRequest(), timeout=5, metadata=bearer_metadata(observer_token))
                .counters["streams_open"]
            )
        during = probe(probe_s)
        ends: Counter[str] = Counter()
        for f in puts:
            code, _, _ = rpc_code(_waiter(f, idle_s * 4 + 30))
            ends[code.name] += 1
        time.sleep(idle_s)
        for call in gets:
            code, _, _ = rpc_code(_drainer(call))
            ends[code.name] += 1
    finally:
        release.set()
        for call in gets:
            call.cancel()
        for c in channels:
            c.close()
    with KVClient(target, token="tok-a") as a:
        partial = sum(a.lookup(ns_a, [k], 1) for k in stalled_keys)
    return {
        "workers": workers,
        "streams_attempted": attempted,
        "tenant_limit": tenant_limit,
        "streams_held": held,
        "stalled_ends_by_code": dict(ends),
        "refused_resource_exhausted": ends.get("RESOURCE_EXHAUSTED", 0),
        "stalled_put_end_s_max": round(max(end_s), 2) if end_s else None,
        "idle_timeout_s": idle_s,
        "partial_puts_stored": partial,
        "baseline_other_tenant": baseline,
        "during_stall_other_tenant": during,
    }


def _waiter(future: Any, timeout_s: float) -> Callable[[], object]:
    return lambda: future.result(timeout=timeout_s)


def _drainer(stream: Any) -> Callable[[], object]:
    return lambda: sum(1 for _ in stream)
