"""Hit rate, balance and Lookup latency of one keyspace over N replicas vs per-connection balancing.

Workload (shared prefixes, chunked as the store does with :func:`kvstore.keys.chunk_keys`):
``--systems`` system prompts of ``--system-chunks`` chunks, each followed by
``--users`` user suffixes of ``--user-chunks`` chunks, in a seeded random order.
Every request goes through a prefill worker (Lookup, then Put of the chunks it
did not find, ``--layers`` sealed blobs of ``--blob-bytes`` per chunk) and then a
decode worker (Lookup of the whole prompt: the handoff). ``--workers`` workers
(8), each with its own client, play both roles; request ``i`` uses
prefill worker ``i mod W`` and decode worker ``(i + 1) mod W``.

For N = 1..``--max-replicas`` fresh ``kvstore serve`` child processes (RAM tier),
two modes run side by side in the same process, same requests, same order:

* ``placement``: every worker has a :class:`transfer.replicas.client.ClusterKVClient`
  over all N members (rendezvous per chunk, ``--replication`` copies, capped at N);
* ``pinned``: today's per-connection balancing: each worker's plain
  :class:`transfer.rpc.client.KVClient` is pinned to one replica chosen at random.

Reported per (N, mode): chunk hit rate (found / looked up, prefill and decode
lookups together, and each alone), bytes each replica holds (server's own
Stats, max/mean), Lookup latency p50/p99 as the worker sees it (the workload's
lookups plus ``--lookup-repeats`` passes of timed Lookups over every request,
the arms interleaved call by call so they share the machine's background load).
Blob contents do not matter to placement, so no model runs.

Goals (placement): hit rate at N=4 within 2 points of N=1; max/mean bytes per
replica <= 1.25 at every N; Lookup p99 at N=4 <= 2x N=1 (the N=1 baseline is a
plain KVClient on one server, i.e. today's client). Prints one JSON document,
then a one-line summary. ``--quick`` uses fewer users per system prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvstore import integrity
from kvstore.keys import chunk_keys
from kvstore.testing.store import ServerProcess, start_server_process
from transfer.replicas.client import ClusterKVClient, connect
from transfer.rpc.client import KVClient

ROOT = Path(__file__).resolve().parent.parent

NAMESPACE = "bench/cluster/lossless"
GOAL_HIT_POINTS = 2.0
GOAL_MAX_OVER_MEAN = 1.25
GOAL_P99_RATIO = 2.0
#: Each replica: RAM tier only, 8 workers, quiet logs.
SERVE_ARGS = ["--no-disk", "--memory-bytes", "512MiB", "--workers", "8", "--log-level", "WARNING"]


def build_requests(args: argparse.Namespace) -> list[list[bytes]]:
    """Chunk keys of every request: a system prompt's chunks, then the user's own."""
    rng = random.Random(args.seed)
    tokens = args.chunk_tokens
    systems = [
        [rng.randrange(49152) for _ in range(args.system_chunks * tokens)] for _ in range(args.systems)
    ]
    prompts = [
        s + [rng.randrange(49152) for _ in range(args.user_chunks * tokens)]
        for s in systems
        for _ in range(args.users)
    ]
    rng.shuffle(prompts)
    return [chunk_keys(p, NAMESPACE, tokens) for p in prompts]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Config:
    """One (N, mode) arm: its replicas, its workers' clients and what they measured."""

    def __init__(self, args: argparse.Namespace, targets: list[str], mode: str) -> None:
        rng = random.Random(args.seed + len(targets))
        self.targets, self.mode = targets, mode
        self.replication = min(args.replication, len(targets)) if mode == "placement" else 1
        self.workers: list[Any] = []
        for _ in range(args.workers):
            if mode == "placement" and len(targets) > 1:
                self.workers.append(connect(",".join(targets), replication=self.replication))
            else:  # today: one connection, to one replica (a per-connection load balancer's pick)
                self.workers.append(KVClient(rng.choice(targets)))
        self.found = {"prefill": 0, "decode": 0}
        self.asked = {"prefill": 0, "decode": 0}
        self.stored: set[bytes] = set()  # chunks some earlier request stored anywhere in this arm
        self.ideal = 0  # chunks a lookup would find if every replica saw every put
        self.handoff_new = self.handoff_found = 0
        self.latencies: list[float] = []

    def _lookup(self, client: Any, keys: list[bytes], role: str, layers: int) -> int:
        t0 = time.perf_counter()
        n = client.lookup(NAMESPACE, keys, layers)
        self.latencies.append(time.perf_counter() - t0)
        self.found[role] += n
        self.asked[role] += len(keys)
        self.ideal += next((i for i, k in enumerate(keys) if k not in self.stored), len(keys))
        return n

    def time_lookup(self, i: int, keys: list[bytes], layers: int) -> None:
        t0 = time.perf_counter()
        self.workers[i % len(self.workers)].lookup(NAMESPACE, keys, layers)
        self.latencies.append(time.perf_counter() - t0)

    def request(self, i: int, keys: list[bytes], layers: int, blob: bytes) -> None:
        """Prefill (Lookup, Put what is missing) on worker i, then decode's Lookup on worker i+1."""
        prefill, decode = self.workers[i % len(self.workers)], self.workers[(i + 1) % len(self.workers)]
        n = self._lookup(prefill, keys, "prefill", layers)
        if n < len(keys):
            prefill.put(NAMESPACE, ((k, layer, layers, blob) for k in keys[n:] for layer in range(layers)))
            self.stored.update(keys[n:])
        m = self._lookup(decode, keys, "decode", layers)
        self.handoff_new += len(keys) - n
        self.handoff_found += max(0, m - n)

    def report(self) -> dict[str, Any]:
        per_replica = []
        for target in self.targets:
            with KVClient(target) as c:
                per_replica.append(sum(t.bytes for t in c.stats().tiers if t.name == "memory"))
        mean = statistics.fmean(per_replica)
        found, asked = sum(self.found.values()), sum(self.asked.values())
        out = {
            "replicas": len(self.targets),
            "mode": self.mode,
            "replication": self.replication,
            "hit_rate": found / asked,
            "hit_rate_of_stored": found / self.ideal if self.ideal else 1.0,
            "prefill_hit_rate": self.found["prefill"] / self.asked["prefill"],
            "decode_hit_rate": self.found["decode"] / self.asked["decode"],
            "handoff_hit_rate": self.handoff_found / self.handoff_new if self.handoff_new else 1.0,
            "bytes_per_replica": per_replica,
            "bytes_total": sum(per_replica),
            "bytes_max_over_mean": max(per_replica) / mean if mean else 0.0,
            "lookup_p50_ms": 1e3 * percentile(self.latencies, 0.5),
            "lookup_p99_ms": 1e3 * percentile(self.latencies, 0.99),
            "lookups": len(self.latencies),
        }
        if isinstance(self.workers[0], ClusterKVClient):
            rpcs = sum(c["lookups"] for w in self.workers for c in w.replica_counters().values())
            out["lookup_rpcs_per_lookup"] = rpcs / len(self.latencies)
            out["worker0_replica_counters"] = self.workers[0].replica_counters()
        else:
            out["lookup_rpcs_per_lookup"] = 1.0
        return out

    def close(self) -> None:
        for w in self.workers:
            w.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", type=int, default=8, help="distinct system prompts")
    p.add_argument("--users", type=int, default=32, help="user suffixes per system prompt")
    p.add_argument("--system-chunks", type=int, default=8)
    p.add_argument("--user-chunks", type=int, default=2)
    p.add_argument("--chunk-tokens", type=int, default=128, help="tokens per chunk (as the store cuts them)")
    p.add_argument("--layers", type=int, default=4, help="blobs per chunk")
    p.add_argument("--blob-bytes", type=int, default=4096)
    p.add_argument(
        "--workers", type=int, default=8, help="workers, each with its own client (prefill and decode)"
    )
    p.add_argument("--replication", type=int, default=2)
    p.add_argument("--max-replicas", type=int, default=4)
    p.add_argument(
        "--lookup-repeats",
        type=int,
        default=4,
        help="extra passes of timed Lookups over every request after the workload (latency samples)",
    )
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="12 users per system prompt instead of 32")
    args = p.parse_args(argv)
    if args.quick:
        args.users = 12
        args.lookup_repeats = min(args.lookup_repeats, 3)
    if min(args.systems, args.users, args.system_chunks, args.layers, args.workers, args.max_replicas) < 1:
        p.error("sizes must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    requests = build_requests(args)
    blob = integrity.seal(os.urandom(args.blob_bytes))
    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-cluster-"))
    procs: list[ServerProcess] = []
    configs: list[Config] = []
    try:
        # Every arm's replicas run at once and every request goes through every arm in turn, so
        # the arms share whatever else loads the machine (the comparison is side by side).
        for n in range(1, args.max_replicas + 1):
            for mode in ("placement", "pinned"):
                started = [start_server_process(SERVE_ARGS, workdir=workdir) for _ in range(n)]
                procs += started
                configs.append(Config(args, [p.target for p in started], mode))
        for i, keys in enumerate(requests):
            for config in configs:
                config.request(i, keys, args.layers, blob)
        for _ in range(args.lookup_repeats):  # more Lookup samples, all arms interleaved, nothing stored
            for i, keys in enumerate(requests):
                for config in configs:
                    config.time_lookup(i, keys, args.layers)
        runs = [c.report() for c in configs]
    finally:
        for c in configs:
            c.close()
        for proc in procs:
            proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)

    def run(n: int, mode: str) -> dict[str, Any]:
        return next(r for r in runs if r["replicas"] == n and r["mode"] == mode)

    top = args.max_replicas
    base, place, pinned = run(1, "pinned"), run(top, "placement"), run(top, "pinned")
    points = 100 * (base["hit_rate"] - place["hit_rate"])
    worst_balance = max(r["bytes_max_over_mean"] for r in runs if r["mode"] == "placement")
    p99_ratio = place["lookup_p99_ms"] / base["lookup_p99_ms"]
    goals = {
        f"hit_rate_N{top}_within_{GOAL_HIT_POINTS}_points_of_N1": points <= GOAL_HIT_POINTS,
        f"bytes_max_over_mean_le_{GOAL_MAX_OVER_MEAN}": worst_balance <= GOAL_MAX_OVER_MEAN,
        f"lookup_p99_N{top}_le_{GOAL_P99_RATIO}x_N1": p99_ratio <= GOAL_P99_RATIO,
    }
    report = {
        "benchmark": "cluster",
        "config": {k: v for k, v in vars(args).items()},
        "requests": len(requests),
        "runs": runs,
        "comparison": {
            "hit_rate_points_lost_N1_to_Nmax_placement": points,
            "hit_rate_points_lost_N1_to_Nmax_pinned": 100 * (base["hit_rate"] - pinned["hit_rate"]),
            "handoff_hit_rate_by_N": {f"{r['mode']}_N{r['replicas']}": r["handoff_hit_rate"] for r in runs},
            "hit_rate_of_stored_by_N": {
                f"{r['mode']}_N{r['replicas']}": r["hit_rate_of_stored"] for r in runs
            },
            "bytes_max_over_mean_placement_worst": worst_balance,
            "lookup_p99_ratio_Nmax_over_N1": p99_ratio,
            "lookup_p50_ratio_Nmax_over_N1": place["lookup_p50_ms"] / base["lookup_p50_ms"],
            "lookup_rpcs_per_lookup_Nmax": place["lookup_rpcs_per_lookup"],
        },
        "goals": goals,
    }
    print(json.dumps(report, indent=2))
    print(
        f"cluster {len(requests)} requests: hit rate N=1 {100 * base['hit_rate']:.1f}% -> N={top} placement "
        f"{100 * place['hit_rate']:.1f}% ({points:+.1f} pts lost) vs per-connection "
        f"{100 * pinned['hit_rate']:.1f}% (handoff prefill->decode {100 * pinned['handoff_hit_rate']:.0f}% vs "
        f"{100 * place['handoff_hit_rate']:.0f}%); bytes max/mean <= {worst_balance:.2f}; Lookup p99 "
        f"{place['lookup_p99_ms']:.2f} ms vs {base['lookup_p99_ms']:.2f} ms = {p99_ratio:.2f}x; goals "
        f"{'met' if all(goals.values()) else 'MISSED: ' + ', '.join(k for k, v in goals.items() if not v)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
