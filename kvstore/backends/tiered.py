"""The tiered store: several backends read fastest-first, checked on every read.

Promises, in the order they matter:

1. **Never a wrong answer.** Every blob read from any tier is verified with
   :func:`kvstore.integrity.is_intact`. A corrupt copy is deleted from that tier,
   counted (``integrity_failures``) and the next tier is tried; if some tier held
   a corrupt copy and none held a good one the read raises
   :class:`~kvstore.errors.IntegrityError` (DATA_LOSS on the wire). Writes are
   verified before they reach any tier.
2. **A miss is "absent" only when every tier was asked.** A read that finds a key
   in no tier while some tier could not be consulted (it raised: circuit open,
   timeout, refused) does not know that the key is absent -- an acknowledged Put
   may have put it exactly there -- so it raises
   :class:`~kvstore.errors.BackendUnavailable` (UNAVAILABLE, retryable), naming the
   tiers it skipped. ``None`` (NOT_FOUND) means every tier answered "not here".
3. **A dead tier degrades, it does not fail.** A tier raising counts an ``error``;
   reads go on to the next tier (hits there are served as usual) and writes skip it;
   a write fails only when no tier at all took it.
4. **A skipped write is written behind.** Blobs a write could not give to a lower
   tier (its breaker open, the call failed) are kept, up to that tier's
   ``write_behind_max_bytes``, served from there to reads, and written to the tier
   by a background thread once it answers again. Past the bound the oldest are
   dropped (``write_behind_dropped``); they are then in the upper tiers only.
5. **Hot data moves up.** A hit in a lower tier is promoted into every faster tier.

Writes go to tier 0 and to every tier named in ``write_through`` (default: all);
:meth:`TieredStore.put_many` reports which tiers took them (``ack: durable``).
Backends are thread-safe; this class's own state is the write-behind backlogs (each
under its lock), so the server's thread pool calls it concurrently.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

from kvstore.backends.base import Backend, BackendCounters, BackendUsage, BlobKey
from kvstore.errors import TIER_SKIPPED, BackendUnavailable, IntegrityError
from kvstore.integrity import is_intact

log = logging.getLogger(__name__)

#: Chunks checked per round in exists_chunks: a cached prefix usually ends early,
#: so there is no point asking every tier about every layer of a long context.
_LOOKUP_WINDOW = 64


def _put_intact(tier: Backend, items: Sequence[tuple[BlobKey, bytes]]) -> None:
    """Write blobs whose trailers are verified; a tier that can use that (the disk tier takes the
    trailer as its record checksum) does not hash them again."""
    put_sealed = getattr(tier, "put_sealed_many", None)
    if put_sealed is not None:
        put_sealed(items)
    else:
        tier.put_many(items)


#: Most blobs and bytes one write-behind call gives a tier (bounded by the tier's call budget anyway).
_WRITE_BEHIND_BATCH = 64
_WRITE_BEHIND_BATCH_BYTES = 8 << 20
#: How often the write-behind thread looks at a tier whose breaker is open (it is woken at once
#: for new blobs). The breaker's own probe decides when the tier answers; this only notices it.
_WRITE_BEHIND_POLL_S = 0.05


def _answers(tier: Backend) -> bool:
    """Whether the tier's circuit breaker (if any) lets calls through."""
    breaker = getattr(tier, "breaker", None)
    return breaker is None or breaker.state == "closed"


