"""Backoff and a per-worker circuit breaker for Dify outages. Pure logic; time is passed in.

How this works: every failure to reach Dify (refused, timeout before the first byte, 429, 5xx)
is reported with :meth:`CircuitBreaker.failure`; ``threshold`` in a row open the circuit for a
cooldown that doubles on every failed probe (capped, jittered). While open, jobs are not sent
to Dify: they go back to JetStream with a delay that ends at the next probe, so every waiting job
comes due at about the same moment and JetStream redelivers them in stream order, oldest first.
Half-open lets one probe through; its success closes the circuit. A probe that ends without an
answer either way (stopped by its client before Dify said anything, or its worker gave it up)
is released (:meth:`~CircuitBreaker.release`), so the next job probes instead of none ever.
"""

from __future__ import annotations

import random
from enum import Enum

__all__ = ["BreakerState", "CircuitBreaker", "backoff_s"]


def backoff_s(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with ±20 % jitter: base, 2·base, 4·base … capped at ``cap``."""
    raw: float = min(cap, base * 2.0 ** max(0, attempt - 1))
    jitter: float = (rng or random).uniform(0.8, 1.2)
    return raw * jitter


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        *,
        threshold: int = 3,
        cooldown_s: float = 2.0,
        max_cooldown_s: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.threshold = threshold
        self.base_cooldown = cooldown_s
        self.max_cooldown = max_cooldown_s
        self.rng = rng or random.Random()
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.cooldown = cooldown_s
        self.opened_until = 0.0
        self.probing = False

    def allow(self, now: float) -> bool:
        """May a request go to Dify now? In half-open state, only one probe at a time."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and now >= self.opened_until:
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def retry_in(self, now: float) -> float:
        """Seconds until the next probe (0 when closed)."""
        if self.state is BreakerState.CLOSED:
            return 0.0
        return max(self.opened_until - now, 0.0) + 0.05

    @property
    def probe_out(self) -> bool:
        """A half-open probe was let through and has not been judged yet."""
        return self.state is BreakerState.HALF_OPEN and self.probing

    def release(self) -> None:
        """The probe ended without telling whether Dify is up: let the next request probe."""
        if self.state is BreakerState.HALF_OPEN:
            self.probing = False

    def success(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.cooldown = self.base_cooldown
        self.probing = False

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN:
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
            self._open(now)
        elif self.state is BreakerState.CLOSED and self.failures >= self.threshold:
            self._open(now)

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.probing = False
        self.opened_until = now + self.cooldown * self.rng.uniform(0.9, 1.1)
