"""Issue 14's pure parts: the apps table, app kinds and routes, workflow and human-input
mapping, the pause record, the plan for runs, and the session's `run` and `input`."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.apps import (
    AppKind,
    AppSpec,
    app_table,
    kind_of,
    route_for,
)
from shared.delivery import Action, Kept, plan
from shared.dify_api import DifyIds, form_rejection, request_body
from shared.exceptions import ErrorCode, FormClosed, NotFound, WrongAppKind
from shared.frames import ClientLimits, InputFrame, RunFrame, decode_client_frame
from shared.human_input import (
    IllegalPauseMove,
    InputRequest,
    Pause,
    PauseState,
    decode_input_reply,
    input_reply,
)
from shared.jobs import Job
from shared.mapping import DifyStreamMapper, scrub_tokens
from shared.sequencing import SeqCounter
from shared.session import (
    CheckRate,
    Send,
    Session,
    SessionConfig,
    StoreJob,
    SubmitInput,
    SubscribeConnection,
)
from shared.settings import Settings
from shared.state import RequestMachine, RequestState
from shared.subjects import request_frames, request_key
from tests.unit.helpers import answer_of, assert_frames

# --- apps ------------------------------------------------------------------------------


def test_the_apps_table_takes_both_forms_and_the_default_app() -> None:
    settings = Settings(
        dify_api_url="http://dify.local/v1/",
        dify_api_key="app-default",
        dify_apps={
            "sales": "app-sales",
            "flows": {"url": "http://other/v1/", "key": "app-flows", "max_active": 2},
        },
    )
    table = app_table(settings)
    assert set(table) == {"default", "sales", "flows"}
    assert table["default"].url == "http://dify.local/v1"
    assert table["sales"].url == "http://dify.local/v1" and table["sales"].max_active is None
    assert table["flows"].url == "http://other/v1" and table["flows"].max_active == 2
    assert table["flows"].key.get_secret_value() == "app-flows"
    assert "app-flows" not in repr(table) and "app-flows" not in repr(settings)


def test_the_apps_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    path = tmp_path / "apps.json"
    path.write_text(json.dumps({"a": "app-file", "b": {"key": "app-b", "max_active": 1}}))
    settings = Settings(dify_apps_file=path, dify_apps={"a": "app-env"})
    table = app_table(settings)
    assert table["a"].key.get_secret_value() == "app-env"
    assert table["b"].max_active == 1
    assert isinstance(settings.dify_apps["b"], AppSpec)


ONE_SHOT = {AppKind.COMPLETION, AppKind.WORKFLOW}


@pytest.mark.parametrize("kind", list(AppKind))
@pytest.mark.parametrize("request_kind", ["chat", "run"])
def test_route_for_every_kind_and_request(kind: AppKind, request_kind: str) -> None:
    fits = (request_kind == "run") == (kind in ONE_SHOT)
    if not fits:
        with pytest.raises(WrongAppKind) as info:
            route_for(kind, request_kind, "x")
        assert info.value.code is ErrorCode.WRONG_APP_KIND
        return
    route = route_for(kind, request_kind, "x")
    assert route.one_shot == (kind in ONE_SHOT)
    expected = {
        AppKind.COMPLETION: ("/completion-messages", "/completion-messages/T/stop"),
        AppKind.WORKFLOW: ("/workflows/run", "/workflows/tasks/T/stop"),
    }.get(kind, ("/chat-messages", "/chat-messages/T/stop"))
    assert (route.path, route.stop_path("T")) == expected


def test_a_kind_dify_does_not_name_follows_the_request() -> None:
    assert kind_of({"name": "old dify"}) is None and kind_of({"mode": "???"}) is None
    assert kind_of({"mode": "agent"}) is AppKind.AGENT
    assert route_for(None, "chat", "x").kind is AppKind.CHAT
    assert route_for(None, "run", "x").kind is AppKind.WORKFLOW


def job(**kw: Any) -> Job:
    base: dict[str, Any] = {
        "key": "k",
        "id": "r1",
        "user": "u",
        "conn": "c",
        "reply": request_frames("gw", "c", "k", partitions=1),
        "query": "q",
        "trace_id": "t",
        "created_ms": 1,
    }
    return Job(**(base | kw))


def test_request_bodies_per_kind() -> None:
    j = job(kind="run", inputs={"a": 1}, files=[{"type": "image"}], conversation_id=None)
    assert request_body(j, AppKind.WORKFLOW) == {
        "inputs": {"a": 1},
        "response_mode": "streaming",
        "user": "u",
        "files": [{"type": "image"}],
    }
    assert request_body(j, AppKind.COMPLETION)["query"] == "q"
    assert "conversation_id" not in request_body(j, AppKind.COMPLETION)
    assert request_body(job(), AppKind.CHAT)["auto_generate_name"] is True


def test_closed_forms_become_form_expired_and_form_submitted() -> None:
    def body(code: str) -> bytes:
        return orjson.dumps({"code": code, "message": "m", "status": 412})

    expired = form_rejection(412, body("human_input_form_expired"))
    submitted = form_rejection(412, body("human_input_form_submitted"))
    assert isinstance(expired, FormClosed) and expired.code is ErrorCode.FORM_EXPIRED
    assert isinstance(submitted, FormClosed) and submitted.code is ErrorCode.FORM_SUBMITTED
    assert isinstance(form_rejection(404, body("not_found")), NotFound)


# --- workflow mapping ------------------------------------------------------------------

RUN = {"workflow_run_id": "wr-1", "task_id": "t-1"}


def wf(name: str, **fields: Any) -> dict[str, Any]:
    return {"event": name, **RUN, **fields}


def test_a_workflow_run_maps_text_chunks_and_ends_with_its_outputs() -> None:
    mapper = DifyStreamMapper("r1", SeqCounter(1), workflow=True)
    frames = []
    for event in [
        wf("workflow_started", data={"id": "wr-1"}),
        wf("node_started", data={"node_id": "n"}),
        wf("text_chunk", data={"text": "Hel"}),
        wf("text_chunk", data={"text": "lo"}),
        wf("node_finished", data={"node_id": "n"}),
        wf("workflow_finished", data={"status": "succeeded", "outputs": {"answer": "Hello"}}),
    ]:
        frames += mapper.feed_event(event)
    frames += mapper.finish()
    assert_frames(frames, "start", "event", "event", "delta", "delta", "event", "end")
    end = frames[-1]
    assert end.outputs == {"answer": "Hello"} and end.status == "succeeded"
    assert end.workflow_run_id == "wr-1" and not end.stopped
    assert answer_of(frames) == "Hello"
    assert mapper.ids() == DifyIds("t-1", None, None, "wr-1")


def test_a_chat_end_carries_no_run_fields() -> None:
    mapper = DifyStreamMapper("r1", SeqCounter(1))
    mapper.feed_event({"event": "message", "answer": "x", "message_id": "m"})
    mapper.feed_event({"event": "message_end", "message_id": "m"})
    (end,) = mapper.finish()
    assert (end.outputs, end.status, end.workflow_run_id) == (None, None, None)


def test_a_stopped_workflow_ends_stopped() -> None:
    mapper = DifyStreamMapper("r1", SeqCounter(1), workflow=True)
    mapper.feed_event(wf("workflow_started"))
    mapper.feed_event(wf("workflow_finished", data={"status": "stopped", "outputs": {}}))
    (end,) = mapper.finish()
    assert end.stopped and end.status == "stopped"


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "form_token", "data", "b"]), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(_json)
def test_no_form_token_survives_scrubbing(value: Any) -> None:
    assert b'"form_token"' not in orjson.dumps(scrub_tokens(value))


def form_events(token: str = "SECRET-TOKEN") -> list[dict[str, Any]]:
    definition = {"form_id": "f-1", "node_id": "n-h", "form_token": token, "actions": []}
    return [
        wf("workflow_started"),
        wf("human_input_required", data={**definition, "expiration_time": 99}),
        wf("workflow_paused", data={"reasons": [{"TYPE": "human_input_required", **definition}]}),
    ]


def test_a_paused_run_keeps_its_form_and_leaves_the_request_open() -> None:
    mapper = DifyStreamMapper("r1", SeqCounter(1), workflow=True)
    frames = []
    for event in form_events():
        frames += mapper.feed_event(event)
    assert b"SECRET-TOKEN" not in orjson.dumps(frames)
    assert mapper.paused and mapper.finish() == [] and not mapper.machine.done
    (form,) = mapper.take_forms()
    assert (form.form_id, form.form_token, form.expiration_time) == ("f-1", "SECRET-TOKEN", 99)
    assert mapper.take_forms() == []


def test_following_a_paused_run_drops_the_replayed_pause_then_streams_the_rest() -> None:
    kept = Kept(RequestState.STARTED, 5, "", waiting=True)
    mapper = DifyStreamMapper(
        "r1",
        SeqCounter(kept.last_seq),
        machine=_started(),
        workflow=True,
        ids=DifyIds("t-1", None, None, "wr-1"),
        skip_pause=kept.waiting,
    )
    frames = []
    for event in form_events()[1:]:  # Dify replays the pause's announcement
        frames += mapper.feed_event(event)
    assert frames == [] and mapper.take_forms() == []
    for event in [
        wf("human_input_form_filled", data={"action_id": "approve"}),
        wf("text_chunk", data={"text": "ok"}),
        wf("workflow_finished", data={"status": "succeeded", "outputs": {"a": 1}}),
    ]:
        frames += mapper.feed_event(event)
    frames += mapper.finish()
    assert_frames(frames, "event", "delta", "end")
    assert frames[0].seq == 6


def _started() -> RequestMachine:
    return RequestMachine(RequestState.STARTED)


@given(st.integers(min_value=0, max_value=6), st.integers(min_value=0, max_value=12))
def test_following_a_running_run_skips_exactly_what_the_client_holds(
    held_events: int, held_chars: int
) -> None:
    """Dify replays the run's current part; the client holds a prefix of it."""
    text = "abcdefghijkl"
    events = [wf("node_started", data={"i": i}) for i in range(6)]
    script: list[dict[str, Any]] = []
    for i, event in enumerate(events):
        script.append(event)
        script.append(wf("text_chunk", data={"text": text[2 * i : 2 * i + 2]}))
    mapper = DifyStreamMapper(
        "r1",
        SeqCounter(9),
        machine=_started(),
        workflow=True,
        skip_events=held_events,
        skip_text=held_chars,
    )
    frames = []
    for event in script:
        frames += mapper.feed_event(event)
    assert len([f for f in frames if f.type == "event"]) == 6 - held_events
    assert "".join(f.text for f in frames if f.type == "delta") == text[held_chars:]


