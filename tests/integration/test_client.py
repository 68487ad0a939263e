"""The Python client (``tokenwire.client``) over a real stack: answers, forced disconnects and
a gateway killed mid-answer, each ending with exactly the simulator's answer; tokens that
expire every few seconds, an idle close and an oversize chat against a real JWT gateway; and
the close-code policy against scripted servers."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import orjson
import pytest
import websockets
from websockets.asyncio.server import ServerConnection

from tests.integration.stack import Stack
from tokenwire.client import (
    CONNECTION_CLOSED,
    FRAME_TOO_LARGE,
    MAX_REFRESH_TRIES,
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


# --- a JWT gateway: short-lived tokens, idleness, the frame limit -----------------------------

SECRET = "client-test-secret-" + uuid.uuid4().hex  # over the 32-byte minimum
IDLE_TIMEOUT_S = 2.0
JWT_ENV = {
    "TOKENWIRE_AUTH": "jwt",
    "TOKENWIRE_ALLOW_INSECURE": "0",
    "TOKENWIRE_JWT_SECRET": SECRET,
    "TOKENWIRE_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
}


@pytest.fixture(scope="module")
def jwt_url(spine: Stack) -> Iterator[str]:
    """The ws:// URL of a second gateway on the spine's NATS, with JWT auth and a short idle."""
    gateway = spine.gateway("gateway-jwt", **JWT_ENV)
    yield spine.ws_url(gateway.port)  # type: ignore[attr-defined]


class Tokens:
    """A token provider: a fresh HS256 token per call, valid ``ttl_s`` (whole seconds)."""

    def __init__(self, sub: str, ttl_s: float) -> None:
        self.sub, self.ttl_s, self.issued = sub, ttl_s, 0

    def __call__(self) -> str:
        self.issued += 1
        claims = {"sub": self.sub, "exp": int(time.time() + self.ttl_s)}
        return jwt.encode(claims, SECRET, algorithm="HS256")


async def test_an_answer_outlives_many_short_lived_tokens(spine: Stack, jwt_url: str) -> None:
    """Tokens live 2-3 s, the answer ~9 s: every 4002 gets a fresh token, a reconnect and a
    resume, and the answer ends exactly, asked of Dify once."""
    tw_sim = {"delay_ms": 100, "tokens": 90}
    query = "Outlive the tokens"
    tokens = Tokens(f"py-jwt-{uuid.uuid4().hex[:6]}", ttl_s=3)
    closes: list[int | None] = []
    async with Connection(jwt_url, tokens, backoff=FAST) as conn, asyncio.timeout(60):
        conn.on_state.append(lambda c: closes.append(c.code) if c.code else None)
        stream = await conn.chat(query, inputs={"tw_sim": tw_sim})
        await stream.wait()
        assert conn.hello is not None and conn.hello.user == tokens.sub
    assert stream.status is RequestStatus.DONE, stream.error
    assert stream.text == expected_final_answer(query, tw_sim)
    assert_gapless(stream)
    assert closes.count(4002) >= 2, f"closes: {closes}"
    assert tokens.issued >= 3
    assert (await sim_queries(spine)).count(query) == 1, "Dify was asked once"


async def test_an_idle_close_does_not_reconnect_by_itself(jwt_url: str) -> None:
    tokens = Tokens(f"py-idle-{uuid.uuid4().hex[:6]}", ttl_s=600)
    async with Connection(jwt_url, tokens, backoff=FAST) as conn:
        states: list[StateChange] = []
        conn.on_state.append(states.append)
        await until(lambda: conn.state is ConnectionState.IDLE, timeout=IDLE_TIMEOUT_S + 10)
        assert conn.last_close is not None and conn.last_close[0] == 4103
        # Longer than the idle timeout plus every backoff: a reconnect would have happened.
        await asyncio.sleep(IDLE_TIMEOUT_S + 1)
        assert conn.state is ConnectionState.IDLE
        assert tokens.issued == 1, "no reconnect by itself"
        assert not any(s.state is ConnectionState.RECONNECTING for s in states)

        stream = await conn.chat("Back after a break")
        async with asyncio.timeout(30):
            await stream.wait()
        assert stream.status is RequestStatus.DONE, stream.error
        assert stream.text == expected_final_answer("Back after a break")
        assert tokens.issued == 2, "the chat reconnected once"


