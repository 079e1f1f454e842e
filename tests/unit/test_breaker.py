"""The probing circuit breaker on its own: when it opens (a run of failures or an error rate over
a window, never one or two isolated failures), no caller probes while open, a background probe
closes it. Real threads and a real (short) probe interval; no servers. The policy tests drive
the breaker through a real :class:`Guard` and step an injected clock instead of sleeping."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from kvstore.backends.breaker import BreakerPolicy, ProbingBreaker
from kvstore.backends.guard import Guard
from kvstore.errors import BackendUnavailable
from kvstore.retry import NoBackoff, Retry


def _wait(cond, timeout_s: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_opens_on_its_threshold_fails_fast_and_closes_after_a_background_probe() -> None:
    up = threading.Event()
    probes: list[float] = []
    opened: list[int] = []

    def probe() -> None:
        probes.append(time.monotonic())
        if not up.is_set():
            raise ConnectionError("still down")

    breaker = ProbingBreaker(
        "t", probe, failure_threshold=1, probe_interval_s=0.05, on_open=lambda: opened.append(1)
    )
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
    breaker = ProbingBreaker("t", None, failure_threshold=1, probe_interval_s=0.05)
    breaker.record_failure(ConnectionError("x"))
    with pytest.raises(BackendUnavailable):
        breaker.before_call()
    time.sleep(0.06)
    breaker.before_call()  # this caller is the probe
    breaker.record_success()
    assert breaker.state == ProbingBreaker.CLOSED


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _policy_guard(policy: BreakerPolicy, clock: _Clock) -> tuple[ProbingBreaker, Callable[[bool], None]]:
    """A breaker with a probe that never answers (so only callers' outcomes move it), and
    ``call(ok)``: one guarded call that succeeds or times out."""

    def probe() -> None:
        raise TimeoutError("still slow")

    breaker = ProbingBreaker("t", probe, probe_interval_s=60.0, clock=clock, policy=policy)
    guard = Guard(
        Retry(NoBackoff(), max_attempts=1, retry_on=(TimeoutError,)),
        breaker,
        lambda exc: BackendUnavailable(f"timed out: {exc}") if isinstance(exc, TimeoutError) else None,
    )

    def call(ok: bool) -> None:
        def fn() -> None:
            if not ok:
                raise TimeoutError("read timeout after 0.35 s")

        try:
            guard(fn)
        except BackendUnavailable:
            if ok:
                raise

    return breaker, call


def test_isolated_slow_calls_never_open_it() -> None:
    """The issue-24 case: a loaded server lets a read run past its timeout now and then."""
    clock = _Clock()
    breaker, call = _policy_guard(BreakerPolicy(failure_threshold=3, error_rate=0.5, min_calls=20), clock)
    try:
        for i in range(500):
            call(ok=i % 5 not in (0, 1))  # two slow calls in a row, then three good ones: 40 %
            clock.now += 0.01
            assert breaker.state == ProbingBreaker.CLOSED, i
        assert breaker.num_trips == 0
    finally:
        breaker.close()


def test_a_run_of_failures_opens_it_on_the_threshold() -> None:
    clock = _Clock()
    breaker, call = _policy_guard(BreakerPolicy(failure_threshold=3), clock)
    try:
        call(ok=False)
        call(ok=False)
        assert breaker.state == ProbingBreaker.CLOSED
        call(ok=True)  # a success ends the run
        call(ok=False)
        call(ok=False)
        assert breaker.state == ProbingBreaker.CLOSED
        call(ok=False)
        assert breaker.state == ProbingBreaker.OPEN and breaker.num_trips == 1
        with pytest.raises(BackendUnavailable, match="circuit open"):
            breaker.before_call()
    finally:
        breaker.close()


def test_an_error_rate_over_the_window_opens_it_without_a_run() -> None:
    clock = _Clock()
    breaker, call = _policy_guard(BreakerPolicy(failure_threshold=3, error_rate=0.5, min_calls=20), clock)
    try:
        for i in range(19):
            call(ok=i % 2 == 1)  # fail, ok, fail, ...: never two failures in a row
            clock.now += 0.01
        assert breaker.state == ProbingBreaker.CLOSED  # 10 of 19: too few calls to judge
        call(ok=True)
        assert breaker.state == ProbingBreaker.CLOSED  # 10 of 20 but the last call succeeded
        call(ok=False)
        assert breaker.state == ProbingBreaker.OPEN  # 11 of 21 >= 50 %
    finally:
        breaker.close()


def test_failures_older_than_the_window_are_forgotten() -> None:
    clock = _Clock()
    policy = BreakerPolicy(failure_threshold=3, error_rate=0.5, window_s=1.0, min_calls=4)
    breaker, call = _policy_guard(policy, clock)
    try:
        for ok in (False, False, True):  # 2 of 3: too few calls to judge
            call(ok=ok)
            clock.now += 0.1
        clock.now += 1.0  # those three leave the window
        call(ok=False)  # counted with them this would be 3 of 4 failed
        assert breaker.state == ProbingBreaker.CLOSED
        call(ok=True)
        call(ok=False)
        call(ok=False)  # 3 of 4 within the window (and no run of 3)
        assert breaker.state == ProbingBreaker.OPEN
    finally:
        breaker.close()


def test_a_probe_that_closes_it_starts_a_fresh_window() -> None:
    clock = _Clock()
    policy = BreakerPolicy(failure_threshold=2, error_rate=0.5, min_calls=4)
    breaker, call = _policy_guard(policy, clock)
    try:
        call(ok=False)
        call(ok=False)
        assert breaker.state == ProbingBreaker.OPEN
        breaker.record_success()  # what a successful background probe does
        assert breaker.state == ProbingBreaker.CLOSED
        call(ok=False)  # one failure after the outage: neither a run nor a rate yet
        assert breaker.state == ProbingBreaker.CLOSED
    finally:
        breaker.close()


@pytest.mark.parametrize(
    ("field", "value"),
    [("failure_threshold", 0), ("error_rate", 0.0), ("error_rate", 1.5), ("window_s", 0.0), ("min_calls", 0)],
)
def test_policy_values_are_checked(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        BreakerPolicy(**{field: value})
