"""The edge, over real gateways: tokens, origins, caps across gateways, rates, liveness.

Four JWT gateways share one NATS, one worker and the Dify simulator. ``a`` and ``b`` are the
"cluster" (per-user cap 2, a small cluster-wide rate); ``c`` has a tiny send queue and a
per-user in-flight cap of 2; ``d`` a 2 s idle timeout.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from tests.integration.stack import Stack, running_stack
from tests.integration.wsclient import Client, answer_of, assert_seq_complete
from tokenwire.simulator import expected_answer

pytestmark = pytest.mark.integration

SECRET = "edge-test-secret-" + uuid.uuid4().hex  # 49 bytes: over the 32-byte minimum
AUDIENCE = "tokenwire"
APP_ORIGIN = "https://app.example"
CONNECTION_TTL_S = 3.0
RATE_BURST = 4
TOKENS = 40

COMMON_ENV = {
    "TOKENWIRE_AUTH": "jwt",
    "TOKENWIRE_ALLOW_INSECURE": "0",
    "TOKENWIRE_JWT_SECRET": SECRET,
    "TOKENWIRE_JWT_AUDIENCE": AUDIENCE,
    "TOKENWIRE_ALLOWED_ORIGINS": APP_ORIGIN,
    "TOKENWIRE_AUTH_TIMEOUT_S": "2",
    "TOKENWIRE_CONNECTION_TTL_S": str(CONNECTION_TTL_S),
    "TOKENWIRE_RATE_PER_USER": "1/min",
    "TOKENWIRE_RATE_BURST": str(RATE_BURST),
}
CLUSTER_ENV = COMMON_ENV | {"TOKENWIRE_MAX_CONNECTIONS_PER_USER": "2"}
LIVENESS_ENV = COMMON_ENV | {
    "TOKENWIRE_SEND_QUEUE_FRAMES": "16",
    "TOKENWIRE_SEND_BUFFER_BYTES": "16384",
    "TOKENWIRE_MAX_INFLIGHT_PER_USER": "2",
}
IDLE_ENV = COMMON_ENV | {"TOKENWIRE_IDLE_TIMEOUT_S": "2"}


class Edge:
    def __init__(self, stack: Stack, a: int, b: int, c: int, d: int) -> None:
        self.stack, self.a, self.b, self.c, self.d = stack, a, b, c, d

    def url(self, port: int) -> str:
        return f"ws://127.0.0.1:{port}/v1/ws"

    def all_dify_requests(self) -> list[dict[str, Any]]:
        response = httpx.get(f"http://127.0.0.1:{self.stack.sim_port}/_sim/requests", timeout=5)
        requests: list[dict[str, Any]] = response.json()
        return requests

    def dify_requests(self, user: str) -> list[dict[str, Any]]:
        return [r for r in self.all_dify_requests() if r["user"] == user]


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    # One frame per token (no coalescing): the slow-consumer test needs a flood of frames, as
    # a worker of many fast streams sends; the edge's rules are per frame either way.
    with running_stack(tmp_path_factory.mktemp("edge"), TOKENWIRE_COALESCE_MS="0") as stack:
        a = stack.gateway("gateway-a", **CLUSTER_ENV)
        b = stack.gateway("gateway-b", **CLUSTER_ENV)
        c = stack.gateway("gateway-c", **LIVENESS_ENV)
        d = stack.gateway("gateway-d", **IDLE_ENV)
        yield Edge(stack, a.port, b.port, c.port, d.port)


def token(sub: str, *, exp_in: float = 600, aud: str = AUDIENCE, secret: str = SECRET) -> str:
    return jwt.encode(
        {"sub": sub, "aud": aud, "exp": int(time.time() + exp_in)}, secret, algorithm="HS256"
    )


def bearer(sub: str, **kw: Any) -> dict[str, Any]:
    return {"additional_headers": {"Authorization": f"Bearer {token(sub, **kw)}"}}


def user() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


async def refusal(url: str, first: dict[str, Any] | None = None, **kw: Any) -> tuple[dict, int]:
    """Connect, maybe send one frame, and return (the error frame, the close code)."""
    kw.setdefault("subprotocols", ["tokenwire.v1"])
    async with websockets.connect(url, **kw) as ws:
        if first is not None:
            await ws.send(orjson.dumps(first).decode())
        frame = orjson.loads(await asyncio.wait_for(ws.recv(), 15))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 15)
        assert ws.close_code is not None
        return frame, ws.close_code


async def first_frames_until_hello(url: str, sub: str, *, since: float) -> list[dict[str, Any]]:
    """Connect as ``sub`` again and again until the gateway says ``hello`` (or the liveness TTL
    and generous slack for a loaded machine have passed since ``since``); each connection's
    first frame, in order."""
    frames: list[dict[str, Any]] = []
    while time.monotonic() - since < CONNECTION_TTL_S + 15:
        async with websockets.connect(url, **bearer(sub)) as ws:
            frames.append(orjson.loads(await asyncio.wait_for(ws.recv(), 15)))
        if frames[-1]["type"] == "hello":
            break
        await asyncio.sleep(0.3)
    return frames


# --- authentication -----------------------------------------------------------------------


async def test_missing_forged_expired_and_wrong_audience_tokens_are_refused(edge: Edge) -> None:
    url = edge.url(edge.a)
    cases = {
        "missing": ({}, "unauthorized", 4001),
        "forged": (bearer("mallory", secret="not-the-secret-" + "z" * 32), "unauthorized", 4001),
        "expired": (bearer("alice", exp_in=-30), "token_expired", 4002),
        "wrong audience": (bearer("alice", aud="another-app"), "unauthorized", 4001),
    }
    for name, (kw, code, close_code) in cases.items():
        frame, closed = await refusal(url, **kw)
        assert frame["type"] == "error" and frame["code"] == code, (name, frame)
        assert closed == close_code, name
        assert "id" not in frame
    # A first frame that is not `auth` is refused at once too, and never reaches Dify.
    frame, closed = await refusal(url, {"type": "chat", "id": "sneaky", "query": "hi"})
    assert (frame["code"], closed) == ("unauthorized", 4001)
    assert "hi" not in [r["query"] for r in edge.all_dify_requests()]


async def test_a_good_tokens_sub_is_the_user_dify_sees(edge: Edge) -> None:
    sub = user()
    query = f"who am I? {uuid.uuid4()}"
    async with Client(edge.url(edge.a), **bearer(sub)) as client:
        assert client.hello["user"] == sub
        frames = await client.finish(await client.chat(query))
    assert answer_of(frames) == expected_answer(query, TOKENS)
    assert [r["query"] for r in edge.dify_requests(sub)] == [query]


async def test_the_token_can_come_as_a_subprotocol_or_a_first_auth_frame(edge: Edge) -> None:
    sub = user()
    offered = ["tokenwire.v1", f"bearer.{token(sub)}"]
    async with websockets.connect(edge.url(edge.b), subprotocols=offered) as ws:
        assert ws.subprotocol == "tokenwire.v1"  # the token is never echoed back
        hello = orjson.loads(await ws.recv())
    assert hello["type"] == "hello" and hello["user"] == sub

    other = user()
    async with websockets.connect(edge.url(edge.a), subprotocols=["tokenwire.v1"]) as ws:
        await ws.send(orjson.dumps({"type": "auth", "token": token(other)}).decode())
        hello = orjson.loads(await ws.recv())
        assert hello["type"] == "hello" and hello["user"] == other
        await ws.send(
            orjson.dumps({"type": "chat", "id": "q", "query": "first-frame auth"}).decode()
        )
        frames = await _frames_until_end(ws)
    assert answer_of(frames) == expected_answer("first-frame auth", TOKENS)
    assert [r["user"] for r in edge.dify_requests(other)] == [other]


async def test_the_query_string_token_is_off_unless_enabled(edge: Edge) -> None:
    frame, closed = await refusal(f"{edge.url(edge.a)}?access_token={token(user())}")
    assert (frame["code"], closed) == ("unauthorized", 4001)


async def test_expiry_closes_the_connection_unless_a_fresh_token_comes(edge: Edge) -> None:
    sub = user()
    lapsing = Client(edge.url(edge.a), **bearer(sub, exp_in=6))
    refreshed = Client(edge.url(edge.b), **bearer(sub, exp_in=6))
    async with lapsing, refreshed:
        await refreshed.send({"type": "auth", "token": token(sub, exp_in=600)})
        await asyncio.wait_for(lapsing.closed.wait(), 20)
        assert lapsing.close_code == 4002
        assert [f["code"] for f in lapsing.other if f["type"] == "error"] == ["token_expired"]
        # Past the first token's exp, the refreshed connection still works.
        await asyncio.sleep(1.5)
        frames = await refreshed.finish(await refreshed.chat("after the refresh"))
        assert frames[-1]["type"] == "end" and not refreshed.closed.is_set()


async def test_an_auth_frame_for_another_user_is_forbidden(edge: Edge) -> None:
    async with Client(edge.url(edge.a), **bearer(user())) as client:
        await client.send({"type": "auth", "token": token("somebody-else")})
        await asyncio.wait_for(client.closed.wait(), 15)
    assert client.close_code == 4003
    assert client.other[-1]["code"] == "forbidden"


# --- origins ------------------------------------------------------------------------------


async def test_a_disallowed_origin_gets_403(edge: Edge) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(edge.url(edge.a), origin="https://evil.example", **bearer("x"))
    assert refused.value.response.status_code == 403
    # The allowed origin, and a client that sends none (not a browser), get in.
    async with Client(edge.url(edge.a), origin=APP_ORIGIN, **bearer(user())) as client:
        assert client.hello["type"] == "hello"
    async with Client(edge.url(edge.a), **bearer(user())) as client:
        assert client.hello["type"] == "hello"


# --- caps and rates -----------------------------------------------------------------------


async def test_per_user_cap_holds_across_gateways(edge: Edge) -> None:
    sub = user()
    async with Client(edge.url(edge.a), **bearer(sub)), Client(edge.url(edge.a), **bearer(sub)):
        frame, closed = await refusal(edge.url(edge.b), **bearer(sub))
        assert frame["code"] == "too_many_connections" and closed == 4004
        assert frame["retryable"] is True and frame["retry_after_ms"] > 0
        # Another user is not affected.
        async with Client(edge.url(edge.b), **bearer(user())) as other:
            assert other.hello["type"] == "hello"
    # Both left cleanly: their slots are free at once.
    async with Client(edge.url(edge.b), **bearer(sub)), Client(edge.url(edge.b), **bearer(sub)):
        pass


async def test_a_killed_gateways_connections_stop_counting(edge: Edge) -> None:
    """One liveness entry per gateway (gateway/limits.py): when it expires, all of the
    killed gateway's slots are free together, while the user's connections elsewhere count."""
    doomed = edge.stack.gateway("gateway-doomed", **CLUSTER_ENV)
    sub = user()
    first = Client(edge.url(doomed.port), **bearer(sub))
    second = Client(edge.url(doomed.port), **bearer(sub))
    await first.connect()
    await second.connect()
    frame, closed = await refusal(edge.url(edge.b), **bearer(sub))
    assert (frame["code"], closed) == ("too_many_connections", 4004)

    doomed.kill()  # SIGKILL: no clean-up runs, the slots stay in NATS, naming gateway-doomed
    killed_at = time.monotonic()
    await asyncio.wait_for(first.closed.wait(), 10)
    await first.close()
    await second.close()
    # Documented: a killed gateway's connections stop counting within
    # TOKENWIRE_CONNECTION_TTL_S; the deadline leaves generous slack for a loaded machine.
    first_frames = await first_frames_until_hello(edge.url(edge.b), sub, since=killed_at)
    assert first_frames[0]["code"] == "too_many_connections"  # right after the kill
    assert first_frames[-1]["type"] == "hello" and first_frames[-1]["user"] == sub
    # Both of the dead gateway's slots went at once: the user holds two on B, then is capped.
    async with Client(edge.url(edge.b), **bearer(sub)), Client(edge.url(edge.a), **bearer(sub)):
        frame, closed = await refusal(edge.url(edge.b), **bearer(sub))
        assert (frame["code"], closed) == ("too_many_connections", 4004)


async def test_a_gateway_restarted_under_its_fixed_id_does_not_inherit_its_dead_slots(
    edge: Edge,
) -> None:
    """A StatefulSet pod (the restricted overlay) or ``--workers N`` keeps TOKENWIRE_GATEWAY_ID
    across restarts. The slots of the process that was killed must still come free: the new
    process under the same id neither counts them as its own nor keeps them alive."""
    fixed = {"TOKENWIRE_GATEWAY_ID": f"pod-{uuid.uuid4().hex[:6]}"}
    first = edge.stack.gateway("gateway-fixed-1", **CLUSTER_ENV, **fixed)
    sub = user()
    held = [Client(edge.url(first.port), **bearer(sub)) for _ in range(2)]
    for client in held:
        await client.connect()
    first.kill()  # no clean-up: both slots stay in NATS
    killed_at = time.monotonic()
    for client in held:
        await asyncio.wait_for(client.closed.wait(), 10)
        await client.close()
    again = edge.stack.gateway("gateway-fixed-2", **CLUSTER_ENV, **fixed)
    # Within the liveness TTL (and slack for a loaded machine) the user has both slots back,
    # on the restarted gateway itself.
    frames = await first_frames_until_hello(edge.url(again.port), sub, since=killed_at)
    assert frames[-1]["type"] == "hello", f"the dead process's slots never came free: {frames[-1]}"
    async with Client(edge.url(again.port), **bearer(sub)), Client(edge.url(edge.a), **bearer(sub)):
        frame, closed = await refusal(edge.url(again.port), **bearer(sub))
        assert (frame["code"], closed) == ("too_many_connections", 4004)
    again.stop()


async def test_a_burst_over_the_rate_gets_rate_limited_and_dify_sees_none_of_it(
    edge: Edge,
) -> None:
    sub = user()
    queries = {f"burst-{i}": f"burst {i} {uuid.uuid4().hex[:6]}" for i in range(10)}
    async with (
        Client(edge.url(edge.a), **bearer(sub)) as on_a,
        Client(edge.url(edge.b), **bearer(sub)) as on_b,
    ):
        for i, (rid, query) in enumerate(queries.items()):
            await (on_a if i % 2 else on_b).chat(query, rid=rid)
        results = {
            rid: await (on_a if i % 2 else on_b).finish(rid) for i, rid in enumerate(queries)
        }
    answered = {rid for rid, frames in results.items() if frames[-1]["type"] == "end"}
    limited = {rid: frames for rid, frames in results.items() if rid not in answered}
    # The bucket is shared by both gateways: the burst passes once, not once per gateway.
    # Chats of one user interleaved over two gateways may pass at most one more per gateway
    # (a gateway deciding from its copy in memory; docs/security.md has the rule), never a
    # refused one stored: Dify sees exactly the answered ones (below).
    assert RATE_BURST <= len(answered) <= RATE_BURST + 2
    for rid, frames in limited.items():
        (error,) = frames
        assert error["code"] == "rate_limited" and error["seq"] == 1, rid
        assert error["retryable"] is True and error["retry_after_ms"] > 1000
    for rid in answered:
        assert answer_of(results[rid]) == expected_answer(queries[rid], TOKENS)
    seen = sorted(r["query"] for r in edge.dify_requests(sub))
    assert seen == sorted(queries[rid] for rid in answered)


async def test_requests_in_flight_per_user(edge: Edge) -> None:
    sub = user()
    slow = {"tw_sim": {"tokens": 10, "delay_ms": 200}}
    async with (
        Client(edge.url(edge.c), **bearer(sub)) as one,
        Client(edge.url(edge.c), **bearer(sub)) as two,
    ):
        running = [await one.chat(f"slow {n}", inputs=slow) for n in range(2)]
        await asyncio.gather(*(one.wait_for(rid, "accepted") for rid in running))
        refused = await two.finish(await two.chat("one too many"))
        for rid in running:
            assert (await one.finish(rid))[-1]["type"] == "end"
        later = await two.finish(await two.chat("now there is room"))
    assert refused[0]["code"] == "too_many_inflight" and refused[0]["retryable"] is True
    assert later[-1]["type"] == "end"
    assert "one too many" not in [r["query"] for r in edge.dify_requests(sub)]


# --- liveness -----------------------------------------------------------------------------


async def test_idle_connections_close_but_not_while_an_answer_streams(edge: Edge) -> None:
    async with Client(edge.url(edge.d), **bearer(user())) as idle:
        await asyncio.wait_for(idle.closed.wait(), 20)
    assert idle.close_code == 4103 and idle.other[-1]["code"] == "idle_timeout"

    async with Client(edge.url(edge.d), **bearer(user())) as busy:
        # The answer takes ~3 s, longer than the 2 s idle timeout.
        rid = await busy.chat("a long answer", inputs={"tw_sim": {"tokens": 15, "delay_ms": 200}})
        frames = await busy.finish(rid)
        assert frames[-1]["type"] == "end" and not busy.closed.is_set()
        await asyncio.wait_for(busy.closed.wait(), 20)
    assert busy.close_code == 4103


async def test_a_slow_consumer_is_closed_and_resumes_everything(edge: Edge) -> None:
    sub = user()
    query = f"a long answer {uuid.uuid4().hex[:6]}"
    tokens = 5_000  # ~300 kB of frames, far more than gateway c's socket buffers hold
    # A client that reads gets all of it, however small the queue: bursts alone close nobody.
    async with Client(edge.url(edge.c), **bearer(sub)) as fast:
        burst = await fast.finish(await fast.chat(f"burst {query}", inputs=_fast(tokens)))
    assert burst[-1]["type"] == "end" and len(burst) == tokens + 3

    client = RawClient(edge.url(edge.c), {"Authorization": f"Bearer {token(sub)}"})
    await client.connect()
    await client.send(
        {
            "type": "chat",
            "id": "long",
            "query": query,
            "inputs": {"tw_sim": {"tokens": tokens, "delay_ms": 0}},
        }
    )
    # The client reads nothing: once the socket buffers are full, the queue of 16 overflows.
    gateway = next(p for p in edge.stack.procs if p.name == "gateway-c")
    deadline = time.monotonic() + 60
    while "slow consumer" not in gateway.log_text():
        assert time.monotonic() < deadline, "the gateway never gave up on the client"
        await asyncio.sleep(0.1)
    held, close_code = await client.read_to_close()
    assert close_code == 4101
    frames = [f for f in held if f.get("id") == "long"]
    assert frames and frames[-1]["type"] not in ("end", "error")
    assert_seq_complete(frames)

    async with Client(edge.url(edge.c), **bearer(sub)) as again:
        await again.send({"type": "resume", "id": "long", "after": frames[-1]["seq"]})
        rest = await again.finish("long", timeout=60)
    assert_seq_complete(rest, first=frames[-1]["seq"] + 1)
    assert rest[-1]["type"] == "end"
    assert answer_of(frames + rest) == expected_answer(query, tokens)


def _fast(tokens: int) -> dict[str, Any]:
    return {"tw_sim": {"tokens": tokens, "delay_ms": 0}}


class RawClient:
    """A WebSocket client that reads only when told to (websockets' own clients keep reading
    into memory): the sans-I/O protocol over a socket with a small receive buffer."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.protocol = ClientProtocol(parse_uri(url), subprotocols=[Subprotocol("tokenwire.v1")])
        self.headers = headers
        self.port = parse_uri(url).port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setblocking(False)

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, ("127.0.0.1", self.port))
        request = self.protocol.connect()
        request.headers.update(self.headers)
        self.protocol.send_request(request)
        await self._flush()
        frames: list[dict[str, Any]] = []
        while not frames:
            frames += await self._read()
        assert frames[0]["type"] == "hello", frames

    async def send(self, frame: dict[str, Any]) -> None:
        self.protocol.send_text(orjson.dumps(frame))
        await self._flush()

    async def read_to_close(self) -> tuple[list[dict[str, Any]], int | None]:
        frames: list[dict[str, Any]] = []
        while self.protocol.close_rcvd is None and not self.eof:
            frames += await self._read()
        self.sock.close()
        received = self.protocol.close_rcvd
        return frames, received.code if received is not None else None

    eof = False

    async def _read(self) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), 30)
        if data:
            self.protocol.receive_data(data)
        else:
            self.eof = True
            self.protocol.receive_eof()
        return [
            orjson.loads(event.data)
            for event in self.protocol.events_received()
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT
        ]

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, b"".join(self.protocol.data_to_send()))


async def _frames_until_end(ws: ClientConnection) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
        frames.append(frame)
        if frame["type"] in ("end", "error"):
            return frames