async def test_an_oversize_chat_fails_once_and_is_never_sent(spine: Stack, jwt_url: str) -> None:
    tokens = Tokens(f"py-big-{uuid.uuid4().hex[:6]}", ttl_s=600)
    async with Connection(jwt_url, tokens, backoff=FAST) as conn, asyncio.timeout(60):
        assert conn.hello is not None
        limit = conn.hello.limits["max_frame_bytes"]
        assert limit == 64 * 1024, "the gateway announces TOKENWIRE_MAX_FRAME_BYTES"
        sent: list[dict[str, Any]] = []
        real_send = conn._send

        async def recording_send(frame: dict[str, Any]) -> bool:
            sent.append(frame)
            return await real_send(frame)

        conn._send = recording_send  # type: ignore[method-assign]
        query = "Too big " + "x" * limit
        big = await conn.chat(query, id="py-big")
        assert big.status is RequestStatus.ERROR
        assert big.error is not None and big.error.code == FRAME_TOO_LARGE
        small = await conn.chat("Small after big", inputs={"tw_sim": {"delay_ms": 30}})
        await until(lambda: deltas(small) >= 2)
        conn.drop_for_testing()  # the reconnect re-sends what is unfinished: not the big one
        await small.wait()
        assert small.text == expected_final_answer("Small after big", {"delay_ms": 30})
    assert "py-big" not in {f.get("id") for f in sent}
    assert [f["type"] for f in sent if f.get("id") == small.id] == ["chat", "resume"]
    assert query not in await sim_queries(spine)


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


def _hello(**extra: Any) -> str:
    frame = {"type": "hello", "session": "s", "user": "u", "protocol": 1, "server": "t"}
    return orjson.dumps(frame | extra).decode()


def _frame(**fields: Any) -> str:
    return orjson.dumps(fields).decode()


async def test_give_up_codes_end_the_connection_at_once() -> None:
    """4001 (and every give_up code) ends it: no retry, not even with a fresh token."""
    opened: list[str | None] = []

    async def handler(ws: ServerConnection) -> None:
        opened.append(ws.request.headers.get("Authorization") if ws.request else None)
        await ws.send(_hello())
        await ws.recv()  # the chat
        await ws.send(_frame(type="error", code="unauthorized", message="no", retryable=False))
        await ws.close(4001, "unauthorized")

    tokens = iter(["t1", "t2", "t3"])
    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        conn = Connection(f"ws://127.0.0.1:{port}/v1/ws", lambda: next(tokens), backoff=FAST)
        await conn.connect()
        stream = await conn.chat("hi")
        async with asyncio.timeout(10):
            await stream.wait()
        await until(lambda: conn.state is ConnectionState.CLOSED, timeout=10)
        await conn.close()
    assert opened == ["Bearer t1"], "no second try after 4001"
    assert stream.error is not None and stream.error.code == CONNECTION_CLOSED


async def test_token_expiry_gets_a_fresh_token_and_resumes_everything() -> None:
    """4002: the provider is asked again, the client reconnects and resumes every request."""
    opened: list[str | None] = []
    first_frames: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection) -> None:
        opened.append(ws.request.headers.get("Authorization") if ws.request else None)
        await ws.send(_hello())
        if len(opened) == 1:
            chat_a = orjson.loads(await ws.recv())
            chat_b = orjson.loads(await ws.recv())
            await ws.send(_frame(type="accepted", id=chat_a["id"], seq=1))
            await ws.send(_frame(type="delta", id=chat_a["id"], seq=2, text="Hel"))
            await ws.send(_frame(type="accepted", id=chat_b["id"], seq=1))
            await ws.send(
                _frame(type="error", code="token_expired", message="expired", retryable=False)
            )
            await ws.close(4002, "token expired")
            return
        for _ in range(2):
            first_frames.append(orjson.loads(await ws.recv()))
        for frame in first_frames:
            rest = [("delta", {"text": "lo"}), ("end", {"stopped": False})]
            for seq, (kind, fields) in enumerate(rest, start=frame["after"] + 1):
                end = {"conversation_id": None, "message_id": None} if kind == "end" else {}
                await ws.send(_frame(type=kind, id=frame["id"], seq=seq, **fields, **end))
        await ws.wait_closed()

    tokens = iter(["t1", "t2", "t3"])
    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}/v1/ws"
        async with Connection(url, lambda: next(tokens), backoff=FAST) as conn:
            a = await conn.chat("a", id="a")
            b = await conn.chat("b", id="b")
            async with asyncio.timeout(10):
                await a.wait()
                await b.wait()
    assert opened == ["Bearer t1", "Bearer t2"]
    assert [(f["type"], f["id"], f["after"]) for f in first_frames] == [
        ("resume", "a", 2),
        ("resume", "b", 1),
    ]
    assert a.status is RequestStatus.DONE and a.text == "Hello"
    assert b.status is RequestStatus.DONE and b.text == "lo"


