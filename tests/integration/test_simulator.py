"""The Dify simulator over real HTTP (uvicorn on a free loopback port, httpx as the client).

These check what a gateway developer relies on: the exact wire bytes, Dify's error shapes,
conversation history, stop semantics, generation surviving a disconnect, and every fault.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from tokenwire.simulator import (
    REPLACEMENT_TEXT,
    RunningSimulator,
    SimConfig,
    expected_final_answer,
    running,
)

pytestmark = pytest.mark.integration

TOKENS = 12
KEY = "app-simulator-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
PING = b"event: ping"
ENVELOPE = {"event", "conversation_id", "message_id", "created_at", "task_id"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sim() -> Iterator[RunningSimulator]:
    with running(SimConfig(token_delay_ms=1, tokens=TOKENS)) as server:
        yield server


@pytest.fixture
def client(sim: RunningSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, headers=AUTH, timeout=5) as http:
        yield http


@pytest.fixture
def user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- helpers


def body(query: str, user: str, tw_sim: dict[str, Any] | None = None, **extra: Any) -> Any:
    inputs = {"tw_sim": tw_sim} if tw_sim is not None else {}
    return {"query": query, "inputs": inputs, "user": user, "response_mode": "streaming", **extra}


def iter_frames(response: httpx.Response) -> Iterator[bytes]:
    """SSE frames as they arrive (split on the blank line), with nothing left over at EOF."""
    buffer = b""
    for chunk in response.iter_raw():
        buffer += chunk
        while b"\n\n" in buffer:
            frame, buffer = buffer.split(b"\n\n", 1)
            yield frame
    assert buffer == b"", f"stream ended mid-frame: {buffer!r}"


def decode(frame: bytes) -> dict[str, Any] | None:
    """None for a keep-alive; a data frame must be exactly one ``data: {json}`` line."""
    if frame == PING:
        return None
    assert frame.startswith(b"data: ") and b"\n" not in frame, frame
    event = orjson.loads(frame[len(b"data: ") :])
    assert isinstance(event, dict)
    return event


def answer_of(events: list[dict[str, Any]]) -> str:
    answer = ""
    for event in events:
        if event["event"] in ("message", "agent_message"):
            answer += event["answer"]
        elif event["event"] == "message_replace":
            answer = event["answer"]
    return answer


def chat(client: httpx.Client, query: str, user: str, tw_sim: Any = None, **extra: Any) -> Any:
    """One whole streaming exchange: (raw bytes, decoded data events)."""
    with client.stream("POST", "/v1/chat-messages", json=body(query, user, tw_sim, **extra)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    frames = raw[:-2].split(b"\n\n")
    assert raw.endswith(b"\n\n")
    return raw, [e for e in map(decode, frames) if e is not None]


def history(client: httpx.Client, conversation_id: str, user: str, **params: Any) -> Any:
    r = client.get(
        "/v1/messages", params={"conversation_id": conversation_id, "user": user, **params}
    )
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def last_message(client: httpx.Client, conversation_id: str, user: str) -> dict[str, Any]:
    message: dict[str, Any] = history(client, conversation_id, user)["data"][-1]
    return message


def assert_dify_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()
    assert set(error) == {"code", "message", "status"}
    assert (error["code"], error["status"]) == (code, status)
    return error


# --------------------------------------------------------------------------- wire format


def test_stream_bytes_follow_difys_wire_format(client: httpx.Client, user: str) -> None:
    raw, events = chat(client, "wire format", user)
    assert raw.startswith(PING + b"\n\n"), "a keep-alive first, as Dify's listen() does"
    assert b"[DONE]" not in raw
    assert b"event: message" not in raw, "the type is only inside the JSON"
    assert [e["event"] for e in events] == ["message"] * TOKENS + ["message_end"]
    first = events[0]
    for event in events:
        assert set(event) >= ENVELOPE
        assert {k: event[k] for k in ("conversation_id", "message_id", "task_id")} == {
            k: first[k] for k in ("conversation_id", "message_id", "task_id")
        }
    assert answer_of(events) == expected_final_answer("wire format", tokens=TOKENS)
    assert b"\\u" not in raw and max(raw) > 127, "orjson style writes raw UTF-8"


def test_message_end_carries_usage_and_citations(client: httpx.Client, user: str) -> None:
    _, events = chat(client, "usage please", user)
    metadata = events[-1]["metadata"]
    usage = metadata["usage"]
    assert usage["completion_tokens"] == TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + TOKENS
    assert usage["currency"] == "USD"
    for name in ("prompt_price", "completion_price", "total_price", "prompt_unit_price"):
        assert isinstance(usage[name], str)
    total = Decimal(usage["prompt_price"]) + Decimal(usage["completion_price"])
    assert Decimal(usage["total_price"]) == total
    assert usage["latency"] > 0
    assert metadata["retriever_resources"][0]["document_name"]


def test_pings_keep_coming_while_the_first_token_is_slow(client: httpx.Client, user: str) -> None:
    tw_sim = {"first_token_delay_ms": 400, "ping_interval_s": 0.05}
    raw, events = chat(client, "slow start", user, tw_sim)
    frames = raw[:-2].split(b"\n\n")
    first_data = next(i for i, f in enumerate(frames) if f.startswith(b"data: "))
    assert set(frames[:first_data]) == {PING}
    assert first_data >= 4, f"only {first_data} pings in 400 ms at a 50 ms interval"
    assert answer_of(events) == expected_final_answer("slow start", tokens=TOKENS)


def test_blocking_mode_returns_one_json_message(client: httpx.Client, user: str) -> None:
    request = body("blocking", user)
    del request["response_mode"]
    r = client.post("/v1/chat-messages", json=request)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    message = r.json()
    assert message["event"] == "message"
    assert message["id"] == message["message_id"]
    assert message["mode"] == "chat"
    assert message["answer"] == expected_final_answer("blocking", tokens=TOKENS)
    assert message["metadata"]["usage"]["completion_tokens"] == TOKENS
    assert last_message(client, message["conversation_id"], user)["answer"] == message["answer"]


def test_ascii_style_escapes_like_older_dify(user: str) -> None:
    with (
        running(SimConfig(token_delay_ms=0, tokens=TOKENS, json_style="ascii")) as server,
        httpx.Client(base_url=server.base_url, headers=AUTH) as http,
    ):
        raw, events = chat(http, "ascii please", user)
    assert b"\\u" in raw
    assert max(raw) < 128
    assert b'{"event": "message", "conversation_id": ' in raw
    assert answer_of(events) == expected_final_answer("ascii please", tokens=TOKENS)


# --------------------------------------------------------------------------- errors before the stream


def test_missing_or_wrong_key_is_401(sim: RunningSimulator, user: str) -> None:
    with httpx.Client(base_url=sim.base_url) as anonymous:
        r = anonymous.post("/v1/chat-messages", json=body("q", user))
        assert_dify_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == 'Bearer realm="api"'
        wrong = {"Authorization": "Bearer sk-not-an-app-key"}
        assert_dify_error(
            anonymous.post("/v1/chat-messages", json=body("q", user), headers=wrong),
            401,
            "unauthorized",
        )
        assert_dify_error(anonymous.get("/v1/parameters"), 401, "unauthorized")


def test_configured_key_must_match_exactly(user: str) -> None:
    with (
        running(SimConfig(token_delay_ms=0, tokens=3, api_key=KEY)) as server,
        httpx.Client(base_url=server.base_url) as http,
    ):
        other = {"Authorization": "Bearer app-some-other-key"}
        r = http.post("/v1/chat-messages", json=body("q", user), headers=other)
        assert_dify_error(r, 401, "unauthorized")
        assert http.post("/v1/chat-messages", json=body("q", user), headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    ("change", "message_part"),
    [
        ({"query": None}, "query"),
        ({"inputs": None}, "inputs"),
        ({"inputs": "x"}, "inputs"),
        ({"user": None}, "user"),
        ({"files": "x"}, "files"),
        ({"inputs": {"tw_sim": {"scenario": "nope"}}}, "tw_sim.scenario"),
    ],
)
def test_invalid_body_is_400_invalid_param(
    client: httpx.Client, user: str, change: dict[str, Any], message_part: str
) -> None:
    request = body("q", user)
    for key, value in change.items():
        if value is None:
            del request[key]
        else:
            request[key] = value
    error = assert_dify_error(client.post("/v1/chat-messages", json=request), 400, "invalid_param")
    assert message_part in error["message"]


def test_non_json_body_is_400(client: httpx.Client) -> None:
    assert_dify_error(client.post("/v1/chat-messages", content=b"{nope"), 400, "bad_request")


def test_conversation_id_checks(client: httpx.Client, user: str) -> None:
    error = assert_dify_error(
        client.post("/v1/chat-messages", json=body("q", user, conversation_id="not-a-uuid")),
        400,
        "invalid_param",
    )
    assert error["message"] == "conversation_id must be a valid UUID"
    unknown = str(uuid.uuid4())
    error = assert_dify_error(
        client.post("/v1/chat-messages", json=body("q", user, conversation_id=unknown)),
        404,
        "not_found",
    )
    assert error["message"] == "Conversation Not Exists."
    _, events = chat(client, "mine", user)
    mine = events[0]["conversation_id"]
    foreign = body("q", "someone-else", conversation_id=mine)
    assert_dify_error(client.post("/v1/chat-messages", json=foreign), 404, "not_found")
    r = client.get("/v1/messages", params={"conversation_id": mine, "user": "someone-else"})
    assert_dify_error(r, 404, "not_found")
    _, events = chat(client, "new again", user, conversation_id="")
    assert events[0]["conversation_id"] != mine, '"" starts a new conversation'


# --------------------------------------------------------------------------- conversations


def test_second_turn_continues_the_conversation(client: httpx.Client, user: str) -> None:
    _, first = chat(client, "turn one", user)
    conversation_id = first[0]["conversation_id"]
    _, second = chat(client, "turn two", user, conversation_id=conversation_id)
    assert {e["conversation_id"] for e in second} == {conversation_id}
    assert second[0]["message_id"] != first[0]["message_id"]
    page = history(client, conversation_id, user)
    assert page["has_more"] is False
    assert [(m["query"], m["answer"], m["status"]) for m in page["data"]] == [
        ("turn one", expected_final_answer("turn one", tokens=TOKENS), "normal"),
        ("turn two", expected_final_answer("turn two", tokens=TOKENS), "normal"),
    ]
    assert {m["conversation_id"] for m in page["data"]} == {conversation_id}
    listed = client.get("/v1/conversations", params={"user": user}).json()
    assert [c["id"] for c in listed["data"]] == [conversation_id]
    assert client.get("/v1/conversations", params={"user": "nobody"}).json()["data"] == []


def test_messages_paginate_backwards_with_first_id(client: httpx.Client, user: str) -> None:
    _, events = chat(client, "page 1", user)
    conversation_id = events[0]["conversation_id"]
    for query in ("page 2", "page 3"):
        chat(client, query, user, conversation_id=conversation_id)
    latest = history(client, conversation_id, user, limit=2)
    assert latest["has_more"] is True
    assert [m["query"] for m in latest["data"]] == ["page 2", "page 3"]
    older = history(client, conversation_id, user, limit=2, first_id=latest["data"][0]["id"])
    assert older["has_more"] is False
    assert [m["query"] for m in older["data"]] == ["page 1"]
    r = client.get(
        "/v1/messages",
        params={"conversation_id": conversation_id, "user": user, "first_id": str(uuid.uuid4())},
    )
    assert_dify_error(r, 404, "not_found")


def test_parameters_and_info(client: httpx.Client) -> None:
    parameters = client.get("/v1/parameters").json()
    assert {"opening_statement", "user_input_form", "system_parameters"} <= set(parameters)
    assert set(client.get("/v1/info").json()) >= {"name", "description", "tags"}
    assert client.get("/_sim/health").status_code == 200
    assert_dify_error(client.get("/v1/nowhere"), 404, "not_found")


# --------------------------------------------------------------------------- stop and disconnect


def test_stop_by_the_owner_ends_with_message_end(client: httpx.Client, user: str) -> None:
    query = "stop me"
    tw_sim = {"tokens": 300, "delay_ms": 10}
    events: list[dict[str, Any]] = []
    with client.stream("POST", "/v1/chat-messages", json=body(query, user, tw_sim)) as r:
        for frame in iter_frames(r):
            event = decode(frame)
            if event is None:
                continue
            events.append(event)
            if len(events) == 3:
                stop = client.post(
                    f"/v1/chat-messages/{event['task_id']}/stop", json={"user": user}
                )
                assert stop.json() == {"result": "success"}
    assert events[-1]["event"] == "message_end"
    partial, full = answer_of(events), expected_final_answer(query, tw_sim)
    assert full.startswith(partial) and len(partial) < len(full) / 2
    tokens_sent = sum(e["event"] == "message" for e in events)
    assert events[-1]["metadata"]["usage"]["completion_tokens"] == tokens_sent
    stops = client.get("/_sim/stops").json()
    assert {"task_id": events[0]["task_id"], "user": user, "matched": True} in stops
    stored = last_message(client, events[0]["conversation_id"], user)
    assert (stored["answer"], stored["status"]) == (partial, "stopped")


def test_stop_by_another_user_is_a_silent_no_op(client: httpx.Client, user: str) -> None:
    query = "not yours"
    tw_sim = {"tokens": 40, "delay_ms": 5}
    events: list[dict[str, Any]] = []
    with client.stream("POST", "/v1/chat-messages", json=body(query, user, tw_sim)) as r:
        for frame in iter_frames(r):
            if (event := decode(frame)) is not None:
                events.append(event)
                if len(events) == 2:
                    url = f"/v1/chat-messages/{event['task_id']}/stop"
                    assert client.post(url, json={"user": "mallory"}).json() == {
                        "result": "success"
                    }
    assert answer_of(events) == expected_final_answer(query, tw_sim)
    assert {"task_id": events[0]["task_id"], "user": "mallory", "matched": False} in client.get(
        "/_sim/stops"
    ).json()
    assert last_message(client, events[0]["conversation_id"], user)["status"] == "normal"
    unknown = client.post(f"/v1/chat-messages/{uuid.uuid4()}/stop", json={"user": user})
    assert unknown.json() == {"result": "success"}


def test_generation_survives_a_client_disconnect(client: httpx.Client, user: str) -> None:
    query = "leave early"
    tw_sim = {"tokens": 60, "delay_ms": 10}
    seen: list[dict[str, Any]] = []
    with client.stream("POST", "/v1/chat-messages", json=body(query, user, tw_sim)) as r:
        for frame in iter_frames(r):
            if (event := decode(frame)) is not None:
                seen.append(event)
            if len(seen) == 3:
                break  # leaving the block closes the connection mid-stream
    conversation_id = seen[0]["conversation_id"]
    full = expected_final_answer(query, tw_sim)
    during = last_message(client, conversation_id, user)
    assert during["status"] == "generating"
    assert full.startswith(during["answer"]) and during["answer"] != full
    wait_for(lambda: last_message(client, conversation_id, user)["status"] == "normal")
    assert last_message(client, conversation_id, user)["answer"] == full


# --------------------------------------------------------------------------- faults


def test_fault_refuse_closes_without_a_response(client: httpx.Client, user: str) -> None:
    query = f"refuse {user}"
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/v1/chat-messages", json=body(query, user, {"fault": "refuse"}))
    recorded = [e for e in client.get("/_sim/requests").json() if e["query"] == query]
    assert len(recorded) == 1 and recorded[0]["task_id"] is None


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ("500", 500, "internal_server_error"),
        ("429", 429, "too_many_requests"),
        ("400", 400, "invalid_param"),
        ("413", 413, "file_too_large"),
    ],
)
def test_fault_http_errors(
    client: httpx.Client, user: str, fault: str, status: int, code: str
) -> None:
    r = client.post("/v1/chat-messages", json=body("fail", user, {"fault": fault}))
    error = assert_dify_error(r, status, code)
    if fault == "429":
        assert error["message"].startswith("Too many requests.")


def test_fault_times_lets_a_retry_succeed(client: httpx.Client, user: str) -> None:
    query = f"flaky {user}"
    tw_sim = {"fault": "500", "fault_times": 2}
    for _ in range(2):
        r = client.post("/v1/chat-messages", json=body(query, user, tw_sim))
        assert_dify_error(r, 500, "internal_server_error")
    _, events = chat(client, query, user, tw_sim)
    assert answer_of(events) == expected_final_answer(query, tw_sim, tokens=TOKENS)


def test_fault_error_event_in_band(client: httpx.Client, user: str) -> None:
    query = "error event"
    raw, events = chat(client, query, user, {"fault": "error_event", "cut_after": 3})
    assert [e["event"] for e in events] == ["message"] * 3 + ["error"]
    error = events[-1]
    assert set(error) == {"event", "conversation_id", "message_id", "created_at", "code",
                          "message", "status"}  # fmt: skip
    assert (error["code"], error["status"]) == ("completion_request_error", 400)
    assert raw.endswith(b"\n\n") and b"message_end" not in raw
    stored = last_message(client, error["conversation_id"], user)
    assert stored["status"] == "error" and stored["error"] == error["message"]
    assert stored["answer"] == answer_of(events)


def test_fault_cut_drops_mid_body_but_history_completes(client: httpx.Client, user: str) -> None:
    query = "cut me"
    tw_sim = {"fault": "cut", "cut_after": 4, "tokens": 30, "delay_ms": 3}
    events: list[dict[str, Any]] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", "/v1/chat-messages", json=body(query, user, tw_sim)) as r,
    ):
        for frame in iter_frames(r):
            if (event := decode(frame)) is not None:
                events.append(event)
    assert [e["event"] for e in events] == ["message"] * 4
    conversation_id = events[0]["conversation_id"]
    wait_for(lambda: last_message(client, conversation_id, user)["status"] == "normal")
    assert last_message(client, conversation_id, user)["answer"] == expected_final_answer(
        query, tw_sim
    )


def test_fault_stall_goes_silent_until_stopped(
    sim: RunningSimulator, client: httpx.Client, user: str
) -> None:
    query = "stall"
    tw_sim = {"fault": "stall", "cut_after": 2, "ping_interval_s": 0.05, "tokens": 20}
    silence_s = 0.5

    def stop_later(task_id: str) -> None:
        time.sleep(silence_s)
        with httpx.Client(base_url=sim.base_url, headers=AUTH) as other:
            other.post(f"/v1/chat-messages/{task_id}/stop", json={"user": user})

    events: list[dict[str, Any]] = []
    after_stall: list[bytes] = []
    stopper: threading.Thread | None = None
    with client.stream("POST", "/v1/chat-messages", json=body(query, user, tw_sim)) as r:
        for frame in iter_frames(r):
            if stopper is not None:
                after_stall.append(frame)
            event = decode(frame)
            if event is not None:
                events.append(event)
                if len(events) == 2:
                    started = time.monotonic()
                    stopper = threading.Thread(target=stop_later, args=(event["task_id"],))
                    stopper.start()
    assert stopper is not None
    stopper.join()
    assert time.monotonic() - started >= silence_s * 0.9
    assert PING not in after_stall, "a stalled stream sends no keep-alives either"
    assert [decode(f)["event"] for f in after_stall] == ["message_end"]  # type: ignore[index]
    stored = last_message(client, events[0]["conversation_id"], user)
    assert stored["status"] == "stopped"
    assert stored["answer"] == answer_of(events[:2])


# --------------------------------------------------------------------------- outages


@pytest.mark.parametrize("mode", ["refuse", "500", "429"])
def test_outage_then_recovery(client: httpx.Client, user: str, mode: str) -> None:
    r = client.post("/_sim/outage", json={"mode": mode, "seconds": 0.4})
    assert r.status_code == 200
    try:
        if mode == "refuse":
            with pytest.raises(httpx.RemoteProtocolError):
                client.post("/v1/chat-messages", json=body("down", user))
        else:
            r = client.post("/v1/chat-messages", json=body("down", user))
            assert r.status_code == int(mode)
        assert client.get("/v1/parameters").status_code == 200, "only sends are affected"

        def recovered() -> bool:
            try:
                return client.post("/v1/chat-messages", json=body("up", user)).status_code == 200
            except httpx.RemoteProtocolError:
                return False

        wait_for(recovered)
    finally:
        client.delete("/_sim/outage")


def test_outage_can_be_ended_early(client: httpx.Client, user: str) -> None:
    client.post("/_sim/outage", json={"mode": "500", "seconds": 60})
    assert client.post("/v1/chat-messages", json=body("q", user)).status_code == 500
    assert client.delete("/_sim/outage").status_code == 200
    _, events = chat(client, "q", user)
    assert events[-1]["event"] == "message_end"
    r = client.post("/_sim/outage", json={"mode": "teapot", "seconds": 1})
    assert_dify_error(r, 400, "invalid_param")


# --------------------------------------------------------------------------- scenarios


def test_agent_scenario(client: httpx.Client, user: str) -> None:
    _, events = chat(client, "/agent find it", user)
    names = [e["event"] for e in events]
    assert {"agent_thought", "agent_message", "message_file"} <= set(names)
    assert "message" not in names and names[-1] == "message_end"
    assert answer_of(events) == expected_final_answer("/agent find it", tokens=TOKENS)
    stored = last_message(client, events[0]["conversation_id"], user)
    assert [f["type"] for f in stored["message_files"]] == ["image"]


def test_chatflow_scenario(client: httpx.Client, user: str) -> None:
    _, events = chat(client, "flow", user, {"scenario": "chatflow"})
    names = [e["event"] for e in events]
    assert names[0] == "workflow_started"
    assert names[-2:] == ["workflow_finished", "message_end"]
    assert names.count("node_started") == names.count("node_finished") == 2
    assert all(set(e) >= ENVELOPE for e in events)
    assert answer_of(events) == expected_final_answer(
        "flow", {"scenario": "chatflow"}, tokens=TOKENS
    )


def test_replace_scenario_history_holds_the_replacement(client: httpx.Client, user: str) -> None:
    _, events = chat(client, "/replace something bad", user)
    assert [e["event"] for e in events][-2:] == ["message_replace", "message_end"]
    assert answer_of(events) == REPLACEMENT_TEXT
    assert last_message(client, events[0]["conversation_id"], user)["answer"] == REPLACEMENT_TEXT


def test_tts_audio_follows_message_end(client: httpx.Client, user: str) -> None:
    _, events = chat(client, "/tts read it", user)
    names = [e["event"] for e in events]
    assert names.index("message_end") < names.index("tts_message")
    assert names[-1] == "tts_message_end"


def test_hostile_scenario_carries_markup(client: httpx.Client, user: str) -> None:
    _, events = chat(client, "/hostile hi", user)
    answer = answer_of(events)
    assert "<script>alert(1)</script>" in answer and "<img src=x onerror=alert(1)>" in answer
    assert answer == expected_final_answer("/hostile hi", tokens=TOKENS)


# --------------------------------------------------------------------------- recording


def test_requests_are_recorded_without_the_key(sim: RunningSimulator, user: str) -> None:
    headers = {**AUTH, "X-Request-Id": "req-1", "X-Trace-Id": "trace-1", "X-Other": "no"}
    with httpx.Client(base_url=sim.base_url, headers=headers) as http:
        assert http.delete("/_sim/requests").status_code == 200
        assert http.get("/_sim/stops").json() == []
        _, events = chat(http, "recorded", user, files=[])
        http.post(f"/v1/chat-messages/{events[0]['task_id']}/stop", json={"user": user})
        raw = http.get("/_sim/requests").content
        recorded = orjson.loads(raw)
        assert len(http.get("/_sim/stops").json()) == 1
        assert http.delete("/_sim/requests").status_code == 200
        assert http.get("/_sim/requests").json() == http.get("/_sim/stops").json() == []
    assert KEY.encode() not in raw
    assert recorded == [
        {
            "path": "/v1/chat-messages",
            "app": "tokenwire Dify simulator",
            "user": user,
            "conversation_id": None,
            "query": "recorded",
            "inputs": {},
            "files": [],
            "response_mode": "streaming",
            "task_id": events[0]["task_id"],
            "message_id": events[0]["message_id"],
            "headers": {"x-request-id": "req-1", "x-trace-id": "trace-1"},
        }
    ]


def test_server_shutdown_cuts_open_streams_promptly(user: str) -> None:
    """Like a Dify process going away: open streams (even a stalled one) end abruptly."""
    outcome: list[BaseException] = []
    request = body("hold", user, {"fault": "stall", "cut_after": 1})
    with running(SimConfig(token_delay_ms=0, tokens=5)) as server:
        opened = threading.Event()

        def hold() -> None:
            try:
                with httpx.stream(
                    "POST", f"{server.api_url}/chat-messages", json=request, headers=AUTH
                ) as r:
                    for _ in r.iter_raw():
                        opened.set()
            except httpx.HTTPError as exc:
                outcome.append(exc)

        holder = threading.Thread(target=hold)
        holder.start()
        assert opened.wait(5)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1.5
    holder.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], httpx.RemoteProtocolError)
