"""The simulator's pure parts beyond chat: workflow and human-input scripts, completion frames,
the app table, the multipart reader, and every frame against Dify's OpenAPI shapes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwire.simulator.apps import (
    DEFAULT_APP,
    DEMO_APPS,
    AppsError,
    AppSpec,
    app_info,
    app_meta,
    app_parameters,
    app_site,
    parse_apps,
)
from tokenwire.simulator.conformance import event_schema, problems
from tokenwire.simulator.media import file_category, speech_of, transcript_of
from tokenwire.simulator.multipart import MultipartError, parse_form
from tokenwire.simulator.openapi_table import SCHEMAS
from tokenwire.simulator.scenarios import (
    SCENARIOS,
    WORKFLOW_SCENARIOS,
    ControlsError,
    Drop,
    Emit,
    SimConfig,
    SimControls,
    Stall,
    StreamIds,
    build_script,
    expected_final_answer,
    parse_controls,
    stopped_events,
)
from tokenwire.simulator.workflows import (
    DEFAULT_FORM_EXPIRY_S,
    Filled,
    FlowStep,
    Pause,
    TimedOut,
    as_completion_event,
    build_flow,
    expected_workflow_answer,
    expected_workflow_outputs,
    run_id_of,
    stopped_flow_events,
    workflow_seed,
)

IDS = StreamIds(
    task_id="7d6f0a8e-1b2c-4d3e-8f4a-5b6c7d8e9f00",
    message_id="0e1d2c3b-4a59-4687-9a8b-7c6d5e4f3a21",
    conversation_id="a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d",
    created_at=1_700_000_000,
)
CONFIG = SimConfig(token_delay_ms=10, tokens=12)
NOW = 1_700_000_000.25
WF_ENVELOPE = ("event", "task_id", "workflow_run_id")


def controls(**tw_sim: Any) -> SimControls:
    tw_sim.setdefault("scenario", "workflow")
    return parse_controls("", {"tw_sim": tw_sim})


def flow(inputs: dict[str, Any] | None = None, **tw_sim: Any) -> list[FlowStep]:
    return build_flow(
        IDS, "workflow", inputs or {"query": "hello"}, controls(**tw_sim), CONFIG,
        form_token="tok", now=NOW,
    )  # fmt: skip


def names(steps: list[Any]) -> list[str]:
    return [s.name if isinstance(s, Emit) else type(s).__name__ for s in steps]


def text_of(steps: list[Any]) -> str:
    answer = ""
    for step in steps:
        if isinstance(step, Emit):
            answer = step.apply_to(answer)
    return answer


def assert_conforms(kind: Any, steps: list[Any]) -> None:
    for step in steps:
        if not isinstance(step, Emit):
            continue
        schema = event_schema(kind, step.name)
        assert schema is not None, f"{step.name} has no documented {kind} schema"
        assert problems(step.event, schema) == [], (step.name, problems(step.event, schema))


# --------------------------------------------------------------------------- workflow scripts


def test_workflow_streams_nodes_then_text_chunks_then_finished() -> None:
    steps = flow()
    assert names(steps)[0] == "workflow_started"
    assert names(steps)[-1] == "workflow_finished"
    assert names(steps).count("node_started") == names(steps).count("node_finished") == 3
    chunks = [s for s in steps if isinstance(s, Emit) and s.name == "text_chunk"]
    assert len(chunks) == 12
    assert text_of(steps) == expected_workflow_answer({"query": "hello"}, tokens=12)
    finished = steps[-1]
    assert isinstance(finished, Emit)
    data = finished.event["data"]
    assert data["status"] == "succeeded" and data["id"] == run_id_of(IDS)
    assert data["outputs"] == expected_workflow_outputs({"query": "hello"}, tokens=12)
    for step in steps:
        assert isinstance(step, Emit)
        assert list(step.event)[:3] == list(WF_ENVELOPE)
        assert step.event["task_id"] == IDS.task_id
        assert "conversation_id" not in step.event and "message_id" not in step.event
    assert_conforms("workflow", steps)


@pytest.mark.parametrize("scenario", ["iteration", "loop"])
@pytest.mark.parametrize("rounds", [1, 3, 5])
def test_iteration_and_loop_rounds(scenario: str, rounds: int) -> None:
    steps = flow(scenario=scenario, iterations=rounds)
    shape = names(steps)
    assert shape.count(f"{scenario}_started") == shape.count(f"{scenario}_completed") == 1
    assert shape.count(f"{scenario}_next") == rounds
    inner = [
        s.event["data"]
        for s in steps
        if isinstance(s, Emit)
        and s.name == "node_started"
        and s.event["data"]["node_id"] == "summarise"
    ]
    assert len(inner) == rounds
    assert len({d["id"] for d in inner}) == rounds, "each round is its own node execution"
    assert {d[f"{scenario}_id"] for d in inner} == {scenario}
    outputs = expected_workflow_outputs(
        {"query": "hello"}, {"scenario": scenario, "iterations": rounds}, tokens=12
    )
    last = steps[-1]
    assert isinstance(last, Emit) and last.event["data"]["outputs"] == outputs
    assert len(outputs["items"]) == rounds
    assert_conforms("workflow", steps)


def test_workflow_text_comes_from_inputs() -> None:
    assert workflow_seed({"query": "q", "tw_sim": {}}) == "q"
    assert workflow_seed({"b": 1, "a": 2, "tw_sim": {"tokens": 3}}) == '{"a":2,"b":1}'
    one = text_of(flow({"query": "one"}))
    two = text_of(flow({"query": "two"}))
    assert one != two


@pytest.mark.parametrize("fault", ["error_event", "cut", "stall"])
def test_workflow_faults_after_the_nth_chunk(fault: str) -> None:
    steps = flow(fault=fault, cut_after=3)
    chunks_before = 0
    for step in steps:
        if isinstance(step, Drop | Stall) or (isinstance(step, Emit) and step.name == "error"):
            break
        chunks_before += isinstance(step, Emit) and step.name == "text_chunk"
    assert chunks_before == 3
    if fault == "error_event":
        error = steps[-1]
        assert isinstance(error, Emit) and error.name == "error"
        assert set(error.event) == {*WF_ENVELOPE, "status", "code", "message"}
        failed = steps[-2]
        assert isinstance(failed, Emit) and failed.name == "workflow_finished"
        assert failed.event["data"]["status"] == "failed"
        assert failed.event["data"]["error"] == error.event["message"]
        assert_conforms("workflow", steps)
    elif fault == "stall":
        assert isinstance(steps[-1], Stall)
    else:
        assert any(isinstance(s, Drop) for s in steps) and names(steps)[-1] == "workflow_finished"


def test_stopped_workflow_finishes_with_status_stopped() -> None:
    events = stopped_flow_events(
        IDS, "workflow", query="", completion_tokens=2, total_steps=2, elapsed_s=0.5
    )
    assert [e["event"] for e in events] == ["workflow_finished"]
    assert events[0]["data"]["status"] == "stopped"
    chat = stopped_flow_events(
        IDS, "chatflow", query="q", completion_tokens=2, total_steps=2, elapsed_s=0.5
    )
    assert [e["event"] for e in chat] == ["workflow_finished", "message_end"]
    for event in events:
        assert problems(event, "WorkflowStreamEventWorkflowFinished") == []
    for event in chat:
        assert problems(event, event_schema("chat", event["event"]) or "") == []


# --------------------------------------------------------------------------- human input


def test_human_run_pauses_with_the_form_then_ends_its_first_part() -> None:
    steps = flow(scenario="human", form_expiry_s=30)
    assert names(steps)[-3:] == ["human_input_required", "workflow_paused", "Pause"]
    required, paused, pause = steps[-3], steps[-2], steps[-1]
    assert isinstance(required, Emit) and isinstance(paused, Emit) and isinstance(pause, Pause)
    form = required.event["data"]
    assert form["form_token"] == "tok"
    assert form["expiration_time"] == 1_700_000_031, "now + expiry, rounded up"
    assert {a["id"] for a in form["actions"]} == {"approve", "reject"}
    assert paused.event["data"]["status"] == "paused"
    assert paused.event["data"]["paused_nodes"] == [form["node_id"]]
    assert paused.event["data"]["reasons"][0]["form_id"] == form["form_id"]
    assert pause.expires_in_s == 30 and pause.form.form_id == form["form_id"]
    assert "text_chunk" not in names(steps)
    assert_conforms("workflow", steps)


@pytest.mark.parametrize(
    "outcome",
    [Filled("approve", {"comment": "ok"}), Filled("reject", {"comment": "no"}), TimedOut()],
)
def test_human_run_resumes_by_outcome(outcome: Any) -> None:
    pause = flow(scenario="human")[-1]
    assert isinstance(pause, Pause)
    rest = pause.resume(outcome)
    first = "human_input_form_filled" if isinstance(outcome, Filled) else "human_input_form_timeout"
    assert names(rest)[0] == first and names(rest)[-1] == "workflow_finished"
    action = outcome.action if isinstance(outcome, Filled) else "timeout"
    assert text_of(rest) == expected_workflow_answer(
        {"query": "hello"}, {"scenario": "human"}, tokens=12, action=action
    )
    last = rest[-1]
    assert isinstance(last, Emit)
    assert last.event["data"]["outputs"] == expected_workflow_outputs(
        {"query": "hello"}, {"scenario": "human"}, tokens=12, action=action
    )
    if isinstance(outcome, Filled):
        filled = rest[0]
        assert isinstance(filled, Emit)
        assert filled.event["data"]["action_id"] == outcome.action
        assert filled.event["data"]["submitted_data"] == dict(outcome.inputs)
    assert pause.resume(outcome) == rest, "resuming is repeatable (pure)"
    assert_conforms("workflow", rest)


def test_default_form_expiry_is_a_day() -> None:
    required = flow(scenario="human")[-3]
    assert isinstance(required, Emit)
    assert required.event["data"]["expiration_time"] == int(NOW + DEFAULT_FORM_EXPIRY_S) + 1


def test_chatflow_human_uses_the_chat_envelope_and_ends_with_message_end() -> None:
    tw_sim = {"scenario": "chatflow_human"}
    steps = build_flow(
        IDS, "chatflow", {"tw_sim": tw_sim}, parse_controls("q", {"tw_sim": tw_sim}), CONFIG,
        query="q", form_token="tok", now=NOW,
    )  # fmt: skip
    assert names(steps)[-3:] == ["human_input_required", "workflow_paused", "Pause"]
    pause = steps[-1]
    assert isinstance(pause, Pause)
    rest = pause.resume(Filled("approve", {"comment": ""}))
    assert names(rest)[-2:] == ["workflow_finished", "message_end"]
    assert "message" in names(rest) and "text_chunk" not in names(rest)
    for step in [*steps, *rest]:
        if isinstance(step, Emit):
            assert step.event["conversation_id"] == IDS.conversation_id
            assert step.event["task_id"] == IDS.task_id
    assert text_of(rest) == expected_workflow_answer(
        {}, {"scenario": "chatflow_human"}, tokens=12, action="approve", query="q"
    )
    assert_conforms("chat", steps)
    assert_conforms("chat", rest)


# --------------------------------------------------------------------------- chat and completion frames


@given(
    st.sampled_from(sorted(set(SCENARIOS) - WORKFLOW_SCENARIOS - {"chatflow_human"})),
    st.text(max_size=20),
)
def test_every_chat_scenario_conforms(scenario: str, query: str) -> None:
    tw_sim = {"scenario": scenario, "tokens": 9}
    steps = build_script(
        IDS, query, {"tw_sim": tw_sim}, parse_controls(query, {"tw_sim": tw_sim}), CONFIG
    )
    assert_conforms("chat", steps)


@pytest.mark.parametrize("fault", ["error_event", None])
@pytest.mark.parametrize("scenario", ["chat", "replace", "tts"])
def test_completion_frames_conform(scenario: str, fault: str | None) -> None:
    tw_sim: dict[str, Any] = {"scenario": scenario, "tokens": 9}
    if fault:
        tw_sim["fault"] = fault
    steps = build_script(
        IDS, "q", {"tw_sim": tw_sim}, parse_controls("q", {"tw_sim": tw_sim}), CONFIG
    )
    for step in steps:
        assert isinstance(step, Emit)
        event = as_completion_event(step.event)
        assert "conversation_id" not in event
        schema = event_schema("completion", step.name)
        assert schema is not None and problems(event, schema) == []


def test_new_agent_mode_closes_with_the_whole_answer_once() -> None:
    steps = build_script(
        IDS, "hi", {}, parse_controls("hi", {}, default_scenario="new_agent"), CONFIG
    )
    shape = names(steps)
    assert shape.count("message") == 1 and shape[-2:] == ["message", "message_end"]
    deltas = "".join(
        s.event["answer"] for s in steps if isinstance(s, Emit) and s.name == "agent_message"
    )
    closing = steps[-2]
    assert isinstance(closing, Emit) and closing.event["answer"] == deltas
    assert not closing.is_token, "the closing message repeats, it does not append"
    assert (
        text_of(steps)
        == deltas
        == expected_final_answer("hi", {"scenario": "new_agent"}, tokens=12)
    )
    end = steps[-1]
    assert isinstance(end, Emit) and end.event["metadata"]["usage"]["completion_tokens"] == 12
    stopped = stopped_events(
        IDS, query="hi", scenario="new_agent", answer="", completion_tokens=0, latency_s=0
    )
    assert [e["event"] for e in stopped] == ["message_end"]


def test_new_controls_are_validated() -> None:
    assert controls(iterations=4, form_expiry_s=0.5) == SimControls(
        scenario="workflow", iterations=4, form_expiry_s=0.5
    )
    for bad in ({"iterations": 0}, {"iterations": 51}, {"form_expiry_s": -1}, {"iterations": 1.5}):
        with pytest.raises(ControlsError):
            controls(**bad)
    assert parse_controls("q", {}, default_scenario="agent").scenario == "agent"
    assert parse_controls("/tts q", {}, default_scenario="agent").scenario == "tts", "a prefix wins"


# --------------------------------------------------------------------------- apps


def test_default_app_is_what_the_simulator_always_was() -> None:
    assert DEFAULT_APP.key is None and DEFAULT_APP.default_scenario == "chat"
    assert app_info(DEFAULT_APP)["mode"] == "advanced-chat"
    parameters = app_parameters(DEFAULT_APP)
    assert parameters["suggested_questions_after_answer"] == {"enabled": False}
    assert parameters["text_to_speech"] == {
        "enabled": False,
        "voice": "",
        "language": "",
        "autoPlay": "disabled",
    }


def test_demo_apps_cover_every_mode() -> None:
    assert {"app-chat", "app-agent", "app-workflow", "app-completion", "app-human"} <= set(
        DEMO_APPS
    )
    assert {spec.mode for spec in DEMO_APPS.values()} == {
        "chat",
        "agent-chat",
        "advanced-chat",
        "agent",
        "completion",
        "workflow",
    }
    assert DEMO_APPS["app-human"].default_scenario == "human"
    assert DEMO_APPS["app-agent"].default_scenario == "new_agent"
    assert parse_apps("demo") == dict(DEMO_APPS)
    assert len({spec.name for spec in DEMO_APPS.values()}) == len(DEMO_APPS)


@pytest.mark.parametrize("spec", [DEFAULT_APP, *DEMO_APPS.values()], ids=lambda s: s.name)
def test_app_metadata_conforms(spec: AppSpec) -> None:
    assert problems(app_info(spec), "AppInfoResponse") == []
    assert problems(app_parameters(spec), "AppParametersResponse") == []
    assert problems(app_meta(spec), "AppMetaResponse") == []
    assert problems(app_site(spec), "WebAppSettingsResponse") == []


def test_parse_apps_reads_json_and_refuses_mistakes() -> None:
    apps = parse_apps(
        '{"app-a": {"mode": "workflow", "name": "A", "scenario": "loop"}, "app-b": {}}'
    )
    assert apps["app-a"].mode == "workflow" and apps["app-a"].default_scenario == "loop"
    assert (apps["app-b"].mode, apps["app-b"].name) == ("chat", "app-b")
    for bad in (
        "nope",
        "[]",
        "{}",
        '{"sk-a": {}}',
        '{"app-a": {"mode": "robot"}}',
        '{"app-a": {"mode": "chat", "scenario": "human"}}',
        '{"app-a": {"colour": "red"}}',
        '{"app-a": {"name": "x"}, "app-b": {"name": "x"}}',
        '{"app-a": 3}',
    ):
        with pytest.raises(AppsError):
            parse_apps(bad)


# --------------------------------------------------------------------------- multipart and media


def _body(*parts: tuple[str, str | None, str | None, bytes]) -> bytes:
    out = b""
    for name, filename, ctype, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += (
            b"--tw-sim-boundary-7f3a9c1e5b\r\nContent-Disposition: "
            + disposition.encode()
            + b"\r\n"
        )
        if ctype:
            out += b"Content-Type: " + ctype.encode() + b"\r\n"
        out += b"\r\n" + data + b"\r\n"
    return out + b"--tw-sim-boundary-7f3a9c1e5b--\r\n"


@given(st.binary(max_size=300), st.text(min_size=1, max_size=20))
def test_multipart_round_trips_any_bytes(data: bytes, user: str) -> None:
    body = _body(("file", "a.png", "image/png", data), ("user", None, None, user.encode()))
    file, field = parse_form("multipart/form-data; boundary=tw-sim-boundary-7f3a9c1e5b", body)
    assert (file.name, file.filename, file.content_type, file.data) == (
        "file",
        "a.png",
        "image/png",
        data,
    )
    assert (field.name, field.filename, field.content_type, field.text) == (
        "user",
        None,
        None,
        user,
    )


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"{}"),
        ("multipart/form-data", b"--tw-sim-boundary-7f3a9c1e5b--\r\n"),
        (
            "multipart/form-data; boundary=tw-sim-boundary-7f3a9c1e5b",
            b"--tw-sim-boundary-7f3a9c1e5b\r\nno header end",
        ),
        (
            "multipart/form-data; boundary=tw-sim-boundary-7f3a9c1e5b",
            b"--tw-sim-boundary-7f3a9c1e5b\r\nX: y\r\n\r\nd\r\n--tw-sim-boundary-7f3a9c1e5b--",
        ),
    ],
)
def test_multipart_refuses_malformed_bodies(content_type: str, body: bytes) -> None:
    with pytest.raises(MultipartError):
        parse_form(content_type, body)


def test_media_stand_ins_are_deterministic() -> None:
    assert transcript_of(b"abc") == transcript_of(b"abc") != transcript_of(b"abd")
    assert speech_of("hello").startswith(b"ID3") and speech_of("hello") == speech_of("hello")
    assert [file_category(e) for e in ("PNG", "mp4", "wav", "pdf", None)] == [
        "image",
        "video",
        "audio",
        "document",
        "document",
    ]


def test_the_openapi_table_is_self_consistent() -> None:
    for schema, props in SCHEMAS.items():
        for kind in props.values():
            ref = kind.split("|")[0].removeprefix("array").removeprefix("@")
            if kind.split("|")[0].startswith(("@", "array@")):
                assert ref in SCHEMAS, f"{schema} refers to unknown {ref}"


@given(
    scenario=st.sampled_from(sorted(WORKFLOW_SCENARIOS)),
    query=st.text(max_size=30),
    tokens=st.integers(min_value=1, max_value=30),
    rounds=st.integers(min_value=1, max_value=6),
    outcome=st.sampled_from(
        [Filled("approve", {"comment": "c"}), Filled("reject", {}), TimedOut()]
    ),
)
def test_any_workflow_run_streams_its_expected_text_and_outputs(
    scenario: str, query: str, tokens: int, rounds: int, outcome: Any
) -> None:
    tw_sim = {"scenario": scenario, "tokens": tokens, "iterations": rounds}
    inputs = {"query": query, "tw_sim": tw_sim}
    steps = build_flow(IDS, "workflow", inputs, controls(**tw_sim), CONFIG, form_token="t", now=NOW)
    action = None
    if scenario == "human":
        pause = steps[-1]
        assert isinstance(pause, Pause)
        steps = [*steps[:-1], *pause.resume(outcome)]
        action = outcome.action if isinstance(outcome, Filled) else "timeout"
    assert not any(isinstance(s, Pause) for s in steps)
    text = "".join(
        s.event["data"]["text"] for s in steps if isinstance(s, Emit) and s.name == "text_chunk"
    )
    assert text == text_of(steps) == expected_workflow_answer(inputs, tw_sim, action=action)
    last = steps[-1]
    assert isinstance(last, Emit) and last.name == "workflow_finished"
    assert last.event["data"]["outputs"] == expected_workflow_outputs(inputs, tw_sim, action=action)
    started = [
        s.event["data"]["id"] for s in steps if isinstance(s, Emit) and s.name == "node_started"
    ]
    finished = [
        s.event["data"]["id"] for s in steps if isinstance(s, Emit) and s.name == "node_finished"
    ]
    assert sorted(started) == sorted(finished), "every node that starts finishes"
    assert {s.event["workflow_run_id"] for s in steps if isinstance(s, Emit)} == {run_id_of(IDS)}
    assert_conforms("workflow", steps)
