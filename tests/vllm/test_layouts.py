"""Every KV-cache layout vLLM can pick, for every backend the connector supports, through a real store.

The paged caches are built the way vLLM's worker builds them (``compute_layout_strides`` +
``create_kv_cache_views`` over one int8 allocation), for each backend in each layout its
``supported_kv_cache_layouts()`` admits (``None``: every layout in vLLM's default preference).
K and V are split independently of the connector, the way each backend's ``forward`` splits them,
so a connector that split on the wrong axis fails here: lossless round trips are bit-exact, and a
lossy blob equals encoding the correctly split K and V directly.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from vllm.v1.attention.backend import AttentionBackend
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheLayout,
    KVCacheTensor,
    MLAAttentionSpec,
    compute_layout_strides,
    create_kv_cache_views,
)

from kvstore.keys import chunk_keys
from transfer.codec import encode_layer
from transfer.rpc.client import KVClient
from transfer.vllm.layout import LAYER_VIEW_ORDER, PagedKV, PagedLayout, UnsupportedLayout, check_profile
from transfer.vllm.plan import LoadSpec, SaveSpec
from transfer.vllm.settings import ConnectorSettings, EngineShape, key_namespace, rank_namespace
from transfer.vllm.worker import WorkerSide

LAYERS, HEADS, DIM, BLOCK, NUM_BLOCKS, CHUNK_BLOCKS = 3, 2, 64, 16, 12, 2
CHUNK = BLOCK * CHUNK_BLOCKS


def _layouts(cls: type[AttentionBackend]) -> list[KVCacheLayout]:
    return get_supported_kv_cache_layouts([cls])


def _backend_cases() -> list[tuple[str, str]]:
    cases = []
    for name in ("CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION"):
        cls = AttentionBackendEnum[name].get_class()
        cases += [(cls.get_name(), layout.name) for layout in _layouts(cls)]
    # FlashInfer's module needs the flashinfer package (not in vLLM's CPU build); off Blackwell its
    # supported_kv_cache_layouts() is the base class's, which this reads from vLLM all the same.
    cases += [("FLASHINFER", layout.name) for layout in _layouts(AttentionBackend)]
    return cases


CASES = _backend_cases()


def vllm_views(spec, layout: KVCacheLayout, num_layers: int = LAYERS, seed: int = 0) -> list[torch.Tensor]:
    """Per-layer views exactly as vLLM's worker makes them (random content)."""
    page = spec.page_size_bytes
    interleaved = page * num_layers if layout.is_block_outermost else None
    layer_stride, block_stride, *_ = compute_layout_strides(
        spec, NUM_BLOCKS, num_layers, layout, fixed_strides=(None, interleaved, None, None, None)
    )
    size = page * NUM_BLOCKS * num_layers
    tensor = KVCacheTensor(
        size=size,
        layers=[f"l{i}" for i in range(num_layers)],
        layer_stride=layer_stride,
        block_stride=block_stride,
    )
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(size // 2, generator=gen).to(torch.bfloat16).view(torch.int8)
    return create_kv_cache_views(raw, spec, NUM_BLOCKS, layout, tensor)


def backend_split(
    backend: str, view: torch.Tensor, block_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of ``block_ids`` as ``[heads, tokens, dim]``, split the way the backend's forward does."""
    if backend == "CPU_ATTN":  # cpu_attn.py: view(B, H, 2N, D).chunk(2, dim=2)
        b, h, n, _ = view.shape
        k, v = view.view(b, h, 2 * n, -1).chunk(2, dim=2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # as [B, N, H, D] like the others
    else:  # flash_attn.py / flashinfer.py / triton_attn.py: transpose(1, 2).split(head_size, dim=-1)
        k, v = view.transpose(1, 2).split(DIM, dim=-1)
    ids = torch.tensor(block_ids)
    k, v = k[ids], v[ids]  # [n, N, H, D]
    return (t.permute(2, 0, 1, 3).reshape(t.shape[2], -1, t.shape[3]) for t in (k, v))


def worker(client, ns: str, profile: str, paged: PagedKV, saves: bool = True) -> WorkerSide:
    w = WorkerSide(
        client=client,
        namespace=ns,
        num_layers=paged.num_layers,
        block_size=BLOCK,
        chunk_blocks=CHUNK_BLOCKS,
        profile=profile,
        load_timeout_s=30,
        save_timeout_s=30,
        saves=saves,
    )
    w.register(paged)
    return w


def round_trip(client, ns, layout: PagedLayout, src, dst, keys, src_ids, dst_ids, profile="lossless"):
    writer = worker(client, ns, profile, PagedKV(layout, src, NUM_BLOCKS))
    for layer in range(len(src)):
        writer.save_layer(layer, [SaveSpec("w", keys, src_ids, 0)])
    writer.finish_saves()
    reader = worker(client, ns, profile, PagedKV(layout, dst, NUM_BLOCKS))
    reader.start_load([LoadSpec("r", keys, dst_ids, 0)])
    for layer in range(len(dst)):
        assert reader.wait_layer(layer) is not None
    assert reader.take_invalid() == set()
    return writer, reader


def test_layer_view_orders_are_vllms():
    assert {layout.name: layout.layer_view_order for layout in KVCacheLayout} == LAYER_VIEW_ORDER


@pytest.mark.parametrize("backend,layout_name", CASES)
def test_every_layout_round_trips_bit_exact_and_splits_k_from_v(kvstore_server, backend, layout_name):
    layout = KVCacheLayout[layout_name]
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM, dtype=torch.bfloat16)
    src, dst = vllm_views(spec, layout, seed=1), vllm_views(spec, layout, seed=2)
    paged = PagedLayout.resolve(
        backend, is_mla=False, layout=layout_name, num_heads=HEADS, block_size=BLOCK, head_dim=DIM
    )
    keys = chunk_keys(list(range(2 * CHUNK)), "t/m/p", CHUNK)
    src_ids, dst_ids = [5, 2, 9, 0], [3, 11, 1, 7]
    with KVClient(kvstore_server.target) as client:
        ns = f"t/{backend}.{layout_name}/lossless"
        round_trip(client, ns, paged, src, dst, keys, src_ids, dst_ids)
        for layer in range(LAYERS):
            k0, v0 = backend_split(backend, src[layer], src_ids)
            k1, v1 = backend_split(backend, dst[layer], dst_ids)
            assert torch.equal(k0, k1) and torch.equal(v0, v1), f"layer {layer}"
            untouched = [b for b in range(NUM_BLOCKS) if b not in dst_ids]
            assert torch.equal(dst[layer][untouched], vllm_views(spec, layout, seed=2)[layer][untouched])
        # lossy: the stored frame is the codec's frame of the backend's own K and V
        ns = f"t/{backend}.{layout_name}/balanced"
        writer = worker(client, ns, "balanced", PagedKV(paged, src, NUM_BLOCKS))
        for layer in range(LAYERS):
            writer.save_layer(layer, [SaveSpec("w", keys, src_ids, 0)])
        writer.finish_saves()
        stored = dict(client.get_layers(ns, keys[1:], 0, LAYERS))
        k, v = backend_split(backend, src[2], src_ids)
        assert bytes(stored[2][0]) == encode_layer(k[:, CHUNK:], v[:, CHUNK:], "balanced", token_offset=CHUNK)


def test_kernel_blocks_smaller_than_vllm_blocks(kvstore_server):
    """A manager block split into kernel blocks (vLLM's view has r x the blocks, 1/r the tokens)."""
    layout = KVCacheLayout.LBNHC
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM, dtype=torch.bfloat16)
    page = spec.page_size_bytes
    layer_stride, block_stride, *_ = compute_layout_strides(spec, NUM_BLOCKS, LAYERS, layout)
    tensor = KVCacheTensor(
        size=page * NUM_BLOCKS * LAYERS,
        layers=["a", "b", "c"],
        layer_stride=layer_stride,
        block_stride=block_stride,
    )

    def views(seed):
        raw = torch.randn(tensor.size // 2, generator=torch.Generator().manual_seed(seed)).bfloat16()
        return create_kv_cache_views(
            raw.view(torch.int8), spec, NUM_BLOCKS, layout, tensor, kernel_block_size=8
        )

    src, dst = views(1), views(2)
    assert src[0].shape[0] == 2 * NUM_BLOCKS  # vLLM's own view: two kernel blocks per block
    paged = PagedLayout.resolve(
        "FLASH_ATTN", is_mla=False, layout="LBNHC", num_heads=HEADS, block_size=BLOCK, head_dim=DIM
    )
    keys = chunk_keys(list(range(CHUNK)), "t/m/p", CHUNK)
    with KVClient(kvstore_server.target) as client:
        round_trip(client, "t/kernel/lossless", paged, src, dst, keys, [4, 1], [0, 10])
    for layer in range(LAYERS):
        a = src[layer].view(NUM_BLOCKS, 2, *src[layer].shape[1:])[[4, 1]]
        b = dst[layer].view(NUM_BLOCKS, 2, *dst[layer].shape[1:])[[0, 10]]
        assert torch.equal(a, b)


def test_mla_latent_is_lossless_only_and_round_trips(kvstore_server):
    latent = 576  # kv_lora_rank 512 + rope 64, as DeepSeek's
    spec = MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=latent, dtype=torch.bfloat16)
    layout = KVCacheLayout.LBHNC
    src, dst = vllm_views(spec, layout, seed=3), vllm_views(spec, layout, seed=4)
    assert src[0].shape == (NUM_BLOCKS, 1, BLOCK, latent)
    paged = PagedLayout.resolve(
        "FLASHMLA", is_mla=True, layout="LBHNC", num_heads=1, block_size=BLOCK, head_dim=latent
    )
    check_profile(paged.placement, "lossless", latent)
    with pytest.raises(UnsupportedLayout, match="MLA latent"):
        check_profile(paged.placement, "balanced", latent)
    keys = chunk_keys(list(range(CHUNK)), "t/m/p", CHUNK)
    with KVClient(kvstore_server.target) as client:
        round_trip(client, "t/mla/lossless", paged, src, dst, keys, [7, 2], [5, 6])
    for layer in range(LAYERS):
        assert torch.equal(src[layer][[7, 2]], dst[layer][[5, 6]])


@pytest.mark.parametrize(
    "backend,layout,message",
    [
        ("TURBOQUANT", "LBNHC", "does not know where it keeps K and V"),
        ("CPU_ATTN", "LBNHC", "only contiguous in layout LBHNC"),
        ("FLASH_ATTN", "XYZ", "not one the connector knows"),
    ],
)
def test_unknown_layouts_are_refused_naming_them(backend, layout, message):
    with pytest.raises(UnsupportedLayout, match=message):
        PagedLayout.resolve(
            backend, is_mla=False, layout=layout, num_heads=HEADS, block_size=BLOCK, head_dim=DIM
        )


def test_a_view_whose_strides_disagree_with_the_layout_is_refused():
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM, dtype=torch.bfloat16)
    views = vllm_views(spec, KVCacheLayout.LBNHC)
    said = PagedLayout.resolve(
        "FLASH_ATTN", is_mla=False, layout="LBHNC", num_heads=HEADS, block_size=BLOCK, head_dim=DIM
    )
    with pytest.raises(UnsupportedLayout, match="do not follow layout LBHNC"):
        PagedKV(said, views, NUM_BLOCKS)


