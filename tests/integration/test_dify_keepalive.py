"""A kept-alive connection Dify closed is not an outage.

The worker's pool keeps idle connections to Dify a few seconds; Dify's server may close one
first (gunicorn after 2 s, uvicorn after 5 s) just as the worker sends on it. Such a request
never reached Dify: the worker sends it once more on a fresh connection, instead of sending the
job back as "Dify unavailable" and the client seeing a ``queued`` detour. This runs the real
client (its aiohttp transport) against a real socket server that answers the first request on
a connection and closes the connection at the second one, without a byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from shared.settings import Settings
from worker.dify import DifyClient

pytestmark = pytest.mark.integration

INFO = orjson.dumps({"name": "app", "mode": "chat"})
SSE = b'data: {"event": "message_end", "task_id": "t", "message_id": "m"}\n\n'


class OneRequestPerConnection:
    """Answers the first request of each connection, then closes it at the next one."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.dropped = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        answered = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                if answered:  # the kept-alive connection's second request: close, no answer
                    self.dropped += 1
                    return
                self.requests.append(head.split(b"\r\n", 1)[0])
                stream = head.startswith(b"POST /v1/chat-messages ")
                body, kind = (SSE, b"text/event-stream") if stream else (INFO, b"application/json")
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: " + kind + b"\r\n"
                    b"Content-Length: %d\r\nConnection: keep-alive\r\n\r\n" % len(body) + body
                )
                await writer.drain()
                answered = True
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@pytest.fixture
async def dify() -> AsyncIterator[tuple[OneRequestPerConnection, DifyClient]]:
    server = OneRequestPerConnection()
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    client = DifyClient(
        Settings(dify_api_url=f"http://127.0.0.1:{port}/v1", dify_api_key="app-keepalive")
    )
    try:
        yield server, client
    finally:
        await client.aclose()
        listening.close()
        await listening.wait_closed()


async def test_a_stop_on_a_connection_dify_closed_is_sent_again_on_a_fresh_one(
    dify: tuple[OneRequestPerConnection, DifyClient],
) -> None:
    """A POST (aiohttp itself sends an idempotent GET again, never a POST)."""
    server, client = dify
    for n in range(3):
        await client.stop(f"task-{n}", "ivy", trace_id=f"t{n}")
    # Each reuse of the kept-alive connection met a close and went out again on a new one.
    assert len(server.requests) == 3 and server.dropped == 2 and server.connections == 3


async def test_a_stream_on_a_connection_dify_closed_is_sent_again_on_a_fresh_one(
    dify: tuple[OneRequestPerConnection, DifyClient],
) -> None:
    server, client = dify
    for n in range(2):
        async with client.stream_chat({"query": f"q{n}"}, trace_id=f"t{n}") as events:
            got = [event async for batch in events for event in batch]
        assert [e.data for e in got] == [SSE[6:-2].decode()]
    assert len(server.requests) == 2 and server.dropped == 1
