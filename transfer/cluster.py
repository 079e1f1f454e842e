"""One keyspace over several store replicas: placement, replication and fallback in the client.

:class:`ClusterKVClient` has the API of :class:`transfer.client.KVClient`
(``lookup``, ``put``, ``get_layers``, ``delete``, ``stats``, ``wait_ready``,
``close``, ``with``), built from one ``KVClient`` per member, so everything that
takes a client (kvio, the layer-wise cache, the workers, the demo) works over a
cluster unchanged. :func:`connect` picks the client from a target string
(:mod:`transfer.membership` has the grammar); :mod:`transfer.aio_cluster` is
the asyncio twin. Both share :class:`transfer.routing.ClusterCore`, which holds every decision
(owners, health, plans, counters), so they cannot drift apart.

Promises:

* **Placement per chunk.** Each chunk key has ``replication`` (R) owners by
  rendezvous hashing (:mod:`transfer.placement`). Clients with the same member
  list agree on them without coordination.
* **Put** sends each item to its R owners in parallel. ``write_ack="all"`` (the
  default) returns once every owner answered, so a reader that looks the key up
  right after (decode picking up prefill's chunks) finds it at whichever owner
  it asks; ``"one"`` returns once every item is on at least one owner and lets
  the other copies finish in the background (lower put latency, a short window
  where a read may miss).
* **Lookup** asks replicas in parallel about keys they own (each once per
  round) and returns the longest prefix present: one trusted owner per key, as
  few replicas as cover the prefix; every candidate, previous owners included,
  where no owner is trusted (recent failure, key moved by a membership change);
  a further round only while the first key not known present is unsettled
  (:class:`transfer.routing.LookupState`). Exact when replicas hold what they
  own, a safe lower bound otherwise (never more than is there).
* **Get** streams each key from one healthy owner (again as few streams as
  cover the keys); a replica that fails or misses mid-stream is replaced by the
  key's next candidate from the layer where it stopped. Blobs are verified
  against their trailer by the member client.
* **A lost replica costs misses, never an error.** Transport failures mark a
  member down for ``down_s`` (it is skipped, then probed again, so a restarted
  replica rejoins by itself); puts that reach no owner are dropped and counted.
  Only caller errors (bad arguments, auth, quotas) raise, as with one server.
* **Counters per replica** (:meth:`ClusterKVClient.replica_counters`): which
  replica served what, fallbacks, failures and misses caused by down replicas.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import grpc

from kvstore.keys import Namespace
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire import Blob, PutRequestView
from transfer.client import ClientCore, KVClient, PutItem, PutResult, StoreStats
from transfer.errors import InvalidArgument, NotFound, TransferError, Unavailable
from transfer.membership import (
    DEFAULT_GRACE_S,
    DEFAULT_REFRESH_S,
    DnsMembership,
    Membership,
    NotAKVStore,
    Resolver,
    StaticMembership,
    View,
    parse_target,
    resolve_host,
)
from transfer.routing import (
    COUNTER_FIELDS,
    DEFAULT_DOWN_S,
    DEFAULT_REPLICATION,
    DEFAULT_WRITE_ACK,
    WRITE_ACKS,
    ClusterCore,
    GetShare,
    ReplicaCounters,
    acknowledged,
    member_options,
)

__all__ = [
    "WRITE_ACKS",
    "ClusterKVClient",
    "ReplicaCounters",
    "ReplicaMetrics",
    "StoreClient",
    "connect",
    "make_membership",
    "probe",
    "verify_members",
]

log = logging.getLogger(__name__)

DEFAULT_PROBE_TIMEOUT_S = 5.0


class ClusterKVClient:
    """Blocking client of a replicated store (see the module docstring); API of :class:`KVClient`."""

    def __init__(
        self,
        membership: Membership,
        *,
        token: str | None = None,
        replication: int = DEFAULT_REPLICATION,
        write_ack: str = DEFAULT_WRITE_ACK,
        down_s: float = DEFAULT_DOWN_S,
        max_workers: int = 16,
        **client_options: Any,
    ) -> None:
        self._options = member_options({"token": token, **client_options})
        check = ClientCore("cluster", **self._options)
        self._cluster = ClusterCore(
            membership, replication=replication, write_ack=write_ack, down_s=down_s, check=check
        )
        self._clients: dict[str, KVClient] = {}
        self._retired: dict[str, float] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kvstore-cluster")
        self._pending: list[Future[Any]] = []  # background copies of write_ack="one"
        self._closed = False

    @property
    def cluster(self) -> ClusterCore:
        return self._cluster

    @property
    def core(self) -> ClientCore:
        return self._cluster.check

    def __enter__(self) -> ClusterKVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def members(self) -> tuple[str, ...]:
        return self._cluster.view().members

    def replica_counters(self) -> dict[str, dict[str, int]]:
        """Per replica: lookups, blobs/bytes got and put, fallbacks, failures, misses due to down replicas."""
        return self._cluster.counters()

    def _client(self, member: str) -> KVClient:
        with self._lock:
            client = self._clients.get(member)
            if client is None:
                client = self._clients[member] = KVClient(member, **self._options)
            self._retired.pop(member, None)
            return client

    def _retire(self, view: View) -> None:
        """Close clients of members gone from the view once no call can still use them: a call
        never outlives its deadline, so after ``stream_timeout_s`` none is in flight."""
        now = time.monotonic()
        linger = self._cluster.check.stream_timeout_s
        with self._lock:
            for member in list(self._clients):
                if member in view.everyone:
                    self._retired.pop(member, None)
                elif now - self._retired.setdefault(member, now) > linger:
                    self._clients.pop(member).close()
                    del self._retired[member]

    def _view(self) -> View:
        view = self._cluster.view()
        self._retire(view)
        return view

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self._cluster.membership.close()
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    def wait_ready(self, timeout_s: float = 10.0, *, members: Sequence[str] | None = None) -> None:
        """Block until every current member (or each of ``members``) is connected; :class:`Unavailable`
        names those that are not."""
        members = self._view().members if members is None else tuple(members)
        futures = {m: self._pool.submit(self._client(m).wait_ready, timeout_s) for m in members}
        down = [m for m, f in futures.items() if f.exception() is not None]
        if down:
            raise Unavailable(
                f"replicas not reachable within {timeout_s} s: {', '.join(down)} "
                f"({len(members) - len(down)} of {len(members)} ready)"
            )

    # -- lookup -----------------------------------------------------------------------------------

    def lookup(
        self,
        namespace: Namespace | str,
        keys: Sequence[bytes],
        num_layers: int,
        *,
        timeout_s: float | None = None,
    ) -> int:
        """Number of leading ``keys`` whose layers ``[0, num_layers)`` are stored on some owner."""
        ns = self.core.namespace(namespace)
        keys = self.core.check_keys(keys)
        if num_layers < 1:
            raise InvalidArgument(f"num_layers must be >= 1, got {num_layers}")
        if not keys:
            return 0
        view = self._view()
        state = self._cluster.start_lookup(keys, view)
        plan = state.first_plan()
        while plan:
            state.absorb(plan, self._ask(plan, ns, keys, num_layers, timeout_s))
            plan = state.next_plan()
        return state.result()

    def _ask(
        self, plan: dict[str, list[int]], ns: str, keys: list[bytes], num_layers: int, timeout_s: float | None
    ) -> dict[str, int | None]:
        """One Lookup per planned member, side by side: all but one on the pool, the last in this
        thread (one hand-off fewer on the hot path)."""
        if not plan:
            return {}
        calls = [(m, [keys[i] for i in pos]) for m, pos in plan.items()]
        futures = {
            m: self._pool.submit(self._lookup_one, m, ns, sent, num_layers, timeout_s)
            for m, sent in calls[:-1]
        }
        last, sent = calls[-1]
        answers = {last: self._lookup_one(last, ns, sent, num_layers, timeout_s)}
        answers.update((m, f.result()) for m, f in futures.items())
        return answers

    def _lookup_one(
        self, member: str, ns: str, keys: list[bytes], num_layers: int, timeout_s: float | None
    ) -> int | None:
        try:
            n = self._client(member).lookup(ns, keys, num_layers, timeout_s=timeout_s)
        except TransferError as exc:
            self._cluster.failed(member, exc)
            return None
        self._cluster.succeeded(member)
        self._cluster.count(member, lookups=1, lookup_keys=len(keys), lookup_present=n)
        return n

    # -- put --------------------------------------------------------------------------------------

    def put(
        self,
        namespace: Namespace | str,
        items: Iterable[PutItem | tuple],
        *,
        timeout_s: float | None = None,
        ack: str | None = None,
    ) -> PutResult:
        """Store every item on its owners; ``num_stored``/``bytes_stored`` count items stored at least once.

        ``ack`` ("memory" | "durable") is asked of every owner (see :meth:`KVClient.put`);
        ``durable`` and ``tiers`` of the result hold for every copy that was acknowledged.
        """
        ns = self.core.namespace(namespace)
        stored = nbytes = requests = 0
        results: list[PutResult] = []
        for batch in self._cluster.split_batches(ns, iter(items)):
            self._drain()  # at most one batch of background copies in memory
            acked, sent, answers = self._put_batch(ns, batch, timeout_s, ack)
            stored += len(acked)
            nbytes += sum(len(batch[i].blob) for i in acked)
            requests += sent
            results += answers
        if self._cluster.write_ack == "all":
            self._drain()
        return acknowledged(stored, nbytes, requests, results)

    def _put_batch(
        self, ns: str, batch: list[PutRequestView], timeout_s: float | None, ack: str | None
    ) -> tuple[set[int], int, list[PutResult]]:
        plan = self._cluster.plan_put(batch, self._view())
        futures = {
            self._pool.submit(self._put_one, m, ns, batch, idx, timeout_s, ack): idx
            for m, idx in plan.items()
        }
        owners_left = [0] * len(batch)  # per item: owners not yet answered
        for idx in plan.values():
            for i in idx:
                owners_left[i] += 1
        acked: set[int] = set()
        answers: list[PutResult] = []
        pending = set(futures)
        need_all = self._cluster.write_ack == "all"
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                ok = f.result()  # raises caller errors only
                if ok is not None:
                    answers.append(ok)
                for i in futures[f]:
                    owners_left[i] -= 1
                    if ok is not None:
                        acked.add(i)
            if not need_all and all(i in acked or owners_left[i] == 0 for i in range(len(batch))):
                break
        with self._lock:  # the client may be shared by threads: keep every thread's stragglers
            self._pending.extend(pending)
        return acked, len(futures), answers

    def _put_one(
        self,
        member: str,
        ns: str,
        batch: list[PutRequestView],
        indices: list[int],
        timeout_s: float | None,
        ack: str | None,
    ) -> PutResult | None:
        try:
            result = self._client(member).put(
                ns, self._cluster.items(batch, indices), timeout_s=timeout_s, ack=ack
            )
        except TransferError as exc:
            self._cluster.failed(member, exc)
            self._cluster.count(member, puts_dropped=len(indices))
            return None
        self._cluster.put_done(member, batch, indices)
        return result

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for f in pending:
            f.exception()  # a background copy's failure was counted; caller errors surface on the ack path

    # -- get --------------------------------------------------------------------------------------

    def get_layers(
        self,
        namespace: Namespace | str,
        keys: Sequence[bytes],
        layer_start: int,
        layer_end: int,
        *,
        timeout_s: float | None = None,
    ) -> Iterator[tuple[int, list[Blob]]]:
        """Yield ``(layer, [blob per key])`` in layer order, each key from its first healthy owner.

        A replica failing or missing a key mid-stream is replaced by the key's
        next owner from the current layer on; :class:`NotFound` only when no
        candidate of a key has it.
        """
        ns = self.core.namespace(namespace)
        keys = self.core.check_keys(keys)
        self.core.check_layer_range(layer_start, layer_end)
        if not keys:
            return iter(())
        return self._get(ns, keys, layer_start, layer_end, timeout_s)

    def _open(
        self,
        ns: str,
        keys: list[bytes],
        member: str,
        positions: list[int],
        layer: int,
        end: int,
        timeout_s: float | None,
        fallback: bool,
    ) -> GetShare:
        source = self._client(member).get_layers(
            ns, [keys[i] for i in positions], layer, end, timeout_s=timeout_s
        )
        self._cluster.count(member, gets=1, fallbacks=int(fallback))
        return GetShare(member, positions, source, fallback)

    def _get(
        self, ns: str, keys: list[bytes], start: int, end: int, timeout_s: float | None
    ) -> Iterator[tuple[int, list[Blob]]]:
        view = self._view()
        tried: dict[int, set[str]] = {}
        streams = [
            self._open(ns, keys, m, pos, start, end, timeout_s, False)
            for m, pos in self._cluster.plan_get(keys, range(len(keys)), view, tried).items()
        ]
        try:
            for layer in range(start, end):
                blobs: list[Blob | None] = [None] * len(keys)
                queue = list(streams)
                streams = []
                while queue:
                    stream = queue.pop(0)
                    try:
                        got, part = next(stream.source)
                        if got != layer:
                            raise NotFound(f"Get: {stream.member} sent layer {got}, expected {layer}")
                    except (TransferError, StopIteration) as exc:
                        stream.source.close()
                        err = exc if isinstance(exc, TransferError) else NotFound("Get: stream ended early")
                        self._cluster.failed(stream.member, err)
                        for i in stream.positions:
                            tried.setdefault(i, set()).add(stream.member)
                        plan = self._cluster.plan_get(keys, stream.positions, view, tried)
                        queue += [
                            self._open(ns, keys, m, pos, layer, end, timeout_s, True)
                            for m, pos in plan.items()
                        ]
                        continue
                    self._cluster.count(
                        stream.member, blobs_got=len(part), bytes_got=sum(len(b) for b in part)
                    )
                    for i, blob in zip(stream.positions, part, strict=True):
                        blobs[i] = blob
                    streams.append(stream)
                yield layer, blobs  # type: ignore[misc]
        finally:
            for stream in streams:
                stream.source.close()

    # -- delete, stats ------------------------------------------------------------------------------

    def delete(
        self,
        namespace: Namespace | str,
        keys: Sequence[bytes],
        *,
        num_layers: int | None = None,
        timeout_s: float | None = None,
    ) -> int:
        """Delete layers ``[0, num_layers)`` of each key (every layer when None: slow, each server
        searches its tiers) from every replica that may hold it (all current and, in a grace window,
        previous members); returns the copies deleted. Down replicas are skipped."""
        ns = self.core.namespace(namespace)
        keys = self.core.check_keys(keys)
        self.core.delete_layers(num_layers)
        futures = [
            self._pool.submit(self._delete_one, m, ns, keys, num_layers, timeout_s)
            for m in self._view().everyone
        ]
        return sum(f.result() for f in futures)

    def _delete_one(
        self, member: str, ns: str, keys: list[bytes], num_layers: int | None, timeout_s: float | None
    ) -> int:
        try:
            return self._client(member).delete(ns, keys, num_layers=num_layers, timeout_s=timeout_s)
        except TransferError as exc:
            self._cluster.failed(member, exc)
            return 0

    def replica_stats(self, *, timeout_s: float | None = None) -> dict[str, StoreStats | TransferError]:
        """Each current member's own stats, or the error it answered with."""
        members = self._view().members
        futures = {m: self._pool.submit(self._client(m).stats, timeout_s=timeout_s) for m in members}
        out: dict[str, StoreStats | TransferError] = {}
        for m, f in futures.items():
            exc = f.exception()
            if exc is not None and not isinstance(exc, TransferError):
                raise exc
            out[m] = exc if exc is not None else f.result()  # type: ignore[assignment]
        return out

    def stats(self, *, timeout_s: float | None = None) -> StoreStats:
        """The reachable replicas' stats as one store (tiers and counters summed)."""
        answered = {
            m: s for m, s in self.replica_stats(timeout_s=timeout_s).items() if isinstance(s, StoreStats)
        }
        if not answered:
            raise Unavailable(f"Stats: no replica answered ({', '.join(self.members())})")
        return ClusterCore.merge_stats(answered)


