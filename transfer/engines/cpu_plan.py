"""Keep the model's thread on cores of its own and the KV cache I/O on the others.

Layer-wise streaming runs the store's I/O (gRPC's threads, the loader that
decodes layers, codec threads) next to the forward pass. When the scheduler
puts an I/O thread on the core the model's thread is running on, the model
waits in the run queue: measured on two cores, 90-120 ms per ~190 ms forward
pass next to a thread that fetches nonstop (``/proc/<tid>/schedstat``), and
``bench/layerwise.py`` on a lossless prefix went from 254 ms unpinned to
226-234 ms with the model alone on core 0. Serving engines pin their model
threads for the same reason; on a GPU host the thread that launches kernels is
that thread.

A :class:`CpuPlan` names the compute CPUs and the I/O CPUs. :func:`apply`
pins the calling thread (the one that runs the model) to the compute CPUs and
every other thread of the process to the I/O CPUs. Threads started later
inherit the affinity of the thread that starts them, so gRPC's and the codec
pool's threads stay on the I/O side; threads the *model's* thread starts
(the layer-wise loader) call :func:`enter_io` first. Linux only: elsewhere
:func:`apply` raises, and :func:`enter_io` does nothing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass

_lock = threading.Lock()
_active: CpuPlan | None = None


@dataclass(frozen=True)
class CpuPlan:
    """Which CPUs run the model's thread and which run everything else (disjoint, both non-empty)."""

    compute: frozenset[int]
    io: frozenset[int]

    def __post_init__(self) -> None:
        if not self.compute or not self.io:
            raise ValueError(
                f"a CPU plan needs compute and I/O CPUs; got compute {sorted(self.compute)}, "
                f"I/O {sorted(self.io)}"
            )
        if self.compute & self.io:
            raise ValueError(f"compute and I/O CPUs overlap: {sorted(self.compute & self.io)}")


def supported() -> bool:
    return hasattr(os, "sched_setaffinity") and os.path.isdir("/proc/self/task")


def available_cpus() -> frozenset[int]:
    """The CPUs this process may run on (its affinity mask, not the machine's core count)."""
    if not hasattr(os, "sched_getaffinity"):
        return frozenset(range(os.cpu_count() or 1))
    return frozenset(os.sched_getaffinity(0))


def parse_cpus(text: str) -> frozenset[int]:
    """``"0"``, ``"0-3,8"`` -> a set of CPU numbers (the list format of ``taskset -c`` and cgroups)."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"bad CPU list {text!r}: use numbers and ranges like '0' or '0-3,8'") from None
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r} in {text!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError(f"empty CPU list {text!r}")
    return frozenset(cpus)


def plan_for(compute: str | Iterable[int] = "auto", *, available: Iterable[int] | None = None) -> CpuPlan:
    """A plan over the CPUs this process may use: ``compute`` for the model, the rest for I/O.

    ``"auto"`` gives the model the lowest available CPU and I/O the rest, the
    split that suits one model thread (``torch.set_num_threads(1)``) or a GPU
    launch thread. Give more compute CPUs when torch runs several threads.
    """
    pool = frozenset(available) if available is not None else available_cpus()
    if compute == "auto":
        chosen = frozenset({min(pool)}) if pool else frozenset()
    else:
        chosen = parse_cpus(compute) if isinstance(compute, str) else frozenset(compute)
    if not chosen <= pool:
        raise ValueError(
            f"compute CPUs {sorted(chosen - pool)} are not available to this process "
            f"(available: {sorted(pool)})"
        )
    if len(pool) < 2:
        raise ValueError(f"a CPU plan needs at least two CPUs; this process may use {sorted(pool)}")
    return CpuPlan(chosen, pool - chosen)


def apply(plan: CpuPlan) -> int:
    """Pin the calling thread to ``plan.compute`` and every other thread of this process to ``plan.io``.

    Returns how many other threads were moved. Call it from the thread that
    runs the model, after the client exists (so gRPC's threads are there to
    move). Calling it again (a new plan, or new threads) is safe.
    """
    global _active
    if not supported():
        raise OSError("CPU plans need Linux (sched_setaffinity and /proc/self/task)")
    me = threading.get_native_id()
    moved = 0
    with _lock:
        os.sched_setaffinity(0, plan.compute)
        for name in os.listdir("/proc/self/task"):
            tid = int(name)
            if tid == me:
                continue
            try:
                os.sched_setaffinity(tid, plan.io)
                moved += 1
            except (ProcessLookupError, PermissionError):  # exited meanwhile
                continue
        _active = plan
    return moved


def active() -> CpuPlan | None:
    """The plan :func:`apply` set in this process, if any."""
    return _active


def enter_io() -> None:
    """Move the calling thread to the I/O CPUs when a plan is active (else do nothing)."""
    plan = _active
    if plan is not None and supported():
        os.sched_setaffinity(0, plan.io)


def release() -> None:
    """Forget the plan and let every thread of this process run anywhere it may again."""
    global _active
    with _lock:
        if _active is not None and supported():
            everything = _active.compute | _active.io
            for name in os.listdir("/proc/self/task"):
                try:
                    os.sched_setaffinity(int(name), everything)
                except (ProcessLookupError, PermissionError):
                    continue
        _active = None