class _Backlog:
    """Blobs one tier missed while a write skipped it, oldest first, bounded by their bytes.

    Holds references to the blobs (no copy): while a blob is still in the RAM tier it costs
    nothing more. ``write_lock`` is held by the writer while it hands a batch to the tier
    and by deletes of that tier, so a delete never races a write-behind of the same key.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: OrderedDict[BlobKey, bytes] = OrderedDict()
        self.nbytes = 0
        self.lock = threading.Lock()
        self.write_lock = threading.Lock()

    def add(self, items: Sequence[tuple[BlobKey, bytes]]) -> int:
        """Remember ``items`` (newest last); return how many old or new blobs were dropped for room."""
        dropped = 0
        with self.lock:
            for key, blob in items:
                old = self.items.pop(key, None)
                if old is not None:
                    self.nbytes -= len(old)
                if len(blob) > self.max_bytes:
                    dropped += 1
                    continue
                self.items[key] = blob
                self.nbytes += len(blob)
            while self.nbytes > self.max_bytes:
                _, old = self.items.popitem(last=False)
                self.nbytes -= len(old)
                dropped += 1
        return dropped

    def get(self, key: BlobKey) -> bytes | None:
        with self.lock:
            return self.items.get(key)

    def discard(self, keys: Sequence[BlobKey]) -> None:
        with self.lock:
            for key in keys:
                old = self.items.pop(key, None)
                if old is not None:
                    self.nbytes -= len(old)

    def batch(self) -> list[tuple[BlobKey, bytes]]:
        """The oldest blobs, up to one write-behind call's worth (left in place until :meth:`done`)."""
        out: list[tuple[BlobKey, bytes]] = []
        size = 0
        with self.lock:
            for key, blob in self.items.items():
                if out and (len(out) >= _WRITE_BEHIND_BATCH or size + len(blob) > _WRITE_BEHIND_BATCH_BYTES):
                    break
                out.append((key, blob))
                size += len(blob)
        return out

    def done(self, written: Sequence[tuple[BlobKey, bytes]]) -> None:
        """Forget the written blobs, unless a newer blob of the same key arrived meanwhile."""
        with self.lock:
            for key, blob in written:
                if self.items.get(key) is blob:
                    del self.items[key]
                    self.nbytes -= len(blob)

    def __len__(self) -> int:
        return len(self.items)


class TierStat(NamedTuple):
    name: str
    usage: BackendUsage
    counters: BackendCounters
    healthy: bool


