"""The Python client (``tokenwire.client``) over a real stack: answers, forced disconnects and
a gateway killed mid-answer, each ending with exactly the simulator's answer."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import httpx
import orjson
import pytest
import websockets
from websockets.asyncio.server import ServerConnection

from tests.integration.stack import Stack
from tokenwire.client import (
    CONNECTION_CLOSED,
    Backoff,
    ChatStream,
    Connection,
    ConnectionState,
    RequestStatus,
    StateChange,
)
from tokenwire.simulator import expected_final_answer

pytestmark = pytest.mark.integration

FAST = Backoff(initial_s=0.05, max_s=0.5, factor=2, jitter=0.5)


def assert_gapless(stream: ChatStream) -> None:
    seqs = [f.seq for f in stream.frames]
    assert seqs == list(range(1, len(seqs) + 1)), f"seqs not 1..n once each: {seqs}"


def deltas(stream: ChatStream) -> int:
    return sum(1 for f in stream.frames if f.type == "delta")


async def until(check: Any, timeout: float = 30.0) -> None:
    """Poll ``check`` (client state changes have no event to wait on from outside)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


async def sim_queries(spine: Stack) -> list[str]:
    """The queries the simulator (Dify) was asked, oldest first."""
    async with httpx.AsyncClient(base_url=spine.sim_url.removesuffix("/v1")) as http:
        return [r["query"] for r in (await http.get("/_sim/requests")).json()]


def connection(spine: Stack, user: str, **kwargs: Any) -> Connection:
    return Connection(spine.ws_url(), user=user, backoff=FAST, **kwargs)


async def test_answer_and_conversation(spine: Stack) -> None:
    async with connection(spine, "py-plain") as conn, asyncio.timeout(60):
        assert conn.hello is not None and conn.hello.user == "py-plain"
        stream = await conn.chat("What is the Python client?")
        kinds = [frame.type async for frame in stream]
        assert stream.status is RequestStatus.DONE
        assert stream.text == expected_final_answer("What is the Python client?")
        assert kinds[0] == "accepted" and kinds[-1] == "end"
        assert_gapless(stream)
        assert stream.conversation_id

        second = await conn.chat("And after?", conversation_id=stream.conversation_id)
        await second.wait()
        assert second.conversation_id == stream.conversation_id
        assert second.text == expected_final_answer("And after?")
        assert conn.requests == {}


async def test_forced_disconnect_mid_answer_resumes_to_the_exact_answer(spine: Stack) -> None:
    tw_sim = {"delay_ms": 30, "tokens": 60}
    query = "Survive two drops"
    async with connection(spine, "py-drop") as conn:
        states: list[StateChange] = []
        conn.on_state.append(states.append)
        sent: list[dict[str, Any]] = []
        real_send = conn._send

        async def recording_send(frame: dict[str, Any]) -> bool:
            sent.append(frame)
            return await real_send(frame)

        conn._send = recording_send  # type: ignore[method-assign]
        stream = await conn.chat(query, inputs={"tw_sim": tw_sim})
        await until(lambda: deltas(stream) >= 5)
        held = stream.last_seq
        conn.drop_for_testing()
        await until(lambda: deltas(stream) >= 15)
        conn.drop_for_testing()
        await stream.wait()

    assert stream.status is RequestStatus.DONE, stream.error
    assert stream.text == expected_final_answer(query, tw_sim)
    assert_gapless(stream)
    resumes = [f for f in sent if f["type"] == "resume"]
    assert len(resumes) == 2
    assert resumes[0] == {"type": "resume", "id": stream.id, "after": resumes[0]["after"]}
    assert resumes[0]["after"] >= held
    assert [f["type"] for f in sent].count("chat") == 1
    assert sum(1 for s in states if s.state is ConnectionState.RECONNECTING and s.code) == 2


async def test_gateway_killed_mid_answer(spine: Stack) -> None:
    """SIGKILL the gateway mid-answer, start a new one on the same port: the client retries
    with backoff until it is up, resumes, and ends with the whole answer, asked once."""
    tw_sim = {"delay_ms": 40, "tokens": 80}
    query = "Outlive the gateway"
    port = spine.gateway_ports[0]
    old = next(p for p in spine.procs if p.name == "gateway" and p.alive)
    async with connection(spine, "py-kill") as conn:
        stream = await conn.chat(query, inputs={"tw_sim": tw_sim})
        await until(lambda: deltas(stream) >= 5)
        old.signal(signal.SIGKILL)
        await until(lambda: conn.state is ConnectionState.RECONNECTING)
        # Started from this thread on purpose: a child's parent-death signal is tied to the
        # thread that spawned it (a worker thread of to_thread would take it down when it ends).
        spine.gateway("gateway-2", port)
        await stream.wait()
        assert stream.status is RequestStatus.DONE, stream.error
        assert stream.text == expected_final_answer(query, tw_sim)
        assert_gapless(stream)
    assert (await sim_queries(spine)).count(query) == 1, "Dify was asked once"


