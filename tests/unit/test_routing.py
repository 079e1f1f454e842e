"""The cluster client's Lookup planning, driven with the answers replicas would give.

The servers' rule is fixed: asked about keys in order, a replica answers how many leading ones it
holds. ``answer`` applies that rule to a given holdings table, so these tests exercise the planner's
rounds exactly as real replicas would drive them (tests/integration/test_cluster.py does it live).
"""

from __future__ import annotations

import hashlib

from transfer.errors import Unavailable
from transfer.replicas.membership import DnsMembership, StaticMembership
from transfer.replicas.routing import ClusterCore
from transfer.rpc.client import ClientCore

MEMBERS = ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]
KEYS = [hashlib.blake2b(str(i).encode(), digest_size=32).digest() for i in range(24)]


def answer(
    plan: dict[str, list[int]], holds: dict[str, set[int]], down: set[str] = frozenset()
) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for m, positions in plan.items():
        if m in down:
            out[m] = None
            continue
        out[m] = next((j for j, i in enumerate(positions) if i not in holds.get(m, set())), len(positions))
    return out


def run(
    core: ClusterCore,
    holds: dict[str, set[int]],
    down: set[str] = frozenset(),
    plans: list[dict[str, list[int]]] | None = None,
) -> tuple[int, int]:
    state = core.start_lookup(KEYS, core.view())
    plan = state.first_plan()
    while plan:
        if plans is not None:
            plans.append(plan)
        answers = answer(plan, holds, down)
        for m, n in answers.items():
            if n is None:
                core.failed(m, Unavailable("down"))
        state.absorb(plan, answers)
        plan = state.next_plan()
    return state.result(), state.rounds


def placed(core: ClusterCore, members: list[str], upto: int = len(KEYS)) -> dict[str, set[int]]:
    holds: dict[str, set[int]] = {m: set() for m in members}
    for i in range(upto):
        for m in core.owners(KEYS[i], tuple(sorted(members))):
            holds[m].add(i)
    return holds


def core_for(membership: object, replication: int = 2) -> ClusterCore:
    return ClusterCore(membership, replication=replication, check=ClientCore("x"))  # type: ignore[arg-type]


def test_steady_state_is_one_round_and_exact() -> None:
    core = core_for(StaticMembership(MEMBERS))
    assert run(core, placed(core, MEMBERS)) == (24, 1)
    plans: list[dict[str, list[int]]] = []
    # a real end of the prefix: one owner's miss is not believed alone; its co-owner confirms it
    assert run(core, placed(core, MEMBERS, upto=10), plans=plans) == (10, 2)
    asked_first = next(m for m, positions in plans[0].items() if 10 in positions)
    other = next(m for m in core.owners(KEYS[10], tuple(MEMBERS)) if m != asked_first)
    assert list(plans[1]) == [other]  # narrow: only the other owner of key 10, one RPC
    assert plans[1][other][0] == 10


def settle(core: ClusterCore, holds: dict[str, set[int]]) -> tuple[int, int, dict[str, list[int]], set[str]]:
    """A whole lookup against ``holds``: the prefix, rounds, holes and who round 1 asked."""
    state = core.start_lookup(KEYS, core.view())
    plan = state.first_plan()
    first = set(plan)
    while plan:
        state.absorb(plan, answer(plan, holds))
        plan = state.next_plan()
    total = state.result()
    return total, state.rounds, state.holes(total), first


def test_an_owner_that_lost_its_copies_does_not_end_the_prefix() -> None:
    # Issue 24: a replica that restarted empty answers "absent" for every chunk it owns; the prefix
    # is whole at the other owners and must look up whole, and the hole is reported for repair.
    for victim in MEMBERS:
        core = core_for(StaticMembership(MEMBERS))  # fresh: no replica known owing
        holds = placed(core, MEMBERS)
        holds[victim] = set()
        total, rounds, holes, first = settle(core, holds)
        assert total == 24 and rounds <= 3, (victim, total, rounds)
        assert set(holes) == ({victim} if victim in first else set())
        owned = [i for i in range(24) if victim in core.owners(KEYS[i], tuple(MEMBERS))]
        if holes:  # from its first known miss to the end, every chunk it owns (the repair asks it)
            assert holes[victim] == owned[owned.index(holes[victim][0]) :]


def test_one_hole_in_the_middle_is_found_from_that_chunk_on() -> None:
    core = core_for(StaticMembership(MEMBERS))
    holds = placed(core, MEMBERS)
    plan = core.start_lookup(KEYS, core.view()).first_plan()
    m, i = next((m, i) for m, positions in plan.items() for i in positions if i >= 5)
    holds[m].discard(i)
    total, rounds, holes, _ = settle(core, holds)
    assert (total, rounds) == (24, 3) or (total, rounds) == (24, 2)
    assert list(holes) == [m] and holes[m][0] == i
    assert all(m in core.owners(KEYS[j], tuple(MEMBERS)) for j in holes[m])


def test_a_failed_replica_is_covered_by_the_other_owner_in_a_second_round() -> None:
    core = core_for(StaticMembership(MEMBERS))
    holds = placed(core, MEMBERS)
    plan = core.start_lookup(KEYS, core.view()).first_plan()
    victim = max(plan, key=lambda m: len(plan[m]))  # a replica round 1 relies on
    n, rounds = run(core, holds, down={victim})
    assert (n, rounds) == (24, 2)
    assert run(core, holds, down={victim}) == (24, 1)  # now known down: skipped from the start


def test_shrinking_in_the_grace_window_asks_the_owners_that_kept_the_key() -> None:
    listed = list(MEMBERS)
    membership = DnsMembership("svc", 1, resolver=lambda h, p: list(listed), grace_s=60, background=False)
    core = core_for(membership)
    holds = placed(core, MEMBERS)  # written while there were three
    listed.remove(MEMBERS[2])
    assert membership.refresh()
    assert run(core, holds) == (24, 1)
    del holds[MEMBERS[2]]  # the pod is gone for good: still whole, from the owners that stayed
    assert run(core, holds, down={MEMBERS[2]}) == (24, 1)


def test_a_key_that_moved_is_found_at_its_previous_owner() -> None:
    listed = list(MEMBERS)
    membership = DnsMembership("svc", 1, resolver=lambda h, p: list(listed), grace_s=60, background=False)
    core = core_for(membership, replication=1)
    holds = placed(core, MEMBERS)
    listed.append("10.0.0.4:1")  # a new, empty replica takes about a quarter of the keys
    assert membership.refresh()
    assert run(core, holds)[0] == 24
    total, _, holes, _ = settle(core, holds)  # the new owner misses the moved keys: repaired by reads
    moved = [i for i in range(24) if core.owners(KEYS[i], tuple(sorted(listed))) == ["10.0.0.4:1"]]
    assert total == 24 and moved and set(holes) == {"10.0.0.4:1"} and set(moved) <= set(holes["10.0.0.4:1"])
    bare = core_for(StaticMembership(listed), replication=1)  # no grace: the moved keys are misses
    assert run(bare, holds)[0] < 24


def test_a_live_replica_whose_shared_tier_was_skipped_is_not_marked_down():
    from kvstore.errors import TIER_SKIPPED

    core = core_for(StaticMembership(MEMBERS))
    skipped = f"1 blob(s), e.g. k, are in no tier that answered, and tier(s) s3 {TIER_SKIPPED}: retry"
    core.failed(MEMBERS[0], Unavailable(skipped))
    assert MEMBERS[0] not in core.troubled()[0]
    core.failed(MEMBERS[1], Unavailable("failed to connect to all addresses"))
    assert MEMBERS[1] in core.troubled()[0]
