"""A cluster's statistics as one store: the single rule for adding up replicas' Stats.

Both totals a person sees use :func:`merge_stats`: the cluster clients' ``stats()``
(``transfer.replicas.ops.stats``) and the ``totals`` of ``kvstore stats`` over a member
list (``transfer.cli``), so the two cannot disagree on what a cluster holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from transfer.rpc.core import StoreStats, TierStats


def merge_stats(replicas: Iterable[StoreStats]) -> StoreStats:
    """Tiers summed by name (in the order first seen), counters summed, the versions seen joined."""
    tiers: dict[str, TierStats] = {}
    counters: dict[str, int] = {}
    versions: set[str] = set()
    for s in replicas:
        for t in s.tiers:
            prev = tiers.get(t.name)
            tiers[t.name] = t if prev is None else _add_tiers(prev, t)
        for k, v in s.counters.items():
            counters[k] = counters.get(k, 0) + v
        if s.version:
            versions.add(s.version)
    return StoreStats(tiers=list(tiers.values()), counters=counters, version=",".join(sorted(versions)))


def _add_tiers(a: TierStats, b: TierStats) -> TierStats:
    """One tier on two replicas: every count summed, healthy only if healthy on both.

    Field by field, so a figure added to :class:`TierStats` is summed without a change here.
    """
    summed: dict[str, Any] = {}
    for f in fields(TierStats):
        x, y = getattr(a, f.name), getattr(b, f.name)
        summed[f.name] = x if f.name == "name" else (x and y) if isinstance(x, bool) else x + y
    return TierStats(**summed)
