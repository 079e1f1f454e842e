"""``crash``, ``backend_kill`` and ``backend_freeze``: a server or a tier taken away under load.

A SIGKILLed server restarted on its disk directory must lose no acknowledged blob;
Redis and S3 killed or frozen (SIGSTOP) under load must cost misses (UNAVAILABLE while a tier
that may hold a key is away, NOT_FOUND once every tier answers), never wrong bytes or a hung
server, and the tiers must serve again once they are back.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from kvstore import integrity
from kvstore.backends.base import BlobKey
from kvstore.keys import KEY_BYTES
from kvstore.testing.reliability.calls import C, committed, percentile, rpc_code
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

# ====================================================================== crash + restart


def _put_chunk(
    stub: Any, namespace: str, key: bytes, blobs: Sequence[bytes], timeout_s: float = 10.0
) -> None:
    stub.Put(
        committed(
            [
                pb.PutRequest(namespace=namespace, key=key, layer=i, num_layers=len(blobs), blob=b)
                for i, b in enumerate(blobs)
            ]
        ),
        timeout=timeout_s,
    )


def run_crash_restart(
    start: Callable[[], Any],
    rounds: int,
    *,
    seed: int = 0,
    writers: int = 2,
    layers: int = 4,
    blob_bytes: int = 4096,
    kill_after_s: tuple[float, float] = (0.3, 0.8),
    namespace: str = "crash/model/profile",
) -> dict[str, Any]:
    """``start()`` returns a fresh ServerProcess on the same disk dir each time.

    Writers put chunks (and delete some) until the server is SIGKILLed at a random
    moment; after each restart every acknowledged chunk must read back intact and
    every acknowledged delete must stay deleted.
    """
    rng = random.Random(seed)
    acked: dict[bytes, list[bytes]] = {}
    deleted: set[bytes] = set()
    lock = threading.Lock()
    figures: Counter[str] = Counter()
    restart_s: list[float] = []
    server = start()
    try:
        for _ in range(rounds):
            stop = threading.Event()

            def writer(wseed: int, target: str = server.target, stop: threading.Event = stop) -> None:
                wrng = random.Random(wseed)
                with grpc.insecure_channel(target) as channel:
                    stub = pb_grpc.KVStoreStub(channel)
                    while not stop.is_set():
                        key = wrng.randbytes(KEY_BYTES)
                        blobs = [integrity.seal(wrng.randbytes(blob_bytes)) for _ in range(layers)]
                        try:
                            _put_chunk(stub, namespace, key, blobs, 5.0)
                        except grpc.RpcError:
                            figures["puts_cut_by_crash"] += 1
                            continue
                        with lock:
                            acked[key] = blobs
                        figures["puts_acked"] += 1
                        if wrng.random() < 0.1:
                            # Out of ``acked`` before the call: a delete cut off by the crash
                            # may or may not have happened, so that chunk is checked for neither.
                            with lock:
                                victim = wrng.choice(list(acked))
                                acked.pop(victim)
                            try:
                                stub.Delete(pb.DeleteRequest(namespace=namespace, keys=[victim]), timeout=5.0)
                            except grpc.RpcError:
                                continue
                            with lock:
                                deleted.add(victim)
                            figures["deletes_acked"] += 1

            threads = [threading.Thread(target=writer, args=(rng.random(),)) for _ in range(writers)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(*kill_after_s))  # the crash comes at a random moment under load
            server.kill()
            stop.set()
            for t in threads:
                t.join()
            t0 = time.perf_counter()
            server = start()
            restart_s.append(time.perf_counter() - t0)
            lost, corrupt, resurrected = _verify(server.target, namespace, acked, deleted, layers)
            figures["acked_blocks_lost"] += lost
            figures["acked_blocks_corrupt"] += corrupt
            figures["deleted_resurrected"] += resurrected
            figures["kills"] += 1
    finally:
        server.kill()
    return {
        **dict(figures),
        "acked_chunks_checked": len(acked),
        "acked_blocks_checked": len(acked) * layers,
        "restart_s_p50": round(percentile(restart_s, 0.5), 2),
        "restart_s_max": round(max(restart_s, default=0.0), 2),
    }


def _verify(
    target: str, namespace: str, acked: dict[bytes, list[bytes]], deleted: set[bytes], layers: int
) -> tuple[int, int, int]:
    lost = corrupt = resurrected = 0
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        for key, blobs in acked.items():
            code, _, got = rpc_code(
                lambda k=key: list(
                    stub.Get(
                        pb.GetRequest(namespace=namespace, keys=[k], layer_start=0, layer_end=layers),
                        timeout=30,
                    )
                )
            )
            if code is not C.OK:
                lost += layers if code is C.NOT_FOUND else 0
                corrupt += layers if code is not C.NOT_FOUND else 0
                continue
            for resp in got:
                corrupt += int(resp.blob != blobs[resp.layer])
            lost += layers - len(got)
        for key in deleted:
            resp = stub.Lookup(pb.LookupRequest(namespace=namespace, keys=[key], num_layers=1), timeout=30)
            resurrected += resp.num_present
    return lost, corrupt, resurrected


# ====================================================================== backend kill under load


def run_backend_kill(
    target: str,
    store: Any,
    redis_proc: Any,
    s3_proc: Any,
    seconds: float,
    *,
    clients: int = 4,
    seed: int = 0,
    namespace: str = "kill/model/profile",
    blob_bytes: int = 4096,
) -> dict[str, Any]:
    """Clients read and write while Redis, then S3, are SIGKILLed and restarted (empty).

    Allowed answers: Put OK; Lookup OK; Get OK with the exact bytes put, NOT_FOUND (every tier
    answered; e.g. a key that only the restarted, empty server held) or UNAVAILABLE (a tier that
    may hold the key could not be read: retryable). Anything else (wrong bytes, INTERNAL, an
    UNAVAILABLE Put...) is a violation.
    """
    rng = random.Random(seed)
    truth: dict[bytes, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    answers: Counter[str] = Counter()
    violations: Counter[str] = Counter()

    def worker(idx: int) -> None:
        wrng = random.Random(seed * 100 + idx)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.KVStoreStub(channel)
            while not stop.is_set():
                if wrng.random() < 0.4 or not truth:
                    key, blob = wrng.randbytes(KEY_BYTES), integrity.seal(wrng.randbytes(blob_bytes))
                    code, details, _ = rpc_code(
                        lambda k=key, b=blob: stub.Put(
                            committed(
                                [pb.PutRequest(namespace=namespace, key=k, layer=0, num_layers=1, blob=b)]
                            ),
                            timeout=10,
                        )
                    )
                    answers[f"put_{code.name}"] += 1
                    if code is C.OK:
                        with lock:
                            truth[key] = blob
                    else:
                        violations[f"put {code.name}: {details[:100]}"] += 1
                    continue
                with lock:
                    key = wrng.choice(list(truth))
                code, details, got = rpc_code(
                    lambda k=key: list(
                        stub.Get(
                            pb.GetRequest(namespace=namespace, keys=[k], layer_start=0, layer_end=1),
                            timeout=10,
                        )
                    )
                )
                answers[f"get_{code.name}"] += 1
                if code is C.OK:
                    if len(got) != 1 or got[0].blob != truth[key]:
                        violations["get served wrong bytes"] += 1
                elif code not in (C.NOT_FOUND, C.UNAVAILABLE):  # UNAVAILABLE: a tier was skipped
                    violations[f"get {code.name}: {details[:100]}"] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    events: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    try:
        step = seconds / 6
        for proc, name in ((redis_proc, "redis"), (s3_proc, "s3")):
            time.sleep(step * rng.uniform(0.8, 1.2))
            proc.kill()
            events.append((round(time.perf_counter() - t0, 2), f"{name} killed"))
            time.sleep(step * rng.uniform(0.8, 1.2))
            proc.restart()
            events.append((round(time.perf_counter() - t0, 2), f"{name} restarted"))
        time.sleep(max(0.0, seconds - (time.perf_counter() - t0)))
    finally:
        stop.set()
        for t in threads:
            t.join()
    # After the restarts, each tier takes writes and serves reads again.
    recovered = _tiers_recovered(target, store, namespace)
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "answers": dict(answers),
        "violations": sum(violations.values()),
        "violation_examples": dict(violations.most_common(5)),
        "events": events,
        "tiers_recovered": recovered,
    }


def _tiers_recovered(target: str, store: Any, namespace: str, deadline_s: float = 15.0) -> dict[str, bool]:
    """Put fresh blobs until each persistent tier holds one (breakers close after their reset time)."""
    names = [t.name for t in store.tiers if t.persistent]
    ok = dict.fromkeys(names, False)
    end = time.monotonic() + deadline_s
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        while not all(ok.values()) and time.monotonic() < end:
            key = os.urandom(KEY_BYTES)
            blob = integrity.seal(os.urandom(256))
            with contextlib.suppress(grpc.RpcError):
                stub.Put(
                    committed(
                        [pb.PutRequest(namespace=namespace, key=key, layer=0, num_layers=1, blob=blob)]
                    ),
                    timeout=10,
                )
            for name in names:
                with contextlib.suppress(Exception):
                    ok[name] = ok[name] or store.tier(name).get(BlobKey(namespace, key, 0)) == blob
            time.sleep(0.1)  # paced retries, bounded by the deadline
    return ok


# ====================================================================== backend freeze under load


def _wait_breaker_closed(store: Any, name: str, deadline_s: float = 15.0) -> float | None:
    """Seconds until tier ``name``'s breaker closes (and Stats calls it healthy), None past the deadline."""
    t0 = time.monotonic()
    tier = store.tier(name)
    while time.monotonic() - t0 < deadline_s:
        breaker = getattr(tier, "breaker", None)
        if (breaker is None or breaker.state == "closed") and all(
            s.healthy for s in store.tier_stats() if s.name == name
        ):
            return round(time.monotonic() - t0, 3)
        time.sleep(0.02)
    return None


