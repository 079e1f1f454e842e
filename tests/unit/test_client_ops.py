"""The client's operations (transfer.rpc.ops, transfer.replicas.ops) driven by scripted effects.

The integration tests run the same operations through real servers; these pin
down the decisions themselves (how many attempts, where a Get resumes, when a
Put batch closes, which replica takes over) with exact sequences of effects, and
check that the blocking and asyncio drivers agree on them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from kvstore import integrity
from kvstore.retry import ExponentialBackoff
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire import GetResponseView
from transfer.errors import BlobIntegrityError, InvalidArgument, NotFound, TransferError, Unavailable
from transfer.replicas import ops as cops
from transfer.replicas.membership import StaticMembership
from transfer.replicas.repair import RepairJob
from transfer.replicas.routing import ClusterCore
from transfer.rpc import ops
from transfer.rpc.core import ClientCore, PutItem, PutResult, RetryPolicy

NS = "t/m/c"
KEYS = [bytes([i]) * 32 for i in range(5)]


def blob(key: int, layer: int) -> bytes:
    return integrity.seal(bytes([key, layer]) * 8)


def core(**options: Any) -> ClientCore:
    policy = RetryPolicy(ExponentialBackoff(base_s=0.01, cap_s=0.01, jitter=False), max_attempts=3)
    return ClientCore("scripted", retry=options.pop("retry", policy), **options)


class Script:
    """A driver's ``perform`` that answers effects from a list of handlers and records them."""

    def __init__(self, handle: Callable[[Any], Any]) -> None:
        self.handle = handle
        self.effects: list[Any] = []

    def __call__(self, effect: Any) -> Any:
        self.effects.append(effect)
        return self.handle(effect)

    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.effects]


def passthrough(effect: Any, exc: BaseException) -> BaseException | None:
    return exc if isinstance(exc, TransferError) else None


class Stream:
    """A scripted Get stream: messages, then an error or the end."""

    def __init__(self, messages: list[GetResponseView], fail: TransferError | None = None) -> None:
        self.messages = list(messages)
        self.fail = fail
        self.cancelled = False

    def receive(self) -> Any:
        if self.messages:
            return self.messages.pop(0)
        if self.fail is not None:
            raise self.fail
        return ops.END

    def cancel(self) -> None:
        self.cancelled = True


def layer_messages(keys: int, start: int, end: int) -> list[GetResponseView]:
    return [GetResponseView(k, layer, blob(k, layer)) for layer in range(start, end) for k in range(keys)]


# -- retry --------------------------------------------------------------------------------------------


def test_unary_retries_unavailable_then_succeeds() -> None:
    answers: list[Any] = [Unavailable("down"), Unavailable("down"), pb.LookupResponse(num_present=2)]

    def handle(effect: Any) -> Any:
        if isinstance(effect, ops.Sleep):
            return None
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    script = Script(handle)
    assert ops.run(ops.lookup(core(), NS, KEYS[:2], 3, None), script, passthrough) == 2
    assert script.kinds() == ["Call", "Sleep", "Call", "Sleep", "Call"]


def test_unary_gives_up_after_max_attempts_and_never_retries_caller_errors() -> None:
    script = Script(lambda e: None if isinstance(e, ops.Sleep) else (_ for _ in ()).throw(Unavailable("x")))
    with pytest.raises(Unavailable):
        ops.run(ops.lookup(core(), NS, KEYS[:1], 1, None), script, passthrough)
    assert script.kinds().count("Call") == 3

    script = Script(lambda e: (_ for _ in ()).throw(InvalidArgument("bad")))
    with pytest.raises(InvalidArgument):
        ops.run(ops.lookup(core(), NS, KEYS[:1], 1, None), script, passthrough)
    assert script.kinds() == ["Call"]


# -- lookup windowing ---------------------------------------------------------------------------------


