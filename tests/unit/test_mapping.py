"""Dify events → frames: every event kind, ids, endings, and the state machine's guard."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.exceptions import DifyStreamCut, DifyUnavailable
from shared.mapping import DifyStreamMapper
from shared.sequencing import SeqCounter
from shared.sse import SSEEvent
from tests.unit.helpers import answer_of, assert_frames, seqs_of

ENVELOPE = {"conversation_id": "c-1", "message_id": "m-1", "task_id": "t-1", "created_at": 1}


def ev(name: str, **fields: object) -> SSEEvent:
    return SSEEvent(
        event="",
        data=orjson.dumps({"event": name, **ENVELOPE, **fields}).decode(),
        id=None,
        retry=None,
    )


PING = SSEEvent(event="ping", data="", id=None, retry=None)


def run(events: list[SSEEvent]) -> tuple[DifyStreamMapper, list]:
    mapper = DifyStreamMapper("r1", SeqCounter(1))
    frames = []
    for e in events:
        frames += mapper.feed(e)
    return mapper, frames


def test_plain_chat_maps_to_start_deltas_end_with_usage() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "total_price": "0.001"}
    mapper, frames = run(
        [
            PING,
            ev("message", answer="Hel"),
            PING,
            ev("message", answer="lo"),
            ev("message_end", metadata={"usage": usage, "retriever_resources": [{"position": 1}]}),
        ]
    )
    frames += mapper.finish()
    assert_frames(frames, "start", "delta", "delta", "end")
    start, end = frames[0], frames[-1]
    assert (start.conversation_id, start.message_id, start.task_id) == ("c-1", "m-1", "t-1")
    assert end.usage == usage and end.retriever_resources == [{"position": 1}] and not end.stopped
    assert answer_of(frames) == "Hello"
    assert seqs_of(frames) == [2, 3, 4, 5]  # accepted is 1


def test_end_waits_for_eof_so_tts_after_message_end_is_delivered() -> None:
    mapper, frames = run(
        [
            ev("message", answer="a"),
            ev("message_end", metadata={}),
            ev("tts_message", audio="AAA"),
            ev("tts_message_end", audio=""),
        ]
    )
    assert_frames(frames, "start", "delta", "event", "event")
    assert frames[2].event == "tts_message" and frames[2].data["audio"] == "AAA"
    assert_frames(mapper.finish(), "end")


def test_agent_and_workflow_events_pass_through_and_text_chunk_is_delta() -> None:
    mapper, frames = run(
        [
            ev("workflow_started", workflow_run_id="w", data={"id": "w"}),
            ev("agent_thought", id="th", thought="think", position=1),
            ev("agent_message", answer="A"),
            ev("text_chunk", data={"text": "B"}),
            ev("message_file", id="f", type="image", url="http://x/f.png", belongs_to="assistant"),
            ev("node_finished", data={"node_id": "n"}),
            ev("some_future_event", data={"x": 1}),
            ev("workflow_finished", data={"status": "succeeded"}),
        ]
    )
    assert_frames(
        frames, "start", "event", "event", "delta", "delta", "event", "event", "event", "event"
    )
    assert [f.event for f in frames if f.type == "event"] == [
        "workflow_started",
        "agent_thought",
        "message_file",
        "node_finished",
        "some_future_event",
        "workflow_finished",
    ]
    assert frames[2].data["thought"] == "think" and "event" not in frames[2].data
    assert answer_of(frames) == "AB"
    assert_frames(mapper.finish(), "end")  # workflow_finished completes a workflow app


def test_message_replace_replaces_the_whole_answer() -> None:
    mapper, frames = run(
        [
            ev("message", answer="bad words"),
            ev("message_replace", answer="[removed]"),
            ev("message_end", metadata={}),
        ]
    )
    frames += mapper.finish()
    assert_frames(frames, "start", "delta", "replace", "end")
    assert answer_of(frames) == "[removed]" == mapper.answer


def test_in_band_error_closes_the_request_and_nothing_follows() -> None:
    mapper, frames = run(
        [
            ev("message", answer="x"),
            SSEEvent(
                event="",
                data=orjson.dumps(
                    {
                        "event": "error",
                        "code": "completion_request_error",
                        "message": "model down",
                        "status": 400,
                    }
                ).decode(),
                id=None,
                retry=None,
            ),
            ev("message", answer="late"),
        ]
    )
    assert_frames(frames, "start", "delta", "error")
    assert frames[-1].code == "upstream_error" and "model down" in frames[-1].message
    assert frames[-1].retryable is False
    assert mapper.finish() == [] and mapper.stopped() == []


def test_error_as_first_event_has_no_start() -> None:
    mapper = DifyStreamMapper("r1", SeqCounter(1))
    frames = mapper.feed_event(
        {"event": "error", "code": "internal_server_error", "message": "boom", "status": 500}
    )
    assert_frames(frames, "error")
    assert frames[0].retryable is True and frames[0].seq == 2


def test_eof_before_completion_is_a_cut() -> None:
    mapper, _ = run([ev("message", answer="half")])
    with pytest.raises(DifyStreamCut):
        mapper.finish()
    assert_frames(mapper.fail(DifyStreamCut("cut")), "error")


def test_stop_ends_with_stopped_and_nothing_after() -> None:
    mapper, frames = run([ev("message", answer="a")])
    frames += mapper.stopped()
    assert_frames(frames, "start", "delta", "end")
    assert frames[-1].stopped is True and frames[-1].conversation_id == "c-1"
    assert mapper.feed(ev("message", answer="late")) == []
    assert mapper.stopped() == [] and mapper.fail(DifyUnavailable("x")) == []


def test_stop_before_dify_answered_is_a_stopped_end_without_start() -> None:
    mapper = DifyStreamMapper("r1", SeqCounter(1))
    assert_frames(mapper.stopped(), "end")


def test_empty_answers_are_not_sent_and_pings_are_dropped() -> None:
    _, frames = run([PING, ev("message", answer=""), PING])
    assert_frames(frames, "start")


@given(st.lists(st.text(min_size=0, max_size=8), max_size=30))
def test_deltas_concatenate_to_the_answer(parts: list[str]) -> None:
    mapper, frames = run(
        [ev("message", answer=p) for p in parts] + [ev("message_end", metadata={})]
    )
    frames += mapper.finish()
    assert answer_of(frames) == "".join(parts) == mapper.answer
    assert seqs_of(frames) == list(range(2, 2 + len(frames)))
