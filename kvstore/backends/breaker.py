"""A circuit breaker for remote tiers that probes in the background.

Why not the caller-probes breaker of ``retry.py``: when a server *hangs* (SIGSTOP, a
frozen host, a black-holed route) every call that reaches it waits its full timeout.
A breaker that lets one caller through as a probe after each cool-down makes one
client request per cool-down pay that timeout, forever, while the outage lasts. This
one opens on the first failed call (``failure_threshold=1``: a timeout is already a
long wait, a second one is not more information) and from then on no caller touches
the backend at all; a daemon thread calls ``probe`` every ``probe_interval_s`` with the
same time budget, and the first successful probe closes the breaker. A hung tier is
then skipped exactly like a dead one, and comes back by itself after it recovers.

The class keeps the interface :class:`~kvstore.backends.retry.Guard` drives
(``before_call`` / ``record_success`` / ``record_failure``, ``state``, ``num_trips``),
so any remote tier can use it; without a ``probe`` it falls back to the caller-probes
behaviour of its base class.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kvstore.backends.retry import Backoff, CircuitBreaker, ExponentialBackoff, Guard, Retry
from kvstore.errors import BackendUnavailable

log = logging.getLogger(__name__)


class ProbingBreaker(CircuitBreaker):
    """Closed → (``failure_threshold`` failures, default 1) → open → (a background probe succeeds) → closed.

    ``probe`` must raise on failure and be bounded by the tier's own timeouts (it runs
    on a daemon thread, never on a request). ``on_open`` runs each time the circuit opens
    (tiers bump their ``breaker_trips`` counter there, for Stats and metrics). ``num_probes`` counts probe attempts and
    ``open_since`` is the monotonic time the breaker last opened (None while closed),
    for Stats, metrics and logs.
    """

    def __init__(
        self,
        name: str,
        probe: Callable[[], object] | None = None,
        failure_threshold: int = 1,
        probe_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        on_open: Callable[[], object] | None = None,
    ) -> None:
        if probe_interval_s <= 0:
            raise ValueError("probe_interval_s must be > 0")
        super().__init__(
            name, failure_threshold=failure_threshold, reset_timeout_s=probe_interval_s, clock=clock
        )
        self.probe = probe
        self.probe_interval_s = probe_interval_s
        self.on_open = on_open
        self.num_probes = 0
        self.open_since: float | None = None
        self.last_error = ""
        self._prober: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def closed(self) -> bool:
        return self.state == self.CLOSED

    def before_call(self) -> None:
        if self.probe is None:
            super().before_call()
            return
        with self._lock:
            if self._state == self.CLOSED:
                return
        raise BackendUnavailable(
            f"{self.name}: circuit open (tier failed or timed out; probing in the background)"
        )

    def record_success(self) -> None:
        with self._lock:
            was_open = self._state != self.CLOSED
        super().record_success()
        if was_open:
            log.warning("tier %s: circuit closed, the backend answers again", self.name)
        self.open_since = None

    def record_failure(self, error: BaseException | str | None = None) -> None:
        with self._lock:
            was_closed = self._state == self.CLOSED
        super().record_failure(error)
        if error is not None:
            self.last_error = str(error)
        with self._lock:
            opened = was_closed and self._state != self.CLOSED
            if opened:
                self.open_since = self._clock()
        if opened and self.on_open is not None:
            self.on_open()
        if opened:
            log.warning(
                "tier %s: circuit open after a failed call (%s); skipping it, probing every %.2f s",
                self.name,
                self.last_error or "failure",
                self.probe_interval_s,
            )
        if self.probe is not None and self.state != self.CLOSED:
            self._start_prober()

    def _start_prober(self) -> None:
        with self._lock:
            if self._stop.is_set() or self._prober is not None:
                return
            self._prober = threading.Thread(
                target=self._probe_loop, name=f"kvstore-breaker-{self.name}", daemon=True
            )
            self._prober.start()

    def _probe_loop(self) -> None:
        assert self.probe is not None
        while not self._stop.wait(self.probe_interval_s):
            with self._lock:
                if self._state == self.CLOSED:
                    # Decided under the lock, so a failure that re-opens the circuit right
                    # now either sees this thread gone (and starts one) or is probed here.
                    self._prober = None
                    return
            self.num_probes += 1
            try:
                self.probe()
            except Exception as exc:  # noqa: BLE001 - any failure keeps the circuit open
                self.last_error = f"probe: {type(exc).__name__}: {exc}"
                continue
            self.record_success()
        with self._lock:
            self._prober = None

    def close(self) -> None:
        """Stop the background prober (the tier is being closed)."""
        self._stop.set()
        prober = self._prober
        if prober is not None and prober is not threading.current_thread():
            prober.join(timeout=5.0)


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
    breaker_threshold: int,
    breaker_reset_s: float,
    retry: Retry | None = None,
    breaker: CircuitBreaker | None = None,
) -> Guard:
    """The call policy every remote tier (Redis, S3) uses, built in one place.

    By default: exponential backoff (20 ms to 250 ms) within ``deadline_s``, and a
    :class:`ProbingBreaker` that opens on the first failed call, so while it is open no
    request touches the tier and a daemon thread runs ``probe`` (under the same timeouts)
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
    breaker = breaker or ProbingBreaker(tier, probe, breaker_threshold, breaker_reset_s, on_open=on_open)
    return Guard(retry, breaker, translate)