class ReplicaMetrics:
    """A ``prometheus_client`` collector of a cluster client's per-replica counters.

    ``REGISTRY.register(ReplicaMetrics(client))`` in a process that serves
    metrics exports ``kvstore_client_replica_<counter>_total{replica="host:port"}``:
    which replica served which lookups, blobs and bytes, and where fallbacks,
    failures and misses due to down replicas happened.
    """

    def __init__(self, client: Any, prefix: str = "kvstore_client_replica") -> None:
        self._client = client
        self._prefix = prefix

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        snapshot = self._client.replica_counters()
        for name in COUNTER_FIELDS:
            family = CounterMetricFamily(
                f"{self._prefix}_{name}",
                f"cluster client: {name.replace('_', ' ')} per replica",
                labels=["replica"],
            )
            for member, counters in snapshot.items():
                family.add_metric([member], counters[name])
            yield family


# -- the factory ------------------------------------------------------------------------------------

#: What :func:`connect` returns; both have the same methods.
StoreClient = KVClient | ClusterKVClient


def make_membership(
    target: str,
    *,
    refresh_s: float = DEFAULT_REFRESH_S,
    grace_s: float = DEFAULT_GRACE_S,
    resolver: Resolver | None = None,
) -> Membership:
    """The membership a list or ``dns:///`` target names (a single ``host:port`` is a list of one)."""
    parsed = parse_target(target)
    if parsed.kind == "dns":
        return DnsMembership(
            parsed.host, parsed.port, refresh_s=refresh_s, grace_s=grace_s, resolver=resolver or resolve_host
        )
    return StaticMembership(parsed.members, grace_s=grace_s)


