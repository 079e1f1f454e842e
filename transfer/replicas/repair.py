"""Copies a cluster client owes its replicas: read repair and hinted handoff, bounded.

A chunk written while one of its owners was down, or held by an owner that
restarted empty, has fewer than R copies. Nothing on the servers notices (they
do not talk to each other), so the clients give the copies back:

* **Read repair.** A Lookup that finds an owner answering "absent" for a chunk
  another candidate holds (:meth:`transfer.replicas.routing.LookupState.holes`), or a
  Get whose owner misses a chunk, queues a job for that owner: ask it which of
  the chunks it owns it lacks, and copy those from a candidate that has them.
  Any client does this, a fresh one too, on the first read of the chunk.
* **Hinted handoff.** A Put that could not reach an owner (marked down, or its
  call failed) leaves a hint: that owner, that chunk. When the owner answers a
  call again, its hints become jobs. This gives copies back for chunks written
  during the outage that nobody reads; only the writer holds the hints, so they
  die with it (read repair still covers what is read).

This class only decides what is owed and how much work may be in flight; the
jobs are run by :func:`transfer.replicas.ops.repair_worker` in the background of
whichever front-end drives the client. Bounds, so repair never takes over a
client: at most ``max_workers`` jobs run at once (each one copy at a time, a
Put batch of memory), at most ``max_jobs`` wait (further ones are dropped and
found again by the next read), at most ``max_hints`` hints per replica (the
oldest are forgotten, counted as ``hints_dropped``). A chunk already queued for
a replica is not queued again.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_MAX_WORKERS = 2
DEFAULT_MAX_JOBS = 1024
DEFAULT_MAX_HINTS = 1 << 16
#: Chunks remembered as checked present at a replica (so a lookup in a repair window does not
#: check them again); forgotten when the replica fails.
DEFAULT_MAX_VERIFIED = 1 << 17
#: Chunks per job: one repair Lookup covers them, one Get and one Put stream copy the missing ones.
JOB_KEYS = 64


@dataclass(frozen=True, slots=True)
class RepairJob:
    """Give ``member`` its copies of ``keys`` (layers ``[0, num_layers)``), where it lacks them."""

    member: str
    namespace: str
    keys: tuple[bytes, ...]
    num_layers: int


class Repairs:
    """The queue of repair jobs and the hints of one cluster client (thread-safe)."""

    def __init__(
        self,
        count: Callable[..., None],
        *,
        max_workers: int = DEFAULT_MAX_WORKERS,
        max_jobs: int = DEFAULT_MAX_JOBS,
        max_hints: int = DEFAULT_MAX_HINTS,
    ) -> None:
        if max_workers < 0 or max_jobs < 0 or max_hints < 0:
            raise ValueError("repair bounds must be >= 0 (0 turns that kind of repair off)")
        self._count = count
        self.max_workers = max_workers
        self.max_jobs = max_jobs
        self.max_hints = max_hints
        self._lock = threading.Lock()
        self._queue: deque[RepairJob] = deque()
        self._owed: set[tuple[str, str, bytes]] = set()  # (member, namespace, key) queued or in flight
        self._hints: dict[str, dict[tuple[str, bytes], int]] = {}  # member -> {(ns, key): num_layers}
        self._verified: dict[tuple[str, str, bytes], None] = {}  # insertion-ordered, bounded
        self.max_verified = DEFAULT_MAX_VERIFIED
        self._workers = 0
        self.jobs_dropped = 0

    def offer(self, member: str, namespace: str, keys: Sequence[bytes], num_layers: int) -> bool:
        """Queue the copies of ``keys`` owed to ``member``; True when the caller should start a
        worker (:func:`transfer.replicas.ops.repair_worker`) to run them."""
        with self._lock:
            fresh = [
                k
                for k in dict.fromkeys(keys)
                if (member, namespace, k) not in self._owed and (member, namespace, k) not in self._verified
            ]
            queued = False
            for start in range(0, len(fresh), JOB_KEYS):
                if len(self._queue) >= self.max_jobs:
                    self.jobs_dropped += 1
                    break
                part = tuple(fresh[start : start + JOB_KEYS])
                self._owed.update((member, namespace, k) for k in part)
                self._queue.append(RepairJob(member, namespace, part, num_layers))
                queued = True
            return queued and self._start_worker()

    def _start_worker(self) -> bool:
        if self._queue and self._workers < self.max_workers:
            self._workers += 1
            return True
        return False

    def take(self) -> RepairJob | None:
        """The next job for a running worker; ``None`` tells it to stop (it is no longer counted).

        Queued jobs for the same replica, namespace and layer count are merged up
        to :data:`JOB_KEYS` chunks: each Lookup is one prefix's worth of chunks,
        and a repair asks and copies runs, so one job of 64 chunks costs a few
        RPCs where a dozen jobs of five would cost a dozen times more.
        """
        with self._lock:
            if not self._queue:
                self._workers -= 1
                return None
            job = self._queue.popleft()
            keys = list(job.keys)
            while (
                self._queue
                and len(keys) + len(self._queue[0].keys) <= JOB_KEYS
                and (self._queue[0].member, self._queue[0].namespace, self._queue[0].num_layers)
                == (job.member, job.namespace, job.num_layers)
            ):
                keys += self._queue.popleft().keys
            return RepairJob(job.member, job.namespace, tuple(keys), job.num_layers)

    def done(self, job: RepairJob) -> None:
        with self._lock:
            self._owed.difference_update((job.member, job.namespace, k) for k in job.keys)

    def verified(self, member: str, namespace: str, keys: Sequence[bytes]) -> None:
        """``member`` holds ``keys`` (a repair checked or copied them): no need to check again."""
        with self._lock:
            for k in keys:
                self._verified[(member, namespace, k)] = None
            while len(self._verified) > self.max_verified:
                del self._verified[next(iter(self._verified))]

    def forget(self, member: str) -> None:
        """``member`` failed: it may come back without what it was checked to hold."""
        with self._lock:
            if any(v[0] == member for v in self._verified):
                self._verified = {v: None for v in self._verified if v[0] != member}

    def hint(self, member: str, namespace: str, keys: Sequence[bytes], num_layers: int) -> None:
        """Note chunks ``member`` should hold but did not get (it was down)."""
        if self.max_hints == 0:
            return
        dropped = new = 0
        with self._lock:
            hints = self._hints.setdefault(member, {})
            for k in keys:
                new += hints.pop((namespace, k), None) is None  # re-inserted last: the newest survive
                hints[(namespace, k)] = num_layers
            while len(hints) > self.max_hints:
                del hints[next(iter(hints))]
                dropped += 1
        self._count(member, hints=new, hints_dropped=dropped)

    def has_hints(self, member: str) -> bool:
        return bool(self._hints.get(member))  # a racy peek is fine: release_hints takes the lock

    def release_hints(self, member: str) -> bool:
        """``member`` answered again: its hints become jobs. True when a worker should start."""
        with self._lock:
            hints = self._hints.pop(member, None)
        if not hints:
            return False
        groups: dict[tuple[str, int], list[bytes]] = {}
        for (namespace, key), num_layers in hints.items():
            groups.setdefault((namespace, num_layers), []).append(key)
        start = False
        for (namespace, num_layers), keys in groups.items():
            start = self.offer(member, namespace, keys, num_layers) or start
        return start

    def clear(self) -> None:
        """Forget every queued job and hint (the client is closing): running workers stop after their
        current job."""
        with self._lock:
            self._queue.clear()
            self._hints.clear()

    def pending(self) -> int:
        """Jobs queued, plus workers running."""
        with self._lock:
            return len(self._queue) + self._workers

    def hinted(self) -> dict[str, int]:
        """Per replica, the chunks hinted for it and not yet handed to a job (it has not answered)."""
        with self._lock:
            return {m: len(h) for m, h in self._hints.items() if h}
