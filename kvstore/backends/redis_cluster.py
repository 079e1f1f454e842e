"""Redis tier on a Redis Cluster: the same blobs and bookkeeping, sharded by hash tag.

A Redis Cluster runs a Lua script or a multi-key command only when all its keys
hash to one slot, and it must be told every key up front. The standalone layout
(:mod:`kvstore.backends.redis`) keeps one ``#sizes``/``#lru``/``#meta`` for the
whole prefix, which no cluster can serve. Here the keyspace is cut into
``buckets`` (default 256) groups, each with its own bookkeeping under one hash tag:

* ``<prefix>{<b>}<namespace>/<chunk hex>/<layer>``: the blob;
* ``<prefix>{<b>}#sizes``, ``{<b>}#lru``, ``{<b>}#meta``: the bucket's accounting;

where ``b`` is a stable hash of ``namespace/chunk`` modulo ``buckets``. Every layer
of a chunk therefore lives in one slot, next to the index that accounts for it, so
a batch write is its SETs plus one accounting script *per bucket*, reads are
pipelined ``GET`` s (one round trip per master), and every script names all its keys. With ``max_bytes`` each
bucket keeps ``max_bytes / buckets``: eviction is LRU within a bucket, and the
budget holds for the whole prefix. A victim is dropped from the accounting inside
the script, then its blob is deleted by a second script that declares it (a blob
re-written in between is kept). ``iter_keys`` scans every master; ``usage`` sums
the buckets in one pipelined round per master.

Servers that share a prefix on one cluster must use the same ``buckets``.

Failover: the cluster client follows MOVED/ASK and refreshes the slot map on
connection errors; our own :class:`~kvstore.retry.Retry` (bounded by
``2 × socket_timeout_s``) and circuit breaker wrap it as for one server, so while a
master is down and its replica not yet promoted (about ``cluster-node-timeout`` +
1 s) calls touching its slots raise :class:`~kvstore.errors.BackendUnavailable`
and the TieredStore serves from, and writes to, its other tiers.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.backoff
import redis.cluster
import redis.exceptions
import redis.retry

from kvstore.backends.base import Backend, BackendUsage, BlobKey
from kvstore.backends.redis import RedisBackend
from kvstore.backends.redis_common import DELETE_SCRIPT, glob_escape, parse_name
from kvstore.errors import BackendUnavailable

T = TypeVar("T")

# Like the standalone accounting script, for one bucket, but victims are only dropped
# from the accounting and returned: their blobs are keys this script did not declare.
# KEYS: sizes, lru, meta, data_1..data_n; ARGV: now, max_bytes, name_1..name_n
_ACCOUNT_BUCKET = """
local n = #KEYS - 3
local now = tonumber(ARGV[1])
for i = 1, n do
  local name = ARGV[2 + i]
  if redis.call('EXISTS', KEYS[3 + i]) == 1 then
    local size = redis.call('STRLEN', KEYS[3 + i])
    local old = tonumber(redis.call('HGET', KEYS[1], name) or '0')
    redis.call('HSET', KEYS[1], name, size)
    redis.call('ZADD', KEYS[2], now + i * 1e-6, name)
    redis.call('HINCRBY', KEYS[3], 'bytes', size - old)
  end
