"""The tiered store: several backends read fastest-first, checked on every read.

Promises, in the order they matter:

1. **Never a wrong answer.** Every blob read from any tier is verified with
   :func:`kvstore.integrity.is_intact`. A corrupt copy is deleted from that tier,
   counted (``integrity_failures``) and the next tier is tried; if some tier held
   a corrupt copy and none held a good one the read raises
   :class:`~kvstore.errors.IntegrityError` (DATA_LOSS on the wire). A plain miss
   is ``None``. Writes are verified before they reach any tier.
2. **A dead tier degrades, it does not fail.** A tier raising (``BackendUnavailable``
   or anything unexpected) counts an ``error`` and is a miss for reads and
   skipped for writes; a write fails only when no tier at all took it.
3. **Hot data moves up.** A hit in a lower tier is promoted into every faster tier.

Writes go to tier 0 and to every tier named in ``write_through`` (default: all);
:meth:`TieredStore.put_many` reports which tiers took them (``ack: durable``).
Backends are thread-safe; this class keeps no mutable state of its own beyond the
backends' counters, so the server's thread pool calls it concurrently.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

from kvstore.backends.base import Backend, BackendCounters, BackendUsage, BlobKey
from kvstore.errors import BackendUnavailable, IntegrityError
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

        Raises IntegrityError (with ``.keys`` listing the lost ones) if any key had
        only corrupt copies.
        """
        results: list[bytes | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        corrupt: set[int] = set()
        promote: list[tuple[int, list[tuple[BlobKey, bytes]]]] = []
        for level, tier in enumerate(self.tiers):
            if not pending:
                break
            wanted = [keys[i] for i in pending]
            try:
                blobs = tier.get_many(wanted)
            except Exception as exc:  # a dead tier is a miss, never a failed read
                self._tier_error(tier, "get", exc)
                continue
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
            if found and level:
                promote.append((level, found))
            pending = still
        for level, found in promote:
            for upper in self.tiers[:level]:
                self._call(upper, "promote", lambda u=upper, f=found: _put_intact(u, f))
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
        corrupt blob shows up (and is repaired or reported) when it is read.
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
                try:
                    found = tier.exists_many([keys[j] for j in missing])
                except Exception as exc:
                    self._tier_error(tier, "exists", exc)
                    continue
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
        if not accepted:
            raise BackendUnavailable(f"no tier accepted the write ({'; '.join(failures)})")
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

    def close(self) -> None:
        for tier in self.tiers:
            with contextlib.suppress(Exception):
                tier.close()

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
