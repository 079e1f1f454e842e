"""The malloc settings (kvstore.malloc_tuning) are the same wherever they are applied."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import kvstore.allocator
import kvstore.malloc_tuning
from kvstore.malloc_tuning import ALLOCATOR_ENV, tune_allocator
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


def test_the_old_module_name_reexports_every_setting() -> None:
    # workers/ and bench/ import it as kvstore.allocator.
    own = {
        name
        for name, value in vars(kvstore.malloc_tuning).items()
        if not name.startswith("_")
        and (name.isupper() or getattr(value, "__module__", None) == "kvstore.malloc_tuning")
    }
    assert set(kvstore.allocator.__all__) == own
    for name in own:
        assert getattr(kvstore.allocator, name) is getattr(kvstore.malloc_tuning, name)
