"""The guard around one remote call: breaker check, retries, error translation, one time budget.

Remote tiers (Redis, S3) fail in two ways that call for different answers:

* a *blip* (one dropped connection, one 503): retrying a moment later succeeds, so
  :class:`~kvstore.retry.Retry` re-runs the call with a :class:`~kvstore.retry.Backoff`
  between attempts, bounded by an attempt count *and* a deadline so a read never waits
  longer than the caller can afford;
* an *outage* (the server is gone): a circuit breaker (:mod:`kvstore.backends.breaker`)
  fails fast until the server answers again.

:class:`Guard` composes the two with an error translator, so a backend's call sites read
``self._guard(lambda: client.get(name))`` and never loop themselves; :func:`remote_guard`
builds the one every remote tier uses and :func:`call_budget` sizes its time budget. Retry and
backoff themselves live in the shared core, :mod:`kvstore.retry`, because the client uses them
too. The same shape as redis-py's ``redis/retry.py`` + ``redis/backoff.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from kvstore.backends.breaker import BreakerPolicy, CircuitBreaker, ProbingBreaker
from kvstore.errors import BackendUnavailable
from kvstore.retry import Backoff, ExponentialBackoff, Retry

T = TypeVar("T")


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


def remote_guard(
    tier: str,
    probe: Callable[[], object],
    translate: Callable[[BaseException], BackendUnavailable | None],
    on_open: Callable[[], object],
    *,
    retry_on: tuple[type[BaseException], ...],
    retry_if: Callable[[BaseException], bool] | None = None,
    deadline_s: float,
    backoff: Backoff | None,
    max_attempts: int,
    breaker_reset_s: float,
    policy: BreakerPolicy,
    retry: Retry | None = None,
    breaker: CircuitBreaker | None = None,
) -> Guard:
    """The call policy every remote tier (Redis, S3) uses, built in one place.

    By default: exponential backoff (20 ms to 250 ms) within ``deadline_s``, and a
    :class:`ProbingBreaker` that opens as ``policy`` says (a run of failures or an error
    rate), so while it is open no request touches the tier and a daemon thread runs ``probe`` (under the same timeouts)
    until it answers. ``retry=`` / ``breaker=`` replace either outright (tests do). No
    on_failure counter: the TieredStore counts each BackendUnavailable it catches.
    """
    retry = retry or Retry(
        backoff or ExponentialBackoff(base_s=0.02, cap_s=0.25),
        max_attempts=max_attempts,
        deadline_s=deadline_s,
        retry_on=retry_on,
        retry_if=retry_if,
    )
    breaker = breaker or ProbingBreaker(
        tier, probe, probe_interval_s=breaker_reset_s, on_open=on_open, policy=policy
    )
    return Guard(retry, breaker, translate)
