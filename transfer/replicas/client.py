"""One keyspace over several store replicas: placement, replication and fallback in the client.

:class:`ClusterKVClient` has the API of :class:`transfer.rpc.client.KVClient`
(``lookup``, ``put``, ``get_layers``, ``delete``, ``stats``, ``wait_ready``,
``close``, ``with``), built from one ``KVClient`` per member, so everything that
takes a client (kvio, the layer-wise cache, the workers, the demo) works over a
cluster unchanged. :func:`connect` picks the client from a target string
(:mod:`transfer.replicas.membership` has the grammar); :mod:`transfer.replicas.aio_client` is
the asyncio front-end. Both run the operations of :mod:`transfer.replicas.ops` over
:class:`transfer.replicas.routing.ClusterCore`, which holds every decision (owners,
health, plans, counters); the front-ends only carry out the I/O, so they cannot
drift apart.

Promises:

* **Placement per chunk.** Each chunk key has ``replication`` (R) owners by
  rendezvous hashing (:mod:`transfer.replicas.placement`). Clients with the same member
  list agree on them without coordination.
* **Put** sends each item to its R owners in parallel. ``write_ack="all"`` (the
  default) returns once every owner answered, so a reader that looks the key up
  right after (decode picking up prefill's chunks) finds it at whichever owner
  it asks; ``"one"`` returns once every item is on at least one owner and lets
  the other copies finish in the background (lower put latency, a short window
  where a read may miss).
* **Lookup** asks replicas in parallel about keys they own (each once per
  round) and returns the longest prefix present, a chunk counting as present
  when any candidate holds it: one trusted owner per key first, as few
  replicas as cover the prefix; an owner's "absent" is checked with the key's
  other candidates before the prefix ends there
  (:class:`transfer.replicas.routing.LookupState`). Never more than is there.
* **Get** streams each key from one healthy owner (again as few streams as
  cover the keys); a replica that fails or misses mid-stream is replaced by the
  key's next candidate from the layer where it stopped. Blobs are verified
  against their trailer by the member client.
* **A lost replica costs misses, never an error.** Transport failures mark a
  member down for ``down_s`` (it is skipped, then probed again, so a restarted
  replica rejoins by itself); puts that reach no owner are dropped and counted.
  Only caller errors (bad arguments, auth, quotas) raise, as with one server.
* **Repair.** A replica that comes back gets its copies back: the writer's
  hints for it (hinted handoff) and the holes reads find (read repair) are
  copied from another owner in the background, bounded
  (:mod:`transfer.replicas.repair`; :meth:`ClusterKVClient.drain_repairs` waits).
* **Counters per replica** (:meth:`ClusterKVClient.replica_counters`): which
  replica served what, fallbacks, failures and misses caused by down replicas.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import grpc

from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from transfer.errors import TransferError, Unavailable
from transfer.replicas import ops as cops
from transfer.replicas.membership import (
    DEFAULT_GRACE_S,
    DEFAULT_REFRESH_S,
    DnsMembership,
    Membership,
    NotAKVStore,
    Resolver,
    StaticMembership,
    View,
    check_distinct,
    parse_target,
    resolve_host,
)
from transfer.replicas.routing import (
    COUNTER_FIELDS,
    DEFAULT_DOWN_S,
    DEFAULT_REPLICATION,
    DEFAULT_WRITE_ACK,
    WRITE_ACKS,
    ClusterCore,
    ReplicaCounters,
    member_options,
)
from transfer.rpc.api import BlockingApi
from transfer.rpc.client import KVClient
from transfer.rpc.core import ClientCore, StoreStats
from transfer.rpc.ops import END, Loop, assert_never

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
T = TypeVar("T")

DEFAULT_PROBE_TIMEOUT_S = 5.0


class ClusterKVClient(BlockingApi[cops.ClusterAction]):
    """Blocking client of a replicated store (see the module docstring); the methods of
    :class:`KVClient` (:class:`transfer.rpc.api.BlockingApi`) and a few of its own.

    The operations are those of :mod:`transfer.replicas.ops`; this class carries
    their effects out: member calls side by side on a thread pool, member Get
    streams as iterators.
    """

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
        self._ops = cops.ClusterOps(self._cluster)
        self._clients: dict[str, KVClient] = {}
        self._retired: dict[str, float] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kvstore-cluster")
        self._pending: list[Future[Any]] = []  # background copies of write_ack="one"
        self._repairing: list[Future[Any]] = []  # repair workers (transfer.replicas.repair)
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

    def _view(self) -> View:
        """The current view; clients of members gone from it are closed once no call can still use
        them (a call never outlives its deadline, so after ``stream_timeout_s`` none is in flight)."""
        view = self._cluster.view()
        now = time.monotonic()
        with self._lock:
            for member in retired(self._clients, self._retired, view, now, self.core.stream_timeout_s):
                self._clients.pop(member).close()
        return view

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cluster.repairs.clear()
        self._pool.shutdown(wait=True)
        self._cluster.membership.close()
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    def drain(self) -> None:
        """Wait for the background copies of ``write_ack="one"`` puts (their failures were counted)."""
        with self._lock:
            pending, self._pending = self._pending, []
        wait(pending)  # a background copy's failure was counted; caller errors surface on the ack path

    def drain_repairs(self, timeout_s: float | None = None) -> bool:
        """Wait until the repairs this client has queued are done (read repair and the hints of
        replicas that answered again; see :mod:`transfer.replicas.repair`). False if ``timeout_s`` ran out."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._lock:
                self._repairing = [f for f in self._repairing if not f.done()]
                running = list(self._repairing)
            if not running:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            wait(running, timeout=left)

    # -- the effects of transfer.replicas.ops, carried out with threads -----------------------------

    def _run(self, op: cops.ClusterOp[T]) -> T:
        return Loop(self._perform, cops.map_error, _close).run(op)

    def _drive(self, op: cops.ClusterOp[None]) -> Iterator[Any]:
        return Loop(self._perform, cops.map_error, _close).drive(op)

    def _perform(self, effect: cops.ClusterAction) -> Any:
        match effect:
            case cops.Next():
                return next(effect.source, END)
            case cops.MemberLookup(member, ns, keys, num_layers, timeout_s):
                return self._client(member).lookup(ns, keys, num_layers, timeout_s=timeout_s)
            case cops.MemberPut(member, ns, items, ack, timeout_s):
                return self._client(member).put(ns, items, ack=ack, timeout_s=timeout_s)
            case cops.MemberDelete(member, ns, keys, num_layers, timeout_s):
                return self._client(member).delete(ns, keys, num_layers=num_layers, timeout_s=timeout_s)
            case cops.MemberStats(member, timeout_s):
                return self._client(member).stats(timeout_s=timeout_s)
            case cops.MemberReady(member, timeout_s):
                return self._client(member).wait_ready(timeout_s)
            case cops.Fan():
                return self._fan(effect.ops)
            case cops.CurrentView():
                return self._view()
            case cops.OpenLayers(member, ns, keys, start, end, timeout_s):
                return self._client(member).get_layers(ns, keys, start, end, timeout_s=timeout_s)
            case cops.Close():
                return _close(effect.source)
            case cops.Spawn():
                return self._pool.submit(self._run, effect.op)
            case cops.WaitAny():
                done, pending = wait(effect.tasks, return_when=FIRST_COMPLETED)
                return [(f, _outcome(f)) for f in done], frozenset(pending)
            case cops.Detach():
                with self._lock:  # the client may be shared by threads: keep every thread's stragglers
                    self._pending.extend(effect.tasks)
                return None
            case cops.Abandon():
                for f in effect.tasks:
                    f.cancel()  # one not started never runs; one running cannot be stopped: drain waits
                with self._lock:
                    self._pending.extend(effect.tasks)
                return None
            case cops.Drain():
                return self.drain()
            case cops.Background():
                future = self._pool.submit(self._background, effect.op)
                with self._lock:
                    self._repairing.append(future)
                return None
            case cops.Copy():
                return self._copy(effect)
            case _:
                assert_never(effect)

    def _background(self, op: cops.ClusterOp[None]) -> None:
        try:
            self._run(op)
        except Exception as exc:
            cops.background_failed(exc)

    def _fan(self, ops: tuple[cops.ClusterOp[Any], ...]) -> list[Any]:
        """Every sub-operation run to its end, all but the last on the pool (one hand-off fewer on
        the hot path); their results, or the first error in their order."""
        futures = [self._pool.submit(self._run, op) for op in ops[:-1]]
        last: list[Any] = []
        error: Exception | None = None
        try:
            last = [self._run(ops[-1])] if ops else []
        except Exception as exc:
            error = exc
        wait(futures)
        results = [f.result() for f in futures]  # raises the first error of the pool's share
        if error is not None:
            raise error
        return results + last

    def _copy(self, effect: cops.Copy) -> int:
        """One member's Get streamed into another's Put: no more than a Put batch in memory."""
        keys, n = list(effect.keys), effect.num_layers
        layers = self._client(effect.source).get_layers(effect.namespace, keys, 0, n)
        try:
            items = ((k, layer, n, b) for layer, blobs in layers for k, b in zip(keys, blobs, strict=True))
            return self._client(effect.target).put(effect.namespace, items).bytes_stored
        finally:
            _close(layers)

    # -- the API -----------------------------------------------------------------------------------

    def wait_ready(self, timeout_s: float = 10.0, *, members: Sequence[str] | None = None) -> None:
        """Block until every current member (or each of ``members``) is connected; :class:`Unavailable`
        names those that are not."""
        self._run(cops.wait_ready(self._cluster, timeout_s, members))

    def replica_stats(self, *, timeout_s: float | None = None) -> dict[str, StoreStats | TransferError]:
        """Each current member's own stats, or the error it answered with."""
        return self._run(cops.replica_stats(self._cluster, timeout_s))