async def test_token_expiry_without_progress_gives_up_after_a_few_tries() -> None:
    sessions = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal sessions
        sessions += 1
        await ws.send(_hello())
        await ws.close(4002, "token expired")  # a provider that keeps handing out stale tokens

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        conn = Connection(f"ws://127.0.0.1:{port}/v1/ws", lambda: "stale", backoff=FAST)
        stream = await conn.chat("q")
        async with asyncio.timeout(10):
            await stream.wait()
        assert conn.state is ConnectionState.CLOSED
        await conn.close()
    assert sessions == MAX_REFRESH_TRIES + 1
    assert stream.error is not None and stream.error.code == CONNECTION_CLOSED


async def test_idle_close_waits_for_the_application() -> None:
    """4103: no reconnect by itself; the next chat reconnects and is sent."""
    received: list[list[dict[str, Any]]] = []

    async def handler(ws: ServerConnection) -> None:
        frames: list[dict[str, Any]] = []
        received.append(frames)
        await ws.send(_hello())
        if len(received) == 1:
            await ws.close(4103, "idle")
            return
        chat = orjson.loads(await ws.recv())
        frames.append(chat)
        await ws.send(_frame(type="accepted", id=chat["id"], seq=1))
        await ws.send(
            _frame(type="end", id=chat["id"], seq=2, conversation_id=None, message_id=None)
        )
        await ws.wait_closed()

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with Connection(f"ws://127.0.0.1:{port}/v1/ws", backoff=FAST) as conn:
            await until(lambda: conn.state is ConnectionState.IDLE, timeout=10)
            await asyncio.sleep(0.5)  # a reconnect would be due many times over by now
            assert len(received) == 1 and conn.state is ConnectionState.IDLE
            stream = await conn.chat("later", id="later")
            async with asyncio.timeout(10):
                await stream.wait()
    assert [[f["id"] for f in frames] for frames in received] == [[], ["later"]]
    assert stream.status is RequestStatus.DONE


async def test_a_hello_followed_at_once_by_a_close_does_not_reset_the_backoff() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send(_hello())
        await ws.close(4101, "slow consumer")

    delays: list[float] = []
    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        backoff = Backoff(initial_s=0.02, max_s=0.16, factor=2, jitter=0)
        conn = Connection(f"ws://127.0.0.1:{port}/v1/ws", backoff=backoff)
        conn.on_state.append(lambda c: c.delay_s and delays.append(c.delay_s))
        await conn.chat("q")
        await until(lambda: len(delays) >= 5, timeout=10)
        await conn.close()
    assert delays[:5] == pytest.approx([0.02, 0.04, 0.08, 0.16, 0.16])


async def test_an_oversize_chat_fails_locally_and_is_never_sent() -> None:
    """hello.limits.max_frame_bytes: over it, the chat fails with frame_too_large, unsent."""
    received: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection) -> None:
        await ws.send(_hello(limits={"max_frame_bytes": 1024}))
        async for message in ws:
            received.append(orjson.loads(message))

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with Connection(f"ws://127.0.0.1:{port}/v1/ws", backoff=FAST) as conn:
            big = await conn.chat("x" * 2000, id="big")
            small = await conn.chat("small", id="small")
            assert big.status is RequestStatus.ERROR
            assert big.error is not None and big.error.code == FRAME_TOO_LARGE
            assert not big.error.retryable
            await until(lambda: [f["id"] for f in received] == ["small"], timeout=10)
            conn.drop_for_testing()  # the reconnect sends what is unfinished: not the big one
            await until(lambda: [f["id"] for f in received] == ["small", "small"], timeout=10)
            assert not small.finished and "big" not in conn.requests
    assert "big" not in {f.get("id") for f in received}


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


