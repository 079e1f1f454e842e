"""The cluster client's operations as plain logic: generators of effects, like :mod:`transfer.rpc.ops`.

:class:`transfer.replicas.routing.ClusterCore` decides who owns what, who is down and
how answers combine; this module strings those decisions into whole
operations (Lookup rounds, Put fan-out with ``write_ack``, Get with fallback
mid-stream, Delete, Stats) without doing any I/O. The blocking
:class:`transfer.replicas.client.ClusterKVClient` and the asyncio
:class:`transfer.replicas.aio_client.AsyncClusterKVClient` only carry the effects out
(threads and futures there, tasks and ``await`` here), so the two cannot drift
apart.

Effects (besides :class:`transfer.rpc.ops.Emit`):

* :class:`CurrentView` — the membership view (the driver also retires clients
  of members gone for longer than any call can last).
* :data:`MemberCall` (:class:`MemberLookup`, :class:`MemberPut`,
  :class:`MemberDelete`, :class:`MemberStats`, :class:`MemberReady`) — that
  method of the member's client, with these arguments; a :class:`TransferError`
  is thrown back in.
* :class:`OpenLayers` / :class:`Next` / :class:`Close` — a member's
  ``get_layers`` iterator (or the caller's items): its next item or
  :data:`transfer.rpc.ops.END`; the driver closes every opened iterator when the
  operation ends or is abandoned.
* :class:`Fan` — run sub-operations side by side, wait for all of them, and
  return their results in order (or raise the first error, in that order);
  :class:`Spawn` / :class:`WaitAny` / :class:`Detach` / :class:`Abandon` /
  :class:`Drain` — the same with an early return (``write_ack="one"``),
  background copies, and copies no longer wanted (cancelled where they have not
  finished; both kinds are waited for by ``drain``).
* :class:`Background` — run an operation (a :func:`repair_worker`) detached;
  nothing waits for it but ``drain_repairs`` and ``close``; if it raises, the
  driver logs it (:func:`background_failed`).
* :class:`Copy` — stream layers ``[0, num_layers)`` of some chunks from one
  member's Get into another member's Put (bounded memory: the member client's
  Put batches); the bytes stored. A :class:`TransferError` is thrown back in.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias, TypeVar

from kvstore.keys import Namespace
from kvstore.wire import Blob, PutRequestView
from transfer.errors import InvalidArgument, NotFound, TransferError, Unavailable
from transfer.replicas.membership import View
from transfer.replicas.repair import RepairJob
from transfer.replicas.routing import ClusterCore, GetShare, acknowledged
from transfer.rpc.core import PutItem, PutResult, StoreStats
from transfer.rpc.ops import END, Emit

log = logging.getLogger("transfer.replicas.client")
T = TypeVar("T")


@dataclass(slots=True)
class CurrentView:
    pass


@dataclass(slots=True)
class MemberLookup:
    """``lookup`` on the member's client: how many leading ``keys`` it holds."""

    member: str
    namespace: str
    keys: list[bytes]
    num_layers: int
    timeout_s: float | None


@dataclass(slots=True)
class MemberPut:
    """``put`` of ``items`` on the member's client: its :class:`PutResult`."""

    member: str
    namespace: str
    items: list[PutItem]
    ack: str | None
    timeout_s: float | None


@dataclass(slots=True)
class MemberDelete:
    """``delete`` on the member's client: the chunks it deleted."""

    member: str
    namespace: str
    keys: list[bytes]
    num_layers: int | None
    timeout_s: float | None


@dataclass(slots=True)
class MemberStats:
    """``stats`` of the member: its :class:`StoreStats`."""

    member: str
    timeout_s: float | None


@dataclass(slots=True)
class MemberReady:
    """``wait_ready`` on the member's client: None once its channel is connected."""

    member: str
    timeout_s: float


#: One call on a member's client (each driver calls the method of that name, typed).
MemberCall: TypeAlias = MemberLookup | MemberPut | MemberDelete | MemberStats | MemberReady


