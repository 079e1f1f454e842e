"""Settings and namespaces of the vLLM connector (no vLLM needed: transfer.vllm.settings is plain Python)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvstore.keys import Namespace, chunk_keys
from transfer.vllm.settings import ConnectorSettings, EngineShape, key_namespace, rank_namespace

SHAPE = EngineShape("LlamaForCausalLM", 30, 3, 64, "bfloat16", 128, "/models/smollm2")


def test_defaults_and_overrides():
    s = ConnectorSettings.from_extra({"target": "10.0.0.1:7000", "profile": "balanced", "tenant": "team-a"})
    assert (s.target, s.profile, s.tenant, s.load_mode) == (
        "10.0.0.1:7000",
        "balanced",
        "team-a",
        "layerwise",
    )
    # ~256-token chunks by default whatever the block size: 2 CPU blocks of 128, 16 GPU blocks of 16
    assert (s.chunk_blocks_for(128), s.chunk_blocks_for(16), s.chunk_blocks_for(512)) == (2, 16, 1)
    assert ConnectorSettings.from_extra({"chunk_blocks": 4}).chunk_blocks_for(16) == 4
    assert ConnectorSettings.from_extra(None).profile == "lossless"


def test_profile_names_are_the_codecs():
    from transfer.codec import PROFILES
    from transfer.vllm.settings import PROFILE_NAMES

    assert sorted(PROFILES) == list(PROFILE_NAMES)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"profil": "lossless"}, "unknown key"),
        ({"profile": "lossy"}, "choose one of"),
        ({"chunk_blocks": 0}, "chunk_blocks"),
        ({"load_timeout_s": 0}, "load_timeout_s"),
        ({"target": "nohost"}, "host:port"),
        ({"tenant": "a/b"}, r"kv_connector_extra_config\.tenant='a/b'"),
        ({"target": "http://kvstore:50051"}, r"target=.*no URL scheme"),
        ({"target": "grpc://kvstore:50051"}, r"target=.*no URL scheme"),
        ({"load_mode": "background"}, r"load_mode=.*layerwise"),
        ({"require_store": "yes"}, r"require_store=.*true or false"),
        ({"token": 5}, r"token=5"),
        ({"weights_fingerprint": ""}, r"weights_fingerprint=''"),
        ({"model_tag": "a b"}, r"model_tag='a b'"),
        ({"replication": True}, r"replication=True"),
        ({"save_timeout_s": "10"}, r"save_timeout_s='10'"),
    ],
)
def test_bad_settings_name_what_to_fix(extra, message):
    with pytest.raises(ValueError, match=message):
        ConnectorSettings.from_extra(extra)


def test_incompatible_engines_never_share_a_namespace():
    s = ConnectorSettings.from_extra({})
    base = str(rank_namespace(s, SHAPE))
    variants = [
        rank_namespace(s, replace(SHAPE, kv_dtype="float16")),
        rank_namespace(s, replace(SHAPE, block_size=64)),
        rank_namespace(s, replace(SHAPE, tp_size=2)),
        rank_namespace(s, replace(SHAPE, tp_size=2, tp_rank=1)),
        rank_namespace(s, replace(SHAPE, model_name="/models/other")),
        rank_namespace(s, replace(SHAPE, num_kv_heads=4)),
        rank_namespace(replace(s, profile="int8"), SHAPE),
        rank_namespace(replace(s, tenant="other"), SHAPE),
        rank_namespace(replace(s, chunk_blocks=4), SHAPE),
        rank_namespace(s, replace(SHAPE, weights="other-weights")),
        rank_namespace(replace(s, model_tag="tag"), replace(SHAPE, weights="other-weights")),
        rank_namespace(s, replace(SHAPE, mla=True, num_kv_heads=1)),
    ]
    names = [str(v) for v in variants]
    assert base not in names and len(set(names)) == len(names)
    for name in [base, *names]:
        Namespace.parse(name)  # each is a valid store namespace


def test_ranks_share_keys_but_not_blobs():
    s = ConnectorSettings.from_extra({})
    shape = replace(SHAPE, tp_size=2)
    tokens = list(range(600))
    keys0 = chunk_keys(tokens, key_namespace(s, replace(shape, tp_rank=0)), 256)
    keys1 = chunk_keys(tokens, key_namespace(s, replace(shape, tp_rank=1)), 256)
    assert keys0 == keys1 and len(keys0) == 2  # the scheduler computes one key list for every rank
    assert rank_namespace(s, shape, 0) != rank_namespace(s, shape, 1)


@pytest.mark.parametrize("target", ["a:1,a:1", "dns:///", "a:1,", 7])
def test_bad_cluster_targets_are_refused_at_engine_start(target):
    with pytest.raises(ValueError, match="kv_connector_extra_config.target"):
        ConnectorSettings.from_extra({"target": target})


def test_store_client_is_a_cluster_client_for_a_member_list(tmp_path):
    # Real servers: a member list gives the replicated client with the connector's quick-retry policy.
    from kvstore.server import serve
    from tests.fixtures.store import store_config
    from transfer.replicas.client import ClusterKVClient
    from transfer.rpc.client import KVClient
    from transfer.vllm.settings import open_store

    servers = [serve(store_config(tmp_path / str(i))) for i in range(2)]
    try:
        single = open_store(ConnectorSettings.from_extra({"target": servers[0].target}))
        with single:
            assert isinstance(single, KVClient) and single.core.retry.max_attempts == 2
        listed = ",".join(s.target for s in servers)
        with open_store(ConnectorSettings.from_extra({"target": listed})) as cluster:
            assert isinstance(cluster, ClusterKVClient) and cluster.cluster.replication == 2
    finally:
        for s in servers:
            s.stop(grace=0)
