"""The probing circuit breaker on its own: opens on the first failure, no caller probes, a
background probe closes it. Real threads and a real (short) probe interval; no servers."""

from __future__ import annotations

import threading
import time

import pytest

from kvstore.backends.breaker import ProbingBreaker
from kvstore.backends.retry import Guard, NoBackoff, Retry
from kvstore.errors import BackendUnavailable


def _wait(cond, timeout_s: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_opens_on_first_failure_fails_fast_and_closes_after_a_background_probe() -> None:
    up = threading.Event()
    probes: list[float] = []
    opened: list[int] = []

    def probe() -> None:
        probes.append(time.monotonic())
        if not up.is_set():
            raise ConnectionError("still down")

    breaker = ProbingBreaker("t", probe, probe_interval_s=0.05, on_open=lambda: opened.append(1))
    guard = Guard(
        Retry(NoBackoff(), max_attempts=1, retry_on=(ConnectionError,)),
        breaker,
        lambda exc: BackendUnavailable(str(exc)) if isinstance(exc, ConnectionError) else None,
    )
    calls = 0

    def call() -> str:
        nonlocal calls
        calls += 1
        if not up.is_set():
            raise ConnectionError("refused")
        return "ok"

    try:
        with pytest.raises(BackendUnavailable, match="refused"):
            guard(call)
        assert breaker.state == ProbingBreaker.OPEN and opened == [1] and breaker.num_trips == 1
        assert "refused" in breaker.last_error
        # While open, callers never reach the backend, however long they keep trying.
        for _ in range(20):
            with pytest.raises(BackendUnavailable, match="circuit open"):
                guard(call)
            time.sleep(0.01)
        assert calls == 1
        assert _wait(lambda: len(probes) >= 2)  # the background thread keeps probing
        assert breaker.state == ProbingBreaker.OPEN
        up.set()
        assert _wait(lambda: breaker.state == ProbingBreaker.CLOSED)  # closed by the probe, not a caller
        assert calls == 1
        assert guard(call) == "ok"
        # A second outage opens it again and starts probing again.
        up.clear()
        with pytest.raises(BackendUnavailable):
            guard(call)
        assert breaker.num_trips == 2 and opened == [1, 1]
        seen = len(probes)
        assert _wait(lambda: len(probes) > seen)
    finally:
        breaker.close()
    stopped = len(probes)
    time.sleep(0.2)
    assert len(probes) <= stopped + 1  # close() stops the prober


def test_a_server_answering_with_an_error_that_is_not_an_outage_keeps_it_closed() -> None:
    breaker = ProbingBreaker("t", lambda: None, probe_interval_s=0.05)
    guard = Guard(Retry(NoBackoff(), max_attempts=1), breaker, lambda exc: None)
    try:
        with pytest.raises(KeyError):
            guard(lambda: {}["missing"])
        assert breaker.state == ProbingBreaker.CLOSED and breaker.num_trips == 0
    finally:
        breaker.close()


def test_without_a_probe_it_falls_back_to_caller_probes() -> None:
    breaker = ProbingBreaker("t", None, probe_interval_s=0.05)
    breaker.record_failure(ConnectionError("x"))
    with pytest.raises(BackendUnavailable):
        breaker.before_call()
    time.sleep(0.06)
    breaker.before_call()  # this caller is the probe
    breaker.record_success()
    assert breaker.state == ProbingBreaker.CLOSED
