"""Token buckets (shared/ratelimit.py): the rate syntax, and what a bucket lets through."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.ratelimit import (
    BucketState,
    Rate,
    decode_state,
    encode_state,
    parse_rate,
    take,
)
from shared.settings import Settings


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("20/min", 20 / 60),
        ("5/s", 5.0),
        ("5/sec", 5.0),
        ("100/hour", 100 / 3600),
        ("100/hours", 100 / 3600),
        ("3/10s", 0.3),
        (" 2 / mins ", 2 / 60),
        ("1.5/minute", 1.5 / 60),
        ("10/day", 10 / 86400),
    ],
)
def test_rate_syntax(text: str, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["", "20", "20/", "/min", "0/s", "5/ms", "5/years", "-1/s", "x/s"])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def test_settings_refuse_a_bad_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENWIRE_RATE_PER_USER", "lots")
    with pytest.raises(ValueError, match="rate"):
        Settings()


def test_a_full_bucket_lets_a_burst_through_then_refuses_with_a_hint() -> None:
    rate = Rate(per_second=1.0, burst=3)
    state = None
    allowed = []
    for _ in range(5):
        decision = take(rate, state, now=100.0)
        state = decision.state
        allowed.append(decision.allowed)
    assert allowed == [True, True, True, False, False]
    refused = take(rate, state, now=100.0)
    assert refused.retry_after_s == pytest.approx(1.0)
    assert take(rate, state, now=100.0 + refused.retry_after_s).allowed


def test_a_backwards_clock_mints_nothing() -> None:
    rate = Rate(per_second=1.0, burst=2)
    empty = BucketState(tokens=0.0, at=1000.0)
    assert not take(rate, empty, now=10.0).allowed
    assert take(rate, empty, now=10.0).state.at == 1000.0


steps = st.lists(
    st.tuples(st.floats(min_value=0, max_value=30, allow_nan=False), st.sampled_from([1.0, 2.0])),
    min_size=1,
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(
    per_second=st.floats(min_value=0.01, max_value=100),
    burst=st.integers(min_value=1, max_value=50),
    steps=steps,
)
def test_never_more_than_burst_plus_refill(
    per_second: float, burst: int, steps: list[tuple[float, float]]
) -> None:
    """Whatever the timing, what passes is at most the burst plus what refilled meanwhile."""
    rate = Rate(per_second, burst)
    state: BucketState | None = None
    now = 0.0
    spent = 0.0
    for gap, cost in steps:
        now += gap
        decision = take(rate, state, now, cost)
        if decision.allowed:
            spent += cost
            assert decision.retry_after_s == 0
        else:
            assert decision.retry_after_s > 0
            assert decision.state.tokens < cost
            if cost > burst:
                assert decision.retry_after_s == float("inf")
            else:  # the hint is right: after it, exactly that request passes
                later = now + decision.retry_after_s + 1e-6
                assert take(rate, decision.state, later, cost).allowed
        state = decision.state
        assert spent <= burst + per_second * now + 1e-6
        assert 0 <= state.tokens <= burst + 1e-9


@given(st.floats(min_value=0, max_value=1e6), st.floats(min_value=0, max_value=2e9))
def test_state_round_trips(tokens: float, at: float) -> None:
    back = decode_state(encode_state(BucketState(tokens, at)))
    assert back is not None
    assert back.tokens == pytest.approx(tokens, abs=1e-5)
    assert back.at == pytest.approx(at, abs=1e-5)


@given(st.binary(max_size=64))
def test_unreadable_state_is_a_full_bucket(data: bytes) -> None:
    state = decode_state(data)
    decision = take(Rate(1.0, 5), state, now=1.0)
    assert decision.state.tokens <= 5


def test_ratelimit_is_core_without_io() -> None:
    tree = ast.parse((Path(__file__).resolve().parents[2] / "shared" / "ratelimit.py").read_text())
    imported = {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    } | {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert imported <= {"__future__", "math", "re", "dataclasses", "typing"}
