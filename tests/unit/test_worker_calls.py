"""The worker's calls (worker/calls.py) and owners (worker/ownership.py, shared/ownership.py)
against fakes of Dify and of the KV bucket: caching, ownership, error mapping, the breaker."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field
from typing import Any

import nats.js.errors
import orjson
import pytest

from shared.breaker import CircuitBreaker
from shared.calls import CallRequest, DifyRequest, decode_reply, encode_call
from shared.exceptions import NotFound, TokenwireError
from shared.jobs import Job
from shared.ownership import check_owner, file_ids
from worker.calls import Calls
from worker.ownership import Ownership


@dataclass
class Entry:
    value: bytes
    revision: int = 1


class FakeKv:
    """The two KV calls the owners make, with nats-py's errors."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get(self, key: str) -> Entry:
        if key not in self.data:
            raise nats.js.errors.KeyNotFoundError()
        return Entry(self.data[key])

    async def create(self, key: str, value: bytes) -> int:
        if key in self.data:
            raise nats.js.errors.KeyWrongLastSequenceError()
        self.data[key] = value
        return 1


@dataclass
class Answer:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    retry_after_s: float | None = None


@dataclass
class FakeDify:
    answers: dict[str, Answer] = field(default_factory=dict)
    sent: list[DifyRequest] = field(default_factory=list)

    async def send(self, request: DifyRequest, *, trace_id: str) -> Answer:
        self.sent.append(request)
        return self.answers.get(request.path, Answer(200, b'{"ok": true}'))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(
    dify: FakeDify | None = None, apps: list[str] | None = None
) -> tuple[Calls, FakeDify, Ownership, Clock, CircuitBreaker]:
    dify = dify or FakeDify()
    owners = Ownership(FakeKv())  # type: ignore[arg-type]
    clock = Clock()
    breaker = CircuitBreaker(threshold=2, cooldown_s=5.0)
    calls = Calls(dify, owners, apps or ["default"], lambda app: breaker, clock=clock)
    return calls, dify, owners, clock, breaker


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def answer(calls: Calls, method: str, params: dict[str, Any], user: str = "ada") -> Any:
    return run(calls.answer(CallRequest(method, params, user)))


# --- ownership --------------------------------------------------------------------------


def test_the_first_owner_wins_and_others_are_not_found() -> None:
    owners = Ownership(FakeKv())  # type: ignore[arg-type]

    async def scenario() -> None:
        await owners.record("run", "run-1", "ada")
        await owners.record("run", "run-1", "bob")  # never handed over
        assert await owners.owner_of("run", "run-1") == "ada"
        await owners.check("run", "run-1", "ada")
        with pytest.raises(NotFound):
            await owners.check("run", "run-1", "bob")
        with pytest.raises(NotFound):
            await owners.check("run", "never-recorded", "ada")
        # An id that cannot be a KV key cannot have been recorded: not found, no NATS error.
        with pytest.raises(NotFound):
            await owners.check("file", "a b.*", "ada")

    run(scenario())


def test_not_found_for_another_user_looks_like_not_found_for_nobody() -> None:
    with pytest.raises(NotFound) as theirs:
        check_owner("file", "f1", "bob", "ada")
    with pytest.raises(NotFound) as nobodys:
        check_owner("file", "f1", None, "ada")
    assert str(theirs.value) == str(nobodys.value)


def test_file_ids_are_found_in_files_and_in_file_inputs_once_each() -> None:
    local = {"type": "image", "transfer_method": "local_file", "upload_file_id": "f1"}
    remote = {"type": "image", "transfer_method": "remote_url", "url": "https://x/y.png"}
    inputs = {
        "doc": {"type": "document", "transfer_method": "local_file", "upload_file_id": "f2"},
        "many": [local, {"transfer_method": "local_file", "upload_file_id": "f3"}],
        "text": "not a file",
    }
    assert file_ids([local, remote], inputs) == ["f1", "f2", "f3"]


def test_a_job_naming_another_users_file_is_refused() -> None:
    owners = Ownership(FakeKv())  # type: ignore[arg-type]
    mine = {"type": "image", "transfer_method": "local_file", "upload_file_id": "f1"}

    async def scenario() -> None:
        await owners.record("file", "f1", "ada")
        job: dict[str, Any] = dict(
            key="k", id="1", user="ada", conn="c", reply="r", query="q", files=[mine]
        )
        job |= {"trace_id": "t", "created_ms": 0}
        assert await owners.check_files(Job(**job)) is None
        job["user"] = "bob"
        assert isinstance(await owners.check_files(Job(**job)), NotFound)

    run(scenario())


# --- calls ------------------------------------------------------------------------------


def test_the_user_sent_is_the_calls_user() -> None:
    calls, dify, *_ = make()
    answer(calls, "conversations.list", {"limit": 3}, user="ada")
    (request,) = dify.sent
    assert request.query == {"limit": 3, "user": "ada"}


def test_app_metadata_is_cached_per_app_for_its_ttl() -> None:
    calls, dify, _, clock, _ = make(apps=["default", "sales"])
    answer(calls, "app.parameters", {})
    answer(calls, "app.parameters", {})
    answer(calls, "app.parameters", {"app": "sales"})
    assert [(r.path, r.app) for r in dify.sent] == [
        ("/parameters", "default"),
        ("/parameters", "sales"),
    ]
    clock.now += 61
    answer(calls, "app.parameters", {})
    assert len(dify.sent) == 3


