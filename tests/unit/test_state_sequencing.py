"""The request state machine and the gateway's exactly-once, in-order release."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.exceptions import InternalError
from shared.sequencing import Reorderer, SeqCounter, SequenceGap
from shared.state import (
    FRAME_KINDS,
    FRAME_TO_STATE,
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    RequestMachine,
    RequestState,
    rebuild,
)

S = RequestState
# The protocol's rules, written out by hand (not derived from TRANSITIONS): state -> the frame
# kinds it allows and where each leads. Every other (state, kind) pair must be refused.
LEGAL: dict[tuple[RequestState, str], RequestState] = {
    **{(s, "queued"): S.QUEUED for s in (S.ACCEPTED, S.QUEUED, S.RESET)},
    **{(s, "start"): S.STARTED for s in (S.ACCEPTED, S.QUEUED, S.RESET)},
    **{(S.STARTED, k): S.STARTED for k in ("delta", "replace", "event")},
    **{(s, "reset"): S.RESET for s in (S.ACCEPTED, S.QUEUED, S.STARTED)},
    **{(s, "end"): S.ENDED for s in (S.ACCEPTED, S.QUEUED, S.STARTED, S.RESET)},
    **{(s, "error"): S.FAILED for s in (S.ACCEPTED, S.QUEUED, S.STARTED, S.RESET)},
}
PAIRS = [(state, kind) for state in RequestState for kind in FRAME_KINDS]


@pytest.mark.parametrize(("state", "kind"), PAIRS, ids=[f"{s.value}-{k}" for s, k in PAIRS])
def test_every_transition_of_the_table(state: RequestState, kind: str) -> None:
    m = RequestMachine(state)
    if (state, kind) in LEGAL:
        assert m.can_emit(kind)
        m.emit(kind)
        assert m.state is LEGAL[state, kind]
    else:
        assert not m.can_emit(kind)
        with pytest.raises(IllegalTransition) as raised:
            m.emit(kind)
        assert (raised.value.state, raised.value.frame_type) == (state, kind)
        assert isinstance(raised.value, InternalError)  # a bug in tokenwire, typed
        assert m.state is state  # an illegal frame moves nothing


def test_the_table_is_exactly_the_protocol() -> None:
    table = {(s, k): t for s, row in TRANSITIONS.items() for k, t in row.items()}
    assert table == LEGAL
    assert {k for _, k in table} | {"accepted"} == set(FRAME_KINDS)
    assert {kind: FRAME_TO_STATE[kind] for _, kind in table} == {
        k: t for (_, k), t in LEGAL.items()
    }


def test_a_second_start_is_illegal() -> None:
    m = RequestMachine()
    m.emit("start")
    with pytest.raises(IllegalTransition, match="'start' is not allowed in state started"):
        m.emit("start")


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
    assert {RequestState.ENDED, RequestState.FAILED} == TERMINAL
    assert all(not TRANSITIONS[state] for state in TERMINAL)


@given(st.lists(st.sampled_from(FRAME_KINDS), max_size=30))
def test_any_sequence_moves_by_the_table_or_raises_and_stays(kinds: list[str]) -> None:
    m = RequestMachine()
    for kind in kinds:
        before = m.state
        try:
            m.emit(kind)
        except IllegalTransition:
            assert (before, kind) not in LEGAL and m.state is before
        else:
            assert m.state is LEGAL[before, kind]


@pytest.mark.parametrize("state", list(RequestState), ids=lambda s: s.value)
def test_only_a_closed_request_can_be_reopened(state: RequestState) -> None:
    m = RequestMachine(state)
    if state in TERMINAL:
        m.reopen()
        assert m.state is S.RESET
    else:
        with pytest.raises(IllegalTransition):
            m.reopen()
        assert m.state is state


def test_rebuild_reads_a_reset_after_the_end_as_a_reopening() -> None:
    assert rebuild(["accepted", "error", "reset", "start"]).state is S.STARTED


def test_rebuild_starts_after_accepted_and_skips_what_the_table_refuses() -> None:
    assert rebuild([]).state is S.ACCEPTED
    assert rebuild(["accepted", "start", "delta"]).state is S.STARTED
    assert rebuild(["accepted", "start", "start", "delta", "end"]).state is S.ENDED
    assert rebuild(["accepted", "delta"]).state is S.ACCEPTED


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