@dataclass(slots=True)
class OpenLayers:
    """``get_layers`` on the member's client: an iterator for :class:`Next` and :class:`Close`."""

    opens: ClassVar[bool] = True
    member: str
    namespace: str
    keys: list[bytes]
    start: int
    end: int
    timeout_s: float | None


@dataclass(slots=True)
class Next:
    source: Any


@dataclass(slots=True)
class Close:
    source: Any


@dataclass(slots=True)
class Fan:
    """Run ``ops`` side by side; once every one has ended, their results in order, or the first
    error in that order (none is left running whatever failed)."""

    ops: tuple[ClusterOp[Any], ...]


@dataclass(slots=True)
class Spawn:
    """Start ``op``; the result is a task handle for :class:`WaitAny`, :class:`Detach`, :class:`Abandon`."""

    op: ClusterOp[Any]


@dataclass(slots=True)
class WaitAny:
    """Wait until one of ``tasks`` is done: ``([(task, outcome), ...], still pending)``, the outcome
    being the task's result or the exception it raised (the operation decides what to do with it)."""

    tasks: frozenset[Any]


@dataclass(slots=True)
class Detach:
    """Leave ``tasks`` running; :class:`Drain` waits for them (their failures were counted)."""

    tasks: frozenset[Any]


@dataclass(slots=True)
class Abandon:
    """``tasks`` are no longer wanted: cancel them (a blocking driver can only stop those not yet
    started); :class:`Drain` waits for what still runs."""

    tasks: frozenset[Any]


@dataclass(slots=True)
class Drain:
    pass


@dataclass(slots=True)
class Background:
    """Start ``op`` and do not wait for it (read repair, hinted handoff)."""

    op: ClusterOp[Any]


@dataclass(slots=True)
class Copy:
    """Layers ``[0, num_layers)`` of ``keys`` read from ``source`` and put to ``target``: the bytes
    stored. The blobs are verified on receipt by the member client, as every Get's."""

    source: str
    target: str
    namespace: str
    keys: tuple[bytes, ...]
    num_layers: int


#: What a cluster driver performs: its ``_perform`` matches every one of these.
ClusterAction: TypeAlias = (
    CurrentView
    | MemberLookup
    | MemberPut
    | MemberDelete
    | MemberStats
    | MemberReady
    | OpenLayers
    | Next
    | Close
    | Fan
    | Spawn
    | WaitAny
    | Detach
    | Abandon
    | Drain
    | Background
    | Copy
)
#: Everything a cluster operation yields.
ClusterEffect: TypeAlias = ClusterAction | Emit
ClusterOp = Generator[ClusterEffect, Any, T]

#: Effects whose failure (a TransferError) the operation handles itself.
FALLIBLE = (MemberLookup, MemberPut, MemberDelete, MemberStats, MemberReady, Next, Copy)


def map_error(effect: ClusterAction, exc: BaseException) -> BaseException | None:
    """What both cluster drivers throw into an operation: a TransferError of a fallible effect
    (the rest propagates)."""
    return exc if isinstance(exc, TransferError) and isinstance(effect, FALLIBLE) else None


# -- lookup -------------------------------------------------------------------------------------------


def lookup(
    cluster: ClusterCore, namespace: Namespace | str, keys: Any, num_layers: int, timeout_s: float | None
) -> ClusterOp[int]:
    """Number of leading keys whose layers ``[0, num_layers)`` are stored on some owner: rounds of
    Lookups side by side, planned by :class:`transfer.replicas.routing.LookupState`."""
    core = cluster.check
    ns = core.namespace(namespace)
    keys = core.check_keys(keys)
    if num_layers < 1:
        raise InvalidArgument(f"num_layers must be >= 1, got {num_layers}")
    if not keys:
        return 0
    state = cluster.start_lookup(keys, (yield CurrentView()))
    plan = state.first_plan()
    while plan:
        members = list(plan)
        asks = tuple(
            _lookup_one(cluster, m, ns, [keys[i] for i in plan[m]], num_layers, timeout_s) for m in members
        )
        state.absorb(plan, dict(zip(members, (yield Fan(asks)), strict=True)))
        plan = state.next_plan()
    total = state.result()
    for member, positions in state.holes(total).items():  # read repair, in the background
        if cluster.repairs.offer(member, ns, [keys[i] for i in positions], num_layers):
            yield Background(repair_worker(cluster))
    return total


