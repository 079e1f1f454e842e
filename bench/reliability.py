"""Reliability of a real kvstore server under faults, fuzzing and load.

Each workload is a function of kvstore/testing/reliability/ (raw gRPC) or, when it
drives the client, of transfer/testing/, shared with the test suite
(tests/integration/test_fuzz.py, test_bitflips.py, test_crash_restart.py,
test_concurrency.py, test_backend_kill_under_load.py run the same code at a small
size), so the figures below and the assertions of the suite measure the same
thing; this file sizes them, runs them and prints the results:

* ``fuzz``: malformed and oversize requests (bad namespaces, keys, layer numbers,
  blobs, foreign tenants, bad tokens, oversize messages, random and mutated raw
  bytes sent through a generic channel) against ``kvstore serve`` as a child
  process. Counted: crashes, statuses outside the precise set each case allows
  (UNKNOWN/INTERNAL are never allowed). Baseline: valid requests before and after.
* ``bitflips``: bit flips at random positions in blobs stored in every tier (RAM
  internals, disk segment bytes, Redis ``SETRANGE``, S3 object rewrite), then a
  gRPC Get. Counted: corrupt blocks served (must be 0), repaired reads (an intact
  copy in a lower tier was served), reads lost (DATA_LOSS / NOT_FOUND).
  Baseline: the same reads with no flips.
* ``crash``: Puts acknowledged by a child server with the disk tier, SIGKILL
  mid-load, restart on the same directory: acknowledged blocks lost (must be 0)
  and deleted blocks resurrected, per fsync policy.
* ``concurrency``: N clients (transfer.rpc.client.KVClient) putting and reading back
  for S seconds: errors, wrong bytes, throughput and p50/p99 latency; baseline 1
  client.
* ``starvation``: one tenant stalls 10x the worker count of streams (Puts that
  stop sending, Gets never read) while another keeps calling: streams held and
  refused, the other tenant's latency and failures against its own baseline
  before the stall, how the stalled streams ended, partial Puts stored (must be 0).
* ``backend_kill``: Redis and S3 killed and restarted while clients read and
  write through a server with a tiny RAM tier: answers that are neither correct
  bytes nor a miss (must be 0), server health, tiers serving again afterwards.
* ``replica_repair``: three RAM-only replicas, R=2, cluster clients reading and
  writing; one replica SIGKILLed, down a few seconds, back empty on its port.
  Counted (blocking and asyncio clients, one run each): caller errors and wrong
  bytes (must be 0), prefixes a fresh client looks up short per pass (must be 0),
  seconds from the return until every acknowledged prefix looks up whole and
  until every chunk is on its R owners again, bytes the repairs copied against
  the bytes the replica was owed.

Prints one JSON document, then a one-line summary. ``--quick`` runs everything
reduced in under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvstore.testing.reliability import (
    Limits,
    TierCorruptor,
    fuzz_server_args,
    roundtrip_ok,
    run_backend_freeze,
    run_backend_kill,
    run_bitflips,
    run_crash_restart,
    run_disk_flips,
    run_fuzz,
)
from kvstore.testing.store import REMOTE_READS, serving, start_server_process, store_config
from transfer.testing import run_concurrency, run_replica_repair, run_starvation

if TYPE_CHECKING:
    from kvstore.server import ServerHandle
    from kvstore.testing.services import RedisProcess, S3Process

# ====================================================================== main


def _bench_fuzz(n: int, seed: int) -> dict[str, Any]:
    limits = Limits()
    with tempfile.TemporaryDirectory(prefix="kvstore-fuzz-") as tmp:
        server = start_server_process(fuzz_server_args(Path(tmp), limits, "fuzz-token", "fuzz"), workdir=tmp)
        try:
            return run_fuzz(
                server.target,
                n,
                seed=seed,
                token="fuzz-token",
                limits=limits,
                alive=lambda: server.proc.poll() is None,
            )
        finally:
            server.kill()


def _bench_crash(rounds: int, seed: int) -> dict[str, Any]:
    out = {}
    for fsync in ("always", "batch"):
        with tempfile.TemporaryDirectory(prefix="kvstore-crash-") as tmp:
            args = ["--disk-path", str(Path(tmp) / "disk"), "--fsync", fsync, "--log-level", "WARNING"]
            out[fsync] = run_crash_restart(
                lambda a=args, w=tmp: start_server_process(a, workdir=w), rounds, seed=seed
            )
    return out


def _in_process_server(tmp: Path, **overrides: Any) -> contextlib.AbstractContextManager[ServerHandle]:
    """The tests' server config (RAM + disk under ``tmp``) with 32 workers, for the load."""
    return serving(store_config(tmp, **{"server.workers": 32, **overrides}))


