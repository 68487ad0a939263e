"""A test client that survives anything: on a dropped socket it reconnects (to whichever
gateway answers) and resumes every request it holds, with the last seq it has.

It records every frame exactly as received, without deduplicating, so a test can check that
the gateways delivered each seq exactly once across reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import orjson
import websockets

__all__ = ["ResilientClient"]

TERMINAL = {"end", "error"}


class ResilientClient:
    def __init__(self, urls: list[str], user: str) -> None:
        self.urls = urls
        self.user = user
        self.frames: dict[str, list[dict[str, Any]]] = {}
        self.queries: dict[str, str] = {}
        self.sent: dict[str, dict[str, Any]] = {}
        self.done: dict[str, asyncio.Event] = {}
        self.reconnects = 0
        self.busy_resumes = 0  # resumes refused as too_busy, each sent again after its hint
        self._retries: set[asyncio.Task[None]] = set()
        self.ws: Any = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._connected.wait(), 30)

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            url = random.choice(self.urls)
            try:
                async with websockets.connect(
                    f"{url}?user={self.user}", subprotocols=["tokenwire.v1"], open_timeout=5
                ) as ws:
                    hello = orjson.loads(await ws.recv())
                    assert hello["type"] == "hello" and hello["user"] == self.user
                    self.ws = ws
                    attempt = 0
                    for rid, frames in list(self.frames.items()):
                        if self.done[rid].is_set():
                            continue
                        if frames:
                            resume = {"type": "resume", "id": rid, "after": frames[-1]["seq"]}
                            await ws.send(orjson.dumps(resume).decode())
                        else:
                            # Never acknowledged: send the chat again. The same id is the same
                            # request (JetStream dedup), so this cannot ask Dify twice.
                            await ws.send(orjson.dumps(self.sent[rid]).decode())
                    self._connected.set()
                    async for raw in ws:
                        frame = orjson.loads(raw)
                        rid = frame.get("id")
                        if rid in self.frames and "seq" in frame:
                            self.frames[rid].append(frame)
                            if frame["type"] in TERMINAL:
                                self.done[rid].set()
                        elif rid in self.frames and frame.get("code") == "too_busy":
                            # The gateway had no room (or NATS no answer) for the resume: the
                            # request is untouched; the same resume after the hint.
                            self.busy_resumes += 1
                            wait_s = frame.get("retry_after_ms", 1000) / 1000
                            self._later(ws, rid, wait_s * random.uniform(1.0, 1.5))
            except (TimeoutError, OSError, websockets.WebSocketException):
                pass
            self.ws = None
            self._connected.clear()
            if self._closing:
                return
            self.reconnects += 1
            attempt += 1
            await asyncio.sleep(min(0.1 * 2**attempt, 2.0) * random.uniform(0.5, 1.0))

    def _later(self, ws: Any, rid: str, wait_s: float) -> None:
        async def resend() -> None:
            await asyncio.sleep(wait_s)
            frames = self.frames[rid]
            if self.ws is ws and not self.done[rid].is_set():  # a new socket resumes anyway
                again = (
                    {"type": "resume", "id": rid, "after": frames[-1]["seq"]}
                    if frames
                    else self.sent[rid]  # never acknowledged: the chat again, as on reconnect
                )
                with contextlib.suppress(websockets.ConnectionClosed):
                    await ws.send(orjson.dumps(again).decode())

        task = asyncio.create_task(resend())
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def chat(self, rid: str, query: str, **fields: Any) -> None:
        self.sent[rid] = {"type": "chat", "id": rid, "query": query, **fields}
        self.queries[rid] = query
        self.done[rid] = asyncio.Event()
        self.frames[rid] = []
        await asyncio.wait_for(self._connected.wait(), 30)
        with contextlib.suppress(websockets.ConnectionClosed):
            await self.ws.send(orjson.dumps(self.sent[rid]).decode())
        # If the socket dropped first, the reconnect sends it again.

    async def drop(self) -> None:
        """Cut the socket abruptly, as a flaky network would."""
        if self.ws is not None:
            with contextlib.suppress(Exception):
                self.ws.transport.abort()

    async def wait_all(self, timeout: float) -> None:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self.done.values())), timeout)

    async def close(self) -> None:
        self._closing = True
        for task in list(self._retries):
            task.cancel()
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
