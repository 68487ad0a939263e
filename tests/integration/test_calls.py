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


# --- uploads --------------------------------------------------------------------------------


def upload(
    stack: Stack,
    user: str,
    name: str,
    data: bytes,
    mime: str,
    path: str = "/v1/files",
) -> httpx.Response:
    return httpx.post(
        gateway(stack) + path,
        params={"user": user},
        files={"file": (name, data, mime)},
        timeout=30,
    )


def sim_calls(stack: Stack, path: str) -> list[dict[str, Any]]:
    with sim(stack) as http:
        return [c for c in http.get("/_sim/calls").json() if c["path"] == path]


def test_an_uploaded_image_reaches_dify_as_the_user_and_is_passed_in_the_next_chat(
    stack: Stack,
) -> None:
    before = len(sim_calls(stack, "/v1/files/upload"))
    response = upload(stack, "hana", "cat.png", PNG, "image/png")
    assert response.status_code == 201, response.text
    file = response.json()
    assert {"id", "name", "size", "extension", "mime_type"} <= set(file)
    assert (file["name"], file["size"], file["mime_type"]) == ("cat.png", len(PNG), "image/png")
    uploads = sim_calls(stack, "/v1/files/upload")
    assert len(uploads) == before + 1 and uploads[-1]["user"] == "hana"

    ref = {"type": "image", "transfer_method": "local_file", "upload_file_id": file["id"]}

    async def scenario() -> list[dict[str, Any]]:
        async with (
            Client(stack.ws_url(user="hana")) as hana,
            Client(stack.ws_url(user="ivan")) as ivan,
        ):
            await chat(hana, "what is in this picture?", files=[ref])
            # Another user naming the same id: not_found, and Dify is never asked.
            rid = await ivan.chat("and for me?", files=[ref])
            return await ivan.finish(rid)

    with sim(stack) as http:
        http.delete("/_sim/requests")
    theirs = asyncio.run(scenario())
    assert theirs[-1]["type"] == "error" and theirs[-1]["code"] == "not_found", theirs[-1]
    with sim(stack) as http:
        sent = http.get("/_sim/requests").json()
    asked = [r for r in sent if r["query"] == "what is in this picture?"]
    assert asked and asked[0]["user"] == "hana" and asked[0]["files"] == [ref]
    assert not [r for r in sent if r["query"] == "and for me?"]


def test_an_oversize_file_is_refused_with_413_before_dify_sees_a_byte(stack: Stack) -> None:
    before = len(sim_calls(stack, "/v1/files/upload"))
    big = PNG + b"\0" * (200 * 1024)  # over this gateway's TOKENWIRE_MAX_UPLOAD_BYTES (64 KiB)
    response = upload(stack, "hana", "big.png", big, "image/png")
    assert response.status_code == 413
    body = response.json()
    assert body["type"] == "error" and body["code"] == "file_too_large"
    assert body["retryable"] is False and "message" in body
    # Without a Content-Length to go by (a chunked body), refused while it streams.
    chunked = httpx.post(
        gateway(stack) + "/v1/files",
        params={"user": "hana"},
        headers={"Content-Type": "multipart/form-data; boundary=b0"},
        content=_chunked_form("b0", "big.png", "image/png", big),
        timeout=30,
    )
    assert chunked.status_code == 413, chunked.text
    assert len(sim_calls(stack, "/v1/files/upload")) == before


def _chunked_form(boundary: str, name: str, mime: str, data: bytes) -> Iterator[bytes]:
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: {mime}\r\n\r\n"
    ).encode()
    for start in range(0, len(data), 16 * 1024):
        yield data[start : start + 16 * 1024]
    yield f"\r\n--{boundary}--\r\n".encode()


def test_a_type_the_app_does_not_take_is_415_and_no_file_is_400(stack: Stack) -> None:
    response = upload(stack, "hana", "tool.exe", b"MZ\x90\x00", "application/octet-stream")
    assert response.status_code == 415
    assert response.json()["code"] == "unsupported_file_type"
    empty = httpx.post(
        gateway(stack) + "/v1/files", params={"user": "hana"}, data={"x": "1"}, timeout=10
    )
    assert empty.status_code == 400 and empty.json()["code"] == "bad_params"


def test_audio_to_text_goes_to_dify_as_the_user(stack: Stack) -> None:
    audio = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 8
    response = upload(stack, "jill", "note.mp3", audio, "audio/mpeg", path="/v1/audio-to-text")
    if response.status_code == 200:
        assert isinstance(response.json()["text"], str)
    else:  # the simulated app may have speech to text off: Dify's own answer
        assert response.json()["code"] == "feature_disabled", response.text
    calls = sim_calls(stack, "/v1/audio-to-text")
    assert calls and calls[-1]["user"] == "jill"


def test_runs_get_of_another_users_run_is_not_found(stack: Stack) -> None:
    """The owner is recorded as a run's starter records it (``worker/ownership.py``); here
    the record is written directly, for a chatflow run the simulator really has."""
    import nats

    async def scenario() -> None:
        async with (
            Client(stack.ws_url(user="kate")) as kate,
            Client(stack.ws_url(user="liam")) as liam,
        ):
            rid = await kate.chat("a chatflow run", inputs={"tw_sim": {"scenario": "chatflow"}})
            frames = await kate.finish(rid)
            run_id = next(
                (f.get("workflow_run_id") or f["data"].get("workflow_run_id"))
                for f in frames
                if f["type"] in ("event", "end")
                and (f.get("workflow_run_id") or (f.get("data") or {}).get("workflow_run_id"))
            )
            nc = await nats.connect(stack.nats_url)
            try:
                owners = await nc.jetstream().key_value("tw_owners")
                await owners.put(f"run.{run_id}", orjson.dumps({"user": "kate"}))
            finally:
                await nc.close()
            theirs = await call(liam, "runs.get", workflow_run_id=run_id)
            assert theirs["type"] == "error" and theirs["code"] == "not_found", theirs
            assert "data" not in theirs
            mine = await call(kate, "runs.get", workflow_run_id=run_id)
            assert mine["type"] == "result" and mine["data"]["id"] == run_id, mine

    asyncio.run(scenario())


def test_the_python_client_calls_and_uploads(stack: Stack, tmp_path: Path) -> None:
    from tokenwire.client import CallError, Connection

    picture = tmp_path / "fox.png"
    picture.write_bytes(PNG)

    async def scenario() -> None:
        async with Connection(stack.ws_url(), user="mona") as mona:
            stream = await mona.chat("hello from python")
            await stream.wait()
            assert stream.conversation_id
            page = await mona.conversations(limit=10)
            assert stream.conversation_id in {c["id"] for c in page["data"]}
            history = await mona.messages(stream.conversation_id)
            assert [m["query"] for m in history["data"]] == ["hello from python"]
            assert stream.end is not None and stream.end.message_id
            assert await mona.feedback(stream.end.message_id, "dislike") == {"result": "success"}
            params = await mona.parameters()
            assert "system_parameters" in params
            file = await mona.upload(picture)
            assert file["name"] == "fox.png"
            with pytest.raises(CallError) as caught:
                await mona.messages("00000000-0000-4000-8000-000000000000")
            assert caught.value.code == "not_found"
            with pytest.raises(CallError) as unknown:
                await mona.call("no.such.method")
            assert unknown.value.code == "unknown_method"

    asyncio.run(scenario())