def test_apps_list_is_the_configured_names_with_their_info_and_no_key() -> None:
    info = Answer(200, orjson.dumps({"name": "Support", "description": "d", "mode": "chat"}))
    calls, *_ = make(FakeDify({"/info": info}), apps=["default", "sales"])
    data = answer(calls, "apps.list", {})
    assert data == {
        "data": [
            {
                "app": "default",
                "available": True,
                "name": "Support",
                "description": "d",
                "mode": "chat",
            },
            {
                "app": "sales",
                "available": True,
                "name": "Support",
                "description": "d",
                "mode": "chat",
            },
        ]
    }
    assert b"app-" not in orjson.dumps(data)


def test_runs_get_of_another_users_run_is_not_found_and_never_reaches_dify() -> None:
    calls, dify, owners, *_ = make()
    run(owners.record("run", "run-1", "ada"))
    with pytest.raises(NotFound):
        answer(calls, "runs.get", {"workflow_run_id": "run-1"}, user="bob")
    assert dify.sent == []
    answer(calls, "runs.get", {"workflow_run_id": "run-1"}, user="ada")
    assert [r.path for r in dify.sent] == ["/workflows/run/run-1"]


@pytest.mark.parametrize(
    ("status", "body", "code", "retryable"),
    [
        (404, b'{"code": "not_found", "message": "Conversation Not Exists."}', "not_found", False),
        (
            400,
            b'{"code": "bad_request", "message": "Suggested Questions Is Disabled."}',
            "feature_disabled",
            False,
        ),
        (429, b'{"code": "too_many_requests", "message": "slow down"}', "dify_rate_limited", True),
        (503, b"", "dify_server_error", True),
        (400, b'{"code": "not_chat_app", "message": "mode"}', "wrong_app_kind", False),
    ],
)
def test_difys_answers_map_to_the_protocols_codes(
    status: int, body: bytes, code: str, retryable: bool
) -> None:
    dify = FakeDify({"/messages/m1/suggested": Answer(status, body, retry_after_s=3.0)})
    calls, *_ = make(dify)
    with pytest.raises(TokenwireError) as caught:
        answer(calls, "messages.suggested", {"message_id": "m1"})
    assert (caught.value.code.value, caught.value.retryable) == (code, retryable)
    if retryable:
        assert caught.value.retry_after_ms == 3000


def test_an_empty_204_is_success() -> None:
    calls, *_ = make(FakeDify({"/conversations/c1": Answer(204)}))
    assert answer(calls, "conversations.delete", {"conversation_id": "c1"}) == {"result": "success"}


def test_text_to_audio_returns_base64_audio_with_its_type() -> None:
    audio = Answer(200, b"ID3\x04audio", content_type="audio/mpeg")
    calls, *_ = make(FakeDify({"/text-to-audio": audio}))
    data = answer(calls, "text.to_audio", {"text": "hello"})
    assert data["mime_type"] == "audio/mpeg"
    assert base64.b64decode(data["audio"]) == b"ID3\x04audio"


def test_dify_down_opens_the_apps_breaker_and_then_calls_fail_fast() -> None:
    dify = FakeDify({"/conversations": Answer(503)})
    calls, dify, *_ = make(dify)
    for _ in range(2):
        with pytest.raises(TokenwireError):
            answer(calls, "conversations.list", {})
    with pytest.raises(TokenwireError) as caught:
        answer(calls, "conversations.list", {})
    assert caught.value.code.value == "upstream_unavailable"
    assert caught.value.retry_after_ms is not None
    assert len(dify.sent) == 2


def test_handle_answers_every_failure_as_a_reply() -> None:
    calls, *_ = make()
    reply = run(calls.handle(encode_call(CallRequest("no.such", {}, "ada"))))
    with pytest.raises(TokenwireError) as caught:
        decode_reply(reply)
    assert caught.value.code.value == "unknown_method"
    with pytest.raises(TokenwireError):
        decode_reply(run(calls.handle(b"not json")))
    ok = run(calls.handle(encode_call(CallRequest("app.info", {}, "ada"))))
    assert decode_reply(ok) == {"ok": True}


def test_the_dify_client_sends_a_call_to_its_apps_url_with_its_apps_key() -> None:
    import httpx

    from shared.calls import build_request
    from shared.settings import Settings
    from worker.dify import DifyClient

    seen: list[httpx.Request] = []

    def answer_of(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    settings = Settings(
        dify_api_url="http://main.test/v1",
        dify_api_key="app-main",
        dify_apps={"sales": {"url": "http://sales.test/v1", "key": "app-sales"}},
    )

    async def scenario() -> tuple[int, int]:
        client = DifyClient(settings, transport=httpx.MockTransport(answer_of))
        try:
            request = build_request("conversations.delete", {"conversation_id": "c1"}, "ada")
            first = await client.send(request, trace_id="t")
            sales = build_request(
                "conversations.delete", {"conversation_id": "c1", "app": "sales"}, "ada"
            )
            second = await client.send(sales, trace_id="t")
        finally:
            await client.aclose()
        return first.status, second.status

    assert run(scenario()) == (204, 204)
    assert str(seen[0].url) == "http://main.test/v1/conversations/c1"
    assert seen[0].headers["authorization"] == "Bearer app-main"
    assert str(seen[1].url) == "http://sales.test/v1/conversations/c1"
    assert seen[1].headers["authorization"] == "Bearer app-sales"
    assert orjson.loads(seen[1].content) == {"user": "ada"}