def _lookup_one(
    cluster: ClusterCore, member: str, ns: str, keys: list[bytes], num_layers: int, timeout_s: float | None
) -> ClusterOp[int | None]:
    try:
        n: int = yield MemberLookup(member, ns, keys, num_layers, timeout_s)
    except TransferError as exc:
        cluster.failed(member, exc)
        return None
    if cluster.succeeded(member):  # it answers again: the copies it missed while down are owed
        yield Background(repair_worker(cluster))
    cluster.count(member, lookups=1, lookup_keys=len(keys), lookup_present=n)
    return n


# -- put ----------------------------------------------------------------------------------------------


def put(
    cluster: ClusterCore,
    namespace: Namespace | str,
    source: Any,
    ack: str | None,
    timeout_s: float | None,
) -> ClusterOp[PutResult]:
    """Every item of ``source`` (pulled with :class:`Next`) stored on its owners, a batch of at
    most ``put_batch_bytes`` at a time; ``num_stored``/``bytes_stored`` count items stored at least
    once, ``durable`` and ``tiers`` hold for every acknowledged copy."""
    core = cluster.check
    ns = core.namespace(namespace)
    stored = nbytes = requests = 0
    results: list[PutResult] = []
    batch: list[PutRequestView] = []
    size = 0
    while True:
        item = yield Next(source)
        if item is not END:
            batch.append(core.put_request(ns, item))
            size += len(batch[-1].blob)
            if size < core.put_batch_bytes:
                continue
        if batch:
            yield Drain()  # at most one batch of background copies in memory
            acked, sent, answers = yield from _put_batch(cluster, ns, batch, timeout_s, ack)
            stored += len(acked)
            nbytes += sum(len(batch[i].blob) for i in acked)
            requests += sent
            results += answers
            batch, size = [], 0
        if item is END:
            break
    if cluster.write_ack == "all":
        yield Drain()
    return acknowledged(stored, nbytes, requests, results)


def _put_batch(
    cluster: ClusterCore, ns: str, batch: list[PutRequestView], timeout_s: float | None, ack: str | None
) -> ClusterOp[tuple[set[int], int, list[PutResult]]]:
    plan = cluster.plan_put(batch, (yield CurrentView()))
    tasks: dict[Any, list[int]] = {}
    owners_left = [0] * len(batch)  # per item: owners not yet answered
    for member, indices in plan.items():
        tasks[(yield Spawn(_put_one(cluster, member, ns, batch, indices, timeout_s, ack)))] = indices
        for i in indices:
            owners_left[i] += 1
    acked: set[int] = set()
    answers: list[PutResult] = []
    pending = frozenset(tasks)
    need_all = cluster.write_ack == "all"
    while pending:
        done, pending = yield WaitAny(pending)
        for task, ok in done:
            if isinstance(ok, BaseException):  # a task raises only the caller's errors: the put ends
                if pending:  # and its other copies are not wanted
                    yield Abandon(frozenset(pending))
                raise ok
            if ok is not None:
                answers.append(ok)
            for i in tasks[task]:
                owners_left[i] -= 1
                if ok is not None:
                    acked.add(i)
        if not need_all and all(i in acked or owners_left[i] == 0 for i in range(len(batch))):
            break
    if pending:
        yield Detach(frozenset(pending))
    return acked, len(tasks), answers


def _put_one(
    cluster: ClusterCore,
    member: str,
    ns: str,
    batch: list[PutRequestView],
    indices: list[int],
    timeout_s: float | None,
    ack: str | None,
) -> ClusterOp[PutResult | None]:
    try:
        items = cluster.items(batch, indices)
        result: PutResult = yield MemberPut(member, ns, items, ack, timeout_s)
    except TransferError as exc:
        cluster.failed(member, exc)
        cluster.count(member, puts_dropped=len(indices))
        cluster.hint(member, batch, indices)
        return None
    if cluster.put_done(member, batch, indices):
        yield Background(repair_worker(cluster))
    return result