def test_a_run_that_finished_before_it_was_followed_completes_from_its_outputs() -> None:
    mapper = DifyStreamMapper(
        "r1", SeqCounter(7), machine=_started(), workflow=True, held="Hello, wo"
    )
    outputs = {"count": 3, "answer": "Hello, world"}
    frames = mapper.feed_event(
        wf("workflow_finished", data={"status": "succeeded", "outputs": outputs})
    )
    frames += mapper.finish()
    assert_frames(frames, "delta", "end")
    assert frames[0].text == "rld" and frames[1].outputs == outputs
    # Replayed events first: the stream carries the text itself, nothing is taken from outputs.
    live = DifyStreamMapper("r1", SeqCounter(7), machine=_started(), workflow=True, held="He")
    frames = live.feed_event(wf("text_chunk", data={"text": "llo"}))
    frames += live.feed_event(wf("workflow_finished", data={"outputs": {"answer": "Hello"}}))
    assert [f.text for f in frames if f.type == "delta"] == ["llo"]


def test_kept_frames_give_the_run_part_and_whether_it_waits() -> None:
    frames: list[dict[str, Any]] = [
        {"type": "accepted", "seq": 1},
        {"type": "start", "seq": 2},
        {"type": "event", "seq": 3, "event": "workflow_started"},
        {"type": "delta", "seq": 4, "text": "abc"},
        {"type": "event", "seq": 5, "event": "human_input_required"},
        {"type": "event", "seq": 6, "event": "workflow_paused"},
    ]
    kept = Kept.of(frames)
    assert kept.waiting and (kept.part_events, kept.part_text) == (3, 3)
    frames += [
        {"type": "event", "seq": 7, "event": "human_input_form_filled"},
        {"type": "delta", "seq": 8, "text": "de"},
    ]
    kept = Kept.of(frames)
    assert not kept.waiting and (kept.part_events, kept.part_text) == (1, 2)


