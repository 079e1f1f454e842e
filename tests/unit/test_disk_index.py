"""The disk tier's compact index (kvstore/backends/disk_index.py) against a plain dict doing the same."""

from __future__ import annotations

import random

import numpy as np

from kvstore.backends.disk_index import SEG_SHIFT, KeyTable, digest


def _name(i: int) -> bytes:
    return f"ns/{i:04x}/{i % 7}".encode()


def test_put_pop_and_growth_agree_with_a_dict() -> None:
    rng = random.Random(3)
    table, model = KeyTable(), {}
    for step in range(20_000):
        i = rng.randrange(3_000)
        a, b = digest(_name(i))
        if rng.random() < 0.3:
            assert table.pop(a, b) == (model.pop(i)[0] if i in model else -1)
        else:
            where = (
                rng.randrange(1, 50),
                rng.randrange(1 << 30),
                rng.randrange(1 << 20),
                rng.randrange(30, 200),
            )
            assert table.put(a, b, *where) == (model[i][0] if i in model else -1)
            model[i] = where
        if step % 997 == 0:
            assert len(table) == len(model)
    for i in range(3_000):
        slot = table.find(*digest(_name(i)))
        assert (slot >= 0) == (i in model)
        if slot >= 0:
            assert table.entry(slot) == model[i]
    assert table.nbytes < 34 * 8_192  # grew for ~2,000 live keys, not for 20,000 writes


def test_from_log_keeps_the_newest_row_of_each_key_and_drops_removed_ones() -> None:
    rows, model = [], {}
    rng = random.Random(5)
    for n in range(5_000):
        i = rng.randrange(800)
        a, b = digest(_name(i))
        if rng.random() < 0.2:
            rows.append((a, b, 0, 0, 0))
            model.pop(i, None)
        else:
            seg, off, length, hlen = n % 9 + 1, n * 100, n, 40 + n % 50
            rows.append((a, b, seg << SEG_SHIFT | off, length, hlen | 1 << 16))
            model[i] = (seg, off, length, hlen)
    table = KeyTable.from_log(np.array(rows, dtype=np.uint64))
    assert len(table) == len(model)
    for i in range(800):
        slot = table.find(*digest(_name(i)))
        assert (table.entry(slot) if slot >= 0 else None) == model.get(i)
    per_segment: dict[int, int] = {}
    for seg, *_ in model.values():
        per_segment[seg] = per_segment.get(seg, 0) + 1
    assert table.segment_counts() == per_segment
    slots = table.in_segment(3)
    assert sorted(table.describe(slots)[1]) == sorted(off for seg, off, *_ in model.values() if seg == 3)
    table.drop(slots)
    assert len(table) == len(model) - per_segment.get(3, 0)
    assert all(table.find(*digest(_name(i))) < 0 for i, v in model.items() if v[0] == 3)


def test_hot_mark_is_set_by_a_read_and_cleared_by_an_overwrite() -> None:
    table = KeyTable()
    a, b = digest(b"ns/ab/0")
    table.put(a, b, 1, 100, 10, 50)
    slot = table.find(a, b)
    table.mark_hot(slot)
    assert table.describe(np.array([slot]))[4] == [True]
    assert table.entry(slot) == (1, 100, 10, 50)
    table.put(a, b, 2, 200, 10, 50)
    assert table.describe(np.array([table.find(a, b)]))[4] == [False]
