"""The delivery decisions (shared/delivery.py), from plain facts: no pump, no fakes, no loop."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.delivery import (
    ACK,
    HAND_BACK,
    LEAVE,
    Action,
    DeadLetter,
    JobStatus,
    Kept,
    Outcome,
    Plan,
    RequestFrames,
    Retry,
    RetryPolicy,
    Settle,
    Settlement,
    StreamEnd,
    after_unavailable,
    final_outcome,
    judge_stream,
    outcome_after,
    plan,
    settlement_after_failure,
    status_record,
)
from shared.dify_api import DifyIds, HistoryMessage
from shared.exceptions import (
    CircuitOpen,
    DifyRejected,
    DifyStreamCut,
    DifyStreamError,
    DifyUnavailable,
    ErrorCode,
    InternalError,
)
from shared.frames import Delta, End, ErrorFrame, Queued, Reset
from shared.state import IllegalTransition, RequestState
from tests.unit.helpers import answer_of, assert_frames

S = RequestState
IDS = DifyIds("t1", "m1", "c1")
POLICY = RetryPolicy(max_attempts=3, max_age_s=600, base_s=0.5, max_s=8)


def frame(seq: int, kind: str, **fields: Any) -> dict[str, Any]:
    return {"id": "r1", "seq": seq, "type": kind, **fields}


HELD = [frame(1, "accepted"), frame(2, "start"), frame(3, "delta", text="Hel")]


# --- Kept: the request as its kept frames show it ---------------------------------------


def test_nothing_kept_is_a_fresh_request() -> None:
    assert Kept.of([]) == Kept(S.ACCEPTED, 1, "")


def test_kept_frames_give_state_last_seq_and_answer() -> None:
    kept = Kept.of([*HELD, frame(4, "replace", text="Hi"), frame(5, "delta", text="!")])
    assert kept == Kept(S.STARTED, 5, "Hi!") and not kept.closed
    assert Kept.of([*HELD, frame(4, "end")]).closed
    assert Kept.of([*HELD, frame(4, "reset", reason="retry")]) == Kept(S.RESET, 4, "")


@given(st.permutations([*HELD, frame(4, "delta", text="lo")]), st.lists(st.integers(0, 3)))
def test_kept_frames_in_any_order_and_kept_twice_count_once(
    order: list[dict[str, Any]], twice: list[int]
) -> None:
    kept = Kept.of(order + [order[i] for i in twice])
    assert kept == Kept(S.STARTED, 4, "Hello")


# --- plan: the first move ---------------------------------------------------------------


def test_a_first_delivery_asks_dify() -> None:
    assert plan(Kept(), None, replay=False, stop_requested=False) == Plan(Action.ASK)


def test_a_closed_request_is_only_acked_unless_replayed() -> None:
    closed = Kept.of([*HELD, frame(4, "end")])
    assert plan(closed, IDS, replay=False, stop_requested=True).action is Action.CLOSED
    assert plan(closed, IDS, replay=True, stop_requested=False) == Plan(
        Action.ASK, "replayed", reopen=True
    )


def test_a_replayed_dead_letter_reopens_with_a_reset() -> None:
    dead = Kept.of([frame(1, "accepted"), frame(2, "queued"), frame(3, "error", code="x")])
    first = plan(dead, None, replay=True, stop_requested=False)
    assert first == Plan(Action.ASK, "replayed", reopen=True)
    frames = RequestFrames("r1", dead)
    assert frames.reset("replayed", reopen=True) == Reset(id="r1", seq=4, reason="replayed")
    assert frames.machine.state is S.RESET
    # What the next delivery of the replayed job reads back from the kept frames:
    again = Kept.of([*[frame(i, k) for i, k in enumerate(["accepted", "queued", "error"], 1)],
                     frame(4, "reset", reason="replayed"), frame(5, "start")])  # fmt: skip
    assert again.state is S.STARTED and again.last_seq == 5


def test_a_recorded_stop_closes_without_asking() -> None:
    assert plan(Kept(), None, replay=False, stop_requested=True) == Plan(Action.STOP)
    assert plan(Kept.of(HELD), IDS, replay=False, stop_requested=True) == Plan(Action.STOP)


def test_an_answer_dify_began_is_recovered_never_asked_twice() -> None:
    assert plan(Kept.of(HELD), IDS, replay=False, stop_requested=False) == Plan(Action.RECOVER)


@pytest.mark.parametrize(
    "ids", [DifyIds("t1", "m1", None), DifyIds(None, "m1", None)], ids=["no-conv", "no-task"]
)
def test_recorded_ids_without_a_conversation_reset_and_ask(ids: DifyIds) -> None:
    assert plan(Kept.of(HELD), ids, replay=False, stop_requested=False) == Plan(
        Action.ASK, "recovery_failed"
    )


def test_ids_recorded_but_no_start_kept_reset_and_ask() -> None:
    # Dify began, and the client may have seen frames the stream lost: start over, visibly.
    kept = Kept.of(HELD[:1])
    assert plan(kept, IDS, replay=False, stop_requested=False) == Plan(
        Action.ASK, "recovery_failed"
    )


def test_a_partial_answer_without_ids_is_reset_before_asking_again() -> None:
    assert plan(Kept.of(HELD), None, replay=False, stop_requested=False) == Plan(
        Action.ASK, "retry"
    )
    assert plan(Kept.of(HELD), IDS, replay=True, stop_requested=False) == Plan(
        Action.ASK, "replayed"
    )


@pytest.mark.parametrize("kind", ["queued", "reset"])
def test_waiting_or_reset_requests_are_asked_without_another_reset(kind: str) -> None:
    kept = Kept.of([frame(1, "accepted"), frame(2, kind, reason="x")])
    assert plan(kept, None, replay=False, stop_requested=False) == Plan(Action.ASK)


# --- judge_stream: what the end of Dify's stream means -------------------------------


def test_a_stream_that_ended_answered() -> None:
    verdict = judge_stream(None, started=True, message_id="m1")
    assert verdict.end is StreamEnd.ANSWERED and verdict.dify_up


def test_unavailable_before_anything_started_is_a_retry_and_a_breaker_failure() -> None:
    down = DifyUnavailable("down")
    verdict = judge_stream(down, started=False, message_id=None)
    assert (verdict.end, verdict.dify_up, verdict.error) == (StreamEnd.UNAVAILABLE, False, down)


def test_unavailable_after_start_fails_the_request() -> None:
    down = DifyUnavailable("late")
    verdict = judge_stream(down, started=True, message_id=None)
    assert (verdict.end, verdict.dify_up, verdict.error) == (StreamEnd.FAIL, True, down)


def test_a_cut_after_dify_named_the_message_is_recovered() -> None:
    cut = DifyStreamCut("cut")
    assert judge_stream(cut, started=True, message_id="m1").end is StreamEnd.RECOVER
    assert judge_stream(cut, started=True, message_id=None).end is StreamEnd.FAIL


@pytest.mark.parametrize("error", [DifyRejected("no"), DifyStreamError("in-band")])
def test_refusals_and_in_band_errors_fail_as_they_are(error: Exception) -> None:
    verdict = judge_stream(error, started=False, message_id=None)
    assert (verdict.end, verdict.error) == (StreamEnd.FAIL, error)


def test_a_bug_while_streaming_fails_as_an_internal_error() -> None:
    verdict = judge_stream(KeyError("x"), started=True, message_id="m1")
    assert verdict.end is StreamEnd.FAIL and isinstance(verdict.error, InternalError)


# --- after_unavailable: retry or dead letter -------------------------------------------


def test_retry_backs_off_by_attempt_while_the_breaker_is_closed() -> None:
    cause = DifyUnavailable("down", code=ErrorCode.DIFY_RATE_LIMITED)
    retry = after_unavailable(
        cause, attempt=2, age_s=1, policy=POLICY, breaker_wait_s=0, rng=random.Random(1)
    )
    assert isinstance(retry, Retry) and retry.reason == "dify_rate_limited"
    assert 0.8 <= retry.delay_s <= 1.2


def test_an_open_circuit_says_so_and_waits_for_the_probe() -> None:
    cause = CircuitOpen("circuit open")
    retry = after_unavailable(cause, attempt=1, age_s=1, policy=POLICY, breaker_wait_s=3.5)
    assert retry == Retry(3.5, "circuit_open", cause)
    assert cause.code is ErrorCode.UPSTREAM_UNAVAILABLE  # what the metrics count it as


@given(st.integers(1, 10), st.floats(0, 1000), st.floats(0, 30))
def test_dead_letter_exactly_when_attempts_or_age_run_out(
    attempt: int, age_s: float, wait_s: float
) -> None:
    decision = after_unavailable(
        DifyUnavailable("down"), attempt=attempt, age_s=age_s, policy=POLICY, breaker_wait_s=wait_s
    )
    exhausted = attempt >= POLICY.max_attempts or age_s >= POLICY.max_age_s
    assert isinstance(decision, DeadLetter) is exhausted
    if isinstance(decision, DeadLetter):
        assert decision.error.code is ErrorCode.UPSTREAM_UNAVAILABLE and decision.error.retryable
        assert f"{attempt} attempts" in decision.error.message
    else:
        assert decision.delay_s > 0 and (not wait_s or decision.delay_s == wait_s)


# --- RequestFrames: the worker's own frames, through the table --------------------------


def test_own_frames_continue_the_kept_seq() -> None:
    frames = RequestFrames("r1", Kept.of(HELD))
    reset = frames.reset("retry")
    queued = frames.queued("busy", attempt=1, retry_in_ms=5000, position=2)
    error = frames.error(DifyUnavailable("down"))
    assert (reset, queued) == (
        Reset(id="r1", seq=4, reason="retry"),
        Queued(id="r1", seq=5, reason="busy", attempt=1, retry_in_ms=5000, position=2),
    )
    assert isinstance(error, ErrorFrame) and error.seq == 6 and frames.machine.done


def test_own_frames_refuse_what_the_table_refuses() -> None:
    started = RequestFrames("r1", Kept.of(HELD))
    with pytest.raises(IllegalTransition):
        started.queued("busy", attempt=1, retry_in_ms=1)  # no waiting once Dify answers
    closed = RequestFrames("r1", Kept.of([*HELD, frame(4, "end")]))
    with pytest.raises(IllegalTransition):
        closed.error(DifyUnavailable("down"))  # exactly one end or error
    assert closed.seq.last == 4


def history(answer: str, status: str | None = "normal") -> HistoryMessage:
    return HistoryMessage(answer=answer, status=status, retriever_resources=[{"doc": 1}])


def test_history_that_continues_the_answer_sends_the_tail_then_end() -> None:
    out = RequestFrames("r1", Kept.of(HELD)).from_history(
        history("Hello"), held="Hel", ids=IDS, stopped=False
    )
    assert out is not None
    assert_frames(out, "delta", "end")
    assert out[0] == Delta(id="r1", seq=4, text="lo")
    assert isinstance(out[1], End) and out[1].seq == 5 and out[1].message_id == "m1"
    assert out[1].retriever_resources == [{"doc": 1}] and not out[1].stopped
    assert answer_of([*HELD, *(vars_of(f) for f in out)]) == "Hello"


def test_history_that_holds_exactly_the_answer_sends_only_end() -> None:
    out = RequestFrames("r1", Kept.of(HELD)).from_history(
        history("Hel", "stopped"), held="Hel", ids=IDS, stopped=False
    )
    assert out is not None
    assert_frames(out, "end")
    assert isinstance(out[0], End) and out[0].stopped


def test_history_that_disagrees_replaces_the_answer() -> None:
    out = RequestFrames("r1", Kept.of(HELD)).from_history(
        history("[moderated]"), held="Hel", ids=IDS, stopped=True
    )
    assert out is not None
    assert_frames(out, "replace", "end")
    assert isinstance(out[1], End) and out[1].stopped


@pytest.mark.parametrize("message", [history("", "error"), history("", "generating")])
def test_history_that_failed_or_is_unfinished_cannot_finish_it(message: HistoryMessage) -> None:
    frames = RequestFrames("r1", Kept.of(HELD))
    assert frames.from_history(message, held="Hel", ids=IDS, stopped=False) is None
    assert frames.seq.last == 3 and frames.machine.state is S.STARTED


def test_history_cannot_finish_a_request_that_never_started() -> None:
    frames = RequestFrames("r1", Kept.of(HELD[:1]))
    assert frames.from_history(history("Hello"), held="", ids=IDS, stopped=False) is None


def vars_of(f: Any) -> dict[str, Any]:
    return {"type": f.type, **{k: getattr(f, k) for k in ("text",) if hasattr(f, k)}}


# --- settling and counting --------------------------------------------------------------


def test_settlements() -> None:
    assert Settlement(Settle.ACK) == ACK and Settlement(Settle.LEAVE) == LEAVE
    assert Settlement(Settle.NAK, 0.0) == HAND_BACK
    assert settlement_after_failure(InternalError("nats blinked")) == Settlement(Settle.NAK, 1.0)
    assert settlement_after_failure(RuntimeError("bug")) == Settlement(Settle.NAK, 2.0)


def test_outcome_follows_the_closing_frame_and_a_dead_letter_stays_one() -> None:
    end = End(id="r1", seq=2, conversation_id=None, message_id=None)
    stopped = End(id="r1", seq=2, conversation_id=None, message_id=None, stopped=True)
    error = ErrorFrame(code="x", message="y", retryable=False, id="r1", seq=2)
    delta = Delta(id="r1", seq=2, text="a")
    assert outcome_after(Outcome.COMPLETED, delta) is Outcome.COMPLETED
    assert outcome_after(Outcome.COMPLETED, end) is Outcome.COMPLETED
    assert outcome_after(Outcome.COMPLETED, stopped) is Outcome.STOPPED
    assert outcome_after(Outcome.COMPLETED, error) is Outcome.ERROR
    assert outcome_after(Outcome.DEAD_LETTERED, error) is Outcome.DEAD_LETTERED
    assert final_outcome(HAND_BACK, Outcome.COMPLETED) is Outcome.HANDED_BACK
    assert final_outcome(LEAVE, Outcome.COMPLETED) is Outcome.DROPPED
    assert final_outcome(ACK, Outcome.STOPPED) is Outcome.STOPPED


def test_status_record_is_what_tokenwire_jobs_reads() -> None:
    record = status_record(JobStatus.QUEUED, attempt=2, worker="w", now_ms=5, error="down")
    assert record == {
        "state": "queued",
        "attempts": 2,
        "last_error": "down",
        "worker": "w",
        "updated_ms": 5,
    }