# -- get ----------------------------------------------------------------------------------------------


def get_layers(
    cluster: ClusterCore, ns: str, keys: list[bytes], start: int, end: int, timeout_s: float | None
) -> ClusterOp[None]:
    """Emits ``(layer, [blob per key])`` in layer order, each key from its first healthy owner; a
    replica failing or missing a key mid-stream is replaced by the key's next candidate from the
    current layer on. Arguments are validated by the caller (:func:`transfer.rpc.ops.get_args`)."""
    if not keys:
        return
    view = yield CurrentView()
    tried: dict[int, set[str]] = {}
    missed: dict[str, list[int]] = {}  # owners that answered NOT_FOUND: repaired once the Get is done
    streams: list[GetShare] = []
    for member, positions in cluster.plan_get(keys, range(len(keys)), view, tried).items():
        streams.append((yield from _open(ns, keys, member, positions, start, end, timeout_s, False, cluster)))
    for layer in range(start, end):
        blobs: list[Blob | None] = [None] * len(keys)
        queue, streams = streams, []
        while queue:
            stream = queue.pop(0)
            try:
                got = yield Next(stream.source)
                if got is END:
                    raise NotFound("Get: stream ended early")
                if got[0] != layer:
                    raise NotFound(f"Get: {stream.member} sent layer {got[0]}, expected {layer}")
            except TransferError as err:
                yield Close(stream.source)
                cluster.failed(stream.member, err)
                if isinstance(err, NotFound):
                    missed.setdefault(stream.member, []).extend(stream.positions)
                    cluster.owe(stream.member)
                for i in stream.positions:
                    tried.setdefault(i, set()).add(stream.member)
                for member, positions in cluster.plan_get(keys, stream.positions, view, tried).items():
                    queue.append(
                        (yield from _open(ns, keys, member, positions, layer, end, timeout_s, True, cluster))
                    )
                continue
            part = got[1]
            cluster.count(stream.member, blobs_got=len(part), bytes_got=sum(len(b) for b in part))
            for i, blob in zip(stream.positions, part, strict=True):
                blobs[i] = blob
            streams.append(stream)
        yield Emit((layer, blobs))
    for stream in streams:
        yield Close(stream.source)
    for member, positions in missed.items():  # every key was found elsewhere: give the copies back
        owned = [keys[i] for i in positions if member in cluster.owners(keys[i], view.members)]
        if owned and cluster.repairs.offer(member, ns, owned, end):
            yield Background(repair_worker(cluster))


def _open(
    ns: str,
    keys: list[bytes],
    member: str,
    positions: list[int],
    layer: int,
    end: int,
    timeout_s: float | None,
    fallback: bool,
    cluster: ClusterCore,
) -> ClusterOp[GetShare]:
    source = yield OpenLayers(member, ns, [keys[i] for i in positions], layer, end, timeout_s)
    cluster.count(member, gets=1, fallbacks=int(fallback))
    return GetShare(member, positions, source, fallback)


# -- repair -------------------------------------------------------------------------------------------


def background_failed(exc: BaseException) -> None:
    """What both drivers do with a :class:`Background` operation that raised: nobody waits for its
    result, so the failure is logged (never raised)."""
    log.error("kvstore cluster: a background operation failed: %r", exc, exc_info=exc)


def repair_worker(cluster: ClusterCore) -> ClusterOp[None]:
    """Run the queued repair jobs (:class:`transfer.replicas.repair.Repairs`) one after the other until none
    is left. In the background: every failure is counted, none is raised."""
    while (job := cluster.repairs.take()) is not None:
        try:
            yield from repair(cluster, job)
        except TransferError as exc:  # a caller error (auth, quota) of the copy: nobody to raise it to
            cluster.count(job.member, repairs_failed=1)
            log.warning("kvstore cluster: repair of %s failed: %s", job.member, exc)
        finally:
            cluster.repairs.done(job)


