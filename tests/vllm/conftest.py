"""vLLM connector tests: run with the vLLM environment's interpreter (``make test`` does:
``.venv-vllm/bin/python -m pytest -q tests/vllm``). The main environment cannot hold vLLM
(see scripts/bootstrap-vllm.sh), so there these modules are not collected at all; nothing
is skipped."""

from __future__ import annotations

import importlib.util
import os

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]

# Offline, small KV cache: set before vLLM is imported anywhere in this process.
for _name, _value in (
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("VLLM_CPU_KVCACHE_SPACE", "1"),
    ("VLLM_NO_USAGE_STATS", "1"),
    ("DO_NOT_TRACK", "1"),
):
    os.environ.setdefault(_name, _value)


def corrupt_stored_layer(target: str, namespace: str, key: bytes, layer: int, num_layers: int) -> None:
    """Replace one stored (chunk, layer) by a frame whose header no decoder accepts, under a valid
    store trailer: the store serves it, the connector's decode must refuse it."""
    from kvstore import integrity
    from transfer.rpc.client import KVClient

    with KVClient(target) as client:
        blobs = [bytes(blob) for _, (blob,) in client.get_layers(namespace, [key], 0, num_layers)]
        payload = bytearray(integrity.payload_of(blobs[layer]))
        payload[0] ^= 0xFF
        blobs[layer] = integrity.seal(bytes(payload))
        client.delete(namespace, [key])
        client.put(namespace, [(key, i, num_layers, blob) for i, blob in enumerate(blobs)])


if importlib.util.find_spec("vllm") is not None:
    import pytest

    @pytest.fixture(scope="session")
    def model_dir() -> str:
        """The bundled model as a local checkpoint vLLM loads offline."""
        from workers.vllm_checkpoint import vllm_checkpoint

        return str(vllm_checkpoint())
