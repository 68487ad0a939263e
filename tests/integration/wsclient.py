"""A small protocol client for tests: real WebSocket (``websockets``), frames by request."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

__all__ = ["Client", "answer_of", "assert_seq_complete"]

_ids = itertools.count(1)
TERMINAL = {"end", "error"}


def answer_of(frames: list[dict[str, Any]]) -> str:
    text = ""
    for f in frames:
        if f["type"] == "delta":
            text += f["text"]
        elif f["type"] == "replace":
            text = f["text"]
        elif f["type"] == "reset":
            text = ""
    return text


def assert_seq_complete(frames: list[dict[str, Any]], first: int = 1) -> None:
    seqs = [f["seq"] for f in frames]
    assert seqs == list(range(first, first + len(frames))), f"seqs not gapless: {seqs}"


class Client:
    """One connection; frames are sorted by request id as they come."""

    def __init__(self, url: str, **connect_kwargs: Any) -> None:
        self.url = url
        self.connect_kwargs = connect_kwargs
        self.ws: ClientConnection | None = None
        self.hello: dict[str, Any] = {}
        self.frames: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.other: list[dict[str, Any]] = []
        self.arrivals: list[dict[str, Any]] = []  # every request frame, in arrival order
        self._events: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._other_event = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.close_code: int | None = None

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self.ws = await websockets.connect(
            self.url, subprotocols=["tokenwire.v1"], max_size=None, **self.connect_kwargs
        )
        self.hello = orjson.loads(await self.ws.recv())
        assert self.hello["type"] == "hello", self.hello
        self.closed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for raw in self.ws:
                frame = orjson.loads(raw)
                rid = frame.get("id")
                if rid is not None and "seq" in frame:
                    self.frames[rid].append(frame)
                    self.arrivals.append(frame)
                    self._events[rid].set()
                else:
                    self.other.append(frame)
                    self._other_event.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        assert self.ws is not None
        await self.ws.send(
            frame if isinstance(frame, (str, bytes)) else orjson.dumps(frame).decode()
        )

    async def chat(self, query: str, rid: str | None = None, **fields: Any) -> str:
        rid = rid or f"req-{next(_ids)}"
        await self.send({"type": "chat", "id": rid, "query": query, **fields})
        return rid

    async def wait_for(
        self, rid: str, kind: str | set[str], timeout: float = 30.0
    ) -> dict[str, Any]:
        kinds = {kind} if isinstance(kind, str) else kind

        async def _wait() -> dict[str, Any]:
            while True:
                for f in self.frames[rid]:
                    if f["type"] in kinds:
                        return f
                if self.closed.is_set():
                    raise ConnectionError(f"closed ({self.close_code}) before {kinds} for {rid}")
                self._events[rid].clear()
                waiter = asyncio.ensure_future(self._events[rid].wait())
                closer = asyncio.ensure_future(self.closed.wait())
                await asyncio.wait({waiter, closer}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                closer.cancel()

        return await asyncio.wait_for(_wait(), timeout)

    async def finish(self, rid: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        await self.wait_for(rid, TERMINAL, timeout)
        return self.frames[rid]

    async def next_other(self, timeout: float = 10.0) -> dict[str, Any]:
        async def _wait() -> dict[str, Any]:
            while not self.other:
                self._other_event.clear()
                await self._other_event.wait()
            return self.other.pop(0)

        return await asyncio.wait_for(_wait(), timeout)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.wait({self._reader}, timeout=5)
