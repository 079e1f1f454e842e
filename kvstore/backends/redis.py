"""Redis tier: blobs as plain string values, bookkeeping kept next to them in Redis.

Layout under ``key_prefix`` (default ``kvstore:``):

* ``<prefix><namespace>/<chunk hex>/<layer>``: the blob, byte for byte (so an
  operator or a test can inspect or corrupt it with plain ``GET``/``SETRANGE``);
* ``<prefix>#sizes`` (hash name → size) and ``<prefix>#meta`` (hash, field ``bytes``):
  byte accounting, so :meth:`usage` is O(1) (``HGET`` + ``HLEN``) and shared by
  every server that uses the same prefix;
* ``<prefix>#lru`` (sorted set name → last access time): the eviction order when
  ``max_bytes`` is set; then reads touch it with one ``ZADD XX`` in their pipeline.

A batch write is its ``SET`` commands followed, in the same pipeline, by one accounting
script that reads each blob's size and existence from Redis itself (blobs never pass
through Lua); a delete is one script per key. Accounting therefore stays exact even
when writes, deletes and evictions of one key interleave. Eviction of the least
recently used blobs happens inside the accounting script, so the budget holds with
many writers. Reads are one ``MGET``. Every batch method is one pipelined round trip. With ``ttl_seconds`` Redis expires blobs by itself; their
accounting is reclaimed when a read misses them or eviction reaches them.

Connection errors and timeouts are retried with backoff, then surface as
:class:`~kvstore.errors.BackendUnavailable`; a circuit breaker makes a dead
Redis cost microseconds per call instead of a socket timeout (see ``guard.py``, ``breaker.py``).
On a Redis Cluster (``redis.cluster: true``) :func:`kvstore.backends.build_backend` builds
:class:`~kvstore.backends.redis_cluster.RedisClusterBackend` instead: the same contract
with hash-tagged keys, per-bucket bookkeeping and scripts that declare every key. What
both layouts share (the delete script, key names) is in :mod:`kvstore.backends.redis_common`;
this module never imports the cluster one, which builds on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import redis
import redis.backoff
import redis.exceptions
import redis.retry

from kvstore.backends.base import Backend, BackendUsage, BlobKey
from kvstore.backends.breaker import BreakerPolicy, CircuitBreaker, ProbingBreaker
from kvstore.backends.guard import call_budget, remote_guard
from kvstore.backends.redis_common import DELETE_SCRIPT, glob_escape, parse_name
from kvstore.errors import BackendUnavailable
from kvstore.retry import Backoff, Retry

# Runs right after a batch's SETs, pipelined on the same connection, so blobs never pass
# through Lua (a copy per byte would cost more than the network on large blobs) and no
# MULTI has to queue them. Size and existence are read from each key itself, so a delete,
# eviction or expiry that slips in between leaves the accounting exact. One call per batch.
# KEYS: sizes, lru, meta, data_1..data_n; ARGV: now, max_bytes, key_prefix, name_1..name_n
_ACCOUNT = """
local n = #KEYS - 3
local now = tonumber(ARGV[1])
for i = 1, n do
  local name = ARGV[3 + i]
  if redis.call('EXISTS', KEYS[3 + i]) == 1 then
    local size = redis.call('STRLEN', KEYS[3 + i])
    local old = tonumber(redis.call('HGET', KEYS[1], name) or '0')
    redis.call('HSET', KEYS[1], name, size)
    -- later items of a batch count as more recent, so a batch evicts its own head first
    redis.call('ZADD', KEYS[2], now + i * 1e-6, name)
    redis.call('HINCRBY', KEYS[3], 'bytes', size - old)
  end
end
local total = tonumber(redis.call('HGET', KEYS[3], 'bytes') or '0')
local limit = tonumber(ARGV[2])
local newest = ARGV[3 + n]
local evicted = 0
local kept = nil
while limit > 0 and total > limit do
  local victim = redis.call('ZPOPMIN', KEYS[2])
  if #victim == 0 then break end
  if victim[1] == newest then
    kept = victim
  else
    local vsize = tonumber(redis.call('HGET', KEYS[1], victim[1]) or '0')
    redis.call('HDEL', KEYS[1], victim[1])
    redis.call('DEL', ARGV[3] .. victim[1])
    total = redis.call('HINCRBY', KEYS[3], 'bytes', -vsize)
    evicted = evicted + 1
  end
