"""KV straight from the real model's forward pass, autograd on, through every encoding path.

A user who calls the model as in the README (no ``torch.no_grad()``) gets K and V
that require grad. The codec's CPU kernels and the torch path's last host step
both call ``.numpy()``, which refuses such tensors; the codec detaches at its one
entry (``frame.encode_group``) instead. These tests feed the bundled model's own
outputs, checked to require grad, to ``encode_layer``, ``encode`` (one thread and
the codec pool), both kernel paths, ``kvio.put_context`` and ``longctx`` against a
real server, and compare every frame byte for byte with the frame of the same
tensor detached by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from transfer.codec import PROFILES, cpu_kernels, decode_into, encode, encode_layer
from transfer.rpc.client import KVClient

CHUNK = 64


@pytest.fixture(scope="module")
def model_kv(smollm2: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (K, V) of a 2-chunk prompt, computed with autograd on, as a new user would."""
    from workers.model import cache_to_layers

    model, tokenizer = smollm2
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt").input_ids
    with torch.enable_grad():
        out = model(ids[:, : 2 * CHUNK + 10], use_cache=True)
    layers = cache_to_layers(out.cache)
    assert all(k.requires_grad and v.requires_grad for k, v in layers), "the model must hand out grad tensors"
    return layers


def _chunk(
    layers: list[tuple[torch.Tensor, torch.Tensor]], c: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(k[:, c * CHUNK : (c + 1) * CHUNK], v[:, c * CHUNK : (c + 1) * CHUNK]) for k, v in layers]


def _detached(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(k.detach(), v.detach()) for k, v in layers]


@pytest.fixture(params=[True, False], ids=["kernels", "torch"])
def kernel_path(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Both CPU encoders: the compiled kernels and the torch stages (``KVSTORE_CODEC_KERNELS=torch``)."""
    was = cpu_kernels.enabled()
    cpu_kernels.set_enabled(request.param)
    try:
        yield request.param
    finally:
        cpu_kernels.set_enabled(was)


@pytest.mark.slow
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_encoder_takes_grad_tensors_and_gives_the_detached_bytes(
    model_kv: list[tuple[torch.Tensor, torch.Tensor]], profile: str, kernel_path: bool
) -> None:
    chunk = _chunk(model_kv, 1)
    expected = encode(_detached(chunk), profile, token_offset=CHUNK, threads=1)
    k, v = chunk[3]
    assert encode_layer(k, v, profile, token_offset=CHUNK) == expected[3]
    assert encode(chunk, profile, token_offset=CHUNK, threads=1) == expected
    assert encode(chunk, profile, token_offset=CHUNK) == expected  # split over the codec pool
    saliency = k.norm(dim=-1).sum(0)  # a grad tensor too
    assert saliency.requires_grad
    assert encode(chunk, profile, saliency=saliency, token_offset=CHUNK) == encode(
        _detached(chunk), profile, saliency=saliency.detach(), token_offset=CHUNK
    )
    assert k.requires_grad and k.grad_fn is not None  # the caller's tensors are left as they were


@pytest.mark.slow
def test_put_context_and_longctx_store_grad_kv_from_the_model(
    kvstore_server: Any, smollm2: Any, model_kv: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    from kvstore.keys import chunk_keys
    from transfer.engines import longctx
    from transfer.engines.kvio import fetch_prefix, put_context

    _, tokenizer = smollm2
    token_ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 20).input_ids[: 2 * CHUNK + 10]
    num_layers = len(model_kv)
    with KVClient(kvstore_server.target) as client:
        ns = "acme/smollm2-135m/lossless"
        keys, result = put_context(client, ns, token_ids, model_kv, chunk_tokens=CHUNK)
        assert result.num_stored == 2 * num_layers
        prefix = fetch_prefix(client, ns, token_ids, num_layers, chunk_tokens=CHUNK)
        assert prefix.num_tokens == 2 * CHUNK
        for (k, v), (k2, v2) in zip(model_kv, prefix.layers, strict=True):
            assert torch.equal(k2, k.detach()[:, : 2 * CHUNK]) and torch.equal(v2, v.detach()[:, : 2 * CHUNK])

        ns = "acme/smollm2-135m/balanced"
        keys = chunk_keys(token_ids, ns, CHUNK)
        done = longctx.offload_context(
            client, ns, keys, (_chunk(model_kv, c) for c in range(2)), chunk_tokens=CHUNK
        )
        assert done.num_blobs == 2 * num_layers
        got = [bytes(b) for b in next(iter(client.get_layers(ns, keys, 5, 6)))[1]]
        assert got == [
            encode(_detached(_chunk(model_kv, c)), "balanced", token_offset=c * CHUNK)[5] for c in range(2)
        ]
        k5, _ = decode_into(got)
        assert k5.shape == (model_kv[5][0].shape[0], 2 * CHUNK, model_kv[5][0].shape[2])
