"""A prefix that Lookup reported but the store can no longer deliver (evicted in between, or every
replica holding it lost) is recomputed by the worker: same first token, no error."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kvstore.keys import chunk_keys
from kvstore.server import ServerHandle
from transfer.replicas.client import connect
from workers.prefill import prefill_from_store
from workers.runner import ModelRunner, reuse_boundary

CHUNK = 16
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runner(smollm2: tuple[Any, Any]) -> Iterator[ModelRunner]:
    threads = torch.get_num_threads()
    yield ModelRunner(num_threads=1, model=smollm2[0], tokenizer=smollm2[1])
    torch.set_num_threads(threads)


@pytest.mark.parametrize("layerwise", [True, False])
def test_prefix_gone_between_lookup_and_get_is_recomputed(
    runner: ModelRunner, kvstore_server: ServerHandle, layerwise: bool
) -> None:
    ids = runner.chat_ids(
        "You are terse.",
        "The store keeps attention KV so prefixes are reused.",
        "\n\nQuestion: what is reused?",
    )
    boundary = reuse_boundary(len(ids), CHUNK)
    ns = "t/recompute/lossless"
    keys = chunk_keys(ids, ns, CHUNK)[: boundary // CHUNK]
    assert keys
    reference = runner.prefill(ids, boundary=boundary)
    with connect(kvstore_server.target) as client:
        assert client.lookup(ns, keys, runner.shape.num_layers) == 0  # nothing there: a stale Lookup's keys
        out, reused = prefill_from_store(client, runner, ns, keys, ids, CHUNK, boundary, layerwise=layerwise)
    assert reused == 0
    assert out.num_computed == len(ids)
    assert out.first_token == reference.first_token
