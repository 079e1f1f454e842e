"""The connector's figures: process-wide totals, vLLM's per-interval stats, Prometheus metrics.

A hit is counted when its load *succeeded* (``loaded_tokens``): what the scheduler
promised at lookup time is ``offered_tokens``, and a failed load is taken back
(``untrue_hits``), so neither our metrics nor vLLM's say a recompute was a hit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig


class _Totals:
    """Process-wide cumulative counters of every connector instance (both roles).

    vLLM's own route for connector figures is :class:`KVStoreConnectorStats`
    (worker -> scheduler -> stat loggers -> Prometheus); these totals are what
    a process can read about itself (tests, benchmarks, debugging).
    """

    FIELDS = (
        "lookups",
        "lookup_errors",
        "offered_tokens",  # promised by the scheduler; a hit only once loaded_tokens says so
        "untrue_hits",  # requests whose promised tokens failed to load (taken back from vLLM's stats)
        "loads",
        "async_loads",
        "load_errors",
        "loaded_tokens",
        "loaded_bytes",
        "layer_waits",
        "layer_wait_s",
        "saves",
        "save_errors",
        "saved_tokens",
        "saved_bytes",
        "corrupt_deleted",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = dict.fromkeys(self.FIELDS, 0)
        self.last_layer_waits: dict[int, float] = {}

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._values[name] += delta

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self._values)
            out["last_layer_waits"] = dict(self.last_layer_waits)
            return out


TOTALS = _Totals()


@dataclass
class KVStoreConnectorStats(KVConnectorStats):
    """Figures of one interval, sent from the workers to vLLM's stat loggers."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data: dict[str, Any] = {
            "loaded_tokens": 0,
            "loaded_bytes": 0,
            "load_errors": 0,
            "saved_tokens": 0,
            "saved_bytes": 0,
            "save_errors": 0,
            "layer_wait_s": [],
        }

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            if isinstance(value, list):
                self.data.setdefault(name, []).extend(value)
            else:
                self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        waits = self.data.get("layer_wait_s", [])
        out = {k: v for k, v in self.data.items() if not isinstance(v, list)}
        out["layer_waits"] = len(waits)
        out["layer_wait_avg_ms"] = round(1e3 * sum(waits) / len(waits), 3) if waits else 0.0
        out["layer_wait_max_ms"] = round(1e3 * max(waits), 3) if waits else 0.0
        return out

    def is_empty(self) -> bool:
        return not self.data.get("layer_wait_s") and not any(
            v for v in self.data.values() if not isinstance(v, list)
        )


class KVStorePromMetrics(KVConnectorPromMetrics):
    """The connector's Prometheus metrics, registered by vLLM next to its own."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counters = {
            "loaded_tokens": "Prompt tokens whose KV was loaded from kvstore instead of computed.",
            "loaded_bytes": "Encoded KV bytes loaded from kvstore.",
            "load_errors": "Loads that failed (store unreachable, block missing or corrupt); recomputed.",
            "saved_tokens": "Prompt tokens whose KV was saved to kvstore.",
            "saved_bytes": "Encoded KV bytes saved to kvstore.",
            "save_errors": "Saves that failed or ran past save_timeout_s.",
        }
        self._counters = {}
        for name, doc in counters.items():
            metric = self._counter_cls(name=f"vllm:kvstore_{name}", documentation=doc, labelnames=labelnames)
            self._counters[name] = {i: metric.labels(*v) for i, v in per_engine_labelvalues.items()}
        wait = self._histogram_cls(
            name="vllm:kvstore_layer_load_wait_seconds",
            documentation="Time the forward pass waited for one layer of a kvstore load.",
            labelnames=labelnames,
            buckets=[0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0],
        )
        self._wait = {i: wait.labels(*v) for i, v in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, children in self._counters.items():
            value = transfer_stats_data.get(name, 0)
            if value:
                children[engine_idx].inc(value)
        for seconds in transfer_stats_data.get("layer_wait_s", []):
            self._wait[engine_idx].observe(seconds)
