"""The request state machine and the gateway's exactly-once, in-order release."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.sequencing import Reorderer, SeqCounter, SequenceGap
from shared.state import TRANSITIONS, IllegalTransition, RequestMachine, RequestState


def test_happy_path_and_terminal_states() -> None:
    m = RequestMachine()
    for kind in ("queued", "queued", "start", "delta", "event", "replace", "end"):
        m.emit(kind)
    assert m.done and m.state is RequestState.ENDED
    for kind in ("delta", "end", "error", "start"):
        with pytest.raises(IllegalTransition):
            m.emit(kind)


def test_delta_before_start_is_illegal_and_reset_restarts() -> None:
    m = RequestMachine()
    with pytest.raises(IllegalTransition):
        m.emit("delta")
    m.emit("start")
    m.emit("reset")
    with pytest.raises(IllegalTransition):
        m.emit("delta")
    m.emit("start")
    m.emit("error")
    assert m.state is RequestState.FAILED


def test_terminal_states_allow_nothing() -> None:
    assert TRANSITIONS[RequestState.ENDED] == frozenset() == TRANSITIONS[RequestState.FAILED]


def test_counter() -> None:
    c = SeqCounter(1)
    assert [c.next(), c.next()] == [2, 3]


@given(st.permutations(list(range(1, 40))), st.lists(st.integers(1, 39), max_size=20))
def test_reorderer_releases_each_seq_once_in_order(order: list[int], dups: list[int]) -> None:
    r: Reorderer[int] = Reorderer(1, window=100)
    out: list[int] = []
    for seq in order + dups:
        out += r.push(seq, seq)
    assert out == list(range(1, 40))
    assert r.delivered == 39 and r.waiting == 0


def test_reorderer_starts_after_what_the_client_holds() -> None:
    r: Reorderer[str] = Reorderer(6)
    assert r.push(3, "old") == [] and r.push(7, "b") == [] and r.push(6, "a") == ["a", "b"]


def test_reorderer_window_bounds_memory() -> None:
    r: Reorderer[int] = Reorderer(1, window=3)
    for seq in (2, 3, 4):
        r.push(seq, seq)
    with pytest.raises(SequenceGap):
        r.push(5, 5)
