"""CPU plans: the model's thread on its CPUs, every other thread of the process on the rest.

Real threads and the real affinity calls (Linux); each test restores the
process's mask, so the rest of the suite runs unpinned.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from transfer.codec import parallel
from transfer.engines import cpu_plan as affinity
from transfer.engines.layerwise import LayerwiseCache


@pytest.fixture(autouse=True)
def _need_linux() -> None:
    if not affinity.supported():
        pytest.fail(
            "CPU plans need Linux (sched_setaffinity, /proc/self/task); CI and dev machines are Linux"
        )


@pytest.fixture
def two_cpus() -> Iterator[affinity.CpuPlan]:
    cpus = sorted(affinity.available_cpus())
    if len(cpus) < 2:
        pytest.fail("these tests need two CPUs (CI and dev machines have them)")
    before = os.sched_getaffinity(0)
    try:
        yield affinity.CpuPlan(frozenset({cpus[0]}), frozenset({cpus[1]}))
    finally:
        affinity.release()
        os.sched_setaffinity(0, before)


def _affinity_of(tid: int) -> set[int]:
    return os.sched_getaffinity(tid)


def test_parse_cpus() -> None:
    assert affinity.parse_cpus("0") == {0}
    assert affinity.parse_cpus("0-3, 8") == {0, 1, 2, 3, 8}
    for bad in ("", "a", "3-1", "-1", "1-x"):
        with pytest.raises(ValueError):
            affinity.parse_cpus(bad)


def test_plan_for_splits_what_the_process_may_use() -> None:
    assert affinity.plan_for("auto", available=[2, 5, 7]) == affinity.CpuPlan(
        frozenset({2}), frozenset({5, 7})
    )
    assert affinity.plan_for("5-7", available=[2, 5, 6, 7]).io == {2}
    with pytest.raises(ValueError, match="not available"):
        affinity.plan_for("9", available=[0, 1])
    with pytest.raises(ValueError, match="at least two"):
        affinity.plan_for("auto", available=[0])
    with pytest.raises(ValueError, match="compute and I/O"):
        affinity.plan_for("0-1", available=[0, 1])  # nothing left for I/O


def test_apply_pins_the_caller_and_moves_every_other_thread(two_cpus: affinity.CpuPlan) -> None:
    started = threading.Event()
    stop = threading.Event()
    tids: dict[str, int] = {}

    def existing() -> None:
        tids["existing"] = threading.get_native_id()
        started.set()
        stop.wait(10)

    t = threading.Thread(target=existing)
    t.start()
    started.wait(10)
    try:
        assert affinity.apply(two_cpus) >= 1
        assert affinity.active() == two_cpus
        assert _affinity_of(0) == two_cpus.compute
        assert _affinity_of(tids["existing"]) == two_cpus.io

        # a thread the model's thread starts inherits compute; enter_io moves it
        seen: dict[str, set[int]] = {}

        def later() -> None:
            seen["inherited"] = os.sched_getaffinity(0)
            affinity.enter_io()
            seen["entered"] = os.sched_getaffinity(0)

        child = threading.Thread(target=later)
        child.start()
        child.join(10)
        assert seen == {"inherited": set(two_cpus.compute), "entered": set(two_cpus.io)}
    finally:
        stop.set()
        t.join(10)
    affinity.release()
    assert affinity.active() is None and _affinity_of(0) == set(two_cpus.compute | two_cpus.io)


def test_the_layerwise_loader_and_codec_threads_run_on_the_io_cpus(
    two_cpus: affinity.CpuPlan, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    affinity.apply(two_cpus)
    where: list[set[int]] = []

    def decode(blobs: object) -> tuple[torch.Tensor, torch.Tensor]:
        where.append(os.sched_getaffinity(0))
        t = torch.zeros(1, 2, 4)
        return t, t.clone()

    cache = LayerwiseCache(((layer, [b"x"]) for layer in range(3)), 3, 2, decode=decode, prefetch_depth=3)
    assert cache.wait_loaded(10)
    assert where == [set(two_cpus.io)] * 3
    # the codec pool's initializer moves its threads too (run here in a fresh thread, as the pool would)
    got: list[set[int]] = []
    worker = threading.Thread(
        target=lambda: (parallel._one_torch_thread(), got.append(os.sched_getaffinity(0)))
    )
    worker.start()
    worker.join(10)
    assert got == [set(two_cpus.io)]
    assert _affinity_of(0) == two_cpus.compute  # the model's thread kept its CPU


def test_enter_io_without_a_plan_leaves_the_thread_alone() -> None:
    before = os.sched_getaffinity(0)
    affinity.enter_io()
    assert os.sched_getaffinity(0) == before


def test_worker_config_checks_its_cpu_list() -> None:
    from workers.prefill import WorkerConfig

    with pytest.raises(ValueError, match="CPU"):
        WorkerConfig(store_target="127.0.0.1:1", compute_cpus="0-x")
    assert WorkerConfig(store_target="127.0.0.1:1").apply_cpu_plan() is None
