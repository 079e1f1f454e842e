"""The connector's save and load of device-resident paged KV, through a real store: the GPU check's part.

Builds FlashAttention-layout paged caches (``LBNHC`` and ``LBHNC``, strided as vLLM lays them
out) on ``device``, saves chosen blocks through the worker side into an in-process store,
loads them into other blocks of a second cache and compares (lossless: bit-exact). On CUDA
this runs the side-stream staging (device -> pinned host for saves, host -> device with a
per-layer event for loads); on CPU the same code without streams. Needs no vLLM.

    python bench/vllm_device_roundtrip.py [cuda|cpu]     (default: cuda when there is one)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kvstore.keys import chunk_keys
from kvstore.testing.store import serving, store_config
from transfer.rpc.client import KVClient
from transfer.vllm.layout import PagedKV, PagedLayout, allocate_views
from transfer.vllm.plan import LoadSpec, SaveSpec
from transfer.vllm.worker import WorkerSide

LAYERS, HEADS, DIM, BLOCK, BLOCKS, CHUNK_BLOCKS = 8, 8, 128, 16, 160, 16


def _one(client: Any, device: str, layout: str, profile: str) -> dict[str, Any]:
    paged = PagedLayout.resolve(
        "FLASH_ATTN", is_mla=False, layout=layout, num_heads=HEADS, block_size=BLOCK, head_dim=DIM
    )

    def views() -> list[torch.Tensor]:
        return allocate_views(
            layout,
            num_layers=LAYERS,
            num_blocks=BLOCKS,
            heads=HEADS,
            block_size=BLOCK,
            content=2 * DIM,
            dtype=torch.bfloat16,
            device=device,
        )

    src, dst = views(), views()
    gen = torch.Generator(device="cpu").manual_seed(0)
    for t in src:
        t.copy_(torch.randn(t.shape, generator=gen).to(torch.bfloat16))
    n_chunks = 4  # 4 chunks of 256 tokens
    src_ids = list(range(3, 3 + n_chunks * CHUNK_BLOCKS))
    dst_ids = list(range(BLOCKS - n_chunks * CHUNK_BLOCKS, BLOCKS))[::-1]
    keys = chunk_keys(list(range(n_chunks * BLOCK * CHUNK_BLOCKS)), f"gpu/{layout}/p", BLOCK * CHUNK_BLOCKS)
    ns = f"gpu/{layout}/{profile}"

    def side(cache: list[torch.Tensor]) -> WorkerSide:
        w = WorkerSide(
            client=client,
            namespace=ns,
            num_layers=LAYERS,
            block_size=BLOCK,
            chunk_blocks=CHUNK_BLOCKS,
            profile=profile,
            load_timeout_s=60,
            save_timeout_s=60,
        )
        w.register(PagedKV(paged, cache, BLOCKS))
        return w

    writer = side(src)
    t0 = time.perf_counter()
    for layer in range(LAYERS):
        writer.save_layer(layer, [SaveSpec("w", keys, src_ids, 0)])
    writer.finish_saves()
    save_s = time.perf_counter() - t0
    reader = side(dst)
    t0 = time.perf_counter()
    reader.start_load([LoadSpec("r", keys, dst_ids, 0)])
    for layer in range(LAYERS):
        reader.wait_layer(layer)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    bad = reader.take_invalid()
    ok = not bad
    for layer in range(LAYERS):
        a, b = src[layer][src_ids].cpu(), dst[layer][dst_ids].cpu()
        ok = ok and (torch.equal(a, b) if profile == "lossless" else a.shape == b.shape)
    kv_bytes = LAYERS * len(src_ids) * BLOCK * HEADS * 2 * DIM * 2
    return {
        "layout": layout,
        "profile": profile,
        "ok": bool(ok),
        "invalid_blocks": len(bad),
        "save_gbps": round(kv_bytes / save_s / 1e9, 3),
        "load_gbps": round(kv_bytes / load_s / 1e9, 3),
    }


def run(device: str = "cuda") -> dict[str, Any]:
    """Round trips on ``device``; ``ok`` is true when every lossless one was bit-exact."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        serving(store_config(Path(tmp))) as server,
        KVClient(server.target) as client,
    ):
        _one(client, device, "LBNHC", "balanced")  # warm-up: the codec's kernels compile on first use
        cases = [_one(client, device, layout, "lossless") for layout in ("LBNHC", "LBHNC")]
        cases.append(_one(client, device, "LBNHC", "balanced"))
    return {"device": device, "ok": all(c["ok"] for c in cases), "cases": cases}


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)  # a failed round trip says why
    default = "cuda" if torch.cuda.is_available() else "cpu"
    result = run(sys.argv[1] if len(sys.argv) > 1 else default)
    print(json.dumps(result, indent=1))
    print(
        f"vllm device round trip on {result['device']}: "
        + ("OK" if result["ok"] else "FAILED")
        + "; "
        + ", ".join(f"{c['layout']}/{c['profile']} load {c['load_gbps']} GB/s" for c in result["cases"])
    )
    sys.exit(0 if result["ok"] else 1)
