"""Circuit breaker (Nygard, "Release It!"): stop sending traffic to a replica that keeps failing.

::

               N consecutive failures                cooldown elapsed
    closed ─────────────────────────────► open ─────────────────────────► half_open
      ▲                                    ▲                                  │ one trial request
      │ success                            └──────────── failure ─────────────┤
      └───────────────────────────────────────────────── success ─────────────┘

Health probes report through the same :meth:`record_success` / :meth:`record_failure`, so a replica that comes
back is closed again by a probe, without risking a user request on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

__all__ = ["BreakerState", "CircuitBreaker"]

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Per-replica breaker; single-threaded (one asyncio loop), so no locks.

    Usage::

        breaker = CircuitBreaker(failures=3, cooldown_s=10)
        if breaker.allow():          # claims the single half-open trial when there is one
            try:
                send()
            except OSError:
                breaker.record_failure()
            else:
                breaker.record_success()
    """

    def __init__(self, failures: int = 3, cooldown_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.consecutive_failures = 0
        self._state: BreakerState = "closed"
        self._opened_at = 0.0
        self._trial_in_flight = False

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose cooldown has elapsed reads (and becomes) half-open."""
        if self._state == "open" and self.clock() - self._opened_at >= self.cooldown_s:
            self._state = "half_open"
            self._trial_in_flight = False
        return self._state

    @property
    def available(self) -> bool:
        """Whether :meth:`allow` would let a request through now (without claiming the trial)."""
        state = self.state
        return state == "closed" or (state == "half_open" and not self._trial_in_flight)

    def allow(self) -> bool:
        """Admit one request: always when closed, never when open, only the first one when half-open."""
        if not self.available:
            return False
        if self._state == "half_open":
            self._trial_in_flight = True
        return True

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self._state = "closed"
        self._trial_in_flight = False

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        state = self.state
        if state == "half_open" or (state == "closed" and self.consecutive_failures >= self.failures):
            self._state = "open"
            self._opened_at = self.clock()
        self._trial_in_flight = False

    def release(self) -> None:
        """Forget an admitted request that ended without a verdict (cancelled), so the trial slot is free again."""
        self._trial_in_flight = False

    def __repr__(self) -> str:
        return f"CircuitBreaker(state={self.state!r}, consecutive_failures={self.consecutive_failures})"