def probe(
    member: str,
    *,
    token: str | None = None,
    timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
    credentials: grpc.ChannelCredentials | None = None,
) -> str | None:
    """Ask ``member`` for its Stats once: ``None`` if it answered as a kvstore, ``"down"`` if nothing
    listens there (a replica not started yet: allowed), else raise :class:`NotAKVStore`."""
    channel = grpc.secure_channel(member, credentials) if credentials else grpc.insecure_channel(member)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with channel:
        try:
            pb_grpc.KVStoreStub(channel).Stats(pb.StatsRequest(), timeout=timeout_s, metadata=metadata)
            return None
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return None  # a kvstore that wants another token; the first real call says so
    if code == grpc.StatusCode.UNAVAILABLE and "parsing http/2" not in details.lower():
        return "down"  # refused, reset, slow handshake: a replica not (yet) up, not a wrong one
    if code == grpc.StatusCode.UNIMPLEMENTED:
        why = "it is a gRPC server without the kvstore.v1.KVStore service"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        why = f"it accepted the connection but did not answer gRPC within {timeout_s} s"
    elif code == grpc.StatusCode.UNAVAILABLE:
        why = "it does not speak gRPC (an HTTP/1 or other TCP port?)"
    else:
        why = f"it answered {code.name}: {details}"
    raise NotAKVStore(f"{member} is not a kvstore server: {why}; check the port (kvstore serve --port)")


