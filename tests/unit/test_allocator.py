"""The malloc settings are the same wherever they are applied."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from kvstore.allocator import ALLOCATOR_ENV, tune_allocator
from workers.pipeline import ray_init_kwargs

ROOT = Path(__file__).resolve().parents[2]


def test_worker_image_sets_the_same_malloc_variables() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    worker = dockerfile.split("FROM base AS worker", 1)[1].split("FROM ", 1)[0]
    found = dict(re.findall(r"(MALLOC_\w+_)=(\d+)", worker))
    assert found == ALLOCATOR_ENV


def test_ray_workers_get_the_malloc_variables() -> None:
    env = ray_init_kwargs()["runtime_env"]["env_vars"]
    assert {k: env[k] for k in ALLOCATOR_ENV} == ALLOCATOR_ENV


def test_tune_allocator_applies_on_linux() -> None:
    assert tune_allocator() is sys.platform.startswith("linux")