def repair(cluster: ClusterCore, job: RepairJob, timeout_s: float | None = None) -> ClusterOp[int]:
    """Give ``job.member`` the chunks of ``job.keys`` it lacks, copied from another candidate; the
    bytes copied.

    The member is asked first, so a chunk it holds costs no copy. A Lookup
    answers up to the first miss, so each missing chunk costs one Lookup, up to
    :data:`ASK_RUN` in a row; a run of missing chunks (a replica back empty) is
    copied together, up to :data:`COPY_RUN` at a time, each run as soon as it
    is found: the shorter the time between asking and copying, the fewer chunks
    another client repairing the same replica copies too.
    """
    member, ns, num_layers = job.member, job.namespace, job.num_layers
    cluster.count(member, repairs=1)
    keys, copied = list(job.keys), 0
    view = yield CurrentView()
    n = yield from _present(cluster, member, ns, keys, num_layers, timeout_s)
    while keys and n is not None:
        cluster.repairs.verified(member, ns, keys[:n])
        keys = keys[n:]
        if not keys:
            break
        run = [keys.pop(0)]
        n = 0
        while keys and n == 0 and len(run) < COPY_RUN:  # the run of missing chunks goes on
            if len(run) >= ASK_RUN:  # a replica back empty: copy the rest of the run without asking
                run.append(keys.pop(0))
                continue
            n = yield from _present(cluster, member, ns, keys, num_layers, timeout_s)
            if n == 0:
                run.append(keys.pop(0))
        copied += yield from _copy(cluster, member, ns, run, num_layers, view)
        if keys and n == 0:  # the run stopped at COPY_RUN: nothing known about the rest yet
            n = yield from _present(cluster, member, ns, keys, num_layers, timeout_s)
    if keys and n is None:
        cluster.count(member, repairs_failed=len(keys))
    return copied


#: Missing chunks copied in one Get and one Put stream by a repair.
COPY_RUN = 32
#: After this many missing chunks in a row, the rest of a run is copied without asking: a replica
#: back empty then costs 3 Lookups per 32 chunks instead of 32; a replica that missed only some
#: writes rarely has such runs (what it holds of them is copied again: Puts are idempotent).
ASK_RUN = 3


def _present(
    cluster: ClusterCore, member: str, ns: str, keys: list[bytes], num_layers: int, timeout_s: float | None
) -> ClusterOp[int | None]:
    """How many leading ``keys`` ``member`` holds; ``None`` if it failed (accounted)."""
    try:
        n: int = yield MemberLookup(member, ns, keys, num_layers, timeout_s)
        return n
    except TransferError as exc:
        cluster.failed(member, exc)
        return None


def _copy(
    cluster: ClusterCore, member: str, ns: str, missing: list[bytes], num_layers: int, view: View
) -> ClusterOp[int]:
    """Copy ``missing`` chunks to ``member``, each from a candidate that has it; the bytes copied."""
    copied = 0
    tried: dict[bytes, set[str]] = {k: {member} for k in missing}
    while missing:
        plan, lost = cluster.plan_copy(missing, view, tried)
        if lost:
            cluster.count(member, repairs_failed=len(lost))
        missing = []
        for source, part in plan.items():
            # one stream for the lot; if it fails, one chunk at a time, so one chunk the source
            # lacks does not send the others to the next candidate
            for group in [part] if len(part) == 1 else [part, *([k] for k in part)]:
                try:
                    nbytes = yield Copy(source, member, ns, tuple(group), num_layers)
                except TransferError as exc:  # the source lacks one, or either end failed
                    log.debug("kvstore cluster: copy %s -> %s failed: %s", source, member, exc)
                    if len(group) == 1:
                        tried[group[0]].add(source)
                        missing.append(group[0])
                    continue
                copied += nbytes
                cluster.count(member, chunks_repaired=len(group), bytes_repaired=nbytes)
                cluster.repairs.verified(member, ns, group)
                if group is part:
                    break
    return copied


# -- delete, stats, readiness -------------------------------------------------------------------------


