"""The decisions of a cluster client, shared by its blocking and asyncio forms.

:class:`ClusterCore` holds everything that does not depend on how calls are
awaited: who owns a key (:mod:`transfer.replicas.placement` over the current
:class:`transfer.replicas.membership.View`), which replicas are down or suspect, which
replica to ask about which key (Lookup), which to stream which key from (Get),
which to send which item to (Put), how answers combine, and the per-replica
counters. :mod:`transfer.replicas.client` and :mod:`transfer.replicas.aio_client` only do the
I/O, so the two cannot drift apart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from kvstore.errors import TIER_SKIPPED
from kvstore.retry import ExponentialBackoff
from kvstore.wire import PutRequestView
from transfer.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TransferError,
    Unauthenticated,
    Unavailable,
)
from transfer.replicas import placement
from transfer.replicas.membership import Membership, ReplicationError, View
from transfer.replicas.repair import Repairs
from transfer.replicas.stats import merge_stats
from transfer.rpc.core import ClientCore, PutItem, PutResult, RetryPolicy, StoreStats

log = logging.getLogger("transfer.replicas.client")

WRITE_ACKS = ("one", "all")


def check_write_ack(value: str, what: str = "write_ack") -> None:
    """The one rule for ``write_ack`` (the cluster client, the workers' config and the demo use it)."""
    if value not in WRITE_ACKS:
        raise ValueError(f"{what} must be one of {', '.join(WRITE_ACKS)}, got {value!r}")


DEFAULT_REPLICATION = 2
DEFAULT_WRITE_ACK = "all"
#: How long a replica that failed at the transport level is skipped before it is tried again.
DEFAULT_DOWN_S = 2.0
DEFAULT_SUSPECT_S = 30.0
DEFAULT_REPAIR_WINDOW_S = 60.0
OWNERS_CACHE_SIZE = 1 << 16

#: Errors that are the caller's to fix; every replica would answer the same, so they are raised.
CALLER_ERRORS: tuple[type[TransferError], ...] = (
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    ResourceExhausted,
)
#: Errors that say the replica itself is unreachable or stuck: it is marked down for a while.
TRANSPORT_ERRORS: tuple[type[TransferError], ...] = (Unavailable, DeadlineExceeded)


def member_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options of each member client: one quick retry by default, since another owner is the better
    retry (the single-server default waits ~0.35 s on a dead server before giving up)."""
    out = dict(options)
    out.setdefault("retry", RetryPolicy(ExponentialBackoff(base_s=0.02, cap_s=0.1), max_attempts=2))
    return out


@dataclass
class ReplicaCounters:
    """What this client asked of one replica and what it got (a snapshot is a plain dict)."""

    lookups: int = 0  # Lookup calls sent
    lookup_keys: int = 0  # keys asked about
    lookup_present: int = 0  # keys it reported present
    gets: int = 0  # Get streams opened
    blobs_got: int = 0
    bytes_got: int = 0
    puts: int = 0  # Put calls (one per batch and owner)
    blobs_put: int = 0
    bytes_put: int = 0
    fallbacks: int = 0  # Get streams it served in place of a failed or missing owner
    failures: int = 0  # calls that failed at this replica (transport, missing data, bad bytes)
    skipped_down: int = 0  # calls not sent because it was marked down
    misses_down: int = 0  # lookup keys it owned, could not answer for, and no other owner had
    puts_dropped: int = 0  # items it should have stored but could not (it was down)
    holes_found: int = 0  # lookups where it missed a chunk it owns that another candidate had
    hints: int = 0  # chunks it missed while down, noted for a copy once it answers (hinted handoff)
    hints_dropped: int = 0  # hints past the bound, forgotten (read repair still covers them)
    repairs: int = 0  # repair checks run against it (Lookup of the chunks it owes)
    chunks_repaired: int = 0  # chunks copied to it from another owner
    bytes_repaired: int = 0  # bytes of those copies
    repairs_failed: int = 0  # copies that could not be made (no candidate had the chunk, it failed)


COUNTER_FIELDS = tuple(f.name for f in fields(ReplicaCounters))


@dataclass
class GetShare:
    """One member's share of a Get: positions of the keys it serves and its layer iterator."""

    member: str
    positions: list[int]
    source: Any
    fallback: bool = False


class ClusterCore:
    """Everything of a cluster client that does not depend on sync vs async I/O."""

    def __init__(
        self,
        membership: Membership,
        *,
        replication: int = DEFAULT_REPLICATION,
        write_ack: str = DEFAULT_WRITE_ACK,
        down_s: float = DEFAULT_DOWN_S,
        check: ClientCore,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_write_ack(write_ack)
        if replication < 1:
            raise ReplicationError(f"replication must be >= 1, got {replication}")
        size = len(membership.view().members)
        if membership.is_static and replication > size:
            raise ReplicationError(
                f"replication {replication} is above the member count {size}: list more "
                f"replicas or lower the replication factor (KVSTORE_REPLICATION)"
            )
        if down_s < 0:
            raise ValueError(f"down_s must be >= 0, got {down_s}")
        self.membership = membership
        self.replication = replication
        self.write_ack = write_ack
        self.down_s = down_s
        #: Validation and request building shared with the member clients (their options).
        self.check = check
        self._clock = clock
        self._lock = threading.Lock()
        self._down_until: dict[str, float] = {}
        self._suspect_until: dict[str, float] = {}
        #: After a failure, how long every owner of its keys is asked (its misses are not trusted).
        self.suspect_s = DEFAULT_SUSPECT_S
        self._counters: dict[str, ReplicaCounters] = {}
        self._owners_cache: dict[tuple[bytes, tuple[str, ...]], list[str]] = {}
        #: Copies owed to replicas (read repair, hinted handoff); see transfer.replicas.repair.
        self.repairs = Repairs(self.count)
        #: How long after a replica came back, or was found missing a chunk, every Lookup also checks
        #: in the background that it holds the chunks of the prefix it owns.
        self.repair_window_s = DEFAULT_REPAIR_WINDOW_S
        self._owing_until: dict[str, float] = {}

    # -- membership and health --------------------------------------------------------------------

    def view(self) -> View:
        return self.membership.view()

    def owners(self, key: bytes, members: tuple[str, ...]) -> list[str]:
        """The owners of ``key`` among ``members`` (R, or every member when there are fewer).

        Memoized per member set: shared prefixes make the same keys come back
        request after request, and hashing every member per key was a third of
        the client's own CPU in a cluster Lookup.
        """
        cache = self._owners_cache
        found = cache.get((key, members))
        if found is None:
            if len(cache) >= OWNERS_CACHE_SIZE:
                cache.clear()
            found = cache[(key, members)] = placement.owners(
                key, members, min(self.replication, max(len(members), 1))
            )
        return list(found)

    def candidates(self, key: bytes, view: View) -> list[str]:
        """Who may hold ``key``: its owners, then (in a grace window) its owners before the change."""
        out = self.owners(key, view.members)
        if view.previous:
            out += [m for m in self.owners(key, view.previous) if m not in out]
        return out

    def troubled(self) -> tuple[frozenset[str], frozenset[str]]:
        """The members down now and those suspect now (one lock for a whole plan)."""
        with self._lock:
            now = self._clock()
            return (
                frozenset(m for m, t in self._down_until.items() if now < t),
                frozenset(m for m, t in self._suspect_until.items() if now < t),
            )

    def failed(self, member: str, exc: BaseException) -> None:
        """Account a failure at ``member``; re-raise it when it is the caller's to fix."""
        if isinstance(exc, CALLER_ERRORS) or not isinstance(exc, TransferError):
            raise exc
        self.count(member, failures=1)
        if isinstance(exc, TRANSPORT_ERRORS) and TIER_SKIPPED not in str(exc):
            # (a live replica whose shared tier was skipped answers UNAVAILABLE too: it is not down)
            with self._lock:
                self._down_until[member] = self._clock() + self.down_s
                self._suspect_until[member] = self._clock() + self.down_s + self.suspect_s
            self.repairs.forget(member)  # it may come back empty: what it was checked to hold is stale
            log.warning("kvstore cluster: %s is down for %.1f s (%s)", member, self.down_s, exc)

    def succeeded(self, member: str) -> bool:
        """``member`` answered: it is up. True when it has hints that just became repair jobs (the
        operation then starts a :func:`transfer.replicas.ops.repair_worker`)."""
        with self._lock:
            was_down = self._down_until.pop(member, None) is not None
        if was_down:  # back after a failure: it may have restarted empty, or missed writes
            self.owe(member)
        return self.repairs.has_hints(member) and self.repairs.release_hints(member)

    def owe(self, member: str) -> None:
        """``member`` may lack copies it owns: for ``repair_window_s``, lookups check its chunks."""
        with self._lock:
            self._owing_until[member] = self._clock() + self.repair_window_s

    def owing(self) -> frozenset[str]:
        """Members whose chunks lookups check now (back recently, or found missing a chunk)."""
        with self._lock:
            now = self._clock()
            return frozenset(m for m, t in self._owing_until.items() if now < t)

    # -- counters ---------------------------------------------------------------------------------

    def count(self, member: str, **deltas: int) -> None:
        with self._lock:
            c = self._counters.setdefault(member, ReplicaCounters())
            for name, delta in deltas.items():
                setattr(c, name, getattr(c, name) + delta)

    def counters(self) -> dict[str, dict[str, int]]:
        """Per replica (every member ever used), a snapshot of :class:`ReplicaCounters`."""
        with self._lock:
            return {m: {f: getattr(c, f) for f in COUNTER_FIELDS} for m, c in sorted(self._counters.items())}

    # -- lookup -----------------------------------------------------------------------------------

    def cover(
        self, options: Sequence[Sequence[str]], tiebreak: bytes, already: Iterable[str] = ()
    ) -> list[str]:
        """One member per item, from its options, using few members (greedy set cover).

        Each extra replica in a fan-out costs a whole RPC of client and server
        CPU; asking one owner per key instead of all R cut Lookup p50 at N=4
        from ~3.5x to ~2x a single server's (bench/cluster.py, 2 busy cores).
        Ties go by rendezvous weight on ``tiebreak`` (the request's first key),
        so different prefixes spread their reads over different owners.
        """
        chosen: list[str] = [""] * len(options)
        planned = set(already)
        left = set(range(len(options)))
        while left:
            counts: dict[str, int] = {}
            for i in left:
                for m in options[i]:
                    counts[m] = counts.get(m, 0) + 1
            best = max(counts, key=lambda m: (m in planned, counts[m], placement.weight(m, tiebreak)))
            planned.add(best)
            for i in [i for i in left if best in options[i]]:
                chosen[i] = best
                left.discard(i)
        return chosen

    def trusted(self, key: bytes, view: View, suspect: frozenset[str]) -> list[str]:
        """Owners to ask about ``key`` first: current owners that were owners before the last change
        too (in a grace window) and have not failed recently. A trusted owner's "present" settles
        the key; its "absent" is checked with the key's other candidates (:class:`LookupState`)."""
        out = [m for m in self.owners(key, view.members) if m not in suspect]
        if view.previous:
            before = self.owners(key, view.previous)
            out = [m for m in out if m in before]
        return out

    def start_lookup(self, keys: Sequence[bytes], view: View) -> LookupState:
        return LookupState(self, keys, view)

    # -- get --------------------------------------------------------------------------------------

    def plan_get(
        self, keys: Sequence[bytes], positions: Sequence[int], view: View, tried: dict[int, set[str]]
    ) -> dict[str, list[int]]:
        """Group ``positions`` by one candidate each has not tried yet: a trusted healthy owner if there
        is one, else any healthy candidate (few streams: see :meth:`cover`).

        Raises :class:`NotFound` when a key has no candidate left.
        """
        options: list[list[str]] = []
        down, suspect = self.troubled()
        for i in positions:
            left = [m for m in self.candidates(keys[i], view) if m not in tried.get(i, ())]
            if not left:
                raise NotFound(
                    f"Get: chunk {keys[i].hex()[:16]}… is on no reachable replica (tried "
                    f"{', '.join(sorted(tried.get(i, ())))}); recompute it"
                )
            healthy = [m for m in left if m not in down]
            trusted = [m for m in self.trusted(keys[i], view, suspect) if m in healthy]
            options.append(trusted or [m for m in healthy if m not in suspect] or healthy or left)
        plan: dict[str, list[int]] = {}
        for i, m in zip(positions, self.cover(options, keys[positions[0]]), strict=True):
            plan.setdefault(m, []).append(i)
        return plan

    # -- put --------------------------------------------------------------------------------------

    def plan_put(self, batch: Sequence[PutRequestView], view: View) -> dict[str, list[int]]:
        """For each owner, the indices of the batch's items it stores (healthy owners only; an item
        whose owners are all down goes to them anyway, one may be back)."""
        plan: dict[str, list[int]] = {}
        down = self.troubled()[0]
        for i, req in enumerate(batch):
            owners = self.owners(req.key, view.members)
            up = [m for m in owners if m not in down] or owners
            for m in owners:
                if m not in up:
                    self.count(m, skipped_down=1, puts_dropped=1)
                    self.repairs.hint(m, req.namespace, [req.key], req.num_layers)
            for m in up:
                plan.setdefault(m, []).append(i)
        return plan

    @staticmethod
    def items(batch: Sequence[PutRequestView], indices: Sequence[int]) -> list[PutItem]:
        return [PutItem(batch[i].key, batch[i].layer, batch[i].num_layers, batch[i].blob) for i in indices]

    def put_done(self, member: str, batch: Sequence[PutRequestView], indices: Sequence[int]) -> bool:
        """Account a Put ``member`` acknowledged; True as :meth:`succeeded`."""
        self.count(member, puts=1, blobs_put=len(indices), bytes_put=sum(len(batch[i].blob) for i in indices))
        return self.succeeded(member)

    def hint(self, member: str, batch: Sequence[PutRequestView], indices: Sequence[int]) -> None:
        """``member`` did not get these items (its Put failed): note their chunks for hinted handoff."""
        chunks: dict[tuple[str, int], list[bytes]] = {}
        for i in indices:
            chunks.setdefault((batch[i].namespace, batch[i].num_layers), []).append(batch[i].key)
        for (ns, num_layers), keys in chunks.items():
            self.repairs.hint(member, ns, keys, num_layers)

    # -- repair -----------------------------------------------------------------------------------

    def plan_copy(
        self, keys: Sequence[bytes], view: View, tried: dict[bytes, set[str]]
    ) -> tuple[dict[str, list[bytes]], list[bytes]]:
        """Where a repair reads each chunk it copies: a candidate not tried yet and not down (one not
        suspect first), as few sources as cover them; second, the chunks with no candidate left."""
        down, suspect = self.troubled()
        planned: list[bytes] = []
        options: list[list[str]] = []
        lost: list[bytes] = []
        for k in keys:
            left = [m for m in self.candidates(k, view) if m not in tried[k] and m not in down]
            if not left:
                lost.append(k)
                continue
            planned.append(k)
            options.append([m for m in left if m not in suspect] or left)
        plan: dict[str, list[bytes]] = {}
        if planned:
            for k, m in zip(planned, self.cover(options, planned[0]), strict=True):
                plan.setdefault(m, []).append(k)
        return plan, lost

    # -- stats ------------------------------------------------------------------------------------

    @staticmethod
    def merge_stats(per_member: dict[str, StoreStats]) -> StoreStats:
        """The answered members' stats as one store (:func:`transfer.replicas.stats.merge_stats`)."""
        return merge_stats(per_member.values())


class LookupState:
    """One cluster Lookup: which replica to ask about which key, round by round, and what is known.

    The server answers "how many leading keys of those sent are present": a
    replica asked about keys in prefix order tells which keys it has up to its
    first miss, that it misses that one, and nothing about the keys after it.

    A key is present when **any** of its candidates has it. An owner's miss is
    not believed on its own: a replica that was down when a chunk was written,
    or restarted empty, answers "absent" for chunks its co-owner holds (issue
    24: 1,299 of 4,071 acknowledged prefixes looked up short that way). So a
    key is known missing only once every candidate that could answer (not
    down, not failed in this lookup) has answered it missing.

    Round 1 asks each key of one trusted owner (as few replicas as cover the
    prefix), or of every healthy candidate when no owner is trusted (after a
    failure, or when the key moved in a membership change). The prefix ends at
    the first key ``p`` not known present. While ``p`` is not known missing, a
    further round asks again:

    * *narrow* (the common case, a prompt whose cached part ends at ``p``): only
      ``p``'s candidates that have not answered for it, each about its keys from
      ``p`` on: R-1 small RPCs settle a real end of the prefix;
    * *wide*, once this lookup has seen a hole (a key missing at one owner and
      present at another) or a failed replica: every candidate of every
      unsettled key from ``p`` on that has not answered for it, so a replica
      that lost its copies costs one more round, not one round per key.

    Full hits stay one round; a real end of the prefix costs a second round of
    R-1 RPCs; a replica with holes costs at most three rounds. The holes seen
    (:meth:`holes`) are what read repair gives back.
    """

    MAX_ROUNDS = 6

    def __init__(self, core: ClusterCore, keys: Sequence[bytes], view: View) -> None:
        self.core = core
        self.keys = keys
        self.view = view
        self.down, suspect = core.troubled()
        self.cands = [core.candidates(k, view) for k in keys]
        self.trusted = [set(core.trusted(k, view, suspect)) for k in keys]
        self.present = [False] * len(keys)
        self.missing_at: list[set[str]] = [set() for _ in keys]
        self.failed: set[str] = set()
        self.rounds = 0
        self.wide = False

    def first_plan(self) -> dict[str, list[int]]:
        plan: dict[str, list[int]] = {}
        covered: list[int] = []
        options: list[list[str]] = []
        for i, cands in enumerate(self.cands):
            up = [m for m in cands if m not in self.down] or cands  # all down: ask anyway, one may be back
            for m in cands:
                if m not in up:
                    self.core.count(m, skipped_down=1)
            trusted = [m for m in up if m in self.trusted[i]]
            if trusted:
                covered.append(i)
                options.append(trusted)
            else:
                for m in up:
                    plan.setdefault(m, []).append(i)
        if covered:
            for i, m in zip(covered, self.core.cover(options, self.keys[covered[0]], plan), strict=True):
                plan.setdefault(m, []).append(i)
        for positions in plan.values():
            positions.sort()
        return plan

    def absorb(self, plan: dict[str, list[int]], answers: dict[str, int | None]) -> None:
        """Take one round's answers (``None``: that member failed)."""
        self.rounds += 1
        for member, positions in plan.items():
            n = answers.get(member)
            if n is None:
                self.failed.add(member)
                self.wide = True
                continue
            for i in positions[:n]:
                self.present[i] = True
            if n < len(positions):
                self.missing_at[positions[n]].add(member)
        if not self.wide:
            self.wide = any(p and m for p, m in zip(self.present, self.missing_at, strict=True))

    def prefix(self) -> int:
        return next((i for i, p in enumerate(self.present) if not p), len(self.keys))

    def _askable(self, i: int, down: frozenset[str]) -> list[str]:
        """Candidates of key ``i`` that may still answer for it (not down, not failed, not yet asked
        or asked only behind another key's miss)."""
        return [
            m for m in self.cands[i] if m not in self.failed and m not in self.missing_at[i] and m not in down
        ]

    def next_plan(self) -> dict[str, list[int]]:
        """The next round, or ``{}`` when the prefix is settled (or the round budget is spent)."""
        p = self.prefix()
        if p == len(self.keys) or self.rounds >= self.MAX_ROUNDS:
            return {}
        down = self.core.troubled()[0]
        first = self._askable(p, down)
        if not first:  # every candidate of p answered it missing (or cannot answer): the prefix ends
            return {}
        plan: dict[str, list[int]] = {}
        for i in range(p, len(self.keys)):  # every unsettled key from p on, in one round
            if self.present[i]:
                continue
            for m in self._askable(i, down):
                if self.wide or m in first:
                    plan.setdefault(m, []).append(i)
        return plan

    def result(self) -> int:
        """The prefix; a miss for want of a live owner is counted against the owners that failed."""
        total = self.prefix()
        if total < len(self.keys):
            for m in self.cands[total]:
                if m in self.failed:
                    self.core.count(m, misses_down=1)
        return total

    def holes(self, total: int) -> dict[str, list[int]]:
        """Per current owner that may lack chunks of the prefix ``[0, total)``: the positions it owns
        that a repair should check (the repair asks it, then copies what it lacks).

        An owner that answered a chunk missing while another candidate had it
        owes the chunks it owns from that one on (its answer said nothing about
        the ones after); it is marked owing (:meth:`ClusterCore.owe`). An owner
        already owing (back after a failure, or found missing a chunk within
        ``repair_window_s``) owes every chunk of the prefix it owns: lookups
        usually ask one owner per chunk, so without this the other owner's
        holes would never be seen.
        """
        core, members = self.core, self.view.members
        out: dict[str, list[int]] = {}
        for i in range(total):
            for m in self.missing_at[i]:
                if m not in out and m in core.owners(self.keys[i], members):
                    core.count(m, holes_found=1)
                    core.owe(m)
                    out[m] = [j for j in range(i, total) if m in core.owners(self.keys[j], members)]
        down = core.troubled()[0]
        for m in core.owing() - down - set(out):
            owned = [j for j in range(total) if m in core.owners(self.keys[j], members)]
            if owned:
                out[m] = owned
        return out


def acknowledged(num_stored: int, nbytes: int, num_requests: int, answers: Sequence[PutResult]) -> PutResult:
    """A cluster Put's result: ``durable`` and ``tiers`` only as far as every acknowledged copy said so
    (a copy on a RAM-only replica makes the whole put not durable, whatever the other owner did)."""
    tiers = [t for t in answers[0].tiers if all(t in a.tiers for a in answers)] if answers else []
    return PutResult(
        num_stored, nbytes, num_requests, bool(answers) and all(a.durable for a in answers), tuple(tiers)
    )
