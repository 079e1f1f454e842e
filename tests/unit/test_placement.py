"""Rendezvous placement: balance, minimal movement on a membership change, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from transfer.replicas import placement

REPO = Path(__file__).resolve().parents[2]
MEMBERS = [f"10.0.0.{i}:50051" for i in range(1, 5)]


def _keys(n: int, seed: int = 0) -> list[bytes]:
    import hashlib

    return [hashlib.blake2b(f"{seed}/{i}".encode(), digest_size=16).digest() for i in range(n)]


def test_owners_are_distinct_top_r_and_order_independent() -> None:
    for key in _keys(200):
        two = placement.owners(key, MEMBERS, 2)
        assert len(set(two)) == 2 and set(two) <= set(MEMBERS)
        assert two == placement.rank(key, MEMBERS)[:2]
        assert placement.owners(key, list(reversed(MEMBERS)), 2) == two
        assert placement.owners(key, MEMBERS, 1) == two[:1]
    assert placement.owners(b"k" * 16, MEMBERS, 9) == placement.rank(b"k" * 16, MEMBERS)
    with pytest.raises(ValueError, match="replication"):
        placement.owners(b"k" * 16, MEMBERS, 0)


@pytest.mark.parametrize("replication", [1, 2])
def test_balance_over_members(replication: int) -> None:
    keys = _keys(20000)
    load = Counter(m for k in keys for m in placement.owners(k, MEMBERS, replication))
    mean = len(keys) * replication / len(MEMBERS)
    assert set(load) == set(MEMBERS)
    assert max(load.values()) / mean < 1.05 and min(load.values()) / mean > 0.95, load


@pytest.mark.parametrize("replication", [1, 2])
def test_adding_a_member_moves_about_r_over_n_plus_one(replication: int) -> None:
    keys = _keys(20000, seed=1)
    grown = [*MEMBERS, "10.0.0.9:50051"]
    before = {k: set(placement.owners(k, MEMBERS, replication)) for k in keys}
    after = {k: set(placement.owners(k, grown, replication)) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    expected = replication / len(grown)
    assert abs(len(moved) / len(keys) - expected) < 0.02, (len(moved) / len(keys), expected)
    # every change is the new member taking one owner slot; nothing shuffles among old members
    for k in moved:
        assert after[k] - before[k] == {"10.0.0.9:50051"} and len(before[k] - after[k]) == 1


def test_removing_a_member_moves_only_its_keys() -> None:
    keys = _keys(20000, seed=2)
    gone = MEMBERS[2]
    shrunk = [m for m in MEMBERS if m != gone]
    moved = 0
    for k in keys:
        before, after = placement.owners(k, MEMBERS, 2), placement.owners(k, shrunk, 2)
        if gone not in before:
            assert after == before
        else:
            moved += 1
            assert set(before) - {gone} <= set(after)
    assert abs(moved / len(keys) - 2 / len(MEMBERS)) < 0.02


def test_same_owners_in_another_process() -> None:
    keys = _keys(50, seed=3)
    code = (
        "import json,sys; from transfer.replicas import placement; ks=[bytes.fromhex(h) for h in json.load(sys.stdin)]; "
        f"print(json.dumps([placement.owners(k, {MEMBERS!r}, 2) for k in ks]))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([k.hex() for k in keys]),
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=REPO,
    )
    assert json.loads(out.stdout) == [placement.owners(k, MEMBERS, 2) for k in keys]
