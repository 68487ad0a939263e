"""The simulator's apps over real HTTP: several apps by key, workflows, human input, completion,
the rest of the Service API with Dify's user scoping and errors, and Dify's OpenAPI shapes.

A module-scoped simulator serves the demo apps plus two small ones (tight limits, the feature
toggles off); the default app (no ``--apps``) is checked where it differs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from tokenwire.simulator import (
    DEMO_APPS,
    RunningSimulator,
    SimConfig,
    expected_final_answer,
    expected_workflow_answer,
    expected_workflow_outputs,
    parse_apps,
    running,
)
from tokenwire.simulator.conformance import StreamKind, event_schema, problems
from tokenwire.simulator.media import speech_of, transcript_of

pytestmark = pytest.mark.integration

TOKENS = 8
EXTRA = {
    "app-small": {
        "mode": "chat",
        "name": "Small",
        "image_file_size_limit": 1,
        "max_active_requests": 1,
    },
    "app-plain-flow": {"mode": "workflow", "name": "Plain flow", "scenario": "workflow"},
}

# Parametrized ids must be the same in every xdist worker: no random ids at collection.
FIXED_ID = "7d0c5a52-4f1e-4b8e-9a59-2f0c3e1d6b11"


@pytest.fixture(scope="module")
def sim() -> Iterator[RunningSimulator]:
    apps = {**DEMO_APPS, **parse_apps(orjson.dumps(EXTRA).decode())}
    with running(SimConfig(token_delay_ms=1, tokens=TOKENS, apps=apps)) as server:
        yield server


@pytest.fixture
def api(sim: RunningSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.api_url, timeout=10) as http:
        yield http


@pytest.fixture
def control(sim: RunningSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, timeout=10) as http:
        yield http


@pytest.fixture
def user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def other() -> str:
    return f"other-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- helpers


def key(app: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {app}"}


def decode_stream(raw: bytes) -> list[dict[str, Any]]:
    assert raw.endswith(b"\n\n") or raw == b"", raw[-50:]
    events = []
    for frame in raw.split(b"\n\n"):
        if frame.startswith(b"data: "):
            assert b"\n" not in frame
            events.append(orjson.loads(frame[6:]))
        else:
            assert frame in (b"event: ping", b""), frame
    return events


def stream(api: httpx.Client, app: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with api.stream(
        "POST", path, json={"response_mode": "streaming", **body}, headers=key(app)
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return decode_stream(r.read())


def events_of(
    api: httpx.Client, app: str, run_id: str, user: str, *, continue_on_pause: bool = True
) -> list[dict[str, Any]]:
    params = {"user": user, "continue_on_pause": str(continue_on_pause).lower()}
    with api.stream("GET", f"/workflow/{run_id}/events", params=params, headers=key(app)) as r:
        assert r.status_code == 200, r.read()
        return decode_stream(r.read())


def names(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


def conforms(kind: StreamKind, events: list[dict[str, Any]]) -> None:
    for event in events:
        schema = event_schema(kind, event["event"])
        assert schema is not None, event["event"]
        assert problems(event, schema) == [], (event["event"], problems(event, schema))


def body_conforms(body: Any, schema: str) -> None:
    assert problems(body, schema) == [], problems(body, schema)


def assert_dify_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()
    assert set(error) == {"code", "message", "status"}
    assert (error["code"], error["status"]) == (code, status)
    return error


def text_of(events: list[dict[str, Any]]) -> str:
    text = ""
    for event in events:
        if event["event"] == "text_chunk":
            text += event["data"]["text"]
        elif event["event"] in ("message", "agent_message"):
            text += event["answer"]
    return text


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def chat(api: httpx.Client, app: str, query: str, user: str, **extra: Any) -> list[dict[str, Any]]:
    return stream(api, app, "/chat-messages", {"query": query, "inputs": {}, "user": user, **extra})


def pause_run(api: httpx.Client, user: str, **tw_sim: Any) -> tuple[str, str, list[Any]]:
    """A human-input workflow run up to its pause: (run id, form token, events)."""
    inputs = {"query": f"draft {user}", "tw_sim": {"tokens": TOKENS, **tw_sim}}
    events = stream(api, "app-human", "/workflows/run", {"inputs": inputs, "user": user})
    assert names(events)[-2:] == ["human_input_required", "workflow_paused"]
    return events[-1]["workflow_run_id"], events[-2]["data"]["form_token"], events


# --------------------------------------------------------------------------- several apps


def test_each_key_is_its_own_app(api: httpx.Client, control: httpx.Client, user: str) -> None:
    for app_key, spec in DEMO_APPS.items():
        info = api.get("/info", headers=key(app_key)).json()
        assert (info["name"], info["mode"]) == (spec.name, spec.mode)
        body_conforms(info, "AppInfoResponse")
        body_conforms(api.get("/parameters", headers=key(app_key)).json(), "AppParametersResponse")
        body_conforms(api.get("/meta", headers=key(app_key)).json(), "AppMetaResponse")
        body_conforms(api.get("/site", headers=key(app_key)).json(), "WebAppSettingsResponse")
    assert_dify_error(api.get("/info", headers=key("app-nope")), 401, "unauthorized")
    assert_dify_error(api.get("/info"), 401, "unauthorized")
    control.delete("/_sim/requests")
    chat(api, "app-chat", "to chat", user)
    stream(
        api, "app-completion", "/completion-messages", {"inputs": {}, "query": "x", "user": user}
    )
    recorded = {(r["app"], r["path"]) for r in control.get("/_sim/requests").json()}
    assert recorded == {
        ("Demo chat", "/v1/chat-messages"),
        ("Demo completion", "/v1/completion-messages"),
    }
    assert "app-chat" not in control.get("/_sim/requests").text


def test_conversations_belong_to_their_app(api: httpx.Client, user: str) -> None:
    events = chat(api, "app-chat", "mine", user)
    conversation_id = events[0]["conversation_id"]
    listed = api.get("/conversations", params={"user": user}, headers=key("app-agent")).json()
    assert listed["data"] == []
    request = {"query": "q", "inputs": {}, "user": user, "conversation_id": conversation_id}
    request["response_mode"] = "streaming"
    r = api.post("/chat-messages", json=request, headers=key("app-agent"))
    assert_dify_error(r, 404, "not_found")


@pytest.mark.parametrize(
    ("app", "method", "path", "body", "code"),
    [
        (
            "app-workflow",
            "POST",
            "/chat-messages",
            {"query": "q", "inputs": {}, "user": "u"},
            "not_chat_app",
        ),
        (
            "app-completion",
            "POST",
            "/chat-messages",
            {"query": "q", "inputs": {}, "user": "u"},
            "not_chat_app",
        ),
        ("app-chat", "POST", "/workflows/run", {"inputs": {}, "user": "u"}, "not_workflow_app"),
        ("app-chatflow", "POST", "/workflows/run", {"inputs": {}, "user": "u"}, "not_workflow_app"),
        (
            "app-chat",
            "POST",
            "/completion-messages",
            {"inputs": {}, "user": "u"},
            "app_unavailable",
        ),
        (
            "app-workflow",
            "POST",
            "/completion-messages",
            {"inputs": {}, "user": "u"},
            "app_unavailable",
        ),
        ("app-workflow", "GET", "/conversations?user=u", None, "not_chat_app"),
        (
            "app-completion",
            "GET",
            f"/messages?user=u&conversation_id={FIXED_ID}",
            None,
            "not_chat_app",
        ),
        ("app-chat", "GET", f"/workflows/run/{FIXED_ID}", None, "not_workflow_app"),
        ("app-chat", "GET", "/workflows/logs", None, "not_workflow_app"),
        ("app-chat", "GET", f"/workflow/{FIXED_ID}/events?user=u", None, "not_workflow_app"),
        ("app-chat", "POST", "/workflows/tasks/t/stop", {"user": "u"}, "not_workflow_app"),
        ("app-workflow", "POST", "/chat-messages/t/stop", {"user": "u"}, "not_chat_app"),
        ("app-chat", "POST", "/completion-messages/t/stop", {"user": "u"}, "app_unavailable"),
        (
            "app-agent",
            "GET",
            f"/conversations/{FIXED_ID}/variables?user=u",
            None,
            "not_chat_app",
        ),
    ],
)
def test_a_route_the_mode_does_not_serve(
    api: httpx.Client, app: str, method: str, path: str, body: Any, code: str
) -> None:
    r = api.request(method, path, json=body, headers=key(app))
    error = assert_dify_error(r, 400, code)
    if code != "app_unavailable":
        assert error["message"] == "Please check if your app mode matches the right API route."


def test_agent_apps_stream_only(api: httpx.Client, user: str) -> None:
    for app in ("app-agent", "app-agent-chat"):
        r = api.post(
            "/chat-messages", json={"query": "q", "inputs": {}, "user": user}, headers=key(app)
        )
        assert_dify_error(r, 400, "bad_request")


def test_a_scenario_of_another_kind_is_refused(api: httpx.Client, user: str) -> None:
    inputs = {"tw_sim": {"scenario": "human"}}
    r = api.post(
        "/chat-messages",
        json={"query": "q", "inputs": inputs, "user": user},
        headers=key("app-chat"),
    )
    assert_dify_error(r, 400, "invalid_param")


# --------------------------------------------------------------------------- newer agent mode and chatflow


def test_newer_agent_mode_answer_is_not_doubled(api: httpx.Client, user: str) -> None:
    events = chat(api, "app-agent", "agent please", user)
    shape = names(events)
    assert shape.count("message") == 1 and shape[-2:] == ["message", "message_end"]
    deltas = "".join(e["answer"] for e in events if e["event"] == "agent_message")
    assert (
        events[-2]["answer"]
        == deltas
        == expected_final_answer("agent please", {"scenario": "new_agent"}, tokens=TOKENS)
    )
    conforms("chat", events)
    page = api.get(
        "/messages",
        params={"user": user, "conversation_id": events[0]["conversation_id"]},
        headers=key("app-agent"),
    ).json()
    assert page["data"][0]["answer"] == deltas
    assert page["data"][0]["agent_thoughts"][0]["thought"] == deltas
    body_conforms(page, "ConversationHistoryResponse")


def test_chatflow_run_details_and_events(api: httpx.Client, user: str, other: str) -> None:
    events = chat(api, "app-chatflow", "flow", user)
    conforms("chat", events)
    run_id = events[0]["workflow_run_id"]
    detail = api.get(f"/workflows/run/{run_id}", headers=key("app-chatflow")).json()
    assert detail["status"] == "succeeded" and detail["outputs"]["answer"] == text_of(events)
    body_conforms(detail, "WorkflowRunDetailResponse")
    again = events_of(api, "app-chatflow", run_id, user)
    assert names(again) == ["workflow_finished"], "a finished run gives one workflow_finished"
    r = api.get(f"/workflow/{run_id}/events", params={"user": other}, headers=key("app-chatflow"))
    assert_dify_error(r, 404, "not_found")


# --------------------------------------------------------------------------- workflows


def test_workflow_run_streams_nodes_iterations_text_and_outputs(
    api: httpx.Client, user: str
) -> None:
    inputs = {"query": "summarise ticket 42"}
    events = stream(api, "app-workflow", "/workflows/run", {"inputs": inputs, "user": user})
    shape = names(events)
    assert shape[0] == "workflow_started" and shape[-1] == "workflow_finished"
    assert shape.count("iteration_next") == 3 and "iteration_completed" in shape
    controls = {"scenario": "iteration"}
    assert text_of(events) == expected_workflow_answer(inputs, controls, tokens=TOKENS)
    finished = events[-1]["data"]
    assert finished["status"] == "succeeded"
    assert finished["outputs"] == expected_workflow_outputs(inputs, controls, tokens=TOKENS)
    assert {e["task_id"] for e in events} == {events[0]["task_id"]}
    assert {e["workflow_run_id"] for e in events} == {finished["id"]}
    conforms("workflow", events)


@pytest.mark.parametrize("scenario", ["workflow", "loop"])
def test_workflow_scenarios_by_tw_sim(api: httpx.Client, user: str, scenario: str) -> None:
    inputs: dict[str, Any] = {"query": "q", "tw_sim": {"scenario": scenario, "iterations": 2}}
    events = stream(api, "app-plain-flow", "/workflows/run", {"inputs": inputs, "user": user})
    assert ("loop_next" in names(events)) == (scenario == "loop")
    assert events[-1]["data"]["outputs"] == expected_workflow_outputs(
        inputs, inputs["tw_sim"], tokens=TOKENS
    )
    conforms("workflow", events)


def test_blocking_run_details_and_logs(api: httpx.Client, user: str, other: str) -> None:
    inputs = {"query": "blocking"}
    r = api.post(
        "/workflows/run", json={"inputs": inputs, "user": user}, headers=key("app-plain-flow")
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    blocking = r.json()
    body_conforms(blocking, "WorkflowBlockingResponse")
    assert blocking["data"]["outputs"] == expected_workflow_outputs(inputs, tokens=TOKENS)
    run_id = blocking["workflow_run_id"]
    detail = api.get(f"/workflows/run/{run_id}", headers=key("app-plain-flow")).json()
    body_conforms(detail, "WorkflowRunDetailResponse")
    assert orjson.loads(detail["inputs"]) == inputs, "Dify gives inputs as a JSON string"
    assert detail["outputs"] == blocking["data"]["outputs"]
    assert_dify_error(
        api.get(f"/workflows/run/{run_id}", headers=key("app-workflow")), 404, "not_found"
    )
    assert_dify_error(
        api.get(f"/workflows/run/{uuid.uuid4()}", headers=key("app-plain-flow")), 404, "not_found"
    )
    logs = api.get(
        "/workflows/logs",
        params={"created_by_end_user_session_id": user},
        headers=key("app-plain-flow"),
    ).json()
    body_conforms(logs, "WorkflowLogsResponse")
    assert [item["workflow_run"]["id"] for item in logs["data"]] == [run_id]
    everyone = api.get(
        "/workflows/logs", params={"limit": 100}, headers=key("app-plain-flow")
    ).json()
    assert run_id in {item["workflow_run"]["id"] for item in everyone["data"]}, "app-wide"
    assert_dify_error(
        api.get("/workflows/logs", params={"status": "odd"}, headers=key("app-plain-flow")),
        400,
        "invalid_param",
    )


def test_run_by_workflow_id(api: httpx.Client, user: str) -> None:
    first = stream(
        api, "app-plain-flow", "/workflows/run", {"inputs": {"query": "v"}, "user": user}
    )
    workflow_id = first[0]["data"]["workflow_id"]
    again = stream(
        api,
        "app-plain-flow",
        f"/workflows/{workflow_id}/run",
        {"inputs": {"query": "v"}, "user": user},
    )
    assert text_of(again) == text_of(first)
    body = {"inputs": {}, "user": user}
    assert_dify_error(
        api.post(f"/workflows/{uuid.uuid4()}/run", json=body, headers=key("app-plain-flow")),
        404,
        "not_found",
    )
    assert_dify_error(
        api.post("/workflows/not-an-id/run", json=body, headers=key("app-plain-flow")),
        400,
        "bad_request",
    )


def test_workflow_stop_is_not_user_checked(
    api: httpx.Client, control: httpx.Client, user: str, other: str
) -> None:
    inputs: dict[str, Any] = {"query": "long", "tw_sim": {"tokens": 400, "delay_ms": 5}}
    events: list[dict[str, Any]] = []
    request = {"inputs": inputs, "user": user, "response_mode": "streaming"}
    with api.stream("POST", "/workflows/run", json=request, headers=key("app-plain-flow")) as r:
        buffer = b""
        for chunk in r.iter_raw():
            buffer += chunk
            while b"\n\n" in buffer:
                frame, buffer = buffer.split(b"\n\n", 1)
                if not frame.startswith(b"data: "):
                    continue
                events.append(orjson.loads(frame[6:]))
                if sum(e["event"] == "text_chunk" for e in events) == 3:
                    stop = api.post(
                        f"/workflows/tasks/{events[0]['task_id']}/stop",
                        json={"user": other},
                        headers=key("app-plain-flow"),
                    )
                    assert stop.json() == {"result": "success"}
    assert events[-1]["event"] == "workflow_finished"
    assert events[-1]["data"]["status"] == "stopped"
    assert len(text_of(events)) < len(expected_workflow_answer(inputs, inputs["tw_sim"]))
    conforms("workflow", events)
    assert {"task_id": events[0]["task_id"], "user": other, "matched": True} in control.get(
        "/_sim/stops"
    ).json()
    detail = api.get(
        f"/workflows/run/{events[0]['workflow_run_id']}", headers=key("app-plain-flow")
    ).json()
    assert detail["status"] == "stopped"
    assert_dify_error(
        api.post("/workflows/tasks/x/stop", json={}, headers=key("app-plain-flow")),
        400,
        "invalid_param",
    )


def test_a_workflow_survives_its_client_and_events_replay_it(api: httpx.Client, user: str) -> None:
    inputs: dict[str, Any] = {"query": "leave", "tw_sim": {"tokens": 40, "delay_ms": 10}}
    request = {"inputs": inputs, "user": user, "response_mode": "streaming"}
    with api.stream("POST", "/workflows/run", json=request, headers=key("app-plain-flow")) as r:
        first = b""
        for chunk in r.iter_raw():
            first += chunk
            if b"text_chunk" in first:
                break
    run_id = decode_stream(first[: first.rindex(b"\n\n") + 2])[0]["workflow_run_id"]
    replay = events_of(api, "app-plain-flow", run_id, user)
    if names(replay) != ["workflow_finished"]:  # still running: a replay from the start, then live
        assert names(replay)[0] == "workflow_started"
        assert text_of(replay) == expected_workflow_answer(inputs, inputs["tw_sim"])
    assert replay[-1]["data"]["outputs"] == expected_workflow_outputs(inputs, inputs["tw_sim"])


# --------------------------------------------------------------------------- human input


def test_human_input_pause_submit_and_continue(
    api: httpx.Client, control: httpx.Client, user: str, other: str
) -> None:
    run_id, token, paused = pause_run(api, user)
    conforms("workflow", paused)
    required = paused[-2]["data"]
    assert required["expiration_time"] > time.time() + 3600
    form = api.get(f"/form/human_input/{token}", headers=key("app-human")).json()
    body_conforms(form, "HumanInputFormResponse")
    assert form["user_actions"] == required["actions"]
    while_paused = events_of(api, "app-human", run_id, user, continue_on_pause=False)
    assert names(while_paused) == ["human_input_required", "workflow_paused"]
    detail = api.get(f"/workflows/run/{run_id}", headers=key("app-human")).json()
    assert detail["status"] == "paused"

    listened: list[list[dict[str, Any]]] = []
    listener = threading.Thread(
        target=lambda: listened.append(events_of(api, "app-human", run_id, user))
    )
    listener.start()
    time.sleep(0.2)
    # Not user-checked, as Dify: another user of the app may answer (the gateway must check).
    submitted = api.post(
        f"/form/human_input/{token}",
        json={"inputs": {"comment": "fine"}, "action": "approve", "user": other},
        headers=key("app-human"),
    )
    assert submitted.status_code == 200 and submitted.json() == {}
    again = api.post(
        f"/form/human_input/{token}",
        json={"inputs": {"comment": "x"}, "action": "reject", "user": user},
        headers=key("app-human"),
    )
    assert_dify_error(again, 412, "human_input_form_submitted")
    assert_dify_error(
        api.get(f"/form/human_input/{token}", headers=key("app-human")),
        412,
        "human_input_form_submitted",
    )
    listener.join(10)
    (rest,) = listened
    assert names(rest)[:2] == ["human_input_required", "workflow_paused"], "replay of the pause"
    after = rest[2:]
    assert names(after)[0] == "human_input_form_filled" and names(after)[-1] == "workflow_finished"
    assert after[0]["data"]["action_id"] == "approve" and after[0]["data"]["submitted_data"] == {
        "comment": "fine"
    }
    inputs = {"query": f"draft {user}", "tw_sim": {"tokens": TOKENS}}
    controls = {"scenario": "human", "tokens": TOKENS}
    assert text_of(after) == expected_workflow_answer(inputs, controls, action="approve")
    assert after[-1]["data"]["outputs"] == expected_workflow_outputs(
        inputs, controls, action="approve"
    )
    conforms("workflow", rest)
    assert names(events_of(api, "app-human", run_id, user)) == ["workflow_finished"]
    control.post("/_sim/faults", json={"path": f"/v1/workflow/{run_id}", "fault": "500"})
    r = api.get(f"/workflow/{run_id}/events", params={"user": user}, headers=key("app-human"))
    assert_dify_error(r, 500, "internal_server_error")
    assert_dify_error(
        api.get(f"/workflow/{run_id}/events", params={"user": other}, headers=key("app-human")),
        404,
        "not_found",
    )


def test_events_after_the_submit_replay_only_the_resumed_part(api: httpx.Client, user: str) -> None:
    run_id, token, _ = pause_run(api, user, delay_ms=20)
    r = api.post(
        f"/form/human_input/{token}",
        json={"inputs": {"comment": ""}, "action": "reject", "user": user},
        headers=key("app-human"),
    )
    assert r.status_code == 200
    resumed = events_of(api, "app-human", run_id, user)
    if names(resumed) != ["workflow_finished"]:
        assert names(resumed)[0] == "human_input_form_filled"
    assert resumed[-1]["data"]["outputs"]["action"] == "reject"


def test_human_input_form_expires(api: httpx.Client, user: str) -> None:
    run_id, token, paused = pause_run(api, user, form_expiry_s=0.3)
    assert paused[-2]["data"]["expiration_time"] <= time.time() + 2
    listened: list[list[dict[str, Any]]] = []
    listener = threading.Thread(
        target=lambda: listened.append(events_of(api, "app-human", run_id, user))
    )
    listener.start()
    listener.join(10)
    (rest,) = listened
    after = rest[2:]
    assert names(after)[0] == "human_input_form_timeout" and names(after)[-1] == "workflow_finished"
    assert after[-1]["data"]["outputs"]["action"] == "timeout"
    conforms("workflow", rest)
    late = api.post(
        f"/form/human_input/{token}",
        json={"inputs": {"comment": "late"}, "action": "approve", "user": user},
        headers=key("app-human"),
    )
    assert_dify_error(late, 412, "human_input_form_expired")
    assert_dify_error(
        api.get(f"/form/human_input/{token}", headers=key("app-human")),
        412,
        "human_input_form_expired",
    )


def test_bad_form_submissions(api: httpx.Client, user: str) -> None:
    run_id, token, paused = pause_run(api, user)
    url = f"/form/human_input/{token}"
    bad_action = api.post(
        url,
        json={"inputs": {"comment": ""}, "action": "shrug", "user": user},
        headers=key("app-human"),
    )
    assert_dify_error(bad_action, 400, "invalid_form_data")
    missing = api.post(
        url, json={"inputs": {}, "action": "approve", "user": user}, headers=key("app-human")
    )
    assert "comment" in assert_dify_error(missing, 400, "invalid_form_data")["message"]
    assert_dify_error(api.get("/form/human_input/nope", headers=key("app-human")), 404, "not_found")
    assert_dify_error(api.get(url, headers=key("app-workflow")), 404, "not_found")  # another app's
    stop = api.post(
        f"/workflows/tasks/{paused[0]['task_id']}/stop",
        json={"user": user},
        headers=key("app-human"),
    )
    assert stop.json() == {"result": "success"}
    wait_for(
        lambda: (
            api.get(f"/workflows/run/{run_id}", headers=key("app-human")).json()["status"]
            == "stopped"
        )
    )
    assert names(events_of(api, "app-human", run_id, user)) == ["workflow_finished"]
    assert_dify_error(api.get(url, headers=key("app-human")), 404, "not_found")


def test_blocking_run_that_pauses_says_paused(api: httpx.Client, user: str) -> None:
    r = api.post(
        "/workflows/run", json={"inputs": {"query": "b"}, "user": user}, headers=key("app-human")
    )
    data = r.json()["data"]
    assert data["status"] == "paused"
    assert data["paused_nodes"] == ["human_input"] and data["reasons"][0]["form_token"]
    body_conforms(r.json(), "WorkflowBlockingResponse")


def test_chatflow_with_human_input(api: httpx.Client, user: str) -> None:
    events = chat(api, "app-chatflow-human", "please approve", user)
    assert names(events)[-2:] == ["human_input_required", "workflow_paused"]
    assert "message_end" not in names(events)
    conforms("chat", events)
    conversation_id, run_id = events[0]["conversation_id"], events[0]["workflow_run_id"]
    token = events[-2]["data"]["form_token"]
    history = api.get(
        "/messages",
        params={"user": user, "conversation_id": conversation_id},
        headers=key("app-chatflow-human"),
    ).json()
    assert history["data"][0]["status"] == "paused"
    api.post(
        f"/form/human_input/{token}",
        json={"inputs": {"comment": "ok"}, "action": "approve", "user": user},
        headers=key("app-chatflow-human"),
    )
    rest = events_of(api, "app-chatflow-human", run_id, user)
    answer = expected_workflow_answer(
        {}, {"scenario": "chatflow_human"}, tokens=TOKENS, action="approve", query="please approve"
    )
    if names(rest) != ["workflow_finished"]:
        assert names(rest)[-2:] == ["workflow_finished", "message_end"]
        assert text_of(rest) == answer
        conforms("chat", rest)

    def done() -> bool:
        page = api.get(
            "/messages",
            params={"user": user, "conversation_id": conversation_id},
            headers=key("app-chatflow-human"),
        )
        return bool(page.json()["data"][0]["status"] == "normal")

    wait_for(done)
    page = api.get(
        "/messages",
        params={"user": user, "conversation_id": conversation_id},
        headers=key("app-chatflow-human"),
    ).json()
    assert page["data"][0]["answer"] == answer


# --------------------------------------------------------------------------- completion


def test_completion_streams_without_a_conversation(
    api: httpx.Client, user: str, other: str
) -> None:
    events = stream(
        api,
        "app-completion",
        "/completion-messages",
        {"inputs": {"topic": "x"}, "query": "write", "user": user},
    )
    assert names(events)[-1] == "message_end"
    assert all("conversation_id" not in e for e in events)
    assert text_of(events) == expected_final_answer("write", tokens=TOKENS)
    conforms("completion", events)
    r = api.post(
        "/completion-messages", json={"inputs": {}, "user": user}, headers=key("app-completion")
    )
    blocking = r.json()
    body_conforms(blocking, "CompletionResponse")
    assert blocking["mode"] == "completion" and "conversation_id" not in blocking
    assert blocking["answer"] == expected_final_answer("", tokens=TOKENS), "query defaults to ''"
    message_id = events[0]["message_id"]
    liked = api.post(
        f"/messages/{message_id}/feedbacks",
        json={"rating": "like", "user": user},
        headers=key("app-completion"),
    )
    assert liked.json() == {"result": "success"}
    foreign = api.post(
        f"/messages/{message_id}/feedbacks",
        json={"rating": "like", "user": other},
        headers=key("app-completion"),
    )
    assert_dify_error(foreign, 404, "not_found")


def test_completion_stop_by_owner_only(
    api: httpx.Client, control: httpx.Client, user: str, other: str
) -> None:
    body = {
        "inputs": {"tw_sim": {"tokens": 300, "delay_ms": 5}},
        "query": "stop me",
        "user": user,
        "response_mode": "streaming",
    }
    events: list[dict[str, Any]] = []
    with api.stream("POST", "/completion-messages", json=body, headers=key("app-completion")) as r:
        buffer = b""
        for chunk in r.iter_raw():
            buffer += chunk
            while b"\n\n" in buffer:
                frame, buffer = buffer.split(b"\n\n", 1)
                if frame.startswith(b"data: "):
                    events.append(orjson.loads(frame[6:]))
                    if len(events) == 2:
                        url = f"/completion-messages/{events[0]['task_id']}/stop"
                        api.post(url, json={"user": other}, headers=key("app-completion"))
                        api.post(url, json={"user": user}, headers=key("app-completion"))
    assert events[-1]["event"] == "message_end"
    assert len(events) < 100
    stops = [s for s in control.get("/_sim/stops").json() if s["task_id"] == events[0]["task_id"]]
    assert [(s["user"], s["matched"]) for s in stops] == [(other, False), (user, True)]
    conforms("completion", events)


# --------------------------------------------------------------------------- conversations and messages


def test_two_users_see_only_their_own_conversations(
    api: httpx.Client, user: str, other: str
) -> None:
    mine = {chat(api, "app-chat", f"mine {i}", user)[0]["conversation_id"] for i in range(3)}
    theirs = chat(api, "app-chat", "theirs", other)[0]["conversation_id"]
    listed = api.get("/conversations", params={"user": user}, headers=key("app-chat")).json()
    body_conforms(listed, "ConversationsListResponse")
    assert {c["id"] for c in listed["data"]} == mine
    assert {
        c["id"]
        for c in api.get("/conversations", params={"user": other}, headers=key("app-chat")).json()[
            "data"
        ]
    } == {theirs}
    page = api.get(
        "/conversations", params={"user": user, "limit": 2}, headers=key("app-chat")
    ).json()
    assert page["has_more"] is True and len(page["data"]) == 2
    rest = api.get(
        "/conversations",
        params={"user": user, "limit": 2, "last_id": page["data"][-1]["id"]},
        headers=key("app-chat"),
    ).json()
    assert rest["has_more"] is False and {c["id"] for c in page["data"] + rest["data"]} == mine
    oldest = api.get(
        "/conversations", params={"user": user, "sort_by": "created_at"}, headers=key("app-chat")
    ).json()
    assert oldest["data"][0]["name"] == "mine 0"
    assert_dify_error(
        api.get("/conversations", params={"user": user, "limit": 101}, headers=key("app-chat")),
        400,
        "invalid_param",
    )
    for path in (f"/conversations/{theirs}/variables", "/messages"):
        params = {"user": user, "conversation_id": theirs}
        r = api.get(path, params=params, headers=key("app-chat"))
        assert assert_dify_error(r, 404, "not_found")["message"] == "Conversation Not Exists."


def test_rename_and_delete(api: httpx.Client, user: str, other: str) -> None:
    conversation_id = chat(api, "app-chat", "What is a queue?\nthanks", user)[0]["conversation_id"]
    url = f"/conversations/{conversation_id}/name"
    renamed = api.post(url, json={"name": "Queues", "user": user}, headers=key("app-chat")).json()
    body_conforms(renamed, "ConversationListItem")
    assert renamed["name"] == "Queues"
    auto = api.post(url, json={"auto_generate": True, "user": user}, headers=key("app-chat")).json()
    assert auto["name"] == "What is a queue?"
    assert_dify_error(
        api.post(url, json={"user": user}, headers=key("app-chat")), 400, "invalid_param"
    )
    assert_dify_error(
        api.post(url, json={"name": "x", "user": other}, headers=key("app-chat")), 404, "not_found"
    )
    foreign = api.request(
        "DELETE", f"/conversations/{conversation_id}", json={"user": other}, headers=key("app-chat")
    )
    assert_dify_error(foreign, 404, "not_found")
    deleted = api.request(
        "DELETE", f"/conversations/{conversation_id}", json={"user": user}, headers=key("app-chat")
    )
    assert deleted.status_code == 204 and deleted.content == b""
    assert (
        api.get("/conversations", params={"user": user}, headers=key("app-chat")).json()["data"]
        == []
    )
    again = api.request(
        "DELETE", f"/conversations/{conversation_id}", json={"user": user}, headers=key("app-chat")
    )
    assert_dify_error(again, 404, "not_found")


def test_conversation_variables(api: httpx.Client, user: str) -> None:
    conversation_id = chat(api, "app-chatflow", "vars", user)[0]["conversation_id"]
    url = f"/conversations/{conversation_id}/variables"
    listed = api.get(url, params={"user": user}, headers=key("app-chatflow")).json()
    body_conforms(listed, "ConversationVariablesResponse")
    by_name = {v["name"]: v for v in listed["data"]}
    assert set(by_name) == {"topic", "turns", "preferences"}
    only = api.get(
        url, params={"user": user, "variable_name": "turns"}, headers=key("app-chatflow")
    ).json()
    assert [v["name"] for v in only["data"]] == ["turns"]
    after = api.get(
        url, params={"user": user, "last_id": by_name["topic"]["id"]}, headers=key("app-chatflow")
    ).json()
    assert "topic" not in {v["name"] for v in after["data"]}
    assert_dify_error(
        api.get(url, params={"user": user, "last_id": "nope"}, headers=key("app-chatflow")),
        400,
        "invalid_param",
    )
    put = api.put(
        f"{url}/{by_name['topic']['id']}",
        json={"value": "queues", "user": user},
        headers=key("app-chatflow"),
    )
    body_conforms(put.json(), "ConversationVariableItem")
    assert put.json()["value"] == "queues"
    mismatch = api.put(
        f"{url}/{by_name['turns']['id']}",
        json={"value": "three", "user": user},
        headers=key("app-chatflow"),
    )
    assert "expects number" in assert_dify_error(mismatch, 400, "bad_request")["message"]
    assert (
        api.put(
            f"{url}/{by_name['turns']['id']}",
            json={"value": 3, "user": user},
            headers=key("app-chatflow"),
        ).json()["value"]
        == "3"
    )
    unknown = api.put(
        f"{url}/{uuid.uuid4()}", json={"value": "x", "user": user}, headers=key("app-chatflow")
    )
    assert (
        assert_dify_error(unknown, 404, "not_found")["message"]
        == "Conversation Variable Not Exists."
    )


def test_feedback_and_suggestions(api: httpx.Client, user: str, other: str) -> None:
    events = chat(api, "app-chat", "rate me", user)
    message_id, conversation_id = events[0]["message_id"], events[0]["conversation_id"]
    url = f"/messages/{message_id}/feedbacks"
    revoke = api.post(url, json={"rating": None, "user": user}, headers=key("app-chat"))
    assert_dify_error(revoke, 400, "invalid_param")
    for rating in ("like", "dislike"):
        r = api.post(
            url, json={"rating": rating, "content": "why", "user": user}, headers=key("app-chat")
        )
        body_conforms(r.json(), "SuccessResult")
        page = api.get(
            "/messages",
            params={"user": user, "conversation_id": conversation_id},
            headers=key("app-chat"),
        ).json()
        assert page["data"][0]["feedback"] == {"rating": rating}
    assert api.post(url, json={"rating": None, "user": user}, headers=key("app-chat")).json() == {
        "result": "success"
    }
    assert_dify_error(
        api.post(url, json={"rating": "meh", "user": user}, headers=key("app-chat")),
        400,
        "invalid_param",
    )
    assert_dify_error(
        api.post(url, json={"rating": "like", "user": other}, headers=key("app-chat")),
        404,
        "not_found",
    )
    assert_dify_error(
        api.post(url, json={"rating": "like"}, headers=key("app-chat")), 400, "invalid_param"
    )
    suggested = api.get(
        f"/messages/{message_id}/suggested", params={"user": user}, headers=key("app-chat")
    ).json()
    body_conforms(suggested, "SuggestedQuestionsResponse")
    assert len(suggested["data"]) == 3 and "rate me" in suggested["data"][0]
    assert_dify_error(
        api.get(
            f"/messages/{message_id}/suggested", params={"user": other}, headers=key("app-chat")
        ),
        404,
        "not_found",
    )
    small = chat(api, "app-small", "no suggestions here", user)[0]["message_id"]
    off = api.get(f"/messages/{small}/suggested", params={"user": user}, headers=key("app-small"))
    assert (
        assert_dify_error(off, 400, "bad_request")["message"] == "Suggested Questions Is Disabled."
    )


def test_history_items_have_every_documented_field(api: httpx.Client, user: str) -> None:
    events = chat(api, "app-agent-chat", "with a tool", user)
    page = api.get(
        "/messages",
        params={"user": user, "conversation_id": events[0]["conversation_id"]},
        headers=key("app-agent-chat"),
    ).json()
    body_conforms(page, "ConversationHistoryResponse")
    item = page["data"][0]
    assert item["message_files"][0]["type"] == "image"
    assert item["answer_tokens"] == TOKENS and item["total_price"] is not None


# --------------------------------------------------------------------------- files and audio


def upload(
    api: httpx.Client,
    app: str,
    user: str | None,
    name: str = "a.png",
    data: bytes = b"\x89PNG\r\n",
    ctype: str = "image/png",
) -> httpx.Response:
    fields = {"user": user} if user is not None else {}
    return api.post(
        "/files/upload", files={"file": (name, data, ctype)}, data=fields, headers=key(app)
    )


def test_upload_preview_and_use_by_the_uploader_only(
    api: httpx.Client, user: str, other: str
) -> None:
    r = upload(api, "app-chat", user)
    assert r.status_code == 201
    file = r.json()
    body_conforms(file, "FileUploadResponse")
    assert (file["name"], file["size"], file["extension"], file["mime_type"]) == (
        "a.png",
        6,
        "png",
        "image/png",
    )
    preview = api.get(
        f"/files/{file['id']}/preview", params={"user": other}, headers=key("app-chat")
    )
    assert preview.content == b"\x89PNG\r\n" and preview.headers["content-type"] == "image/png", (
        "app-wide"
    )
    attachment = api.get(
        f"/files/{file['id']}/preview", params={"as_attachment": "true"}, headers=key("app-chat")
    )
    assert attachment.headers["content-disposition"] == 'attachment; filename="a.png"'
    assert_dify_error(
        api.get(f"/files/{file['id']}/preview", headers=key("app-agent")), 403, "file_access_denied"
    )
    assert_dify_error(
        api.get(f"/files/{uuid.uuid4()}/preview", headers=key("app-chat")), 404, "file_not_found"
    )
    files = [{"type": "image", "transfer_method": "local_file", "upload_file_id": file["id"]}]
    assert names(chat(api, "app-chat", "with my file", user, files=files))[-1] == "message_end"
    foreign = api.post(
        "/chat-messages",
        json={"query": "q", "inputs": {}, "user": other, "files": files},
        headers=key("app-chat"),
    )
    assert assert_dify_error(foreign, 400, "invalid_param")["message"] == "Invalid upload file"
    mine = upload(api, "app-workflow", user).json()
    variable = {"type": "document", "transfer_method": "local_file", "upload_file_id": mine["id"]}
    run = {"inputs": {"query": "with a file", "ticket": variable}, "user": other}
    r = api.post("/workflows/run", json=run, headers=key("app-workflow"))
    assert assert_dify_error(r, 400, "invalid_param")["message"] == "Invalid upload file"
    run["user"] = user
    assert api.post("/workflows/run", json=run, headers=key("app-workflow")).status_code == 200
    shared = upload(api, "app-chat", None).json()
    assert shared["created_by"] == "DEFAULT-USER"


def test_upload_errors(api: httpx.Client, user: str) -> None:
    none = api.post(
        "/files/upload",
        files={"other": ("a.png", b"x", "image/png")},
        data={"user": user},
        headers=key("app-chat"),
    )
    assert_dify_error(none, 400, "no_file_uploaded")
    two = api.post(
        "/files/upload",
        files=[("file", ("a.png", b"x", "image/png")), ("file", ("b.png", b"y", "image/png"))],
        headers=key("app-chat"),
    )
    assert_dify_error(two, 400, "too_many_files")
    big = upload(api, "app-small", user, data=b"x" * (1024 * 1024 + 1))
    assert_dify_error(big, 413, "file_too_large")
    assert (
        upload(
            api,
            "app-small",
            user,
            name="a.pdf",
            ctype="application/pdf",
            data=b"x" * (1024 * 1024 + 1),
        ).status_code
        == 201
    ), "documents: 15 MB"
    boundary = "tw-test-boundary"
    raw = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\nxyz\r\n--{boundary}--\r\n'
    ).encode()
    untyped = api.post(
        "/files/upload",
        content=raw,
        headers={**key("app-chat"), "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert_dify_error(untyped, 415, "unsupported_file_type")
    assert_dify_error(
        api.post("/files/upload", json={}, headers=key("app-chat")), 400, "bad_request"
    )


def test_audio_both_ways(api: httpx.Client, user: str, other: str) -> None:
    r = api.post(
        "/audio-to-text",
        files={"file": ("hi.mp3", b"ID3 audio", "audio/mpeg")},
        data={"user": user},
        headers=key("app-chat"),
    )
    body_conforms(r.json(), "AudioToTextResponse")
    assert r.json() == {"text": transcript_of(b"ID3 audio")}
    wrong = api.post(
        "/audio-to-text",
        files={"file": ("a.txt", b"x", "text/plain")},
        data={"user": user},
        headers=key("app-chat"),
    )
    assert_dify_error(wrong, 415, "unsupported_audio_type")
    huge = api.post(
        "/audio-to-text",
        files={"file": ("a.wav", b"\0" * (30 * 1024 * 1024 + 1), "audio/wav")},
        data={"user": user},
        headers=key("app-chat"),
    )
    assert_dify_error(huge, 413, "audio_too_large")
    assert_dify_error(
        api.post(
            "/audio-to-text", files={"x": ("a.wav", b"x", "audio/wav")}, headers=key("app-chat")
        ),
        400,
        "no_audio_uploaded",
    )
    assert_dify_error(
        api.post(
            "/audio-to-text", files={"file": ("a.wav", b"x", "audio/wav")}, headers=key("app-small")
        ),
        400,
        "speech_to_text_disabled",
    )
    spoken = api.post(
        "/text-to-audio", json={"text": "hello", "user": user}, headers=key("app-chat")
    )
    assert spoken.headers["content-type"] == "audio/mpeg" and spoken.content == speech_of("hello")
    message = chat(api, "app-chat", "speak", user)
    by_message = api.post(
        "/text-to-audio",
        json={"message_id": message[0]["message_id"], "text": "ignored", "user": user},
        headers=key("app-chat"),
    )
    assert by_message.content == speech_of(text_of(message)), "message_id wins over text"
    foreign = api.post(
        "/text-to-audio",
        json={"message_id": message[0]["message_id"], "user": other},
        headers=key("app-chat"),
    )
    assert_dify_error(foreign, 404, "not_found")
    assert_dify_error(
        api.post("/text-to-audio", json={"user": user}, headers=key("app-chat")),
        400,
        "invalid_param",
    )
    assert_dify_error(
        api.post("/text-to-audio", json={"text": "x", "user": user}, headers=key("app-small")),
        400,
        "invalid_param",
    )


# --------------------------------------------------------------------------- faults and limits


def test_outage_and_scripted_faults_reach_the_new_endpoints(
    api: httpx.Client, control: httpx.Client, user: str
) -> None:
    control.post("/_sim/outage", json={"mode": "500", "seconds": 30})
    try:
        r = api.get("/conversations", params={"user": user}, headers=key("app-chat"))
        assert r.status_code == 200, "by default an outage fails sends only, as it always did"
    finally:
        control.delete("/_sim/outage")
    control.post("/_sim/outage", json={"mode": "500", "seconds": 30, "calls": True})
    try:
        assert_dify_error(
            api.post(
                "/workflows/run", json={"inputs": {}, "user": user}, headers=key("app-plain-flow")
            ),
            500,
            "internal_server_error",
        )
        assert_dify_error(
            api.get("/conversations", params={"user": user}, headers=key("app-chat")),
            500,
            "internal_server_error",
        )
        assert api.get("/info", headers=key("app-chat")).status_code == 200, "metadata stays up"
    finally:
        control.delete("/_sim/outage")
    assert (
        control.post(
            "/_sim/faults", json={"path": "/v1/conversations", "fault": "429", "times": 1}
        ).status_code
        == 200
    )
    assert_dify_error(
        api.get("/conversations", params={"user": user}, headers=key("app-chat")),
        429,
        "too_many_requests",
    )
    assert (
        api.get("/conversations", params={"user": user}, headers=key("app-chat")).status_code == 200
    )
    control.post("/_sim/faults", json={"path": "/v1/info", "fault": "500", "times": 1})
    assert_dify_error(api.get("/info", headers=key("app-chat")), 500, "internal_server_error")
    assert api.get("/info", headers=key("app-chat")).status_code == 200
    control.post("/_sim/faults", json={"path": "/v1/files/upload", "fault": "refuse", "times": 1})
    with pytest.raises(httpx.RemoteProtocolError):
        upload(api, "app-chat", user)
    assert_dify_error(
        control.post("/_sim/faults", json={"path": "/x", "fault": "500"}), 400, "invalid_param"
    )
    control.delete("/_sim/faults")
    calls = control.get("/_sim/calls").json()
    assert any(
        c["path"] == "/v1/conversations" and c["user"] == user and c["app"] == "Demo chat"
        for c in calls
    )
    assert "app-chat" not in control.get("/_sim/calls").text


def test_workflow_faults(api: httpx.Client, user: str) -> None:
    failing = {
        "inputs": {"query": f"f {user}", "tw_sim": {"fault": "500", "fault_times": 1}},
        "user": user,
    }
    assert_dify_error(
        api.post("/workflows/run", json=failing, headers=key("app-plain-flow")),
        500,
        "internal_server_error",
    )
    assert (
        api.post("/workflows/run", json=failing, headers=key("app-plain-flow")).status_code == 200
    ), "the retry succeeds"
    inputs = {"query": "err", "tw_sim": {"fault": "error_event", "cut_after": 2}}
    events = stream(api, "app-plain-flow", "/workflows/run", {"inputs": inputs, "user": user})
    assert names(events)[-2:] == ["workflow_finished", "error"]
    assert names(events).count("text_chunk") == 2
    conforms("workflow", events)
    failed = events_of(api, "app-plain-flow", events[0]["workflow_run_id"], user)
    assert names(failed) == ["workflow_finished"] and failed[0]["data"]["status"] == "failed"
    detail = api.get(
        f"/workflows/run/{events[0]['workflow_run_id']}", headers=key("app-plain-flow")
    ).json()
    assert detail["status"] == "failed"
    cut = {"query": "cut", "tw_sim": {"fault": "cut", "cut_after": 2, "tokens": 20, "delay_ms": 2}}
    seen = b""
    request = {"inputs": cut, "user": user, "response_mode": "streaming"}
    with (
        pytest.raises(httpx.RemoteProtocolError),
        api.stream("POST", "/workflows/run", json=request, headers=key("app-plain-flow")) as r,
    ):
        for chunk in r.iter_raw():
            seen += chunk
    run_id = decode_stream(seen[: seen.rindex(b"\n\n") + 2])[0]["workflow_run_id"]
    wait_for(
        lambda: (
            api.get(f"/workflows/run/{run_id}", headers=key("app-plain-flow")).json()["status"]
            == "succeeded"
        )
    )


def test_max_active_requests_is_difys_429(
    api: httpx.Client, control: httpx.Client, user: str
) -> None:
    control.delete("/_sim/requests")
    body = {
        "query": "hold",
        "inputs": {"tw_sim": {"tokens": 200, "delay_ms": 5}},
        "user": user,
        "response_mode": "streaming",
    }
    with api.stream("POST", "/chat-messages", json=body, headers=key("app-small")) as r:
        next(r.iter_raw())
        second = api.post("/chat-messages", json={**body, "inputs": {}}, headers=key("app-small"))
        error = assert_dify_error(second, 429, "too_many_requests")
        assert "is 1." in error["message"]
    small = next(a for a in control.get("/_sim/apps").json() if a["name"] == "Small")
    assert small["peak_active"] == 1


# --------------------------------------------------------------------------- the command line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_simulate_dify_serves_the_demo_apps() -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-m",
        "tokenwire",
        "simulate-dify",
        "--port",
        str(port),
        "--apps",
        "demo",
        "--token-delay-ms",
        "0",
    ]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{base}/_sim/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=20)
        assert (
            httpx.get(f"{base}/v1/info", headers=key("app-workflow")).json()["mode"] == "workflow"
        )
        assert httpx.get(f"{base}/v1/info", headers=key("app-simulator")).json()["mode"] == (
            "advanced-chat"
        ), "tokenwire dev's key keeps working"
        assert httpx.get(f"{base}/v1/info", headers=key("app-other")).status_code == 401
    finally:
        proc.terminate()
        proc.wait(10)
    bad = subprocess.run(
        [*command[:-4], "--apps", '{"nope": {}}'],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert bad.returncode == 2 and "--apps" in bad.stderr


def test_the_default_app_keeps_its_features_off() -> None:
    with (
        running(SimConfig(token_delay_ms=0, tokens=3)) as server,
        httpx.Client(base_url=server.api_url, headers=key("app-anything")) as http,
    ):
        events = decode_stream(
            http.post(
                "/chat-messages",
                json={"query": "q", "inputs": {}, "user": "u", "response_mode": "streaming"},
            ).content
        )
        message_id = events[0]["message_id"]
        assert_dify_error(
            http.get(f"/messages/{message_id}/suggested", params={"user": "u"}), 400, "bad_request"
        )
        assert_dify_error(
            http.post("/text-to-audio", json={"text": "x", "user": "u"}), 400, "invalid_param"
        )
        assert http.get("/info").json()["mode"] == "advanced-chat"
        assert_dify_error(
            http.post("/workflows/run", json={"inputs": {}, "user": "u"}), 400, "not_workflow_app"
        )
        chatflow = decode_stream(
            http.post(
                "/chat-messages",
                json={
                    "query": "/chatflow x",
                    "inputs": {},
                    "user": "u",
                    "response_mode": "streaming",
                },
            ).content
        )
        detail = http.get(f"/workflows/run/{chatflow[0]['workflow_run_id']}").json()
        assert detail["status"] == "succeeded"


def test_the_demo_set_keeps_the_classic_app_under_devs_key(api: httpx.Client, user: str) -> None:
    events = chat(api, "app-simulator", "classic", user)
    assert text_of(events) == expected_final_answer("classic", tokens=TOKENS)
    agent = chat(api, "app-simulator", "/agent classic", user)
    assert "agent_thought" in names(agent)
    request = {"query": "/agent blocking", "inputs": {}, "user": user}
    blocking = api.post("/chat-messages", json=request, headers=key("app-simulator")).json()
    assert blocking["mode"] == "agent-chat", "as before: the mode follows the scenario"
    body_conforms(blocking, "ChatCompletionResponse")


def test_unnamed_conversations_and_pinned_chatflow_versions(api: httpx.Client, user: str) -> None:
    events = chat(api, "app-chat", "no name please", user, auto_generate_name=False)
    listed = api.get("/conversations", params={"user": user}, headers=key("app-chat")).json()
    assert [(c["id"], c["name"]) for c in listed["data"]] == [(events[0]["conversation_id"], "")]
    flow = chat(api, "app-chatflow", "pinned", user)
    pinned = chat(api, "app-chatflow", "pinned", user, workflow_id=flow[0]["data"]["workflow_id"])
    assert text_of(pinned) == text_of(flow)
    body = {"query": "q", "inputs": {}, "user": user, "response_mode": "streaming"}
    unknown = {**body, "workflow_id": str(uuid.uuid4())}
    r = api.post("/chat-messages", json=unknown, headers=key("app-chatflow"))
    assert_dify_error(r, 404, "not_found")
    r = api.post("/chat-messages", json={**body, "workflow_id": "v1"}, headers=key("app-chatflow"))
    assert_dify_error(r, 400, "bad_request")