end
local total = tonumber(redis.call('HGET', KEYS[3], 'bytes') or '0')
local limit = tonumber(ARGV[2])
local newest = ARGV[2 + n]
local victims = {}
local kept = nil
while limit > 0 and total > limit do
  local victim = redis.call('ZPOPMIN', KEYS[2])
  if #victim == 0 then break end
  if victim[1] == newest then
    kept = victim
  else
    local vsize = tonumber(redis.call('HGET', KEYS[1], victim[1]) or '0')
    redis.call('HDEL', KEYS[1], victim[1])
    total = redis.call('HINCRBY', KEYS[3], 'bytes', -vsize)
    victims[#victims + 1] = victim[1]
  end
end
if kept then redis.call('ZADD', KEYS[2], kept[2], kept[1]) end
return victims
"""

# Second half of an eviction: delete the blob unless it was accounted again meanwhile.
# KEYS: data, sizes; ARGV: name
_EVICT_BLOB = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
return redis.call('DEL', KEYS[1])
"""

_SCRIPTS = (_ACCOUNT_BUCKET, _EVICT_BLOB, DELETE_SCRIPT)

# Cluster replies that mean "a slot's master is gone or moving": an outage to retry,
# surfaced as a connection error so the shared Retry and translation treat it as one.
_CLUSTER_OUTAGES: tuple[type[BaseException], ...] = (
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.RedisClusterUnreachableError,
)


def parse_startup_nodes(url: str, cluster_nodes: str = "") -> list[tuple[str, int]]:
    """``host:port`` pairs to discover the cluster from: ``url``'s host, then ``cluster_nodes``.

    ``cluster_nodes`` is a comma-separated list of ``host:port`` (or ``redis://host:port``);
    duplicates are dropped. Raises ValueError with what to fix.
    """
    if url.startswith("unix://"):
        raise ValueError(
            "redis.cluster needs TCP nodes: redis.url must be redis:// or rediss://, not unix://"
        )
    entries = [url, *(part.strip() for part in cluster_nodes.split(",") if part.strip())]
    nodes: list[tuple[str, int]] = []
    for entry in entries:
        split = urlsplit(entry if "://" in entry else f"redis://{entry}")
        try:
            port = split.port or 6379
        except ValueError:
            raise ValueError(f"redis cluster node {entry!r}: port must be a number (host:port)") from None
        if not split.hostname:
            raise ValueError(f"redis cluster node {entry!r}: expected host:port")
        if split.path not in ("", "/", "/0"):
            raise ValueError(f"redis cluster node {entry!r}: a cluster has only database 0")
        if (split.hostname, port) not in nodes:
            nodes.append((split.hostname, port))
    return nodes


class RedisClusterBackend(RedisBackend):
    """The Redis tier on a Redis Cluster (``redis.cluster: true``); same contract as one server."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379",
        cluster_nodes: str = "",
        buckets: int = 256,
        key_prefix: str = "kvstore:",
        socket_timeout_s: float = 0.25,
        connect_timeout_s: float = 0.1,
        pool_size: int = 32,
        cluster_retries: int = 0,
        **kwargs: Any,
    ) -> None:
        if buckets <= 0:
            raise ValueError("redis cluster buckets must be > 0")
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError(
                f"redis.key_prefix {key_prefix!r} must not contain '{{' or '}}' in cluster mode "
                "(the backend adds its own hash tag)"
            )
        nodes = parse_startup_nodes(url, cluster_nodes)
        super().__init__(
            url=url,
            key_prefix=key_prefix,
            socket_timeout_s=socket_timeout_s,
            pool_size=pool_size,
            connect_timeout_s=connect_timeout_s,
            **kwargs,
        )
        self._pool.disconnect()  # the standalone pool is never used in cluster mode
        self.buckets = buckets
        self.bucket_max_bytes = -(-self.max_bytes // buckets) if self.max_bytes else 0
        split = urlsplit(url)
        self._client = redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in nodes],
            # No retries inside the client (one policy, ours, as for one server): our Retry's
            # next attempt runs the slot-map refresh a connection error asked for.
            retry=redis.retry.Retry(redis.backoff.ExponentialBackoff(cap=0.25, base=0.05), cluster_retries),
            require_full_coverage=False,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            max_connections=pool_size,
            username=split.username,
            password=split.password,
            ssl=split.scheme == "rediss",
        )
        self._shas = {script: hashlib.sha1(script.encode()).hexdigest() for script in _SCRIPTS}

    @classmethod
    def from_config(cls, section: Any) -> Backend:
        """Fields of ``section`` named by this constructor or by :class:`RedisBackend`'s."""
        accepted = {
            *inspect.signature(cls.__init__).parameters,
            *inspect.signature(RedisBackend.__init__).parameters,
        }
        fields = {
            name: getattr(section, name) for name in accepted if name != "self" and hasattr(section, name)
        }
        fields.pop("cluster", None)
        return cls(**fields)

    # -- key naming ------------------------------------------------------------------
    def bucket_of(self, key: BlobKey) -> int:
        """Stable across processes and servers (not Python's salted hash)."""
        digest = hashlib.blake2b(f"{key.namespace}/{key.chunk.hex()}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.buckets

    def _tag(self, bucket: int) -> str:
        return f"{self.key_prefix}{{{bucket}}}"

    def _key(self, key: BlobKey) -> str:
        return self._tag(self.bucket_of(key)) + key.name()

    def _book(self, bucket: int) -> tuple[str, str, str]:
        tag = self._tag(bucket)
        return tag + "#sizes", tag + "#lru", tag + "#meta"

    def _by_bucket(self, keys: Sequence[BlobKey]) -> dict[int, list[int]]:
        """Positions of ``keys`` grouped by bucket, in first-seen order."""
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(self.bucket_of(key), []).append(i)
        return groups

    # -- plumbing ----------------------------------------------------------------------
    def _cluster_call(self, fn: Callable[[], T]) -> Callable[[], T]:
        """``fn`` with cluster outages re-raised as ConnectionError, which Retry and translate know."""

        def call() -> T:
            try:
                return fn()
            except _CLUSTER_OUTAGES as exc:
                raise redis.exceptions.ConnectionError(f"{type(exc).__name__}: {exc}") from exc

        return call

    def _run(self, fn: Callable[[], T]) -> T:
        return self._guard(self._cluster_call(fn))

    def _with_scripts(self, run: Callable[[], T]) -> T:
        try:
            return run()
        except redis.exceptions.NoScriptError:
            # A promoted replica or a restarted master lacks them: load on every master.
            for script in _SCRIPTS:
                self._client.script_load(script)
            return run()

    def _evalsha(self, pipe: Any, script: str, keys: Sequence[str], args: Sequence[Any]) -> None:
        pipe.evalsha(self._shas[script], len(keys), *keys, *args)

    # -- reads ---------------------------------------------------------------------------
    def get_many(self, keys: Sequence[BlobKey]) -> list[bytes | None]:
        if not keys:
            return []
        now = time.time()

        def run() -> list[Any]:
            # GETs, not MGET: redis-py's cluster pipeline refuses multi-key commands; it
            # still sends each master its share in one round trip.
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.get(self._key(key))
            if self.max_bytes:
                for bucket, positions in self._by_bucket(keys).items():
                    pipe.zadd(self._book(bucket)[1], {keys[i].name(): now for i in positions}, xx=True)
            return pipe.execute()

        blobs: list[bytes | None] = self._run(run)[: len(keys)]
        if self.ttl_ms:
            self._reap([k for k, b in zip(keys, blobs, strict=True) if b is None])
        return blobs

    def _reap(self, missing: Sequence[BlobKey]) -> None:
        if missing:
            self._delete(missing, only_if_gone=True, quiet=True)

    # -- writes --------------------------------------------------------------------------
    def put_many(self, items: Sequence[tuple[BlobKey, bytes]]) -> None:
        if not items:
            return
        limit = self.bucket_max_bytes
        fitting = [(k, b) for k, b in items if not limit or len(b) <= limit]
        too_big = [k for k, b in items if limit and len(b) > limit]
        groups = self._by_bucket([k for k, _ in fitting])
        now = time.time()

        def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for bucket, positions in groups.items():
                names = [self._key(fitting[i][0]) for i in positions]
                for name, i in zip(names, positions, strict=True):
                    pipe.set(name, fitting[i][1], px=self.ttl_ms or None)
                self._evalsha(
                    pipe,
                    _ACCOUNT_BUCKET,
                    [*self._book(bucket), *names],
                    [now, limit, *(fitting[i][0].name() for i in positions)],
                )
            return pipe.execute()

        evicted = 0
        if fitting:
            replies = self._run(lambda: self._with_scripts(run))
            victims: list[tuple[int, str]] = []
            at = 0
            for bucket, positions in groups.items():
                at += len(positions) + 1  # the SETs, then the script's reply
                victims += [
                    (bucket, v.decode() if isinstance(v, bytes) else v) for v in replies[at - 1] or ()
                ]
            if victims:
                self._evict_blobs(victims)
                evicted += len(victims)
        if too_big:
            # Over a bucket's whole budget: not cached (and an old copy goes), like the RAM tier.
            self.delete_many(too_big)
            evicted += len(too_big)
        if evicted:
            self.counters.add(evictions=evicted)

    def _evict_blobs(self, victims: Sequence[tuple[int, str]]) -> None:
        def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for bucket, name in victims:
                self._evalsha(pipe, _EVICT_BLOB, [self._tag(bucket) + name, self._book(bucket)[0]], [name])
            return pipe.execute()

        self._run(lambda: self._with_scripts(run))

    def delete_many(self, keys: Sequence[BlobKey]) -> int:
        return self._delete(keys, only_if_gone=False, quiet=False)

    def _delete(self, keys: Sequence[BlobKey], only_if_gone: bool, quiet: bool) -> int:
        if not keys:
            return 0

        def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                bucket = self.bucket_of(key)
                self._evalsha(
                    pipe,
                    DELETE_SCRIPT,
                    [self._tag(bucket) + key.name(), *self._book(bucket)],
                    [key.name(), "1" if only_if_gone else "0"],
                )
            return pipe.execute()

        try:
            return sum(int(n) for n in self._run(lambda: self._with_scripts(run)))
        except BackendUnavailable:
            if quiet:  # housekeeping after a read that already succeeded
                return 0
            raise

    # -- listing and accounting ----------------------------------------------------------
    def iter_keys(self, namespace: str | None = None) -> Iterator[BlobKey]:
        match = (
            glob_escape(self.key_prefix) + "{*}" + (glob_escape(f"{namespace}/") if namespace else "") + "*"
        )
        start = len(self.key_prefix)
        seen: set[BlobKey] = set()  # a failover mid-scan may show a key on two masters
        for node in self._run(self._client.get_primaries):
            server = self._client.get_redis_connection(node)  # SCAN cursors are per node
            cursor: int = 0
            while True:
                cursor, names = self._run(
                    lambda c=cursor, r=server: r.scan(cursor=c, match=match, count=1000)
                )
                for raw in names:
                    text = raw.decode("utf-8", "replace")[start:]
                    if not text.startswith("{") or "}" not in text:
                        continue
                    key = parse_name(text.split("}", 1)[1])
                    if (
                        key is not None
                        and (namespace is None or key.namespace == namespace)
                        and key not in seen
                    ):
                        seen.add(key)
                        yield key
                if cursor == 0:
                    break

    def usage(self) -> BackendUsage:
        def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for bucket in range(self.buckets):
                sizes, _, meta = self._book(bucket)
                pipe.hget(meta, "bytes")
                pipe.hlen(sizes)
            return pipe.execute()

        replies = self._run(run)
        total = sum(int(r or 0) for r in replies[0::2])
        count = sum(int(r) for r in replies[1::2])
        return BackendUsage(bytes=total, objects=count, capacity_bytes=self.max_bytes)

    def healthy(self) -> bool:
        try:
            return bool(
                self._run(lambda: self._client.ping(target_nodes=redis.cluster.RedisCluster.PRIMARIES))
            )
        except (BackendUnavailable, redis.exceptions.RedisError):
            return False

    def close(self) -> None:
        self._client.close()