def test_lookup_windows_stop_at_the_first_incomplete_window() -> None:
    present = {0: 2, 2: 1}  # first window whole, second only its first key

    def handle(effect: Any) -> Any:
        first = KEYS.index(effect.request.keys[0])
        return pb.LookupResponse(num_present=present[first])

    script = Script(handle)
    assert ops.run(ops.lookup(core(max_keys_per_request=2), NS, KEYS, 1, None), script, passthrough) == 3
    assert [list(e.request.keys) for e in script.effects] == [KEYS[0:2], KEYS[2:4]]


def test_lookup_validates_before_any_call() -> None:
    script = Script(lambda e: pytest.fail("no call expected"))
    with pytest.raises(InvalidArgument, match="key 1 must be 32 bytes"):
        ops.run(ops.lookup(core(), NS, [KEYS[0], b"short"], 1, None), script, passthrough)
    with pytest.raises(InvalidArgument, match="num_layers"):
        ops.run(ops.lookup(core(), NS, KEYS, 0, None), script, passthrough)
    assert script.effects == []


# -- get: assembly, resume, cancellation -------------------------------------------------------------


def get_script(streams: list[Stream]) -> Script:
    queue = list(streams)

    def handle(effect: Any) -> Any:
        if isinstance(effect, ops.OpenGet):
            return queue.pop(0)
        if isinstance(effect, ops.Receive):
            return effect.stream.receive()
        if isinstance(effect, ops.Cancel):
            return effect.stream.cancel()
        return None  # Sleep

    return Script(handle)


def test_get_resumes_at_the_first_layer_not_yet_emitted() -> None:
    first = Stream(layer_messages(3, 0, 2) + layer_messages(1, 2, 3), fail=Unavailable("reset"))
    second = Stream(layer_messages(3, 2, 4))
    script = get_script([first, second])
    ns, keys = ops.get_args(core(), NS, KEYS[:3], 0, 4)
    got = list(ops.drive(ops.get_layers(core(), ns, keys, 0, 4, None), script, passthrough))
    assert [layer for layer, _ in got] == [0, 1, 2, 3]
    assert all(bytes(b) == blob(k, layer) for layer, blobs in got for k, b in enumerate(blobs))
    opens = [e.request for e in script.effects if isinstance(e, ops.OpenGet)]
    assert [(r.layer_start, r.layer_end) for r in opens] == [(0, 4), (2, 4)]
    assert first.cancelled and second.cancelled


def test_get_refuses_a_damaged_blob_and_cancels_the_stream() -> None:
    bad = GetResponseView(1, 0, blob(1, 0)[:-1] + b"\x00")
    stream = Stream([GetResponseView(0, 0, blob(0, 0)), bad])
    ns, keys = ops.get_args(core(), NS, KEYS[:2], 0, 1)
    with pytest.raises(BlobIntegrityError):
        list(ops.drive(ops.get_layers(core(), ns, keys, 0, 1, None), get_script([stream]), passthrough))
    assert stream.cancelled


def test_get_out_of_order_stream_is_an_error_not_a_retry() -> None:
    stream = Stream([GetResponseView(0, 1, blob(0, 1))])
    ns, keys = ops.get_args(core(), NS, KEYS[:1], 0, 2)
    with pytest.raises(TransferError, match="out of order"):
        list(ops.drive(ops.get_layers(core(), ns, keys, 0, 2, None), get_script([stream]), passthrough))


def test_get_abandoned_by_its_consumer_cancels_the_stream() -> None:
    stream = Stream(layer_messages(2, 0, 3))
    ns, keys = ops.get_args(core(), NS, KEYS[:2], 0, 3)
    layers = ops.drive(ops.get_layers(core(), ns, keys, 0, 3, None), get_script([stream]), passthrough)
    assert next(layers)[0] == 0
    layers.close()
    assert stream.cancelled


def test_get_windows_keys_per_layer() -> None:
    # 5 keys, 2 per request: one Get per (layer, window), layers still in order
    streams = [Stream(layer_messages(n, layer, layer + 1)) for layer in range(2) for n in (2, 2, 1)]
    script = get_script(streams)
    c = core(max_keys_per_request=2)
    ns, keys = ops.get_args(c, NS, KEYS, 0, 2)
    got = list(ops.drive(ops.get_layers(c, ns, keys, 0, 2, None), script, passthrough))
    assert [(layer, len(blobs)) for layer, blobs in got] == [(0, 5), (1, 5)]
    assert len([e for e in script.effects if isinstance(e, ops.OpenGet)]) == 6


