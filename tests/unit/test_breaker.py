"""Backoff and the circuit breaker: pure logic, time passed in."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from shared.breaker import BreakerState, CircuitBreaker, backoff_s


@given(st.integers(1, 40), st.floats(0.1, 5), st.floats(5, 60))
def test_backoff_grows_and_is_capped_with_jitter(attempt: int, base: float, cap: float) -> None:
    delay = backoff_s(attempt, base, cap, random.Random(attempt))
    raw = min(cap, base * 2 ** (attempt - 1))
    assert 0.8 * raw <= delay <= 1.2 * raw


def test_opens_after_threshold_and_probes_once() -> None:
    b = CircuitBreaker(threshold=3, cooldown_s=2, max_cooldown_s=30, rng=random.Random(1))
    for t in (0, 1):
        b.failure(t)
        assert b.allow(t)
    b.failure(2)
    assert b.state is BreakerState.OPEN and not b.allow(2.5)
    assert 0 < b.retry_in(2.5) <= 2.3
    assert b.allow(10) and b.state is BreakerState.HALF_OPEN  # the probe
    assert not b.allow(10)  # only one probe at a time
    b.success()
    assert b.state is BreakerState.CLOSED and b.allow(10) and b.retry_in(10) == 0


def test_failed_probe_doubles_cooldown_up_to_the_cap() -> None:
    b = CircuitBreaker(threshold=1, cooldown_s=2, max_cooldown_s=5, rng=random.Random(2))
    now = 0.0
    b.failure(now)
    cooldowns = []
    for _ in range(4):
        now = b.opened_until + 0.01
        assert b.allow(now)
        b.failure(now)
        cooldowns.append(b.cooldown)
    assert cooldowns == [4, 5, 5, 5]
