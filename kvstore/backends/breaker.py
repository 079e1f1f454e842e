"""Circuit breakers: how a remote tier stops calling a server that is down, and comes back.

Retrying every call during an *outage* (the server is gone) would stall every request for the
whole retry budget and hammer the server when it comes back. A breaker opens after failed calls
and then fails fast with :class:`~kvstore.errors.BackendUnavailable`, so a dead tier costs
microseconds per call; :class:`~kvstore.backends.guard.Guard` drives it around each remote call.

:class:`CircuitBreaker` is the classic one: after a cool-down it lets one caller through as a
probe; a successful probe closes it again, so a tier recovers by itself.

:class:`ProbingBreaker`, which Redis and S3 use, probes from a background thread instead. Why
not let a caller probe: when a server *hangs* (SIGSTOP, a frozen host, a black-holed route)
every call that reaches it waits its full timeout. A breaker that lets one caller through as a
probe after each cool-down makes one client request per cool-down pay that timeout, forever,
while the outage lasts. Once this one is open no caller touches the backend at all; a daemon
thread calls ``probe`` every ``probe_interval_s`` with the same time budget, and the first
successful probe closes the breaker. A hung tier is then skipped exactly like a dead one, and
comes back by itself after it recovers.

When it opens (:class:`BreakerPolicy`): after a *run* of ``failure_threshold`` failed
calls in a row (default 3), or when at least ``min_calls`` calls in the last
``window_s`` seconds failed at ``error_rate`` or more (default: half of at least 20 in
10 s). Not on one or two slow calls: a loaded but healthy S3 server that let two reads
run past the 0.35 s read timeout used to open it (threshold 1) for ~50 ms, and every
read in that window skipped the tier, so 53 of 533 Gets of acknowledged keys answered
NOT_FOUND (issue 24). A call that fails is still a failure for its caller (the tiered
store answers UNAVAILABLE for a miss it could not confirm); only the *skipping of the
tier for every later call* waits for the run or the rate. The price: a tier that dies
costs ``failure_threshold`` failed calls (each at most one budget when it hangs, and
concurrent calls pay in parallel) before it is skipped.

:class:`ProbingBreaker` keeps the interface the guard drives (``before_call`` /
``record_success`` / ``record_failure``, ``state``, ``num_trips``), so any remote tier can
use it; without a ``probe`` it falls back to the caller-probes behaviour of its base class.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kvstore.errors import BackendUnavailable

log = logging.getLogger(__name__)

#: Buckets the error-rate window is counted in.
_BUCKETS = 10


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


@dataclass(frozen=True)
class BreakerPolicy:
    """When a :class:`ProbingBreaker` opens: a run of failures, or an error rate over a window.

    ``failure_threshold`` failed calls in a row open it at once (a dead server fails every
    call). Otherwise it opens once the last ``window_s`` seconds hold at least ``min_calls``
    calls of which ``error_rate`` or more failed (a flapping or overloaded server whose
    successes keep resetting the run). Isolated failures, such as a slow call that ran past
    its timeout now and then, open neither.
    """

    failure_threshold: int = 3
    error_rate: float = 0.5
    window_s: float = 10.0
    min_calls: int = 20

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError(f"breaker failure_threshold must be >= 1, got {self.failure_threshold}")
        if not 0.0 < self.error_rate <= 1.0:
            raise ValueError(f"breaker error_rate must be in (0, 1], got {self.error_rate}")
        if self.window_s <= 0:
            raise ValueError(f"breaker window_s must be > 0, got {self.window_s}")
        if self.min_calls < 1:
            raise ValueError(f"breaker min_calls must be >= 1, got {self.min_calls}")


class ProbingBreaker(CircuitBreaker):
    """Closed → (:class:`BreakerPolicy`: a run of failures or an error rate) → open → (a background probe succeeds) → closed.

    ``probe`` must raise on failure and be bounded by the tier's own timeouts (it runs
    on a daemon thread, never on a request). ``on_open`` runs each time the circuit opens
    (tiers bump their ``breaker_trips`` counter there, for Stats and metrics). ``num_probes`` counts probe attempts and
    ``open_since`` is the monotonic time the breaker last opened (None while closed),
    for Stats, metrics and logs. ``failure_threshold`` is the run length; ``policy``, when
    given, replaces it and sets the error-rate window too.
    """

    def __init__(
        self,
        name: str,
        probe: Callable[[], object] | None = None,
        failure_threshold: int = 3,
        probe_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        on_open: Callable[[], object] | None = None,
        policy: BreakerPolicy | None = None,
    ) -> None:
        if probe_interval_s <= 0:
            raise ValueError("probe_interval_s must be > 0")
        policy = policy or BreakerPolicy(failure_threshold=failure_threshold)
        super().__init__(
            name, failure_threshold=policy.failure_threshold, reset_timeout_s=probe_interval_s, clock=clock
        )
        self.policy = policy
        self.probe = probe
        self.probe_interval_s = probe_interval_s
        self.on_open = on_open
        self.num_probes = 0
        self.open_since: float | None = None
        self.last_error = ""
        self._prober: threading.Thread | None = None
        self._stop = threading.Event()
        # Calls of the last ``policy.window_s`` as [bucket start, calls, failures], one bucket per
        # tenth of the window: memory stays a dozen counters however many calls a second a busy
        # tier serves (the window moves in steps of a tenth). Guarded by ``_lock``.
        self._buckets: deque[list[float]] = deque()
        self._bucket_s = policy.window_s / _BUCKETS

    def _note(self, now: float, failed: bool) -> None:
        """Count one call in the window and drop the buckets that left it (caller holds ``_lock``)."""
        if not self._buckets or now >= self._buckets[-1][0] + self._bucket_s:
            self._buckets.append([now, 0, 0])
        bucket = self._buckets[-1]
        bucket[1] += 1
        bucket[2] += failed
        horizon = now - self.policy.window_s
        while self._buckets and self._buckets[0][0] < horizon:
            self._buckets.popleft()

    def _rate_exceeded(self) -> bool:
        calls = sum(b[1] for b in self._buckets)
        failures = sum(b[2] for b in self._buckets)
        return calls >= self.policy.min_calls and failures >= self.policy.error_rate * calls

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
            if was_open:
                # A fresh start: failures from before the outage say nothing about the server now.
                self._buckets.clear()
            else:
                self._note(self._clock(), False)
            self._state = self.CLOSED
            self._failures = 0
            self._probing = False
        if was_open:
            log.warning("tier %s: circuit closed, the backend answers again", self.name)
        self.open_since = None

    def record_failure(self, error: BaseException | str | None = None) -> None:
        if error is not None:
            self.last_error = str(error)
        if self.probe is None:
            with self._lock:
                was_closed = self._state == self.CLOSED
            super().record_failure(error)
            with self._lock:
                opened = was_closed and self._state != self.CLOSED
        else:
            with self._lock:
                now = self._clock()
                self._failures += 1
                self._note(now, True)
                opened = self._state == self.CLOSED and (
                    self._failures >= self.policy.failure_threshold or self._rate_exceeded()
                )
                if opened:
                    self._state = self.OPEN
                    self._opened_at = now
                    self.num_trips += 1
        if opened:
            self.open_since = self._clock()
            if self.on_open is not None:
                self.on_open()
            log.warning(
                "tier %s: circuit open (%s); skipping it, probing every %.2f s",
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
