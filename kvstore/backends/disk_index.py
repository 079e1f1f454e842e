"""The disk tier's index: where each live blob is, in a few fixed-size arrays.

A Python dict of ``BlobKey -> entry`` costs ~450 bytes of RAM per record (the key
object, its strings, the entry object, its ints, the dict slot, the segment's set
slot) and is rebuilt one record at a time on open. This table keeps, per slot, a
128-bit digest of the blob's name (XXH3-128), the segment id and payload offset
packed in one word, the payload length and the header length: 34 bytes in numpy
arrays, at a load of 3/8 to 3/4 (open addressing, linear probing), so 45-91 bytes
per record and no Python object per record. The names themselves stay on disk, in
the record headers, and are read back only by the rare paths that need them
(listing keys, re-appending a hot blob on eviction).

Two names sharing a 128-bit digest would share a slot; at a billion records the
chance of any such pair is about 1 in 10^21.

Recovery hands over the whole log at once (:meth:`KeyTable.from_log`): the records
in log order, the newest write of a key wins, placed with vectorised probing rounds
instead of one Python call per record.

Not thread-safe: the disk tier calls it under its index lock.
"""

from __future__ import annotations

import numpy as np
import xxhash

from kvstore.malloc_tuning import release_free_memory

#: Bits of the packed location word that hold the payload offset; the segment id sits above.
SEG_SHIFT = 40
MAX_OFFSET = 1 << SEG_SHIFT
MAX_SEGMENT_ID = (1 << (64 - SEG_SHIFT)) - 1
_OFFSET_MASK = MAX_OFFSET - 1
_HOT = 0x8000  # in the header-length word: read since written (a header is at most ~4 KiB)
_EMPTY = 0
_DELETED = 1  # a slot whose key was removed: probing goes on past it
_MAX_LOAD = 0.75
_MIN_CAP = 1024
_M64 = (1 << 64) - 1


def digest(name: bytes) -> tuple[int, int]:
    """The two words a name is stored under; the first is never ``_EMPTY`` or ``_DELETED``."""
    value = xxhash.xxh3_128_intdigest(name)
    return (value >> 64) | 2, value & _M64


def _capacity_for(count: int) -> int:
    cap = _MIN_CAP
    while cap * _MAX_LOAD < count:
        cap <<= 1
    return cap