end
if kept then redis.call('ZADD', KEYS[2], kept[2], kept[1]) end
return evicted
"""

T = TypeVar("T")

_UNAVAILABLE_REPLIES = ("OOM ", "BUSY ", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS")


def translate_redis_error(exc: BaseException) -> BackendUnavailable | None:
    """Connection-level failures mean the tier is down; anything else is a bug to surface."""
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return BackendUnavailable(f"redis: {type(exc).__name__}: {exc}")
    if isinstance(exc, (redis.exceptions.ReadOnlyError, OSError)):
        return BackendUnavailable(f"redis: {type(exc).__name__}: {exc}")
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or (
        isinstance(exc, redis.exceptions.ResponseError) and any(r in str(exc) for r in _UNAVAILABLE_REPLIES)
    ):
        # The server is up but refuses work (out of memory, busy script, failover): an outage too.
        return BackendUnavailable(f"redis: {exc}")
    return None


class RedisBackend(Backend):
    """A shared, optionally byte-bounded and expiring tier on one Redis server.

    ``backoff``, ``max_attempts`` and ``breaker_*`` tune the default :class:`Retry`
    and :class:`CircuitBreaker`; ``retry=`` / ``breaker=`` replace them outright.
    """

    name = "redis"
    persistent = True
    bounded = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        key_prefix: str = "kvstore:",
        ttl_seconds: float = 0,
        max_bytes: int = 0,
        socket_timeout_s: float = 0.25,
        pool_size: int = 32,
        backoff: Backoff | None = None,
        max_attempts: int = 3,
        breaker_threshold: int = 3,
        breaker_reset_s: float = 0.5,
        breaker_error_rate: float = 0.5,
        breaker_window_s: float = 10.0,
        breaker_min_calls: int = 20,
        write_behind_max_bytes: int = 256 << 20,
        retry: Retry | None = None,
        breaker: CircuitBreaker | None = None,
        connect_timeout_s: float = 0.1,
        budget_s: float = 0.0,
    ) -> None:
        super().__init__()
        if ttl_seconds < 0 or max_bytes < 0:
            raise ValueError("redis ttl_seconds and max_bytes must be >= 0")
        if socket_timeout_s <= 0 or pool_size <= 0 or connect_timeout_s <= 0:
            raise ValueError("redis socket_timeout_s, connect_timeout_s and pool_size must be > 0")
        # What is left of the budget after one attempt bounds both the wait for a pooled
        # connection and any retry. 0: connect + read, plus 0.15 s of pool wait.
        attempt_s, budget_s = call_budget(
            "redis", connect_timeout_s, socket_timeout_s, "socket_timeout_s", budget_s, slack_s=0.15
        )
        self.budget_s = budget_s
        self.url = url
        self.key_prefix = key_prefix
        self.ttl_ms = int(ttl_seconds * 1000)
        self.max_bytes = max_bytes
        # redis-py must not retry on its own: one policy, ours, with one budget.
        self._pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=max(0.02, budget_s - attempt_s),
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        )
        self._client = redis.Redis(connection_pool=self._pool)
        self._account_sha = hashlib.sha1(_ACCOUNT.encode()).hexdigest()
        self._delete_sha = hashlib.sha1(DELETE_SCRIPT.encode()).hexdigest()
        self._sizes = key_prefix + "#sizes"
        self._lru = key_prefix + "#lru"
        self._meta = key_prefix + "#meta"
        # While the breaker is open no request touches Redis; a daemon thread PINGs it.
        self._guard = remote_guard(
            "redis",
            self._probe,
            translate_redis_error,
            on_open=lambda: self.counters.add(breaker_trips=1),
            retry_on=(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError),
            deadline_s=budget_s - attempt_s,
            backoff=backoff,
            max_attempts=max_attempts,
            breaker_reset_s=breaker_reset_s,
            policy=BreakerPolicy(breaker_threshold, breaker_error_rate, breaker_window_s, breaker_min_calls),
            retry=retry,
            breaker=breaker,
        )
        self.breaker = self._guard.breaker
        #: Bytes of blobs the tiered store may hold for this tier while it is skipped (write-behind).
        self.write_behind_max_bytes = write_behind_max_bytes

    @classmethod
    def from_config(cls, section: Any) -> Backend:
        """One server. A section that says ``cluster: true`` is refused rather than served by
        one node: :func:`kvstore.backends.build_backend` chooses the cluster backend for it."""
        if cls is RedisBackend and getattr(section, "cluster", False):
            raise ValueError(
                "redis.cluster is true: build the tier with kvstore.backends.build_backend('redis', "
                "section), which chooses RedisClusterBackend"
            )
        return super().from_config(section)

    def _run(self, fn: Callable[[], T]) -> T:
        """Every call to Redis goes through here: the retry policy and breaker (the cluster
        backend adds its own error handling on top, so the shared methods serve both)."""
        return self._guard(fn)

    def _key(self, key: BlobKey) -> str:
        return self.key_prefix + key.name()

    def _with_scripts(self, run: Callable[[], T]) -> T:
        """Run a pipeline of EVALSHAs, loading the scripts first if the server lost them.

        Loading on demand (not on every pipeline, as redis-py's Script does) keeps a
        batch at one round trip; a restarted Redis costs one extra load.
        """
        try:
            return run()
        except redis.exceptions.NoScriptError:
            self._client.script_load(_ACCOUNT)
            self._client.script_load(DELETE_SCRIPT)
            return run()

    # -- reads ---------------------------------------------------------------------
    def get(self, key: BlobKey) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[BlobKey]) -> list[bytes | None]:
        if not keys:
            return []
        names = [self._key(key) for key in keys]
        if self.max_bytes:
            # Reads refresh the LRU order (one ZADD XX for the whole batch); without a
            # budget there is nothing to evict, so a read is a bare MGET.
            now = time.time()
            touch = {key.name(): now for key in keys}

            def run() -> list[Any]:
                pipe = self._client.pipeline(transaction=False)
                pipe.mget(names)
                pipe.zadd(self._lru, touch, xx=True)
                return pipe.execute()[0]

            blobs: list[bytes | None] = self._run(run)
        else:
            blobs = self._run(lambda: self._client.mget(names))
        if self.ttl_ms:
            self._reap([k for k, b in zip(keys, blobs, strict=True) if b is None])
        return blobs

    def _reap(self, missing: Sequence[BlobKey]) -> None:
        """Drop the accounting of blobs Redis expired (no-op for keys never stored)."""
        if not missing:
            return

        def run() -> None:
            pipe = self._client.pipeline(transaction=False)
            for key in missing:
                pipe.evalsha(
                    self._delete_sha, 4, self._key(key), self._sizes, self._lru, self._meta, key.name(), "1"
                )
            pipe.execute()

        with contextlib.suppress(BackendUnavailable):  # housekeeping; the read already succeeded
            self._run(lambda: self._with_scripts(run))

    def exists(self, key: BlobKey) -> bool:
        return self.exists_many([key])[0]

    def exists_many(self, keys: Sequence[BlobKey]) -> list[bool]:
        if not keys:
            return []

        def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self._key(key))
            return pipe.execute()

        return [bool(n) for n in self._run(run)]

    # -- writes --------------------------------------------------------------------
    def put(self, key: BlobKey, blob: bytes) -> None:
        self.put_many([(key, blob)])

    def put_many(self, items: Sequence[tuple[BlobKey, bytes]]) -> None:
        if not items:
            return
        fitting = [(k, b) for k, b in items if not self.max_bytes or len(b) <= self.max_bytes]
        too_big = [k for k, b in items if self.max_bytes and len(b) > self.max_bytes]
        now = time.time()

        def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            names = [self._key(key) for key, _ in fitting]
            for name, (_, blob) in zip(names, fitting, strict=True):
                pipe.set(name, blob, px=self.ttl_ms or None)
            pipe.evalsha(
                self._account_sha, 3 + len(names), self._sizes, self._lru, self._meta, *names,
                now, self.max_bytes, self.key_prefix, *(key.name() for key, _ in fitting),
            )  # fmt: skip
            return pipe.execute()[-1:]

        evicted = sum(self._run(lambda: self._with_scripts(run))) if fitting else 0
        if too_big:
            # Like the RAM tier: a blob over the whole budget is not cached (and an old copy goes).
            self.delete_many(too_big)
            evicted += len(too_big)
        if evicted:
            self.counters.add(evictions=evicted)

    def delete(self, key: BlobKey) -> bool:
        return self.delete_many([key]) == 1

    def delete_many(self, keys: Sequence[BlobKey]) -> int:
        if not keys:
            return 0

        def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.evalsha(
                    self._delete_sha, 4, self._key(key), self._sizes, self._lru, self._meta, key.name(), "0"
                )
            return pipe.execute()

        return sum(int(n) for n in self._run(lambda: self._with_scripts(run)))

    # -- listing and accounting ----------------------------------------------------
    def iter_keys(self, namespace: str | None = None) -> Iterator[BlobKey]:
        match = glob_escape(self.key_prefix + (f"{namespace}/" if namespace else "")) + "*"
        start = len(self.key_prefix)
        cursor: int = 0
        while True:
            cursor, names = self._run(lambda c=cursor: self._client.scan(cursor=c, match=match, count=1000))
            for raw in names:
                key = parse_name(raw.decode("utf-8", "replace")[start:])
                if key is not None and (namespace is None or key.namespace == namespace):
                    yield key
            if cursor == 0:
                return

    def usage(self) -> BackendUsage:
        def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.hget(self._meta, "bytes")
            pipe.hlen(self._sizes)
            return pipe.execute()

        total, count = self._run(run)
        return BackendUsage(bytes=int(total or 0), objects=int(count), capacity_bytes=self.max_bytes)

    def _probe(self) -> None:
        """The background breaker probe: one PING under the call timeouts, never through the guard."""
        self._client.ping()

    def healthy(self) -> bool:
        try:
            return bool(self._run(self._client.ping))
        except BackendUnavailable:
            return False

    def close(self) -> None:
        if isinstance(self.breaker, ProbingBreaker):
            self.breaker.close()
        self._pool.disconnect()
