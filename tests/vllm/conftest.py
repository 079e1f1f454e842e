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
