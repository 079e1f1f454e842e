"""The cluster client's Lookup planning, driven with the answers replicas would give.

The servers' rule is fixed: asked about keys in order, a replica answers how many leading ones it
holds. ``answer`` applies that rule to a given holdings table, so these tests exercise the planner's
rounds exactly as real replicas would drive them (tests/integration/test_cluster.py does it live).
"""

from __future__ import annotations

import hashlib

from transfer.client import ClientCore
from transfer.errors import Unavailable
from transfer.membership import DnsMembership, StaticMembership
from transfer.routing import ClusterCore

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


def run(core: ClusterCore, holds: dict[str, set[int]], down: set[str] = frozenset()) -> tuple[int, int]:
    state = core.start_lookup(KEYS, core.view())
    plan = state.first_plan()
    while plan:
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
    assert run(core, placed(core, MEMBERS, upto=10)) == (10, 1)  # an owner's miss is believed


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
    bare = core_for(StaticMembership(listed), replication=1)  # no grace: the moved keys are misses
    assert run(bare, holds)[0] < 24