def delete(
    cluster: ClusterCore,
    namespace: Namespace | str,
    keys: Any,
    num_layers: int | None,
    timeout_s: float | None,
) -> ClusterOp[int]:
    """Copies deleted on every replica that may hold the keys (all current and, in a grace window,
    previous members); down replicas are skipped."""
    core = cluster.check
    ns = core.namespace(namespace)
    keys = core.check_keys(keys)
    core.delete_layers(num_layers)
    members = (yield CurrentView()).everyone
    asks = tuple(_tolerant(cluster, MemberDelete(m, ns, keys, num_layers, timeout_s), 0) for m in members)
    deleted: list[int] = yield Fan(asks)
    return sum(deleted)


def _tolerant(cluster: ClusterCore, call: MemberCall, default: T) -> ClusterOp[T]:
    """A member call whose transport failure is accounted and answered with ``default``."""
    try:
        answer: T = yield call
        return answer
    except TransferError as exc:
        cluster.failed(call.member, exc)
        return default


def replica_stats(
    cluster: ClusterCore, timeout_s: float | None
) -> ClusterOp[dict[str, StoreStats | TransferError]]:
    """Each current member's own stats, or the error it answered with."""
    members = (yield CurrentView()).members
    answers = yield Fan(tuple(_answer(MemberStats(m, timeout_s)) for m in members))
    return dict(zip(members, answers, strict=True))


def stats(cluster: ClusterCore, timeout_s: float | None) -> ClusterOp[StoreStats]:
    """The reachable replicas' stats as one store (tiers and counters summed)."""
    per_member = yield from replica_stats(cluster, timeout_s)
    answered = {m: s for m, s in per_member.items() if isinstance(s, StoreStats)}
    if not answered:
        raise Unavailable(f"Stats: no replica answered ({', '.join(per_member)})")
    return ClusterCore.merge_stats(answered)


def wait_ready(cluster: ClusterCore, timeout_s: float, members: Sequence[str] | None) -> ClusterOp[None]:
    """Every current member (or each of ``members``) connected, else :class:`Unavailable` naming the
    others."""
    if members is None:
        members = (yield CurrentView()).members
    answers = yield Fan(tuple(_answer(MemberReady(m, timeout_s)) for m in members))
    down = [m for m, a in zip(members, answers, strict=True) if isinstance(a, TransferError)]
    if down:
        raise Unavailable(
            f"replicas not reachable within {timeout_s} s: {', '.join(down)} "
            f"({len(members) - len(down)} of {len(members)} ready)"
        )


def _answer(call: MemberCall) -> ClusterOp[Any]:
    """A member call's result, or the TransferError it raised (as a value)."""
    try:
        return (yield call)
    except TransferError as exc:
        return exc


# -- the operations as an object (what transfer.rpc.api calls) ------------------------------------------


class ClusterOps:
    """The operations above bound to a :class:`ClusterCore`: the :class:`transfer.rpc.api.Operations`
    of :class:`transfer.replicas.client.ClusterKVClient` and :class:`transfer.replicas.aio_client.AsyncClusterKVClient`."""

    __slots__ = ("cluster",)

    def __init__(self, cluster: ClusterCore) -> None:
        self.cluster = cluster

    def lookup(
        self, namespace: Namespace | str, keys: Any, num_layers: int, timeout_s: float | None
    ) -> ClusterOp[int]:
        return lookup(self.cluster, namespace, keys, num_layers, timeout_s)

    def put(
        self, namespace: Namespace | str, source: Any, ack: str | None, timeout_s: float | None
    ) -> ClusterOp[PutResult]:
        return put(self.cluster, namespace, source, ack, timeout_s)

    def get_layers(
        self, ns: str, keys: list[bytes], start: int, end: int, timeout_s: float | None
    ) -> ClusterOp[None]:
        return get_layers(self.cluster, ns, keys, start, end, timeout_s)

    def delete(
        self, namespace: Namespace | str, keys: Any, num_layers: int | None, timeout_s: float | None
    ) -> ClusterOp[int]:
        return delete(self.cluster, namespace, keys, num_layers, timeout_s)

    def stats(self, timeout_s: float | None) -> ClusterOp[StoreStats]:
        return stats(self.cluster, timeout_s)