# --- admission control: too_busy ---------------------------------------------------------


async def test_a_busy_gateway_is_left_for_the_next_after_its_hint_with_jitter() -> None:
    """too_busy + 1013 at the handshake: the wait is the hint plus jitter (never less), and
    the reconnect goes to the next of ``urls``, which answers."""
    busy_handshakes = 0
    answered: list[str] = []

    async def busy(ws: ServerConnection) -> None:
        nonlocal busy_handshakes
        busy_handshakes += 1
        await ws.send(
            _frame(
                type="error", code="too_busy", message="busy", retryable=True, retry_after_ms=400
            )
        )
        await ws.close(1013, "too busy")

    async def serving(ws: ServerConnection) -> None:
        await ws.send(_hello())
        chat = orjson.loads(await ws.recv())
        answered.append(chat["id"])
        await ws.send(_frame(type="accepted", id=chat["id"], seq=1))
        await ws.send(_frame(type="delta", id=chat["id"], seq=2, text="ok"))
        await ws.send(
            _frame(type="end", id=chat["id"], seq=3, conversation_id=None, message_id=None)
        )
        await ws.wait_closed()

    delays: list[float] = []
    async with (
        websockets.serve(busy, "127.0.0.1", 0) as a,
        websockets.serve(serving, "127.0.0.1", 0) as b,
    ):
        url_a = f"ws://127.0.0.1:{a.sockets[0].getsockname()[1]}/v1/ws"
        url_b = f"ws://127.0.0.1:{b.sockets[0].getsockname()[1]}/v1/ws"
        conn = Connection(url_a, backoff=FAST, rand=lambda: 0.5, urls=[url_b])
        conn.on_state.append(lambda c: c.delay_s and delays.append(c.delay_s))
        stream = await conn.chat("q", id="q")
        async with asyncio.timeout(10):
            await stream.wait()
        await conn.close()
    assert busy_handshakes == 1 and answered == ["q"]
    # The hint (0.4 s) plus half the jitter (0.5 of 0.5): well over the backoff's 0.05 s.
    assert delays == pytest.approx([0.5])
    assert stream.status is RequestStatus.DONE and stream.text == "ok"
    assert_gapless(stream)


async def test_a_resume_refused_as_too_busy_is_sent_again_and_the_answer_completes() -> None:
    """too_busy with the request's id and no seq: the request stays as it was (not failed)
    and the same resume goes out again after the hint, on the same socket."""
    resumes: list[dict[str, Any]] = []
    sessions = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal sessions
        sessions += 1
        await ws.send(_hello())
        if sessions == 1:
            chat = orjson.loads(await ws.recv())
            await ws.send(_frame(type="accepted", id=chat["id"], seq=1))
            await ws.send(_frame(type="delta", id=chat["id"], seq=2, text="Hel"))
            await ws.close(4100, "draining")
            return
        resumes.append(orjson.loads(await ws.recv()))
        rid = resumes[0]["id"]
        await ws.send(
            _frame(
                type="error", id=rid, code="too_busy", message="busy", retryable=True,
                retry_after_ms=50,
            )
        )  # fmt: skip
        resumes.append(orjson.loads(await ws.recv()))
        await ws.send(_frame(type="delta", id=rid, seq=3, text="lo"))
        await ws.send(_frame(type="end", id=rid, seq=4, conversation_id=None, message_id=None))
        await ws.wait_closed()

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with Connection(f"ws://127.0.0.1:{port}/v1/ws", backoff=FAST) as conn:
            stream = await conn.chat("q", id="q")
            async with asyncio.timeout(10):
                await stream.wait()
    assert sessions == 2, "the refusal did not cost a reconnect"
    assert [(f["type"], f["after"]) for f in resumes] == [("resume", 2), ("resume", 2)]
    assert stream.status is RequestStatus.DONE and stream.text == "Hello"
    assert_gapless(stream)
