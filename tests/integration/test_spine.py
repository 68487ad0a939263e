"""The spine, end to end over real processes: browser protocol → gateway → JetStream → worker →
Dify (simulator over HTTP) → back. What a user of the WebSocket would check."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import httpx
import pytest

from tests.integration.stack import Stack
from tests.integration.wsclient import Client, answer_of, assert_seq_complete
from tokenwire.simulator import expected_answer, expected_final_answer

pytestmark = pytest.mark.integration

TOKENS = 40  # the simulator's default answer length
T = TypeVar("T")


def sim(stack: Stack, path: str) -> list[dict]:
    return httpx.get(f"http://127.0.0.1:{stack.sim_port}{path}", timeout=5).json()


async def until(probe: Callable[[], T], timeout: float = 10.0) -> T:
    """Poll ``probe`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (found := probe()):
        assert time.monotonic() < deadline, f"still nothing after {timeout} s"
        await asyncio.sleep(0.05)
    return found


def dify_requests_for(stack: Stack, query: str) -> list[dict]:
    return [r for r in sim(stack, "/_sim/requests") if r["query"] == query]


async def test_one_question_streams_the_exact_answer(spine: Stack) -> None:
    user = f"alice-{uuid.uuid4().hex[:6]}"
    async with Client(spine.ws_url(user=user)) as client:
        assert client.hello["user"] == user and client.hello["protocol"] == 1
        query = f"What is tokenwire? {uuid.uuid4()}"
        rid = await client.chat(query)
        frames = await client.finish(rid)
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "accepted" and kinds[1] == "start" and kinds[-1] == "end"
    assert set(kinds[2:-1]) == {"delta"}
    assert_seq_complete(frames)
    assert answer_of(frames) == expected_answer(query, TOKENS)
    start, end = frames[1], frames[-1]
    assert start["conversation_id"] and start["message_id"] and start["task_id"]
    assert end["conversation_id"] == start["conversation_id"]
    assert end["usage"]["total_tokens"] > 0 and end["stopped"] is False
    # Dify saw this connection's user, in streaming mode, never a constant.
    (seen,) = dify_requests_for(spine, query)
    assert seen["user"] == user and seen["response_mode"] == "streaming"


async def test_every_event_kind_reaches_the_client(spine: Stack) -> None:
    async with Client(spine.ws_url(user="bob")) as client:
        agent = await client.chat("/agent plan a trip")
        flow = await client.chat("/chatflow summarise")
        replace = await client.chat("/replace say something rude")
        tts = await client.chat("/tts read it aloud")
        results = {rid: await client.finish(rid) for rid in (agent, flow, replace, tts)}
    events = {rid: [f["event"] for f in fs if f["type"] == "event"] for rid, fs in results.items()}
    assert "agent_thought" in events[agent] and "message_file" in events[agent]
    assert {"workflow_started", "node_started", "node_finished", "workflow_finished"} <= set(
        events[flow]
    )
    assert "tts_message" in events[tts] and "tts_message_end" in events[tts]
    assert "replace" in [f["type"] for f in results[replace]]
    for rid, query in (
        (agent, "/agent plan a trip"),
        (flow, "/chatflow summarise"),
        (replace, "/replace say something rude"),
        (tts, "/tts read it aloud"),
    ):
        frames = results[rid]
        assert frames[-1]["type"] == "end", frames[-1]
        assert_seq_complete(frames)
        want = expected_final_answer(query)
        assert answer_of(frames) == want, rid


async def test_conversation_continues_with_the_id_from_end(spine: Stack) -> None:
    user = f"carol-{uuid.uuid4().hex[:6]}"
    async with Client(spine.ws_url(user=user)) as client:
        first = await client.finish(await client.chat("first turn"))
        conversation = first[-1]["conversation_id"]
        second = await client.finish(await client.chat("second turn", conversation_id=conversation))
    assert second[-1]["type"] == "end" and second[-1]["conversation_id"] == conversation
    assert dify_requests_for(spine, "second turn")[-1]["conversation_id"] == conversation
    history = httpx.get(
        f"{spine.sim_url}/messages",
        params={"conversation_id": conversation, "user": user},
        headers={"Authorization": "Bearer app-test-key"},
    ).json()
    assert [m["query"] for m in history["data"]][-2:] in (
        ["first turn", "second turn"],
        ["second turn", "first turn"],
    )


async def test_twenty_requests_in_flight_and_a_bad_frame_among_them(spine: Stack) -> None:
    async with Client(spine.ws_url(user="dave")) as client:
        queries = {f"r{i}": f"parallel question {i} {uuid.uuid4().hex[:4]}" for i in range(20)}
        for i, (rid, query) in enumerate(queries.items()):
            # r3 streams for seconds, so it is surely in flight when its id is reused below
            # (at 5 ms a token a loaded machine once finished it first: no duplicate_id).
            delay_ms = 100 if rid == "r3" else 5
            await client.chat(query, rid=rid, inputs={"tw_sim": {"delay_ms": delay_ms}})
            if i == 10:
                await client.send("{not json")
                await client.send({"type": "teleport", "id": "r3"})
                await client.send({"type": "chat", "id": "r3", "query": "dup"})
        results = await asyncio.gather(*(client.finish(rid) for rid in queries))
        refusals = [await client.next_other() for _ in range(3)]
    assert sorted(r["code"] for r in refusals) == ["bad_json", "duplicate_id", "unknown_type"]
    assert all("id" not in r for r in refusals)
    for (rid, query), frames in zip(queries.items(), results, strict=True):
        assert frames[-1]["type"] == "end", (rid, frames[-1])
        assert_seq_complete(frames)
        assert answer_of(frames) == expected_answer(query, TOKENS), rid


async def test_invalid_chat_fails_only_that_request(spine: Stack) -> None:
    async with Client(spine.ws_url(user="erin")) as client:
        good = await client.chat("fine question", inputs={"tw_sim": {"delay_ms": 5}})
        await client.send({"type": "chat", "id": "bad-1", "query": "", "inputs": {}})
        bad = await client.finish("bad-1")
        frames = await client.finish(good)
    assert bad == [bad[0]] and bad[0]["type"] == "error" and bad[0]["code"] == "invalid_frame"
    assert bad[0]["seq"] == 1 and bad[0]["retryable"] is False
    assert answer_of(frames) == expected_answer("fine question", TOKENS)
    assert not dify_requests_for(spine, "")


async def test_oversize_frame_is_refused_and_connection_survives(spine: Stack) -> None:
    async with Client(spine.ws_url(user="frank")) as client:
        await client.send({"type": "chat", "id": "big", "query": "x" * 70_000})
        # The gateway reads the id of a frame it will not parse: that request fails, once.
        refused = await client.finish("big")
        # Without a readable id the refusal is connection-level.
        await client.send('{"query": "' + "y" * 70_000 + '", "type": "chat"}')
        anonymous = await client.next_other()
        frames = await client.finish(await client.chat("still here?"))
    assert [(f["type"], f["code"], f["seq"]) for f in refused] == [("error", "frame_too_large", 1)]
    assert anonymous["code"] == "frame_too_large" and "id" not in anonymous
    assert frames[-1]["type"] == "end"


async def test_huge_frame_closes_with_1009(spine: Stack) -> None:
    async with Client(spine.ws_url(user="gina")) as client:
        await client.send({"type": "chat", "id": "huge", "query": "x" * 400_000})
        await asyncio.wait_for(client.closed.wait(), 10)
    assert client.close_code == 1009


async def test_stop_mid_answer_stops_dify_and_nothing_follows_end(spine: Stack) -> None:
    user = f"hank-{uuid.uuid4().hex[:6]}"
    query = f"a long answer please {uuid.uuid4().hex[:6]}"
    async with Client(spine.ws_url(user=user)) as client:
        rid = await client.chat(query, inputs={"tw_sim": {"delay_ms": 50, "tokens": 400}})
        await client.wait_for(rid, "delta")
        await client.send({"type": "stop", "id": rid})
        end = await client.wait_for(rid, {"end", "error"})
        task_id = client.frames[rid][1]["task_id"]
        # The stop went all the way to Dify, and a ping's pong has come back after it: what
        # the gateway held for this client has been delivered by now.
        stops = await until(
            lambda: [s for s in sim(spine, "/_sim/stops") if s["task_id"] == task_id]
        )
        await client.send({"type": "ping"})
        assert (await client.next_other())["type"] == "pong"
        frames = client.frames[rid]
    assert end["type"] == "end" and end["stopped"] is True
    assert frames[-1] is end, "frames arrived after end"
    assert_seq_complete(frames)
    assert len(answer_of(frames)) < len(expected_answer(query, 400))
    assert stops[0]["user"] == user and stops[0]["matched"] is True


@pytest.mark.parametrize(
    ("fault", "code", "retryable"),
    [
        ("400", "dify_bad_request", False),
        ("413", "dify_payload_too_large", False),
        ("error_event", "upstream_error", False),
    ],
)
async def test_dify_failures_become_error_frames(
    spine: Stack, fault: str, code: str, retryable: bool
) -> None:
    async with Client(spine.ws_url(user="ivan")) as client:
        rid = await client.chat(
            f"fail with {fault} {uuid.uuid4().hex[:4]}",
            inputs={"tw_sim": {"fault": fault, "delay_ms": 2}},
        )
        frames = await client.finish(rid)
    error = frames[-1]
    assert error["type"] == "error" and error["code"] == code and error["retryable"] is retryable
    assert "app-test-key" not in error["message"]
    assert_seq_complete(frames)


@pytest.mark.parametrize(
    ("fault", "reason", "times"),
    [
        ("429", "dify_rate_limited", 1),
        ("500", "dify_server_error", 1),
        # A connection dropped without an answer is sent again at once (it may be a kept-alive
        # connection Dify had just closed: worker/dify.py); a second drop is an outage.
        ("refuse", "upstream_unavailable", 2),
    ],
)
async def test_dify_unavailable_is_queued_then_answered(
    spine: Stack, fault: str, reason: str, times: int
) -> None:
    query = f"wait for me {fault} {uuid.uuid4().hex[:4]}"
    controls = {"fault": fault, "fault_times": times, "delay_ms": 2}
    async with Client(spine.ws_url(user="ivy")) as client:
        rid = await client.chat(query, inputs={"tw_sim": controls})
        frames = await client.finish(rid)
    kinds = [f["type"] for f in frames]
    assert kinds[:2] == ["accepted", "queued"] and kinds[-1] == "end", kinds
    queued = frames[1]
    assert queued["reason"] == reason and queued["attempt"] == 1 and queued["retry_in_ms"] > 0
    assert_seq_complete(frames)
    assert answer_of(frames) == expected_final_answer(query, controls)
    assert len(dify_requests_for(spine, query)) == times + 1


async def test_stream_cut_mid_answer_is_recovered_from_history_without_asking_twice(
    spine: Stack,
) -> None:
    query = f"cut me {uuid.uuid4().hex[:4]}"
    controls = {"fault": "cut", "cut_after": 5, "delay_ms": 5}
    async with Client(spine.ws_url(user="cutter")) as client:
        frames = await client.finish(await client.chat(query, inputs={"tw_sim": controls}))
    kinds = [f["type"] for f in frames]
    assert kinds[-1] == "end" and "reset" not in kinds, kinds
    assert_seq_complete(frames)
    assert answer_of(frames) == expected_final_answer(query, controls)
    assert len(dify_requests_for(spine, query)) == 1, "Dify was asked twice"


async def test_unknown_conversation_is_conversation_not_found(spine: Stack) -> None:
    async with Client(spine.ws_url(user="judy")) as client:
        frames = await client.finish(await client.chat("hi", conversation_id=str(uuid.uuid4())))
    assert frames[-1]["code"] == "conversation_not_found" and frames[-1]["retryable"] is False


async def test_ping_pong_and_probes(spine: Stack) -> None:
    async with Client(spine.ws_url(user="kim")) as client:
        await client.send({"type": "ping"})
        assert (await client.next_other())["type"] == "pong"
    port = spine.gateway_ports[0]
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
    page = httpx.get(f"http://127.0.0.1:{port}/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    sdk = httpx.get(f"http://127.0.0.1:{port}/sdk/tokenwire.js")
    assert sdk.status_code == 200 and "javascript" in sdk.headers["content-type"]
    for private in ("/package.json", "/node_modules/.package-lock.json", "/test/run.sh"):
        assert httpx.get(f"http://127.0.0.1:{port}{private}").status_code == 404, private


async def test_resume_on_a_new_connection_replays_exactly_once(spine: Stack) -> None:
    user = f"liz-{uuid.uuid4().hex[:6]}"
    query = f"resume me {uuid.uuid4().hex[:6]}"
    first = Client(spine.ws_url(user=user))
    await first.connect()
    rid = await first.chat(query, inputs={"tw_sim": {"delay_ms": 20, "tokens": 80}})
    await first.wait_for(rid, "delta")
    held = list(first.frames[rid])
    await first.close()
    async with Client(spine.ws_url(user=user)) as second:
        await second.send({"type": "resume", "id": rid, "after": held[-1]["seq"]})
        rest = await second.finish(rid)
    frames = held + rest
    assert_seq_complete(frames)
    assert answer_of(frames) == expected_answer(query, 80)
    # Another user cannot resume it; an unknown id is refused with a stable code.
    async with Client(spine.ws_url(user="mallory")) as thief:
        await thief.send({"type": "resume", "id": rid, "after": 0})
        refused = await thief.finish(rid)
    assert refused[-1]["type"] == "error" and refused[-1]["code"] == "unknown_request"
    assert "delta" not in [f["type"] for f in refused]
