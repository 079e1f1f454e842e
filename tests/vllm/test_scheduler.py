"""Scheduler side of the connector, in vLLM's own style: a real ``Scheduler`` built from a CPU
engine config with the connector in ``kv_transfer_config``, real ``Request`` objects, and a real
kvstore server holding (or not holding) the prompt's chunks. No model runs."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.config import KVTransferConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from kvstore.keys import chunk_keys
from transfer.codec import encode_layer
from transfer.rpc.client import KVClient
from transfer.vllm.connector import TOTALS, KVStoreConnector, KVStoreConnectorMetadata
from transfer.vllm.fingerprint import weights_fingerprint
from transfer.vllm.settings import ConnectorSettings, EngineShape, key_namespace, rank_namespace
from workers.vllm_checkpoint import vllm_checkpoint

BLOCK, LAYERS, HEADS, DIM = 128, 30, 3, 64
CHUNK = 2 * BLOCK


def make_scheduler(
    target: str, *, max_batched: int = 2048, profile: str = "lossless", layout: str | None = None, **extra
) -> Scheduler:
    args = EngineArgs(
        model=str(vllm_checkpoint()),
        dtype="bfloat16",
        max_model_len=2048,
        block_size=BLOCK,
        enable_prefix_caching=False,
        max_num_batched_tokens=max_batched,
        enforce_eager=True,
        kv_transfer_config=KVTransferConfig(
            kv_connector="KVStoreConnector",
            kv_connector_module_path="transfer.vllm.connector",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={"target": target, "profile": profile, **extra},
        ),
    )
    config = args.create_engine_config()
    if layout is not None:
        config.cache_config.kv_cache_layout = layout
    config.cache_config.num_gpu_blocks = 64
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM, dtype=torch.bfloat16)
    kv_cache_config = KVCacheConfig(
        num_blocks=64,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec([f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)], spec)],
    )
    return Scheduler(config, kv_cache_config, StructuredOutputManager(config), block_size=BLOCK)


def namespaces(scheduler: Scheduler) -> tuple[str, str]:
    """The documented namespaces, derived independently of the connector instance."""
    settings = ConnectorSettings.from_extra({"target": "x:1"})
    model = scheduler.vllm_config.model_config.model
    shape = EngineShape(
        "LlamaForCausalLM", LAYERS, HEADS, DIM, "bfloat16", BLOCK, model, weights=weights_fingerprint(model)
    )
    return str(key_namespace(settings, shape)), str(rank_namespace(settings, shape))


def store_chunks(target: str, scheduler: Scheduler, prompt: list[int], n: int) -> list[bytes]:
    key_ns, ns = namespaces(scheduler)
    keys = chunk_keys(prompt, key_ns, CHUNK)[:n]
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(2, HEADS, CHUNK, DIM, generator=gen).to(torch.bfloat16)
    with KVClient(target) as client:
        client.put(
            ns,
            [
                (key, layer, LAYERS, encode_layer(kv[0], kv[1], "lossless"))
                for key in keys
                for layer in range(LAYERS)
            ],
        )
    return keys


def request(req_id: str, prompt: list[int]) -> Request:
    return Request(req_id, prompt, SamplingParams(max_tokens=4), None)


@pytest.fixture
def store(kvstore_server):
    return f"127.0.0.1:{kvstore_server.port}"


def test_stored_prefix_is_one_lookup_and_a_load_of_its_blocks(store):
    sched = make_scheduler(store)
    assert isinstance(sched.connector, KVStoreConnector)
    prompt = list(range(1000, 1600))
    keys = store_chunks(store, sched, prompt, 2)
    lookups = TOTALS.snapshot()["lookups"]
    sched.add_request(request("r0", prompt))
    out = sched.schedule()
    assert TOTALS.snapshot()["lookups"] == lookups + 1
    assert out.num_scheduled_tokens == {"r0": 600 - 2 * CHUNK}  # only the suffix is computed
    meta = out.kv_connector_metadata
    assert isinstance(meta, KVStoreConnectorMetadata)
    (load,) = meta.loads
    assert load.keys == keys and load.first_block == 0
    assert load.block_ids == list(out.scheduled_new_reqs[0].block_ids[0][:4])  # two chunks = four blocks
    assert meta.saves == []  # both full chunks are in the store already


def test_partial_hit_loads_stored_chunks_and_saves_the_rest(store):
    sched = make_scheduler(store)
    prompt = list(range(2000, 2000 + 3 * CHUNK + 10))
    keys = store_chunks(store, sched, prompt, 1)
    sched.add_request(request("r1", prompt))
    out = sched.schedule()
    meta = out.kv_connector_metadata
    (load,) = meta.loads
    assert load.keys == keys and len(load.block_ids) == 2
    (save,) = meta.saves
    key_ns, _ = namespaces(sched)
    assert save.first_chunk == 1 and save.keys == chunk_keys(prompt, key_ns, CHUNK)[1:3]
    assert save.block_ids == list(out.scheduled_new_reqs[0].block_ids[0][2:6])


def test_whole_prompt_stored_still_leaves_a_token_to_compute(store):
    sched = make_scheduler(store)
    prompt = list(range(3000, 3000 + 2 * CHUNK))
    store_chunks(store, sched, prompt, 2)
    sched.add_request(request("r2", prompt))
    out = sched.schedule()
    (load,) = out.kv_connector_metadata.loads
    assert len(load.keys) == 1  # vLLM must compute at least the last prompt token itself
    assert out.num_scheduled_tokens == {"r2": CHUNK}


def step(sched: Scheduler, out, sampled: list[int], invalid: set[int] | None = None) -> None:
    """What the model runner would report for a one-request step (``sampled``: [] while prefilling)."""
    (req_id,) = out.num_scheduled_tokens
    sched.update_from_output(
        out,
        ModelRunnerOutput(
            req_ids=[req_id],
            req_id_to_index={req_id: 0},
            sampled_token_ids=[sampled],
            kv_connector_output=KVConnectorOutput(invalid_block_ids=invalid or set()),
        ),
    )


def test_chunked_prefill_saves_each_chunk_once_it_is_computed(store):
    sched = make_scheduler(store, max_batched=CHUNK)
    prompt = list(range(4000, 4000 + 2 * CHUNK + 50))
    key_ns, _ = namespaces(sched)
    keys = chunk_keys(prompt, key_ns, CHUNK)
    sched.add_request(request("r3", prompt))
    saved: list[bytes] = []
    for _ in range(4):  # 256 + 256 + 50 prompt tokens, then one decode step
        out = sched.schedule()
        saved += [k for spec in out.kv_connector_metadata.saves for k in spec.keys]
        done = sched.requests["r3"].num_computed_tokens + out.num_scheduled_tokens["r3"] >= len(prompt)
        step(sched, out, [7] if done else [])
    assert saved == keys  # chunk 0 after the first step, chunk 1 after the second, each once


def test_failed_load_is_recomputed_under_the_recompute_policy(store):
    sched = make_scheduler(store)
    prompt = list(range(6000, 6600))
    store_chunks(store, sched, prompt, 2)
    sched.add_request(request("r5", prompt))
    out = sched.schedule()
    (load,) = out.kv_connector_metadata.loads
    # the worker reports the loaded blocks failed (as get_block_ids_with_load_errors does)
    step(sched, out, [7], invalid=set(load.block_ids))
    assert sched.requests["r5"].num_computed_tokens == 0  # nothing was kept from the failed load
    again = sched.schedule()
    assert again.num_scheduled_tokens == {"r5": 600}  # the whole prompt is computed now
    assert again.kv_connector_metadata.loads == []


def test_store_down_is_a_miss_not_an_error():
    sched = make_scheduler("127.0.0.1:1")  # nothing listens on port 1
    errors = TOTALS.snapshot()["lookup_errors"]
    sched.add_request(request("r4", list(range(5000, 5600))))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"r4": 600}
    assert out.kv_connector_metadata.loads == []
    assert TOTALS.snapshot()["lookup_errors"] == errors + 1


def test_a_layout_the_workers_cannot_split_offers_no_hits(store, caplog):
    # vLLM's CPU backend reads head-major blocks only; an engine resolved to LBNHC cannot be split honestly
    with caplog.at_level("ERROR", logger="transfer.vllm.connector"):
        sched = make_scheduler(store, layout="LBNHC")
    (record,) = [r for r in caplog.records if "offers no hits" in r.getMessage()]
    assert "CPU_ATTN" in record.getMessage() and "LBNHC" in record.getMessage()
    prompt = list(range(7000, 7600))
    store_chunks(store, make_scheduler(store), prompt, 2)  # the chunks are there
    sched.add_request(request("r6", prompt))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"r6": 600}  # computed, not loaded
    assert out.kv_connector_metadata.loads == [] and out.kv_connector_metadata.saves == []


def test_an_unreachable_store_is_one_line_at_start_or_a_refusal(caplog):
    with caplog.at_level("WARNING", logger="transfer.vllm.connector"):
        sched = make_scheduler("127.0.0.1:1")
        for i in range(3):
            sched.add_request(request(f"u{i}", list(range(100 * i, 100 * i + 600))))
        sched.schedule()
    start = [r for r in caplog.records if "does not answer" in r.getMessage()]
    per_request = [r for r in caplog.records if "lookup failed" in r.getMessage()]
    assert len(start) == 1 and "127.0.0.1:1" in start[0].getMessage()
    assert len(per_request) == 1  # one line per outage, not one per request
    with pytest.raises(RuntimeError, match="require_store is true"):
        make_scheduler("127.0.0.1:1", require_store=True)
