"""A real vLLM engine (CPU build) with the kvstore connector and a real kvstore server.

Engines are expensive on CPU (~15-30 s to start), so the module keeps three:
``writer`` and ``reader`` (lossless, two separate engines sharing one store) and
``balanced`` (one engine whose own saved prefix comes back quantized). vLLM's own
prefix caching is off everywhere, so the store is the only way a prefix can be reused.
Tests run in file order; the last one kills the store.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvstore.keys import chunk_keys
from tests.fixtures.store import start_server_process
from tests.vllm.conftest import corrupt_stored_layer
from transfer.rpc.client import KVClient
from transfer.vllm.fingerprint import weights_fingerprint
from transfer.vllm.harness import EngineProcess, connector_config
from transfer.vllm.settings import ConnectorSettings, EngineShape, key_namespace, rank_namespace

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
NUM_LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 30, 3, 64, 128
CHUNK = 2 * BLOCK  # default chunk_blocks=2
PREFIX = 2 * CHUNK  # 512 tokens: two stored chunks per prompt


@pytest.fixture(scope="module")
def prompts(model_dir: str) -> dict[str, list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)

    def ids(name: str) -> list[int]:
        return tok((REPO / "bench" / "data" / name).read_text())["input_ids"]

    a, b, c = ids("prose_license_apache_2_0.txt"), ids("prose_license_mpl_2_0.txt"), ids("code_argparse.txt")
    q1 = tok(" Summarise the section above in one sentence:")["input_ids"]
    q2 = tok(" Which obligations does it put on a distributor?")["input_ids"]
    return {
        "shared1": a[: PREFIX + 40] + q1,
        "shared2": a[: PREFIX + 40] + q2,
        "corrupt": b[: PREFIX + 30] + q1,
        "balanced1": c[: PREFIX + 30] + q1,
        "balanced2": b[: PREFIX + 30] + q2,
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("vllm-store")
    proc = start_server_process(["--no-disk", "--memory-bytes", "1GiB"], workdir=tmp)
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def writer(model_dir: str, store, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("writer") / "engine.log"
    with EngineProcess(model_dir, kv=connector_config(store.target), log_path=str(log)) as eng:
        yield eng


@pytest.fixture(scope="module")
def reader(model_dir: str, store, writer, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("reader") / "engine.log"
    with EngineProcess(model_dir, kv=connector_config(store.target), log_path=str(log)) as eng:
        yield eng


@pytest.fixture(scope="module")
def reference(writer, prompts) -> dict[str, list[int]]:
    """Greedy tokens computed by the writer with no stored prefix (its first sight of each prefix)."""
    out = {}
    for name in ("shared1", "corrupt"):
        before = writer.stats()
        (comp,) = writer.generate([prompts[name]], max_tokens=16)
        after = writer.stats()
        assert after["offered_tokens"] == before["offered_tokens"], (
            f"{name}: the writer must compute, not load"
        )
        assert after["saved_tokens"] - before["saved_tokens"] == PREFIX, f"{name}: both chunks saved"
        out[name] = comp.token_ids
    return out


def _namespaces(model_dir: str, profile: str) -> tuple[str, str]:
    settings = ConnectorSettings.from_extra({"target": "127.0.0.1:1", "profile": profile})
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
    return str(key_namespace(settings, shape)), str(rank_namespace(settings, shape))


def test_second_engine_loads_first_engines_prefix_layer_by_layer(reader, reference, prompts):
    before = reader.stats()
    (comp,) = reader.generate([prompts["shared1"]], max_tokens=16)
    after = reader.stats()
    assert (
        after["offered_tokens"] - before["offered_tokens"] == PREFIX
    )  # the writer's prefix, as external hits
    assert comp.num_cached_tokens == PREFIX  # what vLLM itself reports for the request
    assert after["loaded_tokens"] - before["loaded_tokens"] == PREFIX
    assert after["load_errors"] == before["load_errors"]
    # layer by layer: the forward pass waited on each of the 30 layers of this load, one wait each
    assert after["layer_waits"] - before["layer_waits"] == NUM_LAYERS
    assert sorted(int(k) for k in after["last_layer_waits"]) == list(range(NUM_LAYERS))
    # lossless: greedy tokens identical with the hit and without it
    assert comp.token_ids == reference["shared1"]
    # a second prompt with the same prefix and another question hits the same chunks
    (comp2,) = reader.generate([prompts["shared2"]], max_tokens=4)
    assert comp2.num_cached_tokens == PREFIX
    # vLLM's connector stats reached its Prometheus metrics
    metrics = reader.metrics("vllm:kvstore")
    assert metrics.get("vllm:kvstore_loaded_tokens", 0) >= 2 * PREFIX, metrics
    assert metrics.get("vllm:kvstore_loaded_bytes", 0) > 0


def test_corrupt_stored_block_is_recomputed_and_counted(reader, reference, prompts, store, model_dir):
    key_ns, ns = _namespaces(model_dir, "lossless")
    keys = chunk_keys(prompts["corrupt"], key_ns, CHUNK)[:2]
    with KVClient(store.target) as client:
        assert client.lookup(ns, keys, NUM_LAYERS) == 2, "the writer stored both chunks under this namespace"
    corrupt_stored_layer(store.target, ns, keys[1], 7, NUM_LAYERS)  # chunk 1, layer 7
    with KVClient(store.target) as client:
        assert client.lookup(ns, keys, NUM_LAYERS) == 2
    before = reader.stats()
    (comp,) = reader.generate([prompts["corrupt"]], max_tokens=16)
    after = reader.stats()
    assert after["offered_tokens"] - before["offered_tokens"] == PREFIX  # the lookup saw both chunks
    assert after["load_errors"] - before["load_errors"] == 1  # the failure is counted
    assert after["untrue_hits"] - before["untrue_hits"] == 1  # and the promised hit taken back
    assert after["loaded_tokens"] == before["loaded_tokens"]
    assert comp.num_cached_tokens == 0  # vLLM's own figure: the prompt was computed, not cached
    assert comp.token_ids == reference["corrupt"]  # and the request completed correctly by recompute
    assert after["corrupt_deleted"] - before["corrupt_deleted"] == 1
    # the corrupt chunk was dropped: the next request loads chunk 0 only and saves chunk 1 again
    (comp2,) = reader.generate([prompts["corrupt"]], max_tokens=16)
    final = reader.stats()
    assert final["offered_tokens"] - after["offered_tokens"] == CHUNK
    assert final["load_errors"] == after["load_errors"]
    assert final["saved_tokens"] - after["saved_tokens"] == CHUNK
    assert comp2.token_ids == reference["corrupt"]


def test_balanced_profile_first_token_and_size(model_dir, store, prompts, tmp_path_factory):
    log = tmp_path_factory.mktemp("balanced") / "engine.log"
    with EngineProcess(
        model_dir, kv=connector_config(store.target, profile="balanced"), log_path=str(log)
    ) as eng:
        names = ["balanced1", "balanced2"]
        computed = eng.generate([prompts[n] for n in names], max_tokens=1)  # computes and saves
        saved = eng.stats()
        loaded = eng.generate([prompts[n] for n in names], max_tokens=1)  # same prompts: from the store
        after = eng.stats()
    assert saved["offered_tokens"] == 0
    assert after["offered_tokens"] == len(names) * PREFIX
    assert after["load_errors"] == 0
    for a, b in zip(computed, loaded, strict=True):
        assert b.num_cached_tokens == PREFIX
        assert a.token_ids[0] == b.token_ids[0]
    fp16_bytes = (
        saved["saved_tokens"] * NUM_LAYERS * 2 * KV_HEADS * HEAD_DIM * torch.finfo(torch.float16).bits // 8
    )
    assert saved["saved_tokens"] == len(names) * PREFIX
    assert fp16_bytes / saved["saved_bytes"] >= 4.0, (fp16_bytes, saved["saved_bytes"])


def test_store_down_requests_complete_by_recompute(reader, reference, prompts, store):
    store.kill()
    before = reader.stats()
    (comp,) = reader.generate([prompts["shared1"]], max_tokens=16)
    after = reader.stats()
    assert comp.token_ids == reference["shared1"]
    assert comp.num_cached_tokens == 0
    assert after["lookup_errors"] - before["lookup_errors"] == 1
    assert after["offered_tokens"] == before["offered_tokens"]
    assert after["save_errors"] - before["save_errors"] == 1  # the save was tried, failed, and was counted
    # the engine keeps serving
    (again,) = reader.generate([prompts["shared2"]], max_tokens=4)
    assert len(again.token_ids) == 4