def verify_members(
    members: Sequence[str],
    *,
    token: str | None = None,
    timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
    credentials: grpc.ChannelCredentials | None = None,
) -> list[str]:
    """Probe every member in parallel; returns those down, raises :class:`NotAKVStore` for a wrong one."""
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(members)))) as pool:
        results = list(
            pool.map(lambda m: probe(m, token=token, timeout_s=timeout_s, credentials=credentials), members)
        )
    down = [m for m, r in zip(members, results, strict=True) if r == "down"]
    for m in down:
        log.warning("kvstore cluster: %s is not reachable; it is treated as down until it answers", m)
    return down


def connect(
    target: str,
    *,
    token: str | None = None,
    replication: int = DEFAULT_REPLICATION,
    write_ack: str = DEFAULT_WRITE_ACK,
    refresh_s: float = DEFAULT_REFRESH_S,
    grace_s: float = DEFAULT_GRACE_S,
    verify: bool = True,
    probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
    resolver: Resolver | None = None,
    **client_options: Any,
) -> KVClient | ClusterKVClient:
    """The client for ``target``: ``host:port`` gives a plain :class:`KVClient` (as before; one
    server holds one copy, ``replication`` does not apply), a member list or ``dns:///name:port``
    a :class:`ClusterKVClient`.

    ``verify`` probes each member once (in parallel): one that answers but is
    not a kvstore raises :class:`NotAKVStore`; one that refuses connections is
    only logged (it may not have started yet) and costs misses until it does.
    Bad targets raise :class:`InvalidTarget`, :class:`UnresolvableTarget` or
    :class:`ReplicationError`, before any connection is made.
    """
    parsed = parse_target(target)
    if parsed.kind == "single":
        return KVClient(parsed.members[0], token=token, **client_options)
    membership = make_membership(target, refresh_s=refresh_s, grace_s=grace_s, resolver=resolver)
    try:
        client = ClusterKVClient(
            membership, token=token, replication=replication, write_ack=write_ack, **client_options
        )
    except BaseException:
        membership.close()
        raise
    if verify:
        try:
            down = verify_members(
                client.members(), token=token, timeout_s=probe_timeout_s, credentials=client.core.credentials
            )
            # connect the answering members' channels before the first call
            client.wait_ready(probe_timeout_s, members=[m for m in client.members() if m not in down])
        except Unavailable:
            pass  # named in the log by verify_members; such members cost misses until they answer
        except BaseException:
            client.close()
            raise
    return client