class KeyTable:
    """Open-addressing hash table from a name digest to (segment id, payload offset, length, header length)."""

    __slots__ = (
        "count",
        "_used",
        "_a",
        "_b",
        "_loc",
        "_len",
        "_hdr",
        "_av",
        "_bv",
        "_locv",
        "_lenv",
        "_hdrv",
        "_mask",
    )

    def __init__(self, capacity: int = _MIN_CAP) -> None:
        self.count = 0  # live keys
        self._used = 0  # live keys + deleted slots
        self._alloc(capacity)

    def _alloc(self, cap: int) -> None:
        self._a = np.zeros(cap, np.uint64)
        self._b = np.zeros(cap, np.uint64)
        self._loc = np.zeros(cap, np.uint64)
        self._len = np.zeros(cap, np.uint64)
        self._hdr = np.zeros(cap, np.uint16)
        # memoryviews: indexing them yields plain ints, several times faster than numpy scalars.
        self._av, self._bv = memoryview(self._a), memoryview(self._b)
        self._locv, self._lenv, self._hdrv = (
            memoryview(self._loc),
            memoryview(self._len),
            memoryview(self._hdr),
        )
        self._mask = cap - 1

    def __len__(self) -> int:
        return self.count

    @property
    def nbytes(self) -> int:
        return self._a.nbytes + self._b.nbytes + self._loc.nbytes + self._len.nbytes + self._hdr.nbytes

    # ------------------------------------------------------------ one key at a time
    def find(self, a: int, b: int) -> int:
        """The slot holding the key, or -1."""
        av, bv, mask = self._av, self._bv, self._mask
        i = b & mask
        while True:
            x = av[i]
            if x == a and bv[i] == b:
                return i
            if x == _EMPTY:
                return -1
            i = (i + 1) & mask

    def entry(self, slot: int) -> tuple[int, int, int, int]:
        """(segment id, payload offset, payload length, header length) of an occupied slot."""
        loc = self._locv[slot]
        return loc >> SEG_SHIFT, loc & _OFFSET_MASK, self._lenv[slot], self._hdrv[slot] & ~_HOT

    def mark_hot(self, slot: int) -> None:
        self._hdrv[slot] |= _HOT

    def put(self, a: int, b: int, seg_id: int, offset: int, length: int, header_len: int) -> int:
        """Insert or overwrite (the hot mark starts clear); return the previous segment id or -1."""
        av, bv, mask = self._av, self._bv, self._mask
        i = b & mask
        free = -1
        while True:
            x = av[i]
            if x == a and bv[i] == b:
                old = self._locv[i] >> SEG_SHIFT
                self._set(i, a, b, seg_id, offset, length, header_len)
                return old
            if x == _EMPTY:
                break
            if x == _DELETED and free < 0:
                free = i
            i = (i + 1) & mask
        if free < 0:
            free = i
            self._used += 1
        self._set(free, a, b, seg_id, offset, length, header_len)
        self.count += 1
        if self._used > len(self._a) * _MAX_LOAD:
            grow = self.count > len(self._a) * _MAX_LOAD / 2
            self._rehash(len(self._a) * 2 if grow else len(self._a))
        return -1

    def _set(self, i: int, a: int, b: int, seg_id: int, offset: int, length: int, header_len: int) -> None:
        self._av[i] = a
        self._bv[i] = b
        self._locv[i] = seg_id << SEG_SHIFT | offset
        self._lenv[i] = length
        self._hdrv[i] = header_len

    def pop(self, a: int, b: int) -> int:
        """Remove the key; return the segment id it was in, or -1 if absent."""
        i = self.find(a, b)
        if i < 0:
            return -1
        self._av[i] = _DELETED
        self.count -= 1
        return self._locv[i] >> SEG_SHIFT

    # ------------------------------------------------------------ many at once
    def occupied(self) -> np.ndarray:
        return np.flatnonzero(self._a > _DELETED)

    def in_segment(self, seg_id: int) -> np.ndarray:
        """Slots of the keys whose blob is in segment ``seg_id``."""
        return np.flatnonzero((self._a > _DELETED) & ((self._loc >> np.uint64(SEG_SHIFT)) == seg_id))

    def describe(self, slots: np.ndarray) -> tuple[list[int], list[int], list[int], list[int], list[bool]]:
        """(segment ids, payload offsets, lengths, header lengths, hot marks) of these slots, in log order."""
        loc = self._loc[slots]
        order = np.argsort(loc, kind="stable")
        slots, loc = slots[order], loc[order]
        hdr = self._hdr[slots]
        return (
            (loc >> np.uint64(SEG_SHIFT)).tolist(),
            (loc & np.uint64(_OFFSET_MASK)).tolist(),
            self._len[slots].tolist(),
            (hdr & np.uint16(~_HOT & 0xFFFF)).tolist(),
            ((hdr & np.uint16(_HOT)) != 0).tolist(),
        )

    def drop(self, slots: np.ndarray) -> None:
        self._a[slots] = _DELETED
        self.count -= len(slots)

    def segment_counts(self) -> dict[int, int]:
        """Live keys per segment id."""
        ids, counts = np.unique(self._loc[self.occupied()] >> np.uint64(SEG_SHIFT), return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist(), strict=True))

    @classmethod
    def from_log(cls, ops: np.ndarray) -> KeyTable:
        """A table from the puts and removals of a recovery, in log order: rows of
        ``(a, b, segment id << SEG_SHIFT | payload offset, length, header length | is_put << 16)``.
        The newest row of a key decides: a put is indexed, a removal leaves it out."""
        table = cls(_capacity_for(len(ops)))
        newest_first = ops[::-1]
        slots, rows = table._insert_new(newest_first)
        removed = (newest_first[rows, 4] >> np.uint64(16)) == 0
        table._a[slots[removed]] = _DELETED
        table._used = len(slots)
        table.count = len(slots) - int(removed.sum())
        if table._used > table.count or len(table._a) > _capacity_for(table.count):
            table._rehash(_capacity_for(table.count))
        return table

    def _rehash(self, cap: int) -> None:
        keep = self.occupied()
        rows = np.empty((len(keep), 5), np.uint64)
        rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3] = (
            self._a[keep],
            self._b[keep],
            self._loc[keep],
            self._len[keep],
        )
        rows[:, 4] = self._hdr[keep]
        self._alloc(cap)
        self._insert_new(rows)
        self.count = self._used = len(keep)
        del rows, keep
        # The old arrays and the rows are free; under the server's malloc settings they would stay
        # in its heap (measured: 222 instead of ~100 bytes of RSS per record after 1,000,000 puts).
        release_free_memory()

    def _insert_new(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Place rows into a table holding none of their keys; of rows with the same key the first
        wins. Vectorised linear probing: each round, every row still unplaced looks at its slot;
        an empty slot goes to the lowest row at it, a slot holding the row's own key (placed by an
        earlier row) drops it, a slot holding another key sends it on to the next slot. Returns the
        slots filled and the rows placed there."""
        a, b = rows[:, 0], rows[:, 1]
        mask = np.uint64(self._mask)
        idx = np.arange(len(rows), dtype=np.int64)
        pos = (b & mask).astype(np.int64)
        none = len(rows)
        owner = np.full(len(self._a), none, np.int64)
        placed_slots, placed_rows = [], []
        while idx.size:
            here = self._a[pos]
            same = (here == a[idx]) & (self._b[pos] == b[idx])
            empty = here == _EMPTY
            cand, cpos = idx[empty], pos[empty]
            np.minimum.at(owner, cpos, cand)
            won = owner[cpos] == cand
            owner[cpos] = none
            wrows, wpos = cand[won], cpos[won]
            self._a[wpos], self._b[wpos] = a[wrows], b[wrows]
            self._loc[wpos], self._len[wpos] = rows[wrows, 2], rows[wrows, 3]
            self._hdr[wpos] = (rows[wrows, 4] & np.uint64(0xFFFF)).astype(np.uint16)
            placed_slots.append(wpos)
            placed_rows.append(wrows)
            rest = ~same
            rest[np.flatnonzero(empty)[won]] = False
            step = ~(empty | same)
            pos = np.where(step, (pos + 1) & self._mask, pos)[rest]
            idx = idx[rest]
        if not placed_slots:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(placed_slots), np.concatenate(placed_rows)