def test_two_ranks_store_and_load_their_own_head_shard(kvstore_server):
    settings = ConnectorSettings.from_extra({"chunk_blocks": CHUNK_BLOCKS})
    shape = EngineShape("LlamaForCausalLM", LAYERS, HEADS, DIM, "bfloat16", BLOCK, "/m", tp_size=2)
    keys = chunk_keys(list(range(CHUNK)), key_namespace(settings, shape), CHUNK)
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM, dtype=torch.bfloat16)
    paged = PagedLayout.resolve(
        "FLASH_ATTN", is_mla=False, layout="LBNHC", num_heads=HEADS, block_size=BLOCK, head_dim=DIM
    )
    shards = {r: vllm_views(spec, KVCacheLayout.LBNHC, seed=10 + r) for r in (0, 1)}
    with KVClient(kvstore_server.target) as client:
        for r in (0, 1):
            ns = str(rank_namespace(settings, replace(shape, tp_rank=r)))
            w = worker(client, ns, "lossless", PagedKV(paged, shards[r], NUM_BLOCKS))
            for layer in range(LAYERS):
                w.save_layer(layer, [SaveSpec("w", keys, [3, 4], 0)])
            w.finish_saves()
        for r in (0, 1):
            ns = str(rank_namespace(settings, replace(shape, tp_rank=r)))
            dst = vllm_views(spec, KVCacheLayout.LBNHC, seed=20 + r)
            reader = worker(client, ns, "lossless", PagedKV(paged, dst, NUM_BLOCKS))
            reader.start_load([LoadSpec("r", keys, [8, 9], 0)])
            for layer in range(LAYERS):
                reader.wait_layer(layer)
            assert reader.take_invalid() == set()
            for layer in range(LAYERS):
                assert torch.equal(dst[layer][[8, 9]], shards[r][layer][[3, 4]]), (
                    f"rank {r} got its own shard"
                )
                assert not torch.equal(dst[layer][[8, 9]], shards[1 - r][layer][[3, 4]])


