"""Prometheus metrics of one kvstore server.

Each server owns its own ``CollectorRegistry`` so that several servers in one
process (tests, benchmarks) never mix their figures. Request metrics are bumped
by the gRPC layer; per-tier figures (hits, misses, bytes, objects, evictions,
errors, integrity failures) are read from ``TieredStore.tier_stats()`` at scrape
time by a custom collector, so the store keeps one source of truth and nothing
has to be mirrored into counters on the hot path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

#: Latency buckets from a RAM hit on loopback (~100 us) to a slow S3 read (~10 s).
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


TIER_FIELDS = (
    "bytes",
    "objects",
    "capacity_bytes",
    "hits",
    "misses",
    "evictions",
    "errors",
    "integrity_failures",
    "corrupt_records",
    "breaker_trips",
)

#: Tier counters exported as metrics only (the Stats RPC's TierStats message does not carry them).
METRIC_ONLY_FIELDS = ("write_behind_queued", "write_behind_written", "write_behind_dropped")


def tier_fields(stat: Any) -> dict[str, Any]:
    """Flatten one ``TieredStore.tier_stats()`` record (name, usage, counters, healthy)
    into ``{"name": ..., "bytes": ..., "hits": ..., "healthy": ...}``."""
    out: dict[str, Any] = {
        "name": str(stat_value(stat, "name", "?")),
        "healthy": bool(stat_value(stat, "healthy", True)),
    }
    sources = [stat, stat_value(stat, "usage", None), stat_value(stat, "counters", None)]
    for name in TIER_FIELDS:
        value = 0
        for source in sources:
            if source is not None and stat_value(source, name, None) is not None:
                value = stat_value(source, name)
                break
        out[name] = int(value)
    return out


def stat_value(stats: Any, name: str, default: Any = 0) -> Any:
    """Read one field of a stats record, whether it is an object or a mapping."""
    if isinstance(stats, dict):
        return stats.get(name, default)
    return getattr(stats, name, default)


class TierCollector(Collector):
    """Exposes ``tier_stats()`` as kvstore_tier_* metric families at scrape time."""

    _COUNTERS = (
        ("kvstore_tier_hits", "hits", "Reads served by this tier"),
        ("kvstore_tier_misses", "misses", "Reads this tier could not serve"),
        ("kvstore_tier_evictions", "evictions", "Blobs evicted from this tier to stay in budget"),
        (
            "kvstore_tier_errors",
            "errors",
            "Failures of this tier's medium (timeouts, refused connections, I/O)",
        ),
        (
            "kvstore_integrity_failures",
            "integrity_failures",
            "Blobs read from this tier that failed their checksum",
        ),
        (
            "kvstore_tier_corrupt_records",
            "corrupt_records",
            "Records a start-up recovery skipped because they failed their checks (each lost only itself)",
        ),
        (
            "kvstore_tier_breaker_trips",
            "breaker_trips",
            "Times the tier's circuit breaker opened (a failed or timed-out call; the tier is then skipped)",
        ),
        (
            "kvstore_tier_write_behind_queued",
            "write_behind_queued",
            "Blobs a write skipped this tier for (breaker open or failed call), kept to write behind",
        ),
        (
            "kvstore_tier_write_behind_written",
            "write_behind_written",
            "Kept blobs written to this tier once it answered again",
        ),
        (
            "kvstore_tier_write_behind_dropped",
            "write_behind_dropped",
            "Kept blobs dropped unwritten past the tier's write_behind_max_bytes (then in RAM only)",
        ),
    )
    _GAUGES = (
        ("kvstore_tier_bytes", "bytes", "Bytes stored in this tier"),
        ("kvstore_tier_objects", "objects", "Blobs stored in this tier"),
        ("kvstore_tier_capacity_bytes", "capacity_bytes", "Byte budget of this tier (0: unbounded)"),
        ("kvstore_tier_healthy", "healthy", "1 when the tier answers its liveness probe"),
    )

    def __init__(self, tier_stats: Callable[[], Iterable[Any]]) -> None:
        self._tier_stats = tier_stats

    def collect(self) -> Iterator[Any]:
        try:
            tiers = [
                tier_fields(t)
                | {f: int(stat_value(stat_value(t, "counters", None), f, 0)) for f in METRIC_ONLY_FIELDS}
                for t in self._tier_stats()
            ]
        except Exception:  # a scrape must never take the server down
            tiers = []
        for metric, attr, doc in self._COUNTERS:
            family = CounterMetricFamily(metric, doc, labels=["tier"])
            for t in tiers:
                family.add_metric([t["name"]], float(t[attr]))
            yield family
        for metric, attr, doc in self._GAUGES:
            family = GaugeMetricFamily(metric, doc, labels=["tier"])
            for t in tiers:
                family.add_metric([t["name"]], float(t[attr]))
            yield family


class ServerMetrics:
    """Request-level metrics plus the tier collector, in a registry of their own."""

    def __init__(self, tier_stats: Callable[[], Iterable[Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kvstore_requests",
            "RPCs handled, by method and final status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "kvstore_request_duration_seconds",
            "Wall time of an RPC, from first byte to final status",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.blob_bytes = Counter(
            "kvstore_blob_bytes",
            "Blob bytes accepted by Put (in) and streamed by Get (out)",
            ["direction"],
            registry=self.registry,
        )
        self.registry.register(TierCollector(tier_stats))
        self._http: Any = None
        self._http_thread: Any = None
        self.port: int = 0

    def observe(self, method: str, code: str, started: float) -> None:
        self.requests.labels(method=method, code=code).inc()
        self.duration.labels(method=method).observe(time.perf_counter() - started)

    def add_bytes(self, direction: str, nbytes: int) -> None:
        self.blob_bytes.labels(direction=direction).inc(nbytes)

    def render(self) -> bytes:
        """The text exposition format, as a scrape would see it."""
        return generate_latest(self.registry)

    def serve_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics on ``port`` in a daemon thread; returns the bound port."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._http.server_address[1])
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