# -- put: batching, replay, a failing source ---------------------------------------------------------


def put_items(n: int, size: int = 64) -> list[PutItem]:
    return [PutItem(KEYS[i % 5], i // 5, 8, integrity.seal(bytes(size))) for i in range(n)]


def test_put_closes_a_batch_at_put_batch_bytes_and_replays_it_whole() -> None:
    c = core(put_batch_bytes=200)  # 72-byte blobs: three per batch
    sent: list[list[Any]] = []
    fail_once = [True]

    def handle(effect: Any) -> Any:
        if isinstance(effect, ops.FirstItem):
            return effect.batch.step(0)
        if isinstance(effect, ops.Sleep):
            return None
        requests = list(effect.batch.attempt())
        sent.append(requests)
        if fail_once.pop() if fail_once else False:
            raise Unavailable("reset mid-stream")
        return pb.PutResponse(num_stored=len(requests) - 1, bytes_stored=0, durable=True, tiers=["ram"])

    result = ops.run(ops.put(c, NS, iter(put_items(7)), None, None), Script(handle), passthrough)
    # batches of 3, 3, 1 items (+ commit each); the first one sent twice
    assert [len(r) for r in sent] == [4, 4, 4, 2]
    assert sent[0] == sent[1]
    assert result.num_stored == 7 and result.num_requests == 3 and result.durable


def test_put_raises_the_sources_own_error_and_commits_nothing() -> None:
    def items() -> Any:
        yield from put_items(2)
        raise KeyError("the caller's iterator broke")

    commits: list[bool] = []

    def handle(effect: Any) -> Any:
        if isinstance(effect, ops.FirstItem):
            return effect.batch.step(0)
        requests = list(effect.batch.attempt())
        commits.append(any(getattr(r, "commit", False) for r in requests))
        raise TransferError("cancelled: the request iterator failed")

    with pytest.raises(KeyError, match="iterator broke"):
        ops.run(ops.put(core(), NS, items(), None, None), Script(handle), passthrough)
    assert commits == [False]


def test_put_validates_items() -> None:
    with pytest.raises(InvalidArgument, match="no valid integrity trailer"):
        ops.run(
            ops.put(core(), NS, iter([PutItem(KEYS[0], 0, 1, b"x")]), None, None),
            Script(lambda e: e.batch.step(0) if isinstance(e, ops.FirstItem) else None),
            passthrough,
        )


# -- the asyncio driver runs the same decisions ----------------------------------------------------


def test_async_driver_makes_the_same_calls() -> None:
    first = Stream(layer_messages(2, 0, 1), fail=Unavailable("reset"))
    second = Stream(layer_messages(2, 1, 3))
    sync_script = get_script(
        [Stream(layer_messages(2, 0, 1), fail=Unavailable("reset")), Stream(layer_messages(2, 1, 3))]
    )
    async_script = get_script([first, second])
    c = core()
    ns, keys = ops.get_args(c, NS, KEYS[:2], 0, 3)
    sync_layers = [
        layer for layer, _ in ops.drive(ops.get_layers(c, ns, keys, 0, 3, None), sync_script, passthrough)
    ]

    async def perform(effect: Any) -> Any:
        return async_script(effect)

    async def main() -> list[int]:
        return [
            layer
            async for layer, _ in ops.adrive(ops.get_layers(c, ns, keys, 0, 3, None), perform, passthrough)
        ]

    assert asyncio.run(main()) == sync_layers == [0, 1, 2]
    assert async_script.kinds() == sync_script.kinds()
    assert first.cancelled and second.cancelled


# -- cluster operations ---------------------------------------------------------------------------------


def cluster(
    members: list[str], replication: int = 2, clock: Callable[[], float] = lambda: 0.0
) -> ClusterCore:
    return ClusterCore(StaticMembership(members), replication=replication, check=core(), clock=clock)


class ClusterScript:
    """Carries out cluster effects in order: Fan runs its sub-operations one after the other, member
    calls and member Get streams come from the test's handlers."""

    def __init__(
        self,
        cluster: ClusterCore,
        member: Callable[[cops.MemberCall], Any] = lambda e: None,
        opens: Callable[[cops.OpenLayers], Any] = lambda e: iter(()),
    ) -> None:
        self.cluster = cluster
        self.member = member
        self.opens = opens

    def perform(self, effect: Any) -> Any:
        if isinstance(effect, cops.CurrentView):
            return self.cluster.view()
        if isinstance(effect, cops.MemberCall):
            return self.member(effect)
        if isinstance(effect, cops.Fan):
            return [self.run(sub) for sub in effect.ops]
        if isinstance(effect, cops.OpenLayers):
            return self.opens(effect)
        if isinstance(effect, cops.Next):
            return next(effect.source, ops.END)
        if isinstance(effect, cops.Close):
            return effect.source.close()
        raise AssertionError(f"unexpected {effect}")

    @staticmethod
    def map_error(effect: Any, exc: BaseException) -> BaseException | None:
        return exc if isinstance(exc, TransferError) and isinstance(effect, cops.FALLIBLE) else None

    def run(self, op: cops.ClusterOp[Any]) -> Any:
        return ops.run(op, self.perform, self.map_error, lambda s: s.close())

    def drive(self, op: cops.ClusterOp[Any]) -> Any:
        return ops.drive(op, self.perform, self.map_error, lambda s: s.close())


def test_cluster_lookup_counts_a_down_replica_as_a_miss_not_an_error() -> None:
    members = ["a:1", "b:1", "c:1"]
    c = cluster(members, replication=1)
    owner = {k: c.owners(k, tuple(members))[0] for k in KEYS}
    down = next(owner[k] for k in KEYS if owner[k] != owner[KEYS[0]])  # not key 0's: a prefix survives

    def member(effect: cops.MemberCall) -> int:
        if effect.member == down:
            raise Unavailable(f"{down} is gone")
        assert isinstance(effect, cops.MemberLookup)
        return len(effect.keys)  # every key it is asked about is there

    first_lost = min(i for i, k in enumerate(KEYS) if owner[k] == down)  # R=1: nobody else has it
    assert first_lost > 0
    assert ClusterScript(c, member).run(cops.lookup(c, NS, KEYS, 4, None)) == first_lost
    assert c.counters()[down]["failures"] >= 1


def test_cluster_lookup_raises_caller_errors() -> None:
    c = cluster(["a:1", "b:1"])

    def member(effect: cops.MemberCall) -> int:
        raise InvalidArgument("namespace quota")

    with pytest.raises(InvalidArgument, match="quota"):
        ClusterScript(c, member).run(cops.lookup(c, NS, KEYS, 4, None))


def test_cluster_get_falls_back_to_the_next_owner_from_the_failed_layer() -> None:
    members = ["a:1", "b:1"]
    c = cluster(members, replication=2)
    opened: list[tuple[str, int]] = []

    def layers(member: str, keys: list[bytes], start: int, end: int) -> Any:
        for layer in range(start, end):
            if member == first and layer == 2:
                raise Unavailable(f"{member} died")
            yield layer, [blob(KEYS.index(k), layer) for k in keys]

    first = c.owners(KEYS[0], tuple(members))[0]

    def opens(effect: cops.OpenLayers) -> Any:
        opened.append((effect.member, effect.start))
        return layers(effect.member, effect.keys, effect.start, effect.end)

    ns, keys = ops.get_args(c.check, NS, KEYS[:1], 0, 4)
    got = list(ClusterScript(c, opens=opens).drive(cops.get_layers(c, ns, keys, 0, 4, None)))
    assert [layer for layer, _ in got] == [0, 1, 2, 3]
    assert [bytes(b[0]) for _, b in got] == [blob(0, layer) for layer in range(4)]
    second = next(m for m in members if m != first)
    assert opened == [(first, 0), (second, 2)]
    assert c.counters()[second]["fallbacks"] == 1


def test_cluster_get_raises_not_found_when_no_candidate_has_the_key() -> None:
    c = cluster(["a:1", "b:1"], replication=2)
    script = ClusterScript(c, opens=lambda e: (x for x in list[Any]()))  # every replica ends at once
    ns, keys = ops.get_args(c.check, NS, KEYS[:1], 0, 2)
    with pytest.raises(NotFound):
        list(script.drive(cops.get_layers(c, ns, keys, 0, 2, None)))


# -- repair (read repair and hinted handoff) -------------------------------------------------------------


class Replicas(ClusterScript):
    """Replicas as the operations see them: what each holds, Lookup and Get answered from that, a
    member in ``down`` failing every call; copies move chunks between them. Background operations
    are kept for the test to run (:meth:`run_background`)."""

    def __init__(self, c: ClusterCore, holds: dict[str, set[bytes]]) -> None:
        super().__init__(c, self.member, self.opens)
        self.holds = holds
        self.down: set[str] = set()
        self.copies: list[tuple[str, str, tuple[bytes, ...]]] = []
        self.background: list[cops.ClusterOp[Any]] = []

    def perform(self, effect: Any) -> Any:
        if isinstance(effect, cops.Background):
            self.background.append(effect.op)
            return None
        if isinstance(effect, cops.Copy):
            return self.copy(effect)
        if isinstance(effect, (cops.Spawn, cops.WaitAny, cops.Detach, cops.Abandon, cops.Drain)):
            return self.spawning(effect)
        return super().perform(effect)

    def spawning(self, effect: Any) -> Any:  # Put's tasks, run at once (write_ack="all")
        if isinstance(effect, cops.Spawn):
            return ("task", self.run(effect.op))
        if isinstance(effect, cops.WaitAny):
            return [(t, t[1]) for t in effect.tasks], frozenset()
        return None

    def member(self, effect: cops.MemberCall) -> Any:
        if effect.member in self.down:
            raise Unavailable(f"{effect.member} is down")
        if isinstance(effect, cops.MemberLookup):
            keys = effect.keys
            return next((j for j, k in enumerate(keys) if k not in self.holds[effect.member]), len(keys))
        if isinstance(effect, cops.MemberPut):
            for item in effect.items:
                self.holds[effect.member].add(item.key)
            return PutResult(len(effect.items), 0, 1)
        raise AssertionError(effect)

    def opens(self, effect: cops.OpenLayers) -> Any:
        member, keys, start, end = effect.member, effect.keys, effect.start, effect.end

        def layers() -> Any:
            if member in self.down or any(k not in self.holds[member] for k in keys):
                raise NotFound(f"{member} misses a key")
            for layer in range(start, end):
                yield layer, [blob(KEYS.index(k), layer) for k in keys]

        return layers()

    def copy(self, effect: cops.Copy) -> int:
        if {effect.source, effect.target} & self.down:
            raise Unavailable("down")
        if any(k not in self.holds[effect.source] for k in effect.keys):
            raise NotFound(f"{effect.source} misses a key")
        self.copies.append((effect.source, effect.target, effect.keys))
        self.holds[effect.target].update(effect.keys)
        return 100 * len(effect.keys) * effect.num_layers

    def run_background(self) -> None:
        while self.background:
            self.run(self.background.pop(0))


def placed_holds(c: ClusterCore, members: list[str]) -> dict[str, set[bytes]]:
    holds: dict[str, set[bytes]] = {m: set() for m in members}
    for k in KEYS:
        for m in c.owners(k, tuple(members)):
            holds[m].add(k)
    return holds


def test_lookup_finds_chunks_an_owner_lost_and_gives_the_copies_back() -> None:
    members = ["a:1", "b:1", "c:1"]
    c = cluster(members)
    holds = placed_holds(c, members)
    plan = c.start_lookup(KEYS, c.view()).first_plan()
    victim = max(plan, key=lambda m: len(plan[m]))  # a replica round 1 asks
    owned = {k for k in KEYS if victim in c.owners(k, tuple(members))}
    holds[victim] = set()  # restarted empty
    r = Replicas(c, holds)
    assert r.run(cops.lookup(c, NS, KEYS, 4, None)) == len(KEYS)  # whole, not cut at the hole
    assert c.counters()[victim]["holes_found"] == 1 and len(r.background) == 1
    r.run_background()
    assert holds[victim] == owned  # every copy it owns is back, copied from another owner
    assert r.copies and all(src != victim and dst == victim for src, dst, _ in r.copies)
    assert c.counters()[victim]["chunks_repaired"] == len(owned)
    assert c.counters()[victim]["bytes_repaired"] == 100 * len(owned) * 4
    # a second lookup finds nothing owed: no copy
    r.copies.clear()
    assert r.run(cops.lookup(c, NS, KEYS, 4, None)) == len(KEYS)
    r.run_background()
    assert r.copies == []


def test_once_a_hole_is_found_every_lookup_gives_the_owner_its_copies_back() -> None:
    # Lookups ask one owner per chunk, so most never see the other owner's hole; once one has, the
    # owner is owing for repair_window_s and every lookup checks the chunks of its prefix it owns.
    members = ["a:1", "b:1", "c:1"]
    for victim in members:
        c = cluster(members)
        holds = placed_holds(c, members)
        owned = {k for k in KEYS if victim in c.owners(k, tuple(members))}
        holds[victim] = set()
        r = Replicas(c, holds)
        for _ in range(2):  # every suffix, twice: the chunks looked up before the first hole too
            for start in range(len(KEYS)):
                assert r.run(cops.lookup(c, NS, KEYS[start:], 4, None)) == len(KEYS) - start
                r.run_background()
        assert c.counters()[victim]["holes_found"] >= 1, victim
        assert holds[victim] == owned, victim
        assert c.counters()[victim]["chunks_repaired"] == len(owned)  # each copied once


def test_a_replica_back_after_a_failure_is_checked_by_every_lookup() -> None:
    members = ["a:1", "b:1", "c:1"]
    c = cluster(members)
    holds = placed_holds(c, members)
    victim = "b:1"
    owned = {k for k in KEYS if victim in c.owners(k, tuple(members))}
    holds[victim] = set()
    r = Replicas(c, holds)
    r.down = {victim}
    assert r.run(cops.lookup(c, NS, KEYS, 4, None)) == len(KEYS)  # served by the others
    r.run_background()
    assert holds[victim] == set()  # nothing to give while it is down
    r.down = set()
    c.succeeded(victim)  # a later call reached it: it is back
    assert victim in c.owing()
    r.run(cops.lookup(c, NS, KEYS, 4, None))
    r.run_background()
    assert holds[victim] == owned


def test_hints_become_a_repair_when_the_owner_answers_again() -> None:
    members = ["a:1", "b:1"]
    now = [0.0]
    c = cluster(members, clock=lambda: now[0])  # R=2 of 2: both own every key
    holds: dict[str, set[bytes]] = {m: set() for m in members}
    r = Replicas(c, holds)
    r.down = {"b:1"}
    items = [(k, layer, 2, blob(i, layer)) for i, k in enumerate(KEYS[:3]) for layer in range(2)]
    result = r.run(cops.put(c, NS, iter(items), None, None))
    assert result.num_stored == 6 and holds == {"a:1": set(KEYS[:3]), "b:1": set()}
    r.run(cops.put(c, NS, iter(items[:2]), None, None))  # b marked down: skipped, hinted
    assert c.repairs.hinted() == {"b:1": 3} and holds["b:1"] == set()
    assert r.background == []  # nothing to replay while it is down
    r.down = set()
    now[0] += c.down_s + 1  # down_s passes: the next call that needs b tries it
    # an unrelated lookup reaches b (b owns every key): its hints become a repair job
    r.run(cops.lookup(c, NS, KEYS[4:], 2, None))
    assert c.repairs.hinted() == {} and r.background
    r.run_background()
    assert holds["b:1"] == set(KEYS[:3])
    assert [(src, dst, set(keys)) for src, dst, keys in r.copies] == [("a:1", "b:1", set(KEYS[:3]))]
    assert c.counters()["b:1"]["hints"] == 3 and c.counters()["b:1"]["chunks_repaired"] == 3


def test_repair_reads_from_the_next_candidate_and_counts_what_no_one_has() -> None:
    members = ["a:1", "b:1", "c:1"]
    c = cluster(members, replication=3)
    holds = {"a:1": set(), "b:1": {KEYS[0]}, "c:1": {KEYS[0], KEYS[1]}}
    r = Replicas(c, holds)
    job = RepairJob("a:1", NS, (KEYS[0], KEYS[1], KEYS[2]), 4)
    copied = r.run(cops.repair(c, job))
    assert holds["a:1"] == {KEYS[0], KEYS[1]}  # KEYS[2] is nowhere: left, counted
    assert copied == 100 * 2 * 4
    assert c.counters()["a:1"]["repairs_failed"] == 1
    # a repair asks first: nothing it holds is copied again
    r.copies.clear()
    assert r.run(cops.repair(c, job)) == 0 and r.copies == []
    holds["a:1"].add(KEYS[2])
    r.copies.clear()
    assert r.run(cops.repair(c, job)) == 0 and r.copies == []


def test_get_that_falls_back_past_a_missing_owner_repairs_it() -> None:
    members = ["a:1", "b:1"]
    c = cluster(members)
    holds = {"a:1": set(KEYS[:2]), "b:1": set(KEYS[:2])}
    first = c.plan_get(KEYS[:2], range(2), c.view(), {})
    reader = next(iter(first))
    holds[reader] = set()
    r = Replicas(c, holds)
    ns, keys = ops.get_args(c.check, NS, KEYS[:2], 0, 4)
    got = list(r.drive(cops.get_layers(c, ns, keys, 0, 4, None)))
    assert [layer for layer, _ in got] == [0, 1, 2, 3]
    assert r.background
    r.run_background()
    assert holds[reader] == set(KEYS[:2])


def test_repair_worker_stops_when_the_queue_is_empty_and_bounds_the_queue() -> None:
    members = ["a:1", "b:1"]
    c = cluster(members)
    c.repairs.max_jobs = 1
    assert c.repairs.offer("a:1", NS, KEYS[:1], 4) is True  # first job: start a worker
    assert c.repairs.offer("a:1", NS, KEYS[:1], 4) is False  # already owed
    assert c.repairs.offer("a:1", NS, KEYS[1:2], 4) is False and c.repairs.jobs_dropped == 1  # full
    holds = {"a:1": set(), "b:1": set(KEYS)}
    r = Replicas(c, holds)
    r.run(cops.repair_worker(c))
    assert holds["a:1"] == {KEYS[0]} and c.repairs.pending() == 0
    assert c.repairs.offer("a:1", NS, KEYS[1:2], 4) is True  # done: owed again, a new worker


def test_queued_jobs_for_one_replica_are_merged() -> None:
    c = cluster(["a:1", "b:1"])
    c.repairs.max_workers = 1
    assert c.repairs.offer("a:1", NS, KEYS[:2], 4)  # a worker to start
    assert not c.repairs.offer("a:1", NS, KEYS[2:3], 4)  # the one running takes it
    c.repairs.offer("b:1", NS, KEYS[3:4], 4)  # another replica: not merged
    c.repairs.offer("a:1", NS, KEYS[4:5], 4)
    first, second, third = c.repairs.take(), c.repairs.take(), c.repairs.take()
    assert first == RepairJob("a:1", NS, tuple(KEYS[:3]), 4)
    assert second == RepairJob("b:1", NS, (KEYS[3],), 4)
    assert third == RepairJob("a:1", NS, (KEYS[4],), 4)
    assert c.repairs.take() is None and c.repairs.pending() == 0