def _bench_bitflips(flips: int, seed: int, r: RedisProcess, s3: S3Process) -> dict[str, Any]:
    """Two servers: RAM+disk+Redis takes most flips (fast); all four tiers with S3 drawn most
    often takes a tenth (each S3 flip costs ~7 requests to moto)."""
    import redis

    out: dict[str, Any] = {}
    phases = [
        ("ram_disk_redis", flips - flips // 10, False, None),
        ("all_four_tiers", flips // 10, True, {"memory": 0.3, "disk": 0.3, "redis": 0.3, "s3": 1.0}),
    ]
    for name, count, with_s3, weights in phases:
        with tempfile.TemporaryDirectory(prefix="kvstore-flips-") as tmp:
            overrides: dict[str, Any] = {
                "redis.enabled": True,
                "redis.url": r.url,
                "redis.key_prefix": f"{name}:",
            }
            if with_s3:
                overrides.update(s3.tier_config(name))
            with _in_process_server(Path(tmp), **overrides) as handle:
                corruptor = TierCorruptor(
                    handle.store, redis.Redis.from_url(r.url), s3.client() if with_s3 else None
                )
                t0 = time.perf_counter()
                report = run_bitflips(
                    handle.target, handle.store, corruptor, count, seed=seed, tier_weights=weights
                ).as_dict()
                report["seconds"] = round(time.perf_counter() - t0, 1)
                out[name] = report
    total: dict[str, Any] = {}
    for key in (
        "flips",
        "reads",
        "corrupt_served",
        "repaired",
        "lost",
        "unrepaired_with_intact_copy",
        "baseline_reads",
        "baseline_wrong",
    ):
        total[key] = sum(phase[key] for phase in out.values())
    tiers: Counter[str] = Counter()
    for phase in out.values():
        tiers.update(phase["flips_by_tier"])
    total["flips_by_tier"] = dict(tiers)
    return {**total, "phases": out}


def _bench_concurrency(clients: int, seconds: float, seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvstore-conc-") as tmp:
        server = start_server_process(
            [
                "--disk-path",
                str(Path(tmp) / "disk"),
                "--fsync",
                "never",
                "--workers",
                str(max(16, clients)),
                "--log-level",
                "WARNING",
            ],
            workdir=tmp,
        )
        try:
            baseline = run_concurrency(server.target, 1, min(seconds, 10.0), seed=seed)
            loaded = run_concurrency(server.target, clients, seconds, seed=seed + 1)
            loaded["server_alive"] = server.proc.poll() is None
            return {"baseline_1_client": baseline, "loaded": loaded}
        finally:
            server.kill()


def _bench_backend_kill(seconds: float, seed: int, r: RedisProcess, s3: S3Process) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvstore-kill-") as tmp:
        overrides = {
            **REMOTE_READS,
            "redis.enabled": True,
            "redis.url": r.url,
            "redis.socket_timeout_s": 0.5,
            **s3.tier_config("kill"),
            "s3.timeout_s": 1.0,
        }
        with _in_process_server(Path(tmp), **overrides) as handle:
            out = run_backend_kill(handle.target, handle.store, r, s3, seconds, seed=seed)
            out["server_healthy"] = roundtrip_ok(handle.target, "kill/model/profile", None)
            return out


def _legacy_store(r: RedisProcess, s3: S3Process, name: str) -> Any:
    """The tiers as they were before budgets: 1 s Redis and 5 s S3 timeouts (connect and read), retry
    deadline 2 x timeout, and the caller-probe breaker that opens after 3 failures in a row."""
    from kvstore.backends.breaker import CircuitBreaker
    from kvstore.backends.memory import MemoryBackend
    from kvstore.backends.redis import RedisBackend
    from kvstore.backends.tiered import TieredStore

    tiers = [
        MemoryBackend(max_bytes=64 * 1024),
        RedisBackend(
            url=r.url,
            key_prefix=f"{name}:",
            socket_timeout_s=1.0,
            connect_timeout_s=1.0,
            budget_s=4.0,
            breaker=CircuitBreaker("redis", 3, 1.0),
        ),
        s3.backend(
            name, timeout_s=5.0, connect_timeout_s=5.0, budget_s=20.0, breaker=CircuitBreaker("s3", 3, 1.0)
        ),
    ]
    return TieredStore(tiers, write_through=["redis", "s3"])


def _bench_backend_freeze(
    seconds: float, seed: int, r: RedisProcess, s3: S3Process, legacy: bool = False
) -> dict[str, Any]:
    """Default budgets (``redis.budget_s``/``s3.budget_s`` 0: connect + read + margin, 0.5 s); with
    ``legacy`` the same load against the pre-budget settings, as the baseline."""
    from kvstore.config import load_config

    with tempfile.TemporaryDirectory(prefix="kvstore-freeze-") as tmp:
        name = "freeze-legacy" if legacy else "freeze"
        if legacy:
            config = load_config(
                None, environ={}, overrides={"server.port": 0, "server.workers": 32, "disk.enabled": False}
            )
            server = serving(config, store=_legacy_store(r, s3, name))
        else:
            overrides = {
                **REMOTE_READS,
                "redis.enabled": True,
                "redis.url": r.url,
                "redis.key_prefix": f"{name}:",
                **s3.tier_config(name),
            }
            server = _in_process_server(Path(tmp), **overrides)
        with server as handle:
            out = run_backend_freeze(handle.target, handle.store, {"redis": r, "s3": s3}, seconds, seed=seed)
            out["server_healthy"] = roundtrip_ok(handle.target, "freeze/model/profile", None)
            return out


def _bench_replica_repair(quick: bool, seed: int) -> dict[str, Any]:
    sizes = (
        {"prefixes": 24, "down_s": 2.5}
        if quick
        else {"prefixes": 200, "down_s": 5.0, "blob_bytes": 4096, "readers": 3, "writers": 2}
    )
    out: dict[str, Any] = {}
    for aio in (False, True):
        with tempfile.TemporaryDirectory(prefix="kvstore-repair-") as tmp:
            args = ["--no-disk", "--memory-bytes", "256MiB", "--log-level", "ERROR", "--workers", "8"]

            def start(port: int, args: list[str] = args, tmp: str = tmp) -> Any:
                return start_server_process([*args, "--port", str(port)], workdir=tmp)

            out["asyncio" if aio else "blocking"] = run_replica_repair(start, aio=aio, seed=seed, **sizes)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes, under a minute")
    parser.add_argument(
        "--only",
        default="fuzz,bitflips,disk_flips,crash,concurrency,starvation,backend_freeze,"
        "backend_freeze_legacy,backend_kill,replica_repair",
        help="comma-separated subset of workloads",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    q = args.quick
    sizes = {
        "fuzz": 1000 if q else 10_000,
        "flips": 400 if q else 10_000,
        "crash_rounds": 1 if q else 10,
        "clients": 16 if q else 64,
        "conc_s": 3.0 if q else 60.0,
        "kill_s": 5.0 if q else 30.0,
        "disk_flips": 36 if q else 360,
        "freeze_s": 3.0 if q else 10.0,
    }
    wanted = set(args.only.split(","))
    results: dict[str, Any] = {"quick": q, "sizes": sizes}
    logging.basicConfig(level=logging.ERROR)  # the faults below make the server warn, by design
    with contextlib.ExitStack() as stack:
        services: list[Any] = []
        if wanted & {
            "bitflips",
            "backend_kill",
            "backend_freeze",
            "backend_freeze_legacy",
        }:  # one Redis and one S3 for both (moto starts slowly)
            from kvstore.testing.services import RedisProcess, S3Process

            services = [stack.enter_context(RedisProcess()), stack.enter_context(S3Process())]
        runners: dict[str, Callable[[], dict[str, Any]]] = {
            "fuzz": lambda: _bench_fuzz(sizes["fuzz"], args.seed),
            "bitflips": lambda: _bench_bitflips(sizes["flips"], args.seed, *services),
            "crash": lambda: _bench_crash(sizes["crash_rounds"], args.seed),
            "concurrency": lambda: _bench_concurrency(sizes["clients"], sizes["conc_s"], args.seed),
            "disk_flips": lambda: run_disk_flips(sizes["disk_flips"], seed=args.seed),
            # SIGSTOP/SIGCONT of the Redis and S3 started above (never any other process).
            "backend_freeze": lambda: _bench_backend_freeze(sizes["freeze_s"], args.seed, *services),
            "backend_freeze_legacy": lambda: _bench_backend_freeze(
                sizes["freeze_s"], args.seed, *services, legacy=True
            ),
            "starvation": lambda: _bench_starvation(q, args.seed),
            "replica_repair": lambda: _bench_replica_repair(q, args.seed),
            # Last: it kills and restarts the shared Redis and S3 (they come back empty).
            "backend_kill": lambda: _bench_backend_kill(sizes["kill_s"], args.seed, *services),
        }
        for name, run in runners.items():
            if name in wanted:
                t0 = time.perf_counter()
                results[name] = run()
                results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(results, indent=2, default=str))
    print(summary(results))
    return 0


def summary(r: dict[str, Any]) -> str:
    parts = []
    if "fuzz" in r:
        f = r["fuzz"]
        parts.append(f"fuzz {f['requests']} reqs: {f['violations']} imprecise, crashed={f['crashed']}")
    if "bitflips" in r:
        b = r["bitflips"]
        parts.append(f"bitflips {b['flips']}: {b['corrupt_served']} corrupt served, {b['repaired']} repaired")
    if "crash" in r:
        parts.append(
            "crash: "
            + ", ".join(
                f"fsync={k} {v.get('acked_blocks_lost', 0)} lost of {v['acked_blocks_checked']}"
                for k, v in r["crash"].items()
                if isinstance(v, dict)
            )
        )
    if "concurrency" in r:
        c = r["concurrency"]["loaded"]
        b = r["concurrency"]["baseline_1_client"]
        parts.append(
            f"{c['clients']} clients: {c['errors']} errors, {c['ops_per_s']} ops/s "
            f"(1 client {b['ops_per_s']}), p99 {c['latency_ms_p99']} ms"
        )
    if "disk_flips" in r:
        d = r["disk_flips"]
        parts.append(
            f"disk flips {d['flips']}: {d['other_records_lost_total']} other records lost "
            f"(max {d['other_records_lost_max_per_flip']}/flip), {d['wrong_bytes_served']} wrong served"
        )
    if "backend_freeze" in r:
        fr = r["backend_freeze"]["freezes"]
        parts.append(
            "freeze: "
            + ", ".join(
                f"{n} max {f['latency_ms_max']} ms / p99 {f['latency_ms_p99']} ms vs budget {f['budget_s']:.2f} s, "
                f"back in {f['breaker_closed_after_resume_s']} s"
                for n, f in fr.items()
            )
            + f", {r['backend_freeze']['violations']} bad answers"
        )
    if "backend_freeze_legacy" in r:
        fr = r["backend_freeze_legacy"]["freezes"]
        parts.append(
            "pre-budget settings: "
            + ", ".join(
                f"{n} max {f['latency_ms_max']} ms / p99 {f['latency_ms_p99']} ms" for n, f in fr.items()
            )
            + f", {r['backend_freeze_legacy']['violations']} bad answers"
        )
    if "backend_kill" in r:
        k = r["backend_kill"]
        back = ",".join(name for name, ok in k["tiers_recovered"].items() if ok) or "none"
        parts.append(f"redis+s3 kill: {k['violations']} bad answers, tiers back: {back}")
    if "starvation" in r:
        st = r["starvation"]
        d = st["during_stall_other_tenant"]
        parts.append(
            f"starvation {st['streams_attempted']} stalled streams ({st['streams_held']} held, "
            f"{st['refused_resource_exhausted']} refused): other tenant p99 {d['latency_ms_p99']} ms, "
            f"max {d['latency_ms_max']} ms, {d['failures']} failures, "
            f"{st['partial_puts_stored']} partial Puts stored"
        )
    if "replica_repair" in r:
        parts.append(
            "replica back empty: "
            + ", ".join(
                f"{name} {v['caller_errors']} errors, {v['wrong_blobs']} wrong, "
                f"{v['fresh_client_short_per_pass'][:1]} short on the first fresh pass, "
                f"whole lookups after {v['lookup_whole_after_return_s']} s, "
                f"R copies after {v['copies_whole_after_return_s']} s, "
                f"{v['bytes_repaired']} B copied for {v['bytes_owed']} B owed"
                for name, v in r["replica_repair"].items()
                if isinstance(v, dict)
            )
        )
    return "reliability: " + "; ".join(parts)


def _bench_starvation(quick: bool, seed: int) -> dict[str, Any]:
    workers = 4 if quick else 16
    idle_s = 2.0 if quick else 5.0
    tenant_limit = 5 * workers
    with tempfile.TemporaryDirectory(prefix="kvstore-starve-") as tmp:
        overrides = {
            "server.workers": workers,
            "auth.tokens": {"tok-a": "a", "tok-b": "b"},
            "server.max_streams_per_tenant": tenant_limit,
            "server.max_streams_per_peer": 10 * workers,
            "server.stream_idle_timeout_s": idle_s,
        }
        with _in_process_server(Path(tmp), **overrides) as handle:
            return run_starvation(
                handle.target,
                "tok-b",
                workers=workers,
                tenant_limit=tenant_limit,
                idle_s=idle_s,
                probe_s=2.0 if quick else 10.0,
                seed=seed,
            )


if __name__ == "__main__":
    raise SystemExit(main())
