"""Chunk keys: stable across processes, separated by namespace, prefix-chained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.keys import KEY_BYTES, Namespace, chunk_keys

ROOT = Path(__file__).resolve().parents[2]
NS = Namespace("acme", "smollm2-L30", "fp16")
TOKENS = list(range(1000, 1000 + 4 * 256 + 17))


def test_keys_are_identical_in_another_process() -> None:
    # Another interpreter with a different hash seed must compute the same keys:
    # keys cross processes and machines (Python's hash() would not).
    code = (
        "import sys; from kvstore.keys import chunk_keys, Namespace;"
        "ks = chunk_keys(list(range(1000, 1000 + 4 * 256 + 17)), Namespace('acme', 'smollm2-L30', 'fp16'));"
        "print(','.join(k.hex() for k in ks))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)},
    )
    assert out.stdout.strip().split(",") == [k.hex() for k in chunk_keys(TOKENS, NS)]


def test_keys_are_32_bytes_and_only_full_chunks_get_one() -> None:
    keys = chunk_keys(TOKENS, NS)
    assert len(keys) == 4  # the trailing 17 tokens are a partial chunk: no key
    assert all(len(k) == KEY_BYTES for k in keys)
    assert chunk_keys(TOKENS[:255], NS) == []
    assert len(set(keys)) == len(keys)


def test_namespaces_never_share_keys() -> None:
    base = chunk_keys(TOKENS, NS)
    for other in (
        Namespace("other", NS.model, NS.profile),
        Namespace(NS.tenant, "llama", NS.profile),
        Namespace(NS.tenant, NS.model, "int4"),
    ):
        assert set(chunk_keys(TOKENS, other)).isdisjoint(base)
    assert chunk_keys(TOKENS, str(NS)) == base  # the str form is the same namespace


def test_key_names_the_whole_prefix() -> None:
    full = chunk_keys(TOKENS, NS)
    # A shared prefix gives shared leading keys...
    assert chunk_keys(TOKENS[: 2 * 256], NS) == full[:2]
    # ...and one changed token changes its chunk's key and every key after it.
    changed = list(TOKENS)
    changed[300] += 1
    other = chunk_keys(changed, NS)
    assert other[0] == full[0]
    assert all(a != b for a, b in zip(other[1:], full[1:], strict=True))


def test_seed_and_chunk_size_change_keys() -> None:
    assert chunk_keys(TOKENS, NS, seed=b"other") != chunk_keys(TOKENS, NS)
    assert chunk_keys(TOKENS, NS, chunk_tokens=128)[0] != chunk_keys(TOKENS, NS)[0]
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunk_keys(TOKENS, NS, chunk_tokens=0)


@pytest.mark.parametrize("text", ["", "a/b", "a/b/c/d", "a b/m/p", "a//p", "t/m/p?", "x" * 65 + "/m/p"])
def test_invalid_namespaces_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="invalid namespace"):
        Namespace.parse(text)


def test_namespace_round_trips() -> None:
    assert Namespace.parse(str(NS)) == NS
    with pytest.raises(ValueError):
        Namespace("bad/tenant", "m", "p")
