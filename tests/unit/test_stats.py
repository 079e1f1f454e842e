"""The one rule for adding up replicas' Stats (transfer.replicas.stats), and the stats table's sizes."""

from __future__ import annotations

from dataclasses import asdict, fields

import pytest

from kvstore.config import format_bytes as server_format_bytes
from kvstore.v1 import kvstore_pb2 as pb
from transfer.cli import format_bytes
from transfer.replicas.routing import ClusterCore
from transfer.replicas.stats import merge_stats
from transfer.rpc.core import ClientCore, StoreStats, TierStats


def tier(name: str, n: int, *, healthy: bool = True) -> TierStats:
    return TierStats(name, n, n + 1, n + 2, n + 3, n + 4, n + 5, n + 6, n + 7, healthy, n + 8, n + 9)


def test_tiers_sum_by_name_in_the_order_first_seen_and_are_healthy_only_everywhere() -> None:
    a = StoreStats([tier("memory", 10), tier("disk", 100)], {"blobs_put": 3, "requests": 5}, "1.0")
    b = StoreStats([tier("disk", 200, healthy=False), tier("s3", 1)], {"requests": 7, "rejected": 1}, "1.1")
    c = StoreStats([tier("memory", 20)], {}, "")
    merged = merge_stats([a, b, c])
    assert [t.name for t in merged.tiers] == ["memory", "disk", "s3"]
    assert merged.tiers[0] == TierStats("memory", 30, 32, 34, 36, 38, 40, 42, 44, True, 46, 48)
    assert merged.tiers[1] == TierStats("disk", 300, 302, 304, 306, 308, 310, 312, 314, False, 316, 318)
    assert merged.tiers[2] == tier("s3", 1)
    assert merged.counters == {"blobs_put": 3, "requests": 12, "rejected": 1}
    assert merged.version == "1.0,1.1"  # distinct versions, sorted; an empty one is not a version


def test_one_replica_is_its_own_total_and_none_is_an_empty_store() -> None:
    one = StoreStats([tier("memory", 4)], {"requests": 2}, "1.0")
    assert merge_stats([one]) == one
    assert merge_stats([]) == StoreStats([], {}, "")


def test_the_cluster_client_totals_with_the_same_rule() -> None:
    per_member = {
        "a:1": StoreStats([tier("memory", 1)], {"x": 1}, "1.0"),
        "b:2": StoreStats([tier("memory", 2, healthy=False)], {"x": 2}, "1.0"),
    }
    assert ClusterCore.merge_stats(per_member) == merge_stats(per_member.values())


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 1536, 10**6, 2**30 - 1, 2**30, 5 * 2**40, 3 * 2**50, -2048])
def test_the_stats_table_sizes_read_as_the_servers(n: int) -> None:
    # transfer.cli formats sizes itself (the client imports no server module); the same text.
    assert format_bytes(n) == server_format_bytes(n)


def test_every_figure_a_server_reports_is_one_the_merger_adds() -> None:
    # kvstore stats prints each replica's answer whole and totals it through TierStats: a field
    # added to the message but not to TierStats would be missing from the totals.
    message = pb.TierStats.DESCRIPTOR.fields
    assert [f.name for f in fields(TierStats)] == [f.name for f in message]
    # Each figure a different value, so a figure read into the wrong field shows.
    sent = {
        f.name: "disk" if f.name == "name" else True if f.type == f.TYPE_BOOL else i
        for i, f in enumerate(message)
    }
    answer = pb.StatsResponse(tiers=[pb.TierStats(**sent)])
    assert asdict(ClientCore.stats_result(answer).tiers[0]) == sent
