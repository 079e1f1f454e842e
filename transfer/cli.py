"""``kvstore stats``: a running server's (or every replica's) tiers and counters, read as a client.

The ``kvstore`` command (kvstore/cli.py) names this module in its table of commands
implemented outside the server package (``EXTERNAL_COMMANDS``) and imports it only
when ``stats`` is run, so the server side never imports the client. One server is
asked directly; a member list or a ``dns:///`` name is resolved with the cluster
client's own grammar (:func:`transfer.replicas.client.make_membership`) and every replica is
asked in parallel, then totalled with :func:`transfer.replicas.stats.merge_stats`, the rule the
cluster clients' ``stats()`` use.

Exit codes: 0 answered (for a cluster: at least one replica), 1 no answer, 2 a bad
member list (usage errors: argparse's 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc
from transfer.replicas.stats import merge_stats
from transfer.rpc.core import ClientCore, StoreStats

DEFAULT_TARGET = "127.0.0.1:50051"

_STATS_EPILOG = """\
examples:
  kvstore stats                                  the server on 127.0.0.1:50051
  kvstore stats --target 10.0.0.5:50051 --json   machine-readable, for scripts
  kvstore stats --token "$KVSTORE_TOKEN"         when the server has auth.tokens configured
  kvstore stats --target a:50051,b:50051         every replica of a cluster, then the totals
  kvstore stats --target dns:///kvstore-headless:50051   the replicas behind a headless Service
"""


def build_stats_parser() -> argparse.ArgumentParser:
    stats = argparse.ArgumentParser(
        prog="kvstore stats",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_STATS_EPILOG,
        description="Ask a running server for its Stats.",
    )
    stats.add_argument(
        "--target",
        default=None,
        help=f"HOST:PORT of the server, or HOST:PORT,HOST:PORT,... / "
        f"dns:///NAME:PORT for every replica and totals (default $KVSTORE_TARGET or {DEFAULT_TARGET})",
    )
    stats.add_argument("--token", default=None, help="bearer token (default $KVSTORE_TOKEN)")
    stats.add_argument("--tls-ca", metavar="FILE", help="CA certificate of a TLS server")
    stats.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (5)")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return stats


def _ask(target: str, token: str | None, tls_ca: str | None, timeout: float) -> kvstore_pb2.StatsResponse:
    """One Stats call on its own channel (a CLI asks once; no retries, no pooling)."""
    channel = (
        grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()))
        if tls_ca
        else grpc.insecure_channel(target)
    )
    with channel:
        stub = kvstore_pb2_grpc.KVStoreStub(channel)
        metadata = [("authorization", f"Bearer {token}")] if token else None
        response: kvstore_pb2.StatsResponse = stub.Stats(
            kvstore_pb2.StatsRequest(), timeout=timeout, metadata=metadata
        )
        return response


def _as_dict(response: kvstore_pb2.StatsResponse, target: str) -> dict[str, Any]:
    """What ``--json`` prints for one server: every field of the answer, 64-bit counts as numbers."""
    data: dict[str, Any] = MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for tier in data.get("tiers", []):
        for k, v in tier.items():
            if isinstance(v, str) and v.isdigit():
                tier[k] = int(v)
    data["counters"] = {k: int(v) for k, v in sorted(data.get("counters", {}).items())}
    data["target"] = target
    return data


def fetch_stats(
    target: str, token: str | None = None, tls_ca: str | None = None, timeout: float = 5.0
) -> dict[str, Any]:
    """Stats of the server at ``target`` as a plain dict (what ``--json`` prints)."""
    return _as_dict(_ask(target, token, tls_ca, timeout), target)


def cluster_stats(
    members: Sequence[str], token: str | None = None, tls_ca: str | None = None, timeout: float = 5.0
) -> dict[str, Any]:
    """Every replica's stats (or its error) and the totals (:func:`transfer.replicas.stats.merge_stats`)."""

    def one(member: str) -> tuple[dict[str, Any], StoreStats | None]:
        try:
            response = _ask(member, token, tls_ca, timeout)
        except grpc.RpcError as exc:
            return {"target": member, "error": f"{exc.code().name}: {exc.details()}"}, None
        return _as_dict(response, member), ClientCore.stats_result(response)

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(members)))) as pool:
        answers = list(pool.map(one, members))
    replicas = [data for data, _ in answers]
    merged = merge_stats(s for _, s in answers if s is not None)
    # Each total tier lists its figures in the order the first replica with that tier prints them.
    order = {t["name"]: list(t) for r in reversed(replicas) for t in r.get("tiers", [])}
    tiers = []
    for t in merged.tiers:
        figures = asdict(t)
        tiers.append({k: figures[k] for k in order[t.name]})
    totals = {
        "target": f"{len(members)} replicas, {sum(s is not None for _, s in answers)} answered",
        "version": merged.version,
        "tiers": tiers,
        "counters": dict(sorted(merged.counters.items())),
    }
    return {"replicas": replicas, "totals": totals}