# --- newer agent mode ------------------------------------------------------------------


@given(st.text(min_size=1, max_size=30), st.data())
def test_the_newer_agent_mode_answer_is_never_doubled(answer: str, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(answer) - 1)), max_size=5)))
    parts = [answer[a:b] for a, b in itertools.pairwise([0, *cuts, len(answer)]) if answer[a:b]]
    mapper = DifyStreamMapper("r1", SeqCounter(1))
    frames = []
    envelope = {"message_id": "m", "conversation_id": "c", "task_id": "t"}
    frames += mapper.feed_event({"event": "agent_thought", "id": "th", **envelope})
    for part in parts:
        frames += mapper.feed_event({"event": "agent_message", "answer": part, **envelope})
    frames += mapper.feed_event({"event": "message", "answer": answer, **envelope})
    frames += mapper.feed_event({"event": "message_end", **envelope})
    frames += mapper.finish()
    assert answer_of(frames) == answer == mapper.answer


def test_a_closing_message_that_differs_replaces_the_answer() -> None:
    mapper = DifyStreamMapper("r1", SeqCounter(1))
    frames = mapper.feed_event({"event": "agent_message", "answer": "draft", "message_id": "m"})
    frames += mapper.feed_event({"event": "message", "answer": "final", "message_id": "m"})
    assert frames[-1].type == "replace" and answer_of(frames) == "final"


# --- the pause record ------------------------------------------------------------------


def pause(**kw: Any) -> Pause:
    return Pause(job=job(kind="run"), form_id="f", form_token="tok", **kw)


