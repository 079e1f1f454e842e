"""Layer-wise streaming of a stored prefix into SmolLM2's forward pass.

Proves three things on a real server, real gRPC and the real model:
1. logits with :class:`LayerwiseCache` are identical to those with an ordinary
   DynamicCache built from the same decoded tensors (and generation continues);
2. the model consumes layer 0 before the last layer has arrived: the stream is
   gated so that layer 1 is only released once layer 0 has been consumed, which
   deadlocks (and fails) any cache that waits for every layer first;
3. a store error in the middle of the stream surfaces in the model's thread as
   the precise client exception.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kvstore.keys import chunk_keys, model_fingerprint
from transfer import errors
from transfer.engines.layerwise import ARRIVED, CONSUMED, DECODED, LayerwiseCache
from transfer.rpc.client import KVClient

CHUNK = 16  # small chunks keep the CPU forward passes short
PREFIX_CHUNKS = 4
SUFFIX = 8


@pytest.fixture(scope="module")
def prompt(smollm2: Any) -> dict[str, Any]:
    """A prompt, its prefix KV and the namespace it is stored under."""
    from workers.model import cache_to_layers, kv_shape

    model, tokenizer = smollm2
    shape = kv_shape(model)
    text = "Layer-wise streaming overlaps the network with compute. " * 12
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : PREFIX_CHUNKS * CHUNK + SUFFIX]
    prefix = ids[:, : PREFIX_CHUNKS * CHUNK]
    with torch.no_grad():
        layers = cache_to_layers(model(prefix, use_cache=True).cache)
    fp = model_fingerprint("llama", shape.num_layers, shape.num_kv_heads, shape.head_dim, "f32")
    ns = f"tenant-a/{fp}/lossless"
    return {
        "ids": ids,
        "prefix": prefix[0].tolist(),
        "suffix": ids[:, PREFIX_CHUNKS * CHUNK :],
        "layers": layers,
        "ns": ns,
        "num_layers": shape.num_layers,
        "keys": chunk_keys(prefix[0].tolist(), ns, CHUNK),
    }


@pytest.fixture
def stored(kvstore_server: Any, prompt: dict[str, Any]) -> Iterator[KVClient]:
    from transfer.engines.kvio import put_context

    with KVClient(kvstore_server.target) as c:
        put_context(c, prompt["ns"], prompt["prefix"], prompt["layers"], "lossless", chunk_tokens=CHUNK)
        yield c


def _reference_logits(model: Any, client: KVClient, prompt: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    from transfer.engines.kvio import fetch_prefix

    fetched = fetch_prefix(client, prompt["ns"], prompt["prefix"], prompt["num_layers"], chunk_tokens=CHUNK)
    assert fetched.num_chunks == PREFIX_CHUNKS
    cache = fetched.to_cache()
    with torch.no_grad():
        return model(prompt["suffix"], cache=cache, use_cache=True).logits, cache


@pytest.mark.slow
def test_layerwise_logits_equal_dynamic_cache(smollm2: Any, stored: KVClient, prompt: dict[str, Any]) -> None:
    model, _ = smollm2
    ref_logits, ref_cache = _reference_logits(model, stored, prompt)
    cache = LayerwiseCache.from_store(
        stored, prompt["ns"], prompt["keys"], prompt["num_layers"], chunk_tokens=CHUNK, prefetch_depth=3
    )
    assert cache.get_seq_length() == PREFIX_CHUNKS * CHUNK  # known before any layer arrived
    with torch.no_grad():
        logits = model(prompt["suffix"], cache=cache, use_cache=True).logits
    assert torch.equal(logits, ref_logits)
    assert cache.wait_loaded(30)
    # Generation continues on the filled cache exactly like on a DynamicCache.
    nxt = logits[:, -1:].argmax(-1)
    with torch.no_grad():
        step = model(nxt, cache=cache, use_cache=True).logits
        ref_step = model(nxt, cache=ref_cache, use_cache=True).logits
    assert torch.equal(step, ref_step)
    assert cache.get_seq_length() == PREFIX_CHUNKS * CHUNK + SUFFIX + 1


@pytest.mark.slow
def test_layer0_is_consumed_before_the_last_layer_arrives(
    smollm2: Any, stored: KVClient, prompt: dict[str, Any]
) -> None:
    model, _ = smollm2
    num_layers = prompt["num_layers"]
    holder: dict[str, LayerwiseCache] = {}
    built = threading.Event()
    gate_opened = threading.Event()

    def gated() -> Iterator[tuple[int, list[bytes]]]:
        # Hold back every layer after 0 until the model has consumed layer 0.
        for layer, blobs in stored.get_layers(prompt["ns"], prompt["keys"], 0, num_layers):
            if layer == 1 and built.wait(30) and holder["cache"].consumed_event(0).wait(60):
                gate_opened.set()
            yield layer, blobs

    from transfer.codec import decode_into

    depth = 2
    cache = LayerwiseCache(
        gated(), num_layers, PREFIX_CHUNKS * CHUNK, decode=decode_into, prefetch_depth=depth
    )
    holder["cache"] = cache
    built.set()
    with torch.no_grad():
        logits = model(prompt["suffix"], cache=cache, use_cache=True).logits
    assert gate_opened.is_set(), "layer 0 was not consumed while later layers were held back"
    arrived, consumed = cache.times(ARRIVED), cache.times(CONSUMED)
    assert consumed[0] < arrived[num_layers - 1]
    assert all(consumed[i] >= arrived[i] for i in range(num_layers))
    # Never more than `depth` decoded layers wait ahead of compute.
    pending = 0
    for event in cache.events:
        pending += {DECODED: 1, CONSUMED: -1}.get(event.kind, 0)
        assert pending <= depth
    ref_logits, _ = _reference_logits(model, stored, prompt)
    assert torch.equal(logits, ref_logits)


@pytest.mark.slow
def test_store_error_mid_stream_surfaces_in_the_model(
    smollm2: Any, kvstore_server: Any, prompt: dict[str, Any]
) -> None:
    from transfer.engines.kvio import context_items

    model, _ = smollm2
    keys = prompt["keys"]
    missing_from = 10  # the last chunk has layers 0..9 only
    items = (
        it
        for it in context_items(prompt["ns"], keys, prompt["layers"], profile="lossless", chunk_tokens=CHUNK)
        if not (it.key == keys[-1] and it.layer >= missing_from)
    )
    with KVClient(kvstore_server.target) as c:
        c.put(prompt["ns"], items)
        assert c.lookup(prompt["ns"], keys, prompt["num_layers"]) == PREFIX_CHUNKS - 1
        cache = LayerwiseCache.from_store(c, prompt["ns"], keys, prompt["num_layers"], chunk_tokens=CHUNK)
        with pytest.raises(errors.NotFound, match=f"layer {missing_from}"), torch.no_grad():
            model(prompt["suffix"], cache=cache, use_cache=True)
    assert sorted(cache.times(CONSUMED)) == list(range(missing_from))


def test_prefetch_depth_bounds_how_far_the_loader_runs_ahead() -> None:
    num_layers, depth = 8, 3
    holder: dict[str, LayerwiseCache] = {}
    built = threading.Event()
    lead: list[int] = []

    def source() -> Iterator[tuple[int, list[bytes]]]:
        built.wait(10)
        for layer in range(num_layers):
            lead.append(layer - len(holder["cache"].times(CONSUMED)))
            yield layer, [bytes([layer])]

    def decode(blobs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.full((1, 4, 2), float(blobs[0][0]))
        return t, t.clone()

    cache = LayerwiseCache(source(), num_layers, 4, decode=decode, prefetch_depth=depth)
    holder["cache"] = cache
    built.set()
    deadline = time.monotonic() + 10
    while len(cache.times(DECODED)) < depth and time.monotonic() < deadline:
        time.sleep(0.005)  # poll with a deadline: the loader fills the window
    assert len(cache.times(DECODED)) == depth
    for layer in range(num_layers):
        k, _ = cache.layers[layer].update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
        assert k.shape == (1, 1, 5, 2) and k[0, 0, 0, 0].item() == layer
    assert max(lead) <= depth
    assert cache.wait_loaded(10)


@pytest.mark.parametrize("decode_in_loader", [True, False])
def test_decoding_runs_in_the_thread_asked_for(decode_in_loader: bool) -> None:
    threads: list[str] = []

    def decode(blobs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        threads.append(threading.current_thread().name)
        t = torch.full((2, 3, 4), float(blobs[0][0]))
        return t, -t

    source = ((layer, [bytes([layer])]) for layer in range(4))
    cache = LayerwiseCache(source, 4, 3, decode=decode, decode_in_loader=decode_in_loader)
    for layer in range(4):
        k, v = cache.layers[layer].update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
        assert k.shape == (1, 2, 4, 4) and k[0, 0, 0, 0].item() == layer and v[0, 0, 0, 0].item() == -layer
    assert cache.wait_loaded(10)
    expected = "layerwise-loader" if decode_in_loader else threading.current_thread().name
    assert threads == [expected] * 4


def test_a_used_cache_is_freed_without_the_cyclic_gc() -> None:
    """Reference counting alone frees a cache once the model is done with it.

    Each cache holds a whole prefix of KV; a reference cycle (layer -> cache)
    kept them until Python's cyclic GC ran, several prefixes at a time, and the
    forward passes in between ran on freshly faulted memory.
    """
    import gc
    import weakref

    def run() -> tuple[weakref.ref[LayerwiseCache], torch.Tensor]:
        source = ((layer, [bytes([layer])]) for layer in range(3))
        cache = LayerwiseCache(
            source, 3, 2, decode=lambda blobs: (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))
        )
        for layer in range(3):
            k, _ = cache.layers[layer].update(torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4))
        assert cache.wait_loaded(10)
        return weakref.ref(cache), k

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        ref, k = run()
        assert k.shape == (1, 1, 3, 4)
        assert ref() is None, "LayerwiseCache is part of a reference cycle"
    finally:
        if was_enabled:
            gc.enable()


def test_a_layer_kept_after_its_cache_is_dropped_says_so() -> None:
    source = ((layer, [bytes([layer])]) for layer in range(2))
    cache = LayerwiseCache(source, 2, 2, decode=lambda blobs: (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))
    assert cache.wait_loaded(10)
    layer = cache.layers[1]
    del cache
    with pytest.raises(errors.TransferError, match="LayerwiseCache is gone"):
        layer.update(torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4))