class TieredStore:
    """Backends composed fastest-first (``tiers[0]`` is read first and always written)."""

    def __init__(self, tiers: Sequence[Backend], write_through: Sequence[str] | None = None) -> None:
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        if write_through is not None:
            unknown = set(write_through) - set(names)
            if unknown:
                raise ValueError(f"write_through names unknown tiers {sorted(unknown)}; tiers are {names}")
        self.tiers: list[Backend] = list(tiers)
        wanted = set(names if write_through is None else write_through) | {names[0]}
        self._write_tiers = [t for t in self.tiers if t.name in wanted]
        self._backlogs: dict[str, _Backlog] = {
            t.name: _Backlog(int(t.write_behind_max_bytes))
            for t in self.tiers[1:]
            if int(getattr(t, "write_behind_max_bytes", 0) or 0) > 0
        }
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()

    def tier(self, name: str) -> Backend:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    # ------------------------------------------------------------------ reads
    def get(self, key: BlobKey) -> bytes | None:
        """The blob under ``key`` from the fastest tier holding an intact copy, or None."""
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[BlobKey]) -> list[bytes | None]:
        """Like :meth:`get` for several keys, asking each tier once for all keys still missing.

        Raises BackendUnavailable when a key was found nowhere but some tier could not be
        asked (its answer is unknown, not "absent"), and IntegrityError (with ``.keys``
        listing the lost ones) if any key had only corrupt copies and every tier answered.
        """
        results: list[bytes | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        corrupt: set[int] = set()
        skipped: list[str] = []
        promote: list[tuple[int, list[tuple[BlobKey, bytes]]]] = []
        for level, tier in enumerate(self.tiers):
            if not pending:
                break
            wanted = [keys[i] for i in pending]
            # Blobs kept for this tier while it was skipped are as good as written there. Looked
            # up *before* the tier: the write-behind thread forgets a blob only after the tier
            # took it, so a blob is always in one of the two places this read looks at.
            backlog = self._backlogs.get(tier.name)
            kept = [backlog.get(k) for k in wanted] if backlog is not None and len(backlog) else None
            try:
                blobs: list[bytes | None] = list(tier.get_many(wanted))
            except Exception as exc:  # a dead tier is skipped; what it may hold is unknown
                self._tier_error(tier, "get", exc)
                skipped.append(f"{tier.name} ({exc})")
                blobs = [None] * len(wanted)
            if kept is not None:
                blobs = [b if b is not None else k for b, k in zip(blobs, kept, strict=True)]
            still: list[int] = []
            bad: list[BlobKey] = []
            found: list[tuple[BlobKey, bytes]] = []
            for i, blob in zip(pending, blobs, strict=True):
                if blob is None:
                    still.append(i)
                elif not is_intact(blob):
                    bad.append(keys[i])
                    corrupt.add(i)
                    still.append(i)
                else:
                    results[i] = blob
                    found.append((keys[i], blob))
            tier.counters.add(hits=len(found), misses=len(still) - len(bad), integrity_failures=len(bad))
            if bad:
                log.warning(
                    "tier %s held %d corrupt blob(s), e.g. %s; deleting them",
                    tier.name,
                    len(bad),
                    bad[0].name(),
                )
                self._call(tier, "delete", lambda t=tier, b=bad: t.delete_many(b))
                if backlog is not None:
                    backlog.discard(bad)
            if found and level:
                promote.append((level, found))
            pending = still
        for level, found in promote:
            for upper in self.tiers[:level]:
                self._call(upper, "promote", lambda u=upper, f=found: _put_intact(u, f))
        if pending and skipped:
            raise BackendUnavailable(
                f"{len(pending)} blob(s), e.g. {keys[pending[0]].name()}, are in no tier that answered, "
                f"and tier(s) {'; '.join(skipped)} {TIER_SKIPPED}: retry"
            )
        lost = [keys[i] for i in pending if i in corrupt]
        if lost:
            err = IntegrityError(
                f"{len(lost)} blob(s) failed their checksum in every tier holding them, e.g. {lost[0].name()}"
            )
            err.keys = lost  # type: ignore[attr-defined]
            raise err
        return results

    def exists_chunks(
        self, namespace: str, chunk_keys: Sequence[bytes], num_layers: int
    ) -> tuple[int, list[str]]:
        """Leading chunks whose layers ``[0, num_layers)`` are all stored somewhere.

        Returns that count and, for each of those chunks, the name of the fastest
        tier holding its layer 0. Presence is not verified against checksums; a
        corrupt blob shows up (and is repaired or reported) when it is read. Blobs kept
        for write-behind count as present. A tier that could not be asked is passed
        over, so the count is then a lower bound (a Lookup is a hint: a short one
        costs a recompute, never a wrong answer); a Get of such a key answers
        UNAVAILABLE rather than NOT_FOUND (see :meth:`get_many`).
        """
        if num_layers <= 0:
            return 0, []
        count = 0
        tiers_of: list[str] = []
        for start in range(0, len(chunk_keys), _LOOKUP_WINDOW):
            window = chunk_keys[start : start + _LOOKUP_WINDOW]
            keys = [BlobKey(namespace, c, layer) for c in window for layer in range(num_layers)]
            present = [False] * len(keys)
            first_tier: list[str | None] = [None] * len(window)
            for tier in self.tiers:
                missing = [j for j, p in enumerate(present) if not p]
                if not missing:
                    break
                backlog = self._backlogs.get(tier.name)  # before the tier, as in get_many
                kept = (
                    [backlog.get(keys[j]) is not None for j in missing]
                    if backlog is not None and len(backlog)
                    else [False] * len(missing)
                )
                try:
                    found = tier.exists_many([keys[j] for j in missing])
                except Exception as exc:
                    self._tier_error(tier, "exists", exc)
                    found = [False] * len(missing)
                found = [f or k for f, k in zip(found, kept, strict=True)]
                for j, hit in zip(missing, found, strict=True):
                    if hit:
                        present[j] = True
                        if j % num_layers == 0:
                            first_tier[j // num_layers] = tier.name
            for c in range(len(window)):
                if not all(present[c * num_layers : (c + 1) * num_layers]):
                    return count, tiers_of
                count += 1
                tiers_of.append(first_tier[c] or "")
        return count, tiers_of

    # ----------------------------------------------------------------- writes
    def put(self, key: BlobKey, blob: bytes) -> None:
        self.put_many([(key, blob)])

    def put_many(
        self, items: Sequence[tuple[BlobKey, bytes]], *, verified: bool = False, durable: bool = False
    ) -> list[str]:
        """Verify every blob, then store them in tier 0 and the write-through tiers.

        Returns the names of the tiers that took the whole write, in tier order,
        so a caller can tell "in RAM" from "persisted". Raises IntegrityError
        before storing anything if a blob is corrupt, and BackendUnavailable if no
        tier accepted the write. ``verified=True`` is for callers that have just
        checked every trailer themselves (the server's Put validation), so the
        hot path hashes each blob once; no tier hashes it again (the disk tier
        takes the verified trailer as its record checksum: ``put_sealed_many``).

        ``durable=True`` (the ``ack: durable`` policy) writes the persistent
        tiers first and fails with BackendUnavailable, storing nothing, when none
        of them took the write: the RAM tier is written only after a persistent
        one, so a refused durable Put leaves no copy that a Lookup would report.
        """
        for key, blob in items:
            if not verified and not is_intact(blob):
                raise IntegrityError(f"blob for {key.name()} ({len(blob)} bytes) fails its checksum trailer")
        if not items:
            return []
        tiers = self._write_tiers
        if durable:
            tiers = [t for t in tiers if t.persistent] + [t for t in tiers if not t.persistent]
        accepted: set[str] = set()
        failures: list[str] = []
        skipped: list[Backend] = []
        for tier in tiers:
            if durable and not tier.persistent and not accepted:
                missing = "; ".join(failures) or "no persistent tier (disk, redis, s3) is configured"
                raise BackendUnavailable(f"durable write refused: no persistent tier took it ({missing})")
            try:
                _put_intact(tier, items)
                accepted.add(tier.name)
            except Exception as exc:
                self._tier_error(tier, "put", exc)
                failures.append(f"{tier.name}: {exc}")
                skipped.append(tier)
                continue
            backlog = self._backlogs.get(tier.name)
            if backlog is not None and len(backlog):
                backlog.discard([k for k, _ in items])  # the tier has them now; no older copy may follow
        if not accepted:
            raise BackendUnavailable(f"no tier accepted the write ({'; '.join(failures)})")
        for tier in skipped:
            self._write_behind(tier, items)
        return [t.name for t in self.tiers if t.name in accepted]

    def persistent(self, names: Sequence[str]) -> bool:
        """Whether any of the named tiers keeps data across a restart (disk, Redis, S3)."""
        return any(t.persistent for t in self.tiers if t.name in names)

    def delete_chunks(
        self, namespace: str, chunk_keys: Sequence[bytes], num_layers: int | None = None
    ) -> int:
        """Delete every layer of each chunk from every tier; return how many chunks had something deleted.

        With ``num_layers`` the blobs are addressed directly; without it each tier
        lists the namespace to find them (slow on remote tiers, so pass it).
        """
        wanted = set(chunk_keys)
        deleted: set[bytes] = set()
        for tier in self.tiers:
            backlog = self._backlogs.get(tier.name)
            # Held while deleting, so the write-behind thread cannot put a deleted blob back.
            with backlog.write_lock if backlog is not None else contextlib.nullcontext():
                if backlog is not None and len(backlog):
                    with backlog.lock:
                        kept = [k for k in backlog.items if k.namespace == namespace and k.chunk in wanted]
                    if num_layers is not None:
                        kept = [k for k in kept if k.layer < num_layers]
                    backlog.discard(kept)
                    deleted.update(k.chunk for k in kept)
                try:
                    if num_layers is not None:
                        keys = [BlobKey(namespace, c, layer) for c in wanted for layer in range(num_layers)]
                    else:
                        keys = [k for k in tier.iter_keys(namespace) if k.chunk in wanted]
                    gone = [k for k, e in zip(keys, tier.exists_many(keys), strict=True) if e]
                    if gone:
                        tier.delete_many(gone)
                        deleted.update(k.chunk for k in gone)
                except Exception as exc:
                    self._tier_error(tier, "delete", exc)
        return len(deleted)

    # ------------------------------------------------------------- operations
    def tier_stats(self) -> list[TierStat]:
        stats = []
        for tier in self.tiers:
            try:
                usage, healthy = tier.usage(), bool(tier.healthy())
            except Exception as exc:
                self._tier_error(tier, "stats", exc)
                usage, healthy = BackendUsage(), False
            stats.append(TierStat(tier.name, usage, tier.counters, healthy))
        return stats

    def write_behind_pending(self) -> dict[str, tuple[int, int]]:
        """Per tier with a backlog: (blobs, bytes) kept and not yet written to it."""
        out = {}
        for name, backlog in self._backlogs.items():
            with backlog.lock:
                out[name] = (len(backlog.items), backlog.nbytes)
        return out

    def close(self) -> None:
        self._closing.set()
        self._wake.set()
        writer = self._writer
        if writer is not None:
            writer.join(timeout=10.0)
        unwritten = {name: n for name, (n, _) in self.write_behind_pending().items() if n}
        if unwritten:
            log.warning("closing with blobs never written behind (they were in RAM only): %s", unwritten)
        for tier in self.tiers:
            with contextlib.suppress(Exception):
                tier.close()

    # ------------------------------------------------------------ write-behind
    def _write_behind(self, tier: Backend, items: Sequence[tuple[BlobKey, bytes]]) -> None:
        """Keep blobs a write could not give ``tier`` until it answers again (see the module docstring)."""
        backlog = self._backlogs.get(tier.name)
        if backlog is None or self._closing.is_set():
            return
        dropped = backlog.add(items)
        tier.counters.add(write_behind_queued=len(items), write_behind_dropped=dropped)
        if dropped:
            log.warning(
                "tier %s: write-behind backlog over write_behind_max_bytes (%d); dropped %d blob(s), "
                "now in the upper tiers only",
                tier.name,
                backlog.max_bytes,
                dropped,
            )
        with self._writer_lock:
            if self._writer is None and not self._closing.is_set():
                self._writer = threading.Thread(
                    target=self._write_behind_loop, name="kvstore-write-behind", daemon=True
                )
                self._writer.start()
        self._wake.set()

    def _write_behind_loop(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(_WRITE_BEHIND_POLL_S)
            self._wake.clear()
            for tier in self.tiers:
                backlog = self._backlogs.get(tier.name)
                if backlog is None or not len(backlog) or self._closing.is_set() or not _answers(tier):
                    continue
                with backlog.write_lock:
                    batch = backlog.batch()
                    try:
                        _put_intact(tier, batch)
                    except Exception as exc:
                        self._tier_error(tier, "write-behind", exc)
                        continue
                    backlog.done(batch)
                tier.counters.add(write_behind_written=len(batch))
                if len(backlog):
                    self._wake.set()  # more to write: go on without waiting

    # --------------------------------------------------------------- internals
    def _call(self, tier: Backend, what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:
            self._tier_error(tier, what, exc)

    @staticmethod
    def _tier_error(tier: Backend, what: str, exc: BaseException) -> None:
        tier.counters.add(errors=1)
        if isinstance(exc, BackendUnavailable):
            # str(exc), not exc: a handler that keeps records (pytest's capture, a queue) would keep the
            # exception's traceback, its frames and so every in-flight gRPC call under them alive.
            log.warning("tier %s unavailable during %s: %s", tier.name, what, str(exc))
        else:
            log.exception("tier %s failed unexpectedly during %s", tier.name, what, exc_info=exc)