def test_a_pause_moves_once_and_only_its_next_copy_submits() -> None:
    waiting = pause(continued=2)
    answered = waiting.move("answer", {"inputs": {}, "action": "ok"})
    assert answered.state is PauseState.ANSWERED
    with pytest.raises(IllegalPauseMove):
        answered.move("stop")
    assert waiting.move("stop").state is PauseState.STOPPING
    nxt = answered.next_job()
    assert nxt.continued == 3 and answered.next_msg_id() == "k.c3"
    assert answered.answer_for(nxt) == {"inputs": {}, "action": "ok"}
    assert answered.answer_for(job(continued=2)) is None
    assert waiting.answer_for(nxt) is None
    assert Pause.from_bytes(answered.to_bytes()) == answered
    assert Pause.from_bytes(b"nope") is None


def test_input_replies_round_trip() -> None:
    assert decode_input_reply(input_reply()) is None
    error = decode_input_reply(input_reply(FormClosed("x", code=ErrorCode.FORM_SUBMITTED)))
    assert error is not None and error.code is ErrorCode.FORM_SUBMITTED
    request = InputRequest(key="k", form_id="f", action="a", inputs={"c": 1})
    assert InputRequest.from_bytes(request.to_bytes()) == request


# --- the plan of a run's delivery ------------------------------------------------------


def test_plan_waits_follows_and_stops() -> None:
    started = Kept.of([{"type": "start", "seq": 2}])
    ids = DifyIds("t", None, None, "wr")
    assert plan(started, ids, replay=False, stop_requested=False, waiting=True).action is (
        Action.WAIT
    )
    assert plan(started, ids, replay=False, stop_requested=False).action is Action.FOLLOW
    assert plan(started, ids, replay=False, stop_requested=True).action is Action.STOP
    chat_ids = DifyIds("t", "m", "c")
    assert plan(started, chat_ids, replay=False, stop_requested=False).action is Action.RECOVER
    completion = DifyIds("t", "m", None)
    first = plan(started, completion, replay=False, stop_requested=False)
    assert first.action is Action.ASK and first.reset == "recovery_failed"


# --- client frames and the session -----------------------------------------------------


def test_run_and_input_frames_are_decoded_with_the_limits() -> None:
    limits = ClientLimits(max_inputs_bytes=64)
    frame = decode_client_frame(b'{"type":"run","id":"r","inputs":{"a":1},"app":"wf"}', limits)
    assert isinstance(frame, RunFrame) and frame.query == ""
    answer = decode_client_frame(
        b'{"type":"input","id":"r","form_id":"f","action":"ok","inputs":{"c":"x"}}', limits
    )
    assert isinstance(answer, InputFrame)
    with pytest.raises(Exception, match="inputs"):
        decode_client_frame(
            orjson.dumps({"type": "run", "id": "r", "inputs": {"a": "x" * 99}}), limits
        )


def opened() -> Session:
    session = Session(
        SessionConfig(frame_rate="1000/s", frame_burst=1000),
        conn_id="conn",
        user="alice",
        expires_at=None,
        now=0.0,
    )
    assert session.start() == [SubscribeConnection("conn")]
    hello = orjson.loads(next(c for c in session.subscribed() if isinstance(c, Send)).data)
    assert {"run", "input"} <= set(hello["features"])
    return session


def test_a_run_becomes_a_run_job() -> None:
    session = opened()
    out = session.receive_client('{"type":"run","id":"r1","inputs":{"x":1},"app":"wf"}', 0.0)
    assert CheckRate("r1") in out
    (store,) = [c for c in session.rate_checked("r1", 0.0) if isinstance(c, StoreJob)]
    assert (store.job.kind, store.job.inputs, store.job.app) == ("run", {"x": 1}, "wf")
    assert store.job.conversation_id is None and store.job.query == ""


def test_an_input_goes_to_a_worker_under_the_users_own_key() -> None:
    session = opened()
    frame = '{"type":"input","id":"r1","form_id":"f","action":"ok","inputs":{"c":1}}'
    (submit,) = [c for c in session.receive_client(frame, 0.0) if isinstance(c, SubmitInput)]
    assert submit.key == request_key("alice", "r1") != request_key("mallory", "r1")
    again = session.receive_client(frame, 0.0)
    assert [orjson.loads(c.data)["code"] for c in again if isinstance(c, Send)] == ["duplicate_id"]
    refused = session.input_answered("r1", 1.0, NotFound("no such form"))
    (error,) = [orjson.loads(c.data) for c in refused if isinstance(c, Send)]
    assert error == {
        "type": "error",
        "code": "not_found",
        "message": "no such form",
        "retryable": False,
        "id": "r1",
    }
    assert not [c for c in session.input_answered("r1", 1.0) if isinstance(c, Send)]