def format_bytes(n: float) -> str:
    """Human-readable binary size: the server's ``kvstore.config.format_bytes``, which the client
    does not import (tests/unit/test_stats.py checks that the two agree)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_stats(data: dict[str, Any]) -> str:
    """A table a person can read at a glance."""
    lines = [f"kvstore {data.get('version', '?')} at {data['target']}", ""]
    header = (
        "tier",
        "bytes",
        "capacity",
        "objects",
        "hits",
        "misses",
        "hit%",
        "evict",
        "errors",
        "corrupt",
        "ok",
    )
    rows = [header]
    for t in data.get("tiers", []):
        lookups = t["hits"] + t["misses"]
        rows.append(
            (
                t["name"],
                format_bytes(t["bytes"]),
                format_bytes(t["capacity_bytes"]) if t["capacity_bytes"] else "unbounded",
                str(t["objects"]),
                str(t["hits"]),
                str(t["misses"]),
                f"{100 * t['hits'] / lookups:.1f}" if lookups else "-",
                str(t["evictions"]),
                str(t["errors"]),
                str(t["integrity_failures"]),
                "yes" if t["healthy"] else "NO",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    if data.get("counters"):
        lines += ["", "counters:"]
        width = max(len(k) for k in data["counters"])
        lines += [f"  {k.ljust(width)}  {v}" for k, v in data["counters"].items()]
    return "\n".join(lines)


def format_cluster_stats(data: dict[str, Any]) -> str:
    parts = [
        format_stats(r) if "error" not in r else f"kvstore at {r['target']}: {r['error']}"
        for r in data["replicas"]
    ]
    return "\n\n".join([*parts, "totals: " + format_stats(data["totals"])])


def stats_main(argv: Sequence[str]) -> int:
    """``kvstore stats ARGV``: print one server's or every replica's stats; the exit code."""
    args = build_stats_parser().parse_args(list(argv))
    target = args.target or os.environ.get("KVSTORE_TARGET") or DEFAULT_TARGET
    token = args.token or os.environ.get("KVSTORE_TOKEN")
    if "," in target or target.startswith("dns:"):  # a member list or a headless Service: every replica
        from transfer.replicas.client import make_membership
        from transfer.replicas.membership import MembershipError

        try:
            membership = make_membership(target)
        except MembershipError as exc:
            print(f"kvstore stats: {exc}", file=sys.stderr)
            return 2
        membership.close()
        data = cluster_stats(membership.view().members, token, args.tls_ca, args.timeout)
        data["target"] = target
        print(json.dumps(data, indent=2) if args.json else format_cluster_stats(data))
        return 0 if any("error" not in r for r in data["replicas"]) else 1
    try:
        data = fetch_stats(target, token, args.tls_ca, args.timeout)
    except grpc.RpcError as exc:
        print(f"kvstore stats: {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else format_stats(data))
    return 0
