"""Retry, backoff and circuit breaking as objects handed to backends.

Remote tiers (Redis, S3) fail in two ways that call for different answers:

* a *blip* (one dropped connection, one 503): retrying a moment later succeeds, so
  :class:`Retry` re-runs the call with a :class:`Backoff` between attempts, bounded
  by an attempt count *and* a deadline so a read never waits longer than the
  caller can afford;
* an *outage* (the server is gone): retrying every call would stall every request
  for the whole retry budget and hammer the server when it comes back, so the
  :class:`CircuitBreaker` opens after a run of failed calls and fails fast with
  :class:`~kvstore.errors.BackendUnavailable` for a cool-down, then lets one probe
  through; a successful probe closes it again, so a tier recovers by itself. Redis and S3
  use its subclass :class:`~kvstore.backends.breaker.ProbingBreaker`, which opens on the first
  failure and probes from a background thread, so no request waits on a hung server twice.

:class:`Guard` composes the two with an error translator, so a backend's call
sites read ``self._guard(lambda: client.get(name))`` and never loop themselves.
The same shape as redis-py's ``redis/retry.py`` + ``redis/backoff.py``.

The shared pieces (:class:`Backoff`, :class:`ExponentialBackoff`, :class:`NoBackoff`,
:class:`Retry`) live in the shared core, :mod:`kvstore.retry`, because the client uses
them too; they are re-exported here so backends import one module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from kvstore.errors import BackendUnavailable
from kvstore.retry import Backoff, ExponentialBackoff, NoBackoff, Retry

__all__ = ["Backoff", "CircuitBreaker", "ExponentialBackoff", "Guard", "NoBackoff", "Retry"]

T = TypeVar("T")


class CircuitBreaker:
    """Closed → (``failure_threshold`` consecutive failures) → open → (``reset_timeout_s``) → half-open.

    While open every call fails at once with :class:`BackendUnavailable`. Once the
    cool-down has passed, exactly one caller is let through as a probe (the others
    keep failing fast); its success closes the breaker, its failure re-opens it for
    another cool-down.
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def __init__(
        self,
        name: str,
        failure_threshold: int = 3,
        reset_timeout_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = self.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        #: How many times the breaker opened (exported as a metric).
        self.num_trips = 0

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    def before_call(self) -> None:
        """Raise :class:`BackendUnavailable` unless this call may go through."""
        with self._lock:
            if self._state == self.CLOSED:
                return
            if self._state == self.OPEN and self._clock() - self._opened_at >= self.reset_timeout_s:
                self._state = self.HALF_OPEN
                self._probing = False
            if self._state == self.HALF_OPEN and not self._probing:
                self._probing = True
                return
            raise BackendUnavailable(f"{self.name}: circuit open after repeated failures; retrying later")

    def record_success(self) -> None:
        with self._lock:
            self._state = self.CLOSED
            self._failures = 0
            self._probing = False

    def record_failure(self, error: BaseException | str | None = None) -> None:
        """One failed call; ``error`` (what failed) is for subclasses that report it."""
        with self._lock:
            self._failures += 1
            if self._state == self.HALF_OPEN or self._failures >= self.failure_threshold:
                if self._state != self.OPEN:
                    self.num_trips += 1
                self._state = self.OPEN
                self._opened_at = self._clock()
                self._probing = False


class Guard:
    """One remote call: breaker check, retries, then translation to BackendUnavailable.

    ``translate(exc)`` returns a :class:`BackendUnavailable` for errors that mean
    "the medium failed" and ``None`` for everything else (which propagates as is
    and does not count against the breaker: a bug is not an outage).
    """

    def __init__(
        self,
        retry: Retry,
        breaker: CircuitBreaker,
        translate: Callable[[BaseException], BackendUnavailable | None],
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.retry = retry
        self.breaker = breaker
        self.translate = translate
        self.on_failure = on_failure

    def __call__(self, fn: Callable[[], T]) -> T:
        self.breaker.before_call()
        try:
            result = self.retry(fn)
        except BackendUnavailable as exc:
            self._failed(exc)
            raise
        except Exception as exc:
            unavailable = self.translate(exc)
            if unavailable is None:
                # Not an outage: the server answered. Let the probe slot go.
                self.breaker.record_success()
                raise
            self._failed(unavailable)
            raise unavailable from exc
        except BaseException:
            # Interrupted (KeyboardInterrupt, SystemExit): never leave a probe slot taken.
            self.breaker.record_failure()
            raise
        self.breaker.record_success()
        return result

    def _failed(self, error: BaseException) -> None:
        self.breaker.record_failure(error)
        if self.on_failure is not None:
            self.on_failure()


def call_budget(
    tier: str,
    connect_timeout_s: float,
    read_timeout_s: float,
    read_name: str,
    budget_s: float,
    slack_s: float,
) -> tuple[float, float]:
    """``(attempt_s, budget_s)`` of one remote call: one attempt is connect + read, the budget bounds
    it and any retry (a retry starts only while a whole fresh attempt still fits).

    Redis and S3 size their timeouts the same way, so an operator reads one rule; ``budget_s``
    0 means one attempt plus ``slack_s``. ``tier`` and ``read_name`` only word the error.
    """
    attempt_s = connect_timeout_s + read_timeout_s
    budget_s = budget_s or round(attempt_s + slack_s, 6)
    if budget_s < attempt_s:
        raise ValueError(
            f"{tier} budget_s ({budget_s}) must be >= connect_timeout_s + {read_name} ({attempt_s})"
        )
    return attempt_s, budget_s
