"""Asynchronous loads (``load_mode: async``) on a real vLLM engine (CPU build) and a real store.

The store is reached through a loopback proxy (kvstore.testing.proxy) that can slow its replies,
so a 2,048-token load takes seconds: long enough to see what the engine does meanwhile.
A second engine without the connector, with vLLM's own prefix cache, is the reference for
what "lossless" promises: the same tokens as vLLM's own prefix-cache hit.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from kvstore.keys import chunk_keys
from kvstore.testing.proxy import DelayProxy
from tests.fixtures.store import start_server_process
from tests.vllm.conftest import corrupt_stored_layer
from transfer.rpc.client import KVClient
from transfer.vllm.fingerprint import weights_fingerprint
from transfer.vllm.harness import EngineProcess, connector_config
from transfer.vllm.settings import ConnectorSettings, EngineShape, key_namespace, rank_namespace

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
NUM_LAYERS, KV_HEADS, HEAD_DIM, BLOCK, CHUNK = 30, 3, 64, 128, 256
PREFIX = 2048


@pytest.fixture(scope="module")
def prompts(model_dir: str) -> dict[str, list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = REPO / "bench" / "data"

    def long(*names: str) -> list[int]:
        ids: list[int] = []
        for name in names:
            ids += tok((data / name).read_text())["input_ids"]
        assert len(ids) >= PREFIX
        return ids[:PREFIX]

    q = tok(" Summarise the text above in one sentence:")["input_ids"]
    assert len(q) < BLOCK  # vLLM's prefix cache and the store then cache the same 2,048 tokens
    return {
        "identical": long("prose_license_gpl_3.txt", "prose_license_gpl_2.txt") + q,
        "stall": long("code_difflib.txt", "code_json_decoder.txt", "code_statistics.txt") + q,
        "corrupt": long("prose_pydoc_types.txt", "prose_pydoc_compound.txt") + q,
        "running": tok((data / "prose_pydoc_debugger.txt").read_text())["input_ids"][:200],
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    proc = start_server_process(["--no-disk", "--memory-bytes", "1GiB"], workdir=tmp_path_factory.mktemp("s"))
    host, port = proc.target.rsplit(":", 1)
    with DelayProxy(host, int(port)) as proxy:
        yield proc, proxy
    proc.kill()


@pytest.fixture(scope="module")
def engine(model_dir: str, store, tmp_path_factory: pytest.TempPathFactory):
    _, proxy = store
    log = tmp_path_factory.mktemp("async") / "engine.log"
    target = f"127.0.0.1:{proxy.port}"
    with EngineProcess(model_dir, kv=connector_config(target, load_mode="async"), log_path=str(log)) as e:
        yield e


def test_async_hit_is_vllms_own_prefix_cache_output(engine, prompts, model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("prefix") / "engine.log"
    with EngineProcess(model_dir, prefix_caching=True, log_path=str(log)) as own:
        first, again = own.generate([prompts["identical"]] * 2, max_tokens=24)
    assert again.num_cached_tokens == PREFIX  # vLLM's own in-memory prefix hit
    before = engine.stats()
    (computed,) = engine.generate([prompts["identical"]], max_tokens=24)  # computes and saves
    mid = engine.stats()
    (loaded,) = engine.generate([prompts["identical"]], max_tokens=24)  # an async load from the store
    after = engine.stats()
    assert mid["offered_tokens"] == before["offered_tokens"]
    assert mid["saved_tokens"] - before["saved_tokens"] == PREFIX
    assert after["async_loads"] - mid["async_loads"] == 1
    assert after["offered_tokens"] - mid["offered_tokens"] == PREFIX
    assert after["loaded_tokens"] - mid["loaded_tokens"] == PREFIX
    assert after["load_errors"] == mid["load_errors"]
    assert loaded.num_cached_tokens == PREFIX
    assert computed.token_ids == first.token_ids  # no cache at all, in both engines
    # lossless: the store hit gives exactly what vLLM's own prefix-cache hit gives
    assert loaded.token_ids == again.token_ids


def test_a_long_load_does_not_stall_a_running_request(engine, store, prompts):
    _, proxy = store
    engine.generate([prompts["stall"]], max_tokens=1)  # computes and saves the prefix
    proxy.slow(
        0.002, 1e-9
    )  # every reply chunk held 2 ms: the store's bytes trickle in, the load takes seconds
    try:
        run = engine.interleave(prompts["running"], 64, prompts["stall"], after_steps=3)
    finally:
        proxy.fast()
    assert run["arriving_cached"] == PREFIX  # the arriving request did load its prefix
    before = [dt for phase, dt in run["steps"] if phase == "before"]
    loading = [dt for phase, dt in run["steps"] if phase == "loading"]
    # the running request kept decoding, step after step, while the load was in flight
    assert len(loading) >= 5, run["steps"]
    assert sum(loading) > 1.0, "the slowed load should span more than a second of steps"
    assert statistics.median(loading) < 3 * statistics.median(before), run["steps"]
    assert len(run["running_tokens"]) == 64


def test_a_failed_async_load_is_recomputed_and_not_a_hit(engine, store, prompts, model_dir):
    proc, _ = store
    (reference,) = engine.generate([prompts["corrupt"]], max_tokens=16)  # computes and saves
    settings = ConnectorSettings.from_extra({"target": proc.target, "load_mode": "async"})
    shape = EngineShape(
        "LlamaForCausalLM",
        NUM_LAYERS,
        KV_HEADS,
        HEAD_DIM,
        "bfloat16",
        BLOCK,
        model_dir,
        weights=weights_fingerprint(model_dir),
    )
    ns = str(rank_namespace(settings, shape))
    keys = chunk_keys(prompts["corrupt"], key_namespace(settings, shape), CHUNK)[: PREFIX // CHUNK]
    with KVClient(proc.target) as client:
        assert client.lookup(ns, keys, NUM_LAYERS) == len(keys)
    corrupt_stored_layer(proc.target, ns, keys[3], 5, NUM_LAYERS)
    before = engine.stats()
    (comp,) = engine.generate([prompts["corrupt"]], max_tokens=16)
    after = engine.stats()
    assert after["offered_tokens"] - before["offered_tokens"] == PREFIX  # the lookup promised it
    assert after["load_errors"] - before["load_errors"] == 1
    assert after["untrue_hits"] - before["untrue_hits"] == 1  # ... and the promise was taken back
    assert after["loaded_tokens"] == before["loaded_tokens"]
    assert comp.num_cached_tokens == 0  # vLLM's own figure: nothing came from a cache
    assert comp.token_ids == reference.token_ids  # recomputed, correctly
