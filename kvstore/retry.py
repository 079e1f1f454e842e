"""Retry and backoff as objects handed to whoever makes a remote call (shared core).

Both sides of the wire retry: the client retries a call the server could not
take (UNAVAILABLE), the Redis and S3 tiers retry a blip of their medium. Both
use the objects here, so a policy reads the same everywhere and can be passed in
(and replaced in a test) instead of being a loop at each call site.

The retry vocabulary, each name for what the piece does:

* :class:`Backoff` — *how long* to wait after the n-th failure
  (:class:`ExponentialBackoff` with jitter, or :class:`NoBackoff`);
* :class:`RetryLoop` (formerly ``Retry``, still importable under that name) —
  *runs* a blocking callable again while it raises one of the given exceptions,
  bounded by an attempt count *and* a deadline so a caller never waits longer
  than it can afford (the server's tiers);
* on the client, :class:`transfer.rpc.core.RetryPolicy` *decides* whether a failure
  gets another attempt and how long to wait, and :func:`transfer.rpc.ops.retrying`
  is the loop that applies it, as effects (the drivers do the sleeping).

Circuit breaking and error translation are the backends' own business
(:mod:`kvstore.backends.breaker`, :mod:`kvstore.backends.guard`). This module imports nothing of the server or the
client; the shape is that of redis-py's ``redis/retry.py`` + ``redis/backoff.py``.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Backoff(ABC):
    """How long to wait after the ``failures``-th failed attempt (1 for the first retry)."""

    @abstractmethod
    def compute(self, failures: int) -> float: ...


class NoBackoff(Backoff):
    def compute(self, failures: int) -> float:
        return 0.0


class ExponentialBackoff(Backoff):
    """``base * 2**(n-1)`` capped at ``cap``, with "equal jitter" (half fixed, half random).

    Jitter spreads the retries of many clients so a recovering server is not hit
    by all of them in the same millisecond.
    """

    def __init__(self, base_s: float = 0.01, cap_s: float = 0.5, jitter: bool = True) -> None:
        if base_s < 0 or cap_s < 0:
            raise ValueError("backoff base_s and cap_s must be >= 0")
        self.base_s = base_s
        self.cap_s = cap_s
        self.jitter = jitter

    def compute(self, failures: int) -> float:
        delay: float = min(self.cap_s, self.base_s * (2 ** max(0, failures - 1)))
        if self.jitter:
            delay = delay / 2 + random.uniform(0, delay / 2)
        return delay


class RetryLoop:
    """Run a callable up to ``max_attempts`` times while it raises one of ``retry_on``.

    ``retry_if`` narrows ``retry_on`` further (an S3 ``ClientError`` is worth a
    retry for a 503, not for a 404). Stops early when the next wait would pass
    ``deadline_s`` (measured from the first attempt), then re-raises the last error
    unchanged: translating it is the caller's job (see :class:`Guard`), so this
    class knows nothing of any library.
    """

    def __init__(
        self,
        backoff: Backoff,
        max_attempts: int = 3,
        deadline_s: float | None = None,
        retry_on: tuple[type[BaseException], ...] = (),
        retry_if: Callable[[BaseException], bool] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.backoff = backoff
        self.max_attempts = max_attempts
        self.deadline_s = deadline_s
        self.retry_on = retry_on
        self.retry_if = retry_if
        self._sleep = sleep
        self._clock = clock

    def __call__(self, fn: Callable[[], T], on_retry: Callable[[BaseException], None] | None = None) -> T:
        start = self._clock()
        failures = 0
        while True:
            try:
                return fn()
            except self.retry_on as exc:
                if self.retry_if is not None and not self.retry_if(exc):
                    raise
                failures += 1
                if failures >= self.max_attempts:
                    raise
                delay = self.backoff.compute(failures)
                if self.deadline_s is not None and self._clock() - start + delay > self.deadline_s:
                    raise
                if on_retry is not None:
                    on_retry(exc)
                self._sleep(delay)


#: The old name of :class:`RetryLoop` (the backends and their tests import it).
Retry = RetryLoop
