"""Running a worker on several threads in a test, with its failures surfaced in the test's thread."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_threads(worker: Callable[[int], None], count: int, timeout_s: float = 60.0) -> None:
    """Run ``worker(0..count-1)`` concurrently; fail with the first exception any of them raised.

    A thread still running after ``timeout_s`` fails the test too (a hang is a bug, not a pass).
    """
    errors: list[BaseException] = []

    def guarded(t: int) -> None:
        try:
            worker(t)
        except BaseException as exc:  # surfaced in the test's thread below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in range(count)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=timeout_s)
    assert not errors, errors[0]
    assert not any(th.is_alive() for th in threads), f"a worker thread ran past {timeout_s} s"
