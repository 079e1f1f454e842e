"""kvstore.service.pack_blobs: how a Get stream is cut into packed messages (GetRequest.pack_bytes)."""

from __future__ import annotations

import pytest

from kvstore.errors import NotFound
from kvstore.service import pack_blobs


def test_pack_blobs_groups_consecutive_keys_of_a_layer_within_the_limit() -> None:
    items = [(k, layer, bytes([k]) * 10) for layer in (0, 1) for k in range(5)]
    packs = list(pack_blobs(iter(items), limit=30))
    assert [(first, layer, len(blobs)) for first, layer, blobs in packs] == [
        (0, 0, 3),
        (3, 0, 2),
        (0, 1, 3),
        (3, 1, 2),
    ]  # never across a layer; at most 30 bytes
    assert [b for _, _, blobs in packs for b in blobs] == [b for _, _, b in items]
    assert [len(blobs) for _, _, blobs in pack_blobs(iter(items), limit=1)] == [
        1
    ] * 10  # one blob always fits
    gap = [(0, 0, b"a"), (2, 0, b"b")]  # not consecutive: two packs, each still "key_index, +1, ..."
    assert list(pack_blobs(iter(gap), limit=100)) == [(0, 0, [b"a"]), (2, 0, [b"b"])]
    assert list(pack_blobs(iter([]), limit=100)) == []


def test_pack_blobs_passes_a_source_error_through() -> None:
    def source():
        yield 0, 0, b"a"
        raise NotFound("keys[1] layer 0")

    packs = pack_blobs(source(), limit=100)
    with pytest.raises(NotFound):
        list(packs)