def run_backend_freeze(
    target: str,
    store: Any,
    procs: dict[str, Any],
    freeze_s: float,
    *,
    clients: int = 4,
    seed: int = 0,
    namespace: str = "freeze/model/profile",
    blob_bytes: int = 4096,
    warmup_s: float = 1.0,
) -> dict[str, Any]:
    """Clients Put, Get and Lookup while each remote tier in ``procs`` is frozen (SIGSTOP) in turn.

    A frozen server accepts connections and never answers, so only the time budget and the
    circuit breaker keep RPCs short. Per freeze it reports the latency of every RPC that
    overlapped the freeze (p50/p99/max vs the tier's budget), the answers (allowed: Put OK;
    Lookup OK; Get OK with the exact bytes put, NOT_FOUND, or UNAVAILABLE when a tier that may
    hold the key could not be read), the breaker trips, how long the
    breaker took to close after SIGCONT, and whether the tier takes writes again.
    ``procs`` maps a tier name to its server process, whose pause()/resume() send the signals:
    only pass servers this run started.
    """
    truth: dict[bytes, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    records: list[tuple[float, float, str]] = []  # (start, end, answer)
    violations: Counter[str] = Counter()

    def worker(idx: int) -> None:
        wrng = random.Random(seed * 100 + idx)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.KVStoreStub(channel)
            while not stop.is_set():
                roll = wrng.random()
                t0 = time.monotonic()
                if roll < 0.35 or not truth:
                    key, blob = wrng.randbytes(KEY_BYTES), integrity.seal(wrng.randbytes(blob_bytes))
                    code, details, _ = rpc_code(
                        lambda k=key, b=blob: stub.Put(
                            committed(
                                [pb.PutRequest(namespace=namespace, key=k, layer=0, num_layers=1, blob=b)]
                            ),
                            timeout=10,
                        )
                    )
                    answer = f"put_{code.name}"
                    if code is C.OK:
                        with lock:
                            truth[key] = blob
                    else:
                        violations[f"put {code.name}: {details[:100]}"] += 1
                elif roll < 0.5:
                    with lock:
                        keys = wrng.sample(list(truth), min(4, len(truth)))
                    code, details, _ = rpc_code(
                        lambda k=keys: stub.Lookup(
                            pb.LookupRequest(namespace=namespace, keys=k, num_layers=1), timeout=10
                        )
                    )
                    answer = f"lookup_{code.name}"
                    if code is not C.OK:
                        violations[f"lookup {code.name}: {details[:100]}"] += 1
                else:
                    with lock:
                        key = wrng.choice(list(truth))
                    code, details, got = rpc_code(
                        lambda k=key: list(
                            stub.Get(
                                pb.GetRequest(namespace=namespace, keys=[k], layer_start=0, layer_end=1),
                                timeout=10,
                            )
                        )
                    )
                    answer = f"get_{code.name}"
                    if code is C.OK:
                        if len(got) != 1 or got[0].blob != truth[key]:
                            violations["get served wrong bytes"] += 1
                    elif code not in (C.NOT_FOUND, C.UNAVAILABLE):  # UNAVAILABLE: a tier was skipped
                        violations[f"get {code.name}: {details[:100]}"] += 1
                with lock:
                    records.append((t0, time.monotonic(), answer))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    freezes: dict[str, dict[str, Any]] = {}
    try:
        for name, proc in procs.items():
            tier = store.tier(name)
            warm_from = time.monotonic()
            time.sleep(warmup_s)
            with lock:
                before = [end - start for start, end, _ in records if start >= warm_from]
            trips_before = tier.breaker.num_trips
            errors_before = tier.counters.errors
            frozen_at = time.monotonic()
            proc.pause()
            try:
                time.sleep(freeze_s)
            finally:
                proc.resume()
            resumed_at = time.monotonic()
            closed_after = _wait_breaker_closed(store, name)
            with lock:
                window = [
                    (end - start, answer)
                    for start, end, answer in records
                    if end >= frozen_at and start <= resumed_at
                ]
            latencies = [lat for lat, _ in window]
            budget = float(getattr(tier, "budget_s", 0.0))
            freezes[name] = {
                "frozen_s": round(resumed_at - frozen_at, 2),
                "budget_s": budget,
                "rpcs": len(window),
                "answers": dict(Counter(answer for _, answer in window)),
                "latency_ms_p50": round(percentile(latencies, 0.50) * 1000, 1),
                "latency_ms_p99": round(percentile(latencies, 0.99) * 1000, 1),
                "latency_ms_max": round(max(latencies, default=0.0) * 1000, 1),
                "rpcs_over_budget": sum(1 for lat in latencies if lat > budget),
                # Same run, same load, the second before the freeze: the baseline.
                "unfrozen_latency_ms_p50": round(percentile(before, 0.50) * 1000, 1),
                "unfrozen_latency_ms_p99": round(percentile(before, 0.99) * 1000, 1),
                "breaker_trips": tier.breaker.num_trips - trips_before,
                "tier_errors": tier.counters.errors - errors_before,
                "breaker_closed_after_resume_s": closed_after,
            }
    finally:
        stop.set()
        for t in threads:
            t.join()
    recovered = _tiers_recovered(target, store, namespace)
    for name in freezes:
        freezes[name]["used_again"] = recovered.get(name, False)
    return {
        "freezes": freezes,
        "answers": dict(Counter(answer for _, _, answer in records)),
        "violations": sum(violations.values()),
        "violation_examples": dict(violations.most_common(5)),
    }