def _close(source: Any) -> None:
    source.close()


def _outcome(future: Future[Any]) -> Any:
    """A finished task's result, or the exception it raised (as a value)."""
    if future.cancelled():
        return CancelledError()
    exc = future.exception()
    return exc if exc is not None else future.result()


def retired(
    clients: dict[str, Any], since: dict[str, float], view: View, now: float, linger_s: float
) -> list[str]:
    """Members whose clients may be closed: gone from ``view`` for longer than ``linger_s`` (``since``
    records when each was first seen gone, and forgets those that came back)."""
    out = []
    for member in list(clients):
        if member in view.everyone:
            since.pop(member, None)
        elif now - since.setdefault(member, now) > linger_s:
            del since[member]
            out.append(member)
    return out


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
    """The membership a list or ``dns:///`` target names (a single ``host:port`` is a list of one).

    A static list is checked after resolving its names (:func:`check_distinct`):
    one server under two spellings is refused with :class:`InvalidTarget`."""
    parsed = parse_target(target)
    if parsed.kind == "dns":
        return DnsMembership(
            parsed.host, parsed.port, refresh_s=refresh_s, grace_s=grace_s, resolver=resolver or resolve_host
        )
    check_distinct(parsed.members)
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
            stub = pb_grpc.KVStoreStub(channel)
            stub.Stats(pb.StatsRequest(), timeout=timeout_s, metadata=metadata)
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
