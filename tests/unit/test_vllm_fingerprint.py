"""No KV across a weight change: the connector's namespace carries a digest of the weights' content."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kvstore.keys import chunk_keys
from transfer.codec import encode_layer
from transfer.rpc.client import KVClient
from transfer.vllm.fingerprint import FingerprintError, weights_fingerprint
from transfer.vllm.settings import ConnectorSettings, EngineShape, key_namespace, rank_namespace


@pytest.fixture
def checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the bundled model's GGUF as a one-file checkpoint directory."""
    from workers.model import bundled_gguf

    monkeypatch.setenv("KVSTORE_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    src = bundled_gguf()
    shutil.copyfile(src, ckpt / Path(src).name)
    (ckpt / "config.json").write_text("{}")
    return ckpt


def _flip_one_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))


def test_changing_one_weight_changes_the_fingerprint_and_misses(checkpoint: Path, kvstore_server):
    before = weights_fingerprint(str(checkpoint))
    assert weights_fingerprint(str(checkpoint)) == before  # stable (and now served from the cache file)
    assert (checkpoint.parent / "cache" / "fingerprints.json").exists()
    settings = ConnectorSettings.from_extra({})
    shape = EngineShape("LlamaForCausalLM", 2, 3, 64, "bfloat16", 128, str(checkpoint), weights=before)
    tokens = list(range(300))
    keys = chunk_keys(tokens, key_namespace(settings, shape), 256)
    kv = torch.randn(2, 3, 256, 64).bfloat16()
    ns = str(rank_namespace(settings, shape))
    with KVClient(kvstore_server.target) as client:
        client.put(ns, [(keys[0], layer, 2, encode_layer(kv[0], kv[1], "lossless")) for layer in range(2)])
        assert client.lookup(ns, keys, 2) == 1
        (gguf,) = checkpoint.glob("*.gguf")
        _flip_one_byte(gguf, gguf.stat().st_size // 2)  # one weight, deep inside the file
        after = weights_fingerprint(str(checkpoint))
        assert after != before
        changed = replace(shape, weights=after)
        keys2 = chunk_keys(tokens, key_namespace(settings, changed), 256)
        assert keys2 != keys and str(rank_namespace(settings, changed)) != ns
        assert client.lookup(str(rank_namespace(settings, changed)), keys2, 2) == 0  # no hit


def test_a_model_that_cannot_be_found_says_what_to_set(tmp_path: Path):
    with pytest.raises(FingerprintError, match="weights_fingerprint"):
        weights_fingerprint(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FingerprintError, match="no weight files"):
        weights_fingerprint(str(tmp_path / "empty"))