def test_a_load_with_a_missing_chunk_reports_its_blocks(kvstore_server):
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM, dtype=torch.bfloat16)
    paged = PagedLayout.resolve(
        "FLASH_ATTN", is_mla=False, layout="LBNHC", num_heads=HEADS, block_size=BLOCK, head_dim=DIM
    )
    keys = chunk_keys(list(range(9000, 9000 + CHUNK)), "t/m/p", CHUNK)
    with KVClient(kvstore_server.target) as client:
        reader = worker(
            client,
            "t/missing/lossless",
            "lossless",
            PagedKV(paged, vllm_views(spec, KVCacheLayout.LBNHC), NUM_BLOCKS),
        )
        reader.start_load([LoadSpec("r", keys, [2, 3], 0)])
        for layer in range(LAYERS):
            reader.wait_layer(layer)
        assert reader.take_invalid() == {2, 3}


@pytest.mark.parametrize("layout", list(KVCacheLayout), ids=lambda x: x.name)
def test_allocate_views_strides_are_vllms(layout):
    from transfer.vllm.layout import allocate_views

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM, dtype=torch.bfloat16)
    theirs = vllm_views(spec, layout)
    ours = allocate_views(
        layout.name,
        num_layers=LAYERS,
        num_blocks=NUM_BLOCKS,
        heads=HEADS,
        block_size=BLOCK,
        content=2 * DIM,
        dtype=torch.bfloat16,
    )
    assert [(t.shape, t.stride()) for t in ours] == [(t.shape, t.stride()) for t in theirs]
