"""A thousand connections on one gateway cost it no NATS subscription and no task of their own.

One real gateway (with its id set, ``TOKENWIRE_GATEWAY_ID``) holds 1,000 raw WebSocket clients;
what it costs is read where an operator reads it: the gateway's NATS client in nats-server's
``/connz?subs=1`` (its subscriptions) and the gateway's ``tokenwire_gateway_asyncio_tasks`` gauge.
A few of the clients chat, to show that the one wildcard subscription routes every frame to
the connection that asked, while the other 995 sit idle on the same gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.integration.promtext import samples, value
from tests.integration.stack import Proc, Stack
from tests.integration.wsclient import answer_of, assert_seq_complete
from tokenwire.natsserver import NatsServer
from tokenwire.simulator import expected_final_answer

pytestmark = pytest.mark.integration

GATEWAY_ID = "gw-fanin-1"
CONNECTIONS = 1000
CHATTERS = (0, 249, 500, 750, 999)  # which of the connections ask something
CONTROLS = {"delay_ms": 5, "tokens": 12}
_OPEN_AT_ONCE = 50


@dataclass
class Held:
    """What one gateway cost with one connection, then with all of them."""

    subs_one: list[str]
    subs_all: list[str]
    tasks_one: float
    tasks_all: float
    gateway_clients: int
    open_all: float
    answers: dict[int, tuple[str, list[dict[str, Any]]]] = field(default_factory=dict)


def gateway_subscriptions(server: NatsServer) -> tuple[list[str], int]:
    """The gateway's subscriptions as nats-server lists them, and how many clients it has."""
    body = httpx.get(f"{server.monitor_url}/connz", params={"subs": 1}, timeout=5).json()
    mine = [c for c in body.get("connections", []) if c.get("name") == "tokenwire-gateway"]
    subs = [s for c in mine for s in c.get("subscriptions_list", [])]
    return sorted(subs), len(mine)


def gateway_tasks(gateway: Proc) -> float:
    metrics = samples(f"http://127.0.0.1:{gateway.port}/metrics")  # type: ignore[attr-defined]
    return value(metrics, "tokenwire_gateway_asyncio_tasks")


async def settled(read: Any, tries: int = 50) -> Any:
    """``read()`` once it returns the same twice in a row (connections finish opening)."""
    last = read()
    for _ in range(tries):
        await asyncio.sleep(0.2)
        now = read()
        if now == last:
            return now
        last = now
    return last


async def open_client(url: str) -> ClientConnection:
    ws = await websockets.connect(
        url, subprotocols=["tokenwire.v1"], ping_interval=None, max_size=None, open_timeout=60
    )
    hello = orjson.loads(await ws.recv())
    assert hello["type"] == "hello", hello
    return ws


async def ask(ws: ClientConnection, rid: str, query: str) -> list[dict[str, Any]]:
    await ws.send(
        orjson.dumps({"type": "chat", "id": rid, "query": query, "inputs": {"tw_sim": CONTROLS}})
    )
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(60):
        while not frames or frames[-1]["type"] not in ("end", "error"):
            frame = orjson.loads(await ws.recv())
            assert frame.get("id") == rid, f"a frame of another request reached it: {frame}"
            frames.append(frame)
    return frames


async def hold(stack: Stack, server: NatsServer, gateway: Proc) -> Held:
    url = stack.ws_url(gateway.port)  # type: ignore[attr-defined]
    clients: list[ClientConnection] = []
    try:
        clients.append(await open_client(f"{url}?user=fan0"))
        subs_one, _ = await settled(lambda: gateway_subscriptions(server))
        tasks_one = await settled(lambda: gateway_tasks(gateway))
        for start in range(1, CONNECTIONS, _OPEN_AT_ONCE):
            batch = range(start, min(start + _OPEN_AT_ONCE, CONNECTIONS))
            clients += await asyncio.gather(*(open_client(f"{url}?user=fan{i}") for i in batch))
        open_all = value(
            samples(f"http://127.0.0.1:{gateway.port}/metrics"),  # type: ignore[attr-defined]
            "tokenwire_gateway_connections",
        )
        subs_all, gateway_clients = await settled(lambda: gateway_subscriptions(server))
        tasks_all = await settled(lambda: gateway_tasks(gateway))
        held = Held(subs_one, subs_all, tasks_one, tasks_all, gateway_clients, open_all)
        queries = {i: f"fan-in {i} {uuid.uuid4().hex[:6]}" for i in CHATTERS}
        answered = await asyncio.gather(
            *(ask(clients[i], f"r{i}", query) for i, query in queries.items())
        )
        held.answers = {
            i: (queries[i], frames) for i, frames in zip(queries, answered, strict=True)
        }
        return held
    finally:
        await asyncio.gather(*(ws.close() for ws in clients), return_exceptions=True)


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Held]:
    """1,000 connections held on one gateway, measured, and a few of them answered."""
    workdir: Path = tmp_path_factory.mktemp("fanin")
    server = NatsServer(workdir / "nats", stop_grace=5.0)
    server.start()
    stack = Stack(nats_url=server.url, workdir=workdir)
    try:
        stack.simulator()
        stack.worker()
        gateway = stack.gateway(TOKENWIRE_GATEWAY_ID=GATEWAY_ID)
        yield asyncio.run(hold(stack, server, gateway))
    except BaseException:
        print(stack.logs())
        raise
    finally:
        with contextlib.suppress(Exception):
            stack.close()
        server.stop()


@pytest.mark.timeout(240)
def test_the_gateway_s_subscriptions_do_not_grow_with_its_connections(held: Held) -> None:
    assert held.open_all == CONNECTIONS
    assert held.gateway_clients == 1
    assert held.subs_all == held.subs_one, "1,000 connections cost the gateway subscriptions"
    # The one subscription that carries every connection's frames names this gateway only.
    frames = [s for s in held.subs_all if s.startswith(("tw.frames.", "tw.live."))]
    assert frames == [f"tw.live.*.{GATEWAY_ID}.>"]  # the frames streams' republish


@pytest.mark.timeout(240)
def test_each_answer_reaches_the_connection_that_asked(held: Held) -> None:
    assert sorted(held.answers) == sorted(CHATTERS)
    for query, frames in held.answers.values():
        assert frames[0]["type"] == "accepted" and frames[-1]["type"] == "end", frames[-2:]
        assert_seq_complete(frames)
        assert answer_of(frames) == expected_final_answer(query, CONTROLS)


# An idle connection runs one task: uvicorn's own (run_asgi), which also reads the client
# (gateway/connection.py). Before issue 13 it also ran a reader, a timer, a writer and its NATS
# subscription's pending-queue task; the timers are one sweep task now, the writer starts on
# first use, and the gateway's one subscription serves every connection.
@pytest.mark.timeout(240)
def test_tasks_grow_by_at_most_one_per_connection(held: Held) -> None:
    grown = held.tasks_all - held.tasks_one
    assert grown <= CONNECTIONS - 1, f"{grown:.0f} more tasks for {CONNECTIONS - 1} connections"