async def test_stop_mid_answer(spine: Stack) -> None:
    tw_sim = {"delay_ms": 40, "tokens": 100}
    query = "Stop me from Python"
    async with connection(spine, "py-stop") as conn:
        stream = await conn.chat(query, inputs={"tw_sim": tw_sim})
        await until(lambda: deltas(stream) >= 3)
        await stream.stop()
        async with asyncio.timeout(30):
            await stream.wait()
    assert stream.status is RequestStatus.STOPPED
    assert stream.end is not None and stream.end.stopped
    full = expected_final_answer(query, tw_sim)
    assert 0 < len(stream.text) < len(full)
    assert full.startswith(stream.text)


async def test_resume_of_an_unknown_request_fails_it(spine: Stack) -> None:
    conn = connection(spine, "py-unknown")
    # As if held from an earlier session: acknowledged, three frames in.
    stream = ChatStream(connection=conn, id="never-asked-py", query="q", last_seq=3)
    conn.requests[stream.id] = stream
    try:
        await conn.connect()
        async with asyncio.timeout(30):
            await stream.wait()
    finally:
        await conn.close()
    assert stream.error is not None and stream.error.code == "unknown_request"


# --- close codes, against a scripted server ------------------------------------------------


async def test_do_not_reconnect_codes_end_the_connection() -> None:
    """4000-4099 end it (requests fail); 4001 first gets one try with a fresh token."""
    opened: list[str | None] = []

    async def handler(ws: ServerConnection) -> None:
        token = ws.request.headers.get("Authorization") if ws.request else None
        opened.append(token)
        if token != "Bearer t1":  # refused: an error frame, then 4001, as the gateway does
            await ws.send(
                orjson.dumps(
                    {"type": "error", "code": "unauthorized", "message": "no", "retryable": False}
                ).decode()
            )
            await ws.close(4001, "unauthorized")
            return
        await ws.send(
            orjson.dumps(
                {"type": "hello", "session": "s", "user": "u", "protocol": 1, "server": "t"}
            ).decode()
        )
        await ws.recv()  # the chat
        await ws.close(4001, "token expired")

    tokens = iter(["t1", "t2", "t3"])
    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        conn = Connection(f"ws://127.0.0.1:{port}/v1/ws", lambda: next(tokens), backoff=FAST)
        await conn.connect()
        stream = await conn.chat("hi")
        await stream.wait()
        await until(lambda: conn.state is ConnectionState.CLOSED)
        await asyncio.sleep(0.3)
        await conn.close()
    assert opened == ["Bearer t1", "Bearer t2"], "one fresh token, then no more tries"
    assert stream.error is not None and stream.error.code == CONNECTION_CLOSED


async def test_replayed_frames_are_applied_once() -> None:
    """A server that replays everything after a resume (more than asked) changes nothing."""
    frames = [
        {"type": "accepted"},
        {"type": "delta", "text": "Hel"},
        {"type": "delta", "text": "lo"},
        {"type": "replace", "text": "Hi"},
        {"type": "delta", "text": " there"},
        {"type": "end", "conversation_id": None, "message_id": None, "stopped": False},
    ]
    sessions = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal sessions
        sessions += 1
        await ws.send(
            orjson.dumps(
                {"type": "hello", "session": "s", "user": "u", "protocol": 1, "server": "t"}
            ).decode()
        )
        first = orjson.loads(await ws.recv())
        upto = 3 if sessions == 1 else len(frames)
        for seq, frame in enumerate(frames[:upto], start=1):
            await ws.send(orjson.dumps({**frame, "id": first["id"], "seq": seq}).decode())
        if sessions == 1:
            await ws.close(4100, "draining")
        else:
            assert first["type"] == "resume" and first["after"] == 3
            await ws.wait_closed()

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with Connection(f"ws://127.0.0.1:{port}/v1/ws", backoff=FAST) as conn:
            stream = await conn.chat("q")
            await stream.wait()
    assert stream.text == "Hi there"
    assert_gapless(stream)
    assert sessions == 2
