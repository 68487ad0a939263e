"""Issue 15's "Must show" over real processes (nats-server, simulator, worker, gateway):
calls scoped to the connection's user, uploads checked before Dify and owned by their
uploader, ``runs.get`` only for the run's owner, and a fast retryable error with no worker."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.integration.stack import Stack, running_stack
from tests.integration.wsclient import Client

pytestmark = pytest.mark.integration

_ids = itertools.count(1)
# A tiny valid PNG (1x1).
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6300010000050001"
    "0d0a2db40000000049454e44ae426082"
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("calls")) as stack:
        stack.gateway(TOKENWIRE_MAX_UPLOAD_BYTES=str(64 * 1024))
        yield stack


def sim(stack: Stack) -> httpx.Client:
    return httpx.Client(base_url=stack.sim_url.removesuffix("/v1"), timeout=10)


def gateway(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.gateway_ports[0]}"


async def call(client: Client, method: str, **params: Any) -> dict[str, Any]:
    """Send one call and return its answer (``result`` or ``error``) frame."""
    rid = f"call-{next(_ids)}"
    await client.send({"type": "call", "id": rid, "method": method, "params": params})
    while True:
        frame = await client.next_other(timeout=20)
        if frame.get("id") == rid:
            assert "seq" not in frame, frame
            return frame


async def result(client: Client, method: str, **params: Any) -> dict[str, Any]:
    frame = await call(client, method, **params)
    assert frame["type"] == "result", frame
    data: dict[str, Any] = frame["data"]
    return data


async def chat(client: Client, query: str, **fields: Any) -> dict[str, Any]:
    rid = await client.chat(query, **fields)
    frames = await client.finish(rid)
    assert frames[-1]["type"] == "end", frames[-1]
    return frames[-1]


def test_hello_names_the_features(stack: Stack) -> None:
    async def scenario() -> None:
        async with Client(stack.ws_url(user="feat")) as c:
            assert {"call", "files"} <= set(c.hello["features"])

    asyncio.run(scenario())


def test_each_user_sees_only_their_conversations_and_history(stack: Stack) -> None:
    async def scenario() -> None:
        async with (
            Client(stack.ws_url(user="ada")) as ada,
            Client(stack.ws_url(user="bob")) as bob,
        ):
            first = await chat(ada, "ada one")
            conv = first["conversation_id"]
            for n in range(3):
                await chat(ada, f"ada more {n}", conversation_id=conv)
            bobs = await chat(bob, "bob one")

            mine = await result(ada, "conversations.list", limit=100)
            theirs = await result(bob, "conversations.list", limit=100)
            assert conv in {c["id"] for c in mine["data"]}
            assert bobs["conversation_id"] not in {c["id"] for c in mine["data"]}
            assert {c["id"] for c in theirs["data"]} == {bobs["conversation_id"]}

            # History pages backwards: newest page first, then first_id = the oldest held.
            page = await result(ada, "messages.list", conversation_id=conv, limit=2)
            assert page["has_more"] is True and len(page["data"]) == 2
            older = await result(
                ada,
                "messages.list",
                conversation_id=conv,
                limit=2,
                first_id=page["data"][0]["id"],
            )
            queries = [m["query"] for m in older["data"] + page["data"]]
            assert queries == ["ada one", "ada more 0", "ada more 1", "ada more 2"]

            # Another user's conversation id is not_found and gives no data.
            for method, params in (
                ("messages.list", {"conversation_id": conv}),
                ("conversations.rename", {"conversation_id": conv, "name": "mine now"}),
                ("conversations.delete", {"conversation_id": conv}),
            ):
                frame = await call(bob, method, **params)
                assert frame["type"] == "error" and frame["code"] == "not_found", frame
                assert "data" not in frame

            renamed = await result(ada, "conversations.rename", conversation_id=conv, name="Trip")
            assert renamed["name"] == "Trip"
            assert await result(ada, "conversations.delete", conversation_id=conv) == {
                "result": "success"
            }
            after = await result(ada, "conversations.list")
            assert conv not in {c["id"] for c in after["data"]}

    asyncio.run(scenario())


def test_feedback_and_suggested_reach_dify_with_the_user_and_message(stack: Stack) -> None:
    async def scenario() -> None:
        async with Client(stack.ws_url(user="carol")) as carol:
            end = await chat(carol, "what next?")
            message = end["message_id"]
            assert await result(carol, "messages.feedback", message_id=message, rating="like") == {
                "result": "success"
            }
            suggested = await call(carol, "messages.suggested", message_id=message)
            return message, suggested

    message, suggested = asyncio.run(scenario())
    with sim(stack) as http:
        calls = http.get("/_sim/calls").json()
    feedback = [c for c in calls if c["path"] == f"/v1/messages/{message}/feedbacks"]
    assert feedback and feedback[-1]["user"] == "carol"
    assert feedback[-1]["body"]["rating"] == "like"
    asked = [c for c in calls if c["path"] == f"/v1/messages/{message}/suggested"]
    assert asked and asked[-1]["user"] == "carol"
    # The default simulated app may have the feature on or off; either is Dify's answer.
    if suggested["type"] == "result":
        assert suggested["data"]["result"] == "success"
    else:
        assert suggested["code"] == "feature_disabled"


def test_unknown_method_and_bad_params_never_reach_a_worker(stack: Stack) -> None:
    async def scenario() -> None:
        async with Client(stack.ws_url(user="dan")) as dan:
            unknown = await call(dan, "apps.delete")
            assert unknown["code"] == "unknown_method"
            forged = await call(dan, "conversations.list", user="ada")
            assert forged["code"] == "bad_params"

    asyncio.run(scenario())


def test_app_metadata_and_apps_list(stack: Stack) -> None:
    async def scenario() -> None:
        async with Client(stack.ws_url(user="erin")) as erin:
            params = await result(erin, "app.parameters")
            assert "system_parameters" in params
            apps = await result(erin, "apps.list")
            assert apps["data"][0]["app"] == "default"
            assert apps["data"][0]["available"] is True
            assert "key" not in orjson.dumps(apps).decode().lower().replace("keys", "")

    asyncio.run(scenario())


def test_runs_get_of_a_run_nobody_recorded_is_not_found(stack: Stack) -> None:
    async def scenario() -> None:
        async with Client(stack.ws_url(user="fay")) as fay:
            frame = await call(fay, "runs.get", workflow_run_id="5b0d3a9e-run-of-someone")
            assert frame["code"] == "not_found"

    asyncio.run(scenario())


def test_with_every_worker_stopped_a_call_fails_fast_and_retryable(tmp_path: Path) -> None:
    with running_stack(tmp_path) as stack:
        stack.gateway()
        worker = next(p for p in stack.procs if p.name == "worker")
        worker.stop()

        async def scenario() -> None:
            async with Client(stack.ws_url(user="gus")) as gus:
                started = time.monotonic()
                frame = await call(gus, "conversations.list")
                took = time.monotonic() - started
                assert frame["type"] == "error", frame
                assert frame["retryable"] is True and frame["retry_after_ms"] >= 1
                assert frame["code"] in ("bus_unavailable", "upstream_unavailable")
                assert took < 3.0, took

        asyncio.run(scenario())
