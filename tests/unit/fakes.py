"""In-memory stand-ins for the worker's seams (``worker/types.py``): NATS, Dify, a job message.

:class:`FakeBus` behaves as the frames stream does, not as a recorder: what is published live
and what the stream keeps are two lists, a frame can be lost on its way into the stream
(``lose``, as in a JetStream leader change), and :meth:`FakeBus.ensure_kept` publishes again
exactly what is missing, the way :class:`worker.bus.NatsBus` does. The bus contract suite
(``tests/unit/bus_contract.py``) runs the same checks against both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import orjson

from shared.dify_api import DifyIds, HistoryMessage
from shared.exceptions import BusRetryable, TokenwireError
from shared.jobs import Job
from shared.sse import SSEEvent

__all__ = ["FakeBus", "FakeDify", "Msg", "event"]


class FakeBus:
    def __init__(self) -> None:
        #: Every frame as published live (what a connected client receives), in order.
        self.frames: list[dict[str, Any]] = []
        #: What the frames stream keeps, per subject, in the order it stored them.
        self.kept: dict[str, list[bytes]] = {}
        #: Seqs the stream fails to store when they are published live (a leader change).
        self.lose: set[int] = set()
        #: How many of the next ensure_kept calls fail as NATS does while it has no leader.
        self.unconfirmed = 0
        self.ids: dict[str, DifyIds] = {}
        self.stops: set[str] = set()
        self.statuses: dict[str, dict[str, Any]] = {}
        self.dead: list[tuple[str, str, int]] = []
        self.leases: dict[str, str] = {}
        #: The lease bucket's revision: every lease taken gets the next (a generation).
        self.revision = 0
        #: How many of the next fences find another frame kept in between (a stale worker).
        self.fence_races = 0

    def seed(self, subject: str, frames: Iterable[dict[str, Any]]) -> None:
        """Frames an earlier delivery published: seen live, and kept."""
        for frame in frames:
            self.frames.append(frame)
            self.kept.setdefault(subject, []).append(orjson.dumps(frame))

    async def publish(self, subject: str, data: bytes) -> None:
        frame = orjson.loads(data)
        self.frames.append(frame)
        if frame.get("seq") not in self.lose:
            self.kept.setdefault(subject, []).append(data)

    async def kept_frames(self, subject: str) -> list[dict[str, Any]]:
        return [orjson.loads(data) for data in self.kept.get(subject, [])]

    async def read_kept(self, subject: str) -> tuple[list[dict[str, Any]], int]:
        # A stream sequence here is a frame's place in its subject (1, 2, …): all a fence needs.
        stored = self.kept.get(subject, [])
        return [orjson.loads(data) for data in stored], len(stored)

    async def publish_fence(self, subject: str, data: bytes, after_stream_seq: int) -> bool:
        stored = self.kept.setdefault(subject, [])
        if self.fence_races > 0:
            self.fence_races -= 1
            stored.append(orjson.dumps({"type": "delta", "id": "?", "seq": 10**6, "text": "x"}))
        if len(stored) != after_stream_seq:
            return False
        stored.append(data)  # kept, never shown to a client (the gateway drops it)
        return True

    async def ensure_kept(self, subject: str, published: dict[int, bytes], *, gen: int = 0) -> None:
        if not published:
            return
        if self.unconfirmed > 0:
            self.unconfirmed -= 1
            raise BusRetryable("cannot check the kept frames: NATS has no answer yet")
        stored = self.kept.setdefault(subject, [])
        if not gen and len(stored) >= max(published):
            return
        have = {
            f.get("seq")
            for f in map(orjson.loads, stored)
            if f.get("gen", 0) == gen and f["type"] != "fence"
        }
        for seq in sorted(set(published) - have):
            stored.append(published[seq])

    async def stop_recorded(self, key: str) -> bool:
        return key in self.stops

    async def save_ids(self, key: str, ids: DifyIds) -> None:
        self.ids[key] = ids

    async def load_ids(self, key: str) -> DifyIds | None:
        return self.ids.get(key)

    async def save_status(self, key: str, status: dict[str, Any]) -> None:
        self.statuses[key] = status

    async def dead_letter(self, job: Job, error: TokenwireError, attempts: int) -> None:
        self.dead.append((job.key, error.code.value, attempts))

    async def take_lease(self, key: str, lease: str) -> int:
        self.leases[key] = lease
        self.revision += 1
        return self.revision

    async def lease_holder(self, key: str) -> str | None:
        return self.leases.get(key)

    def of(self, request_id: str) -> list[dict[str, Any]]:
        """The live frames of one request."""
        return [f for f in self.frames if f.get("id") == request_id]

    async def wait_for(self, kind: str, *, timeout: float = 5.0) -> dict[str, Any]:
        """The first live frame of type ``kind``, polled until ``timeout`` runs out."""
        async with asyncio.timeout(timeout):
            while True:
                for frame in self.frames:
                    if frame["type"] == kind:
                        return frame
                await asyncio.sleep(0.001)


def event(name: str, **fields: Any) -> SSEEvent:
    body = {"event": name, "conversation_id": "c1", "message_id": "m1", "task_id": "t1", **fields}
    return SSEEvent(event="", data=orjson.dumps(body).decode(), id=None, retry=None)


class FakeDify:
    """Plays a script: a list of events, or an exception to raise before/after some events.

    ``per_read`` events arrive together, as from one read of the socket (default: one).
    With ``hold_at`` set, the stream stops before event number ``hold_at`` until the test sets
    :attr:`release`: the test knows the answer is mid-way, instead of hoping a delay is long
    enough. :attr:`open_streams` counts streams not closed yet.
    """

    def __init__(
        self,
        events: list[SSEEvent],
        *,
        before: Exception | None = None,
        after: Exception | None = None,
        delay: float = 0.0,
        hold_at: int | None = None,
        per_read: int = 1,
    ) -> None:
        self.events, self.before, self.after, self.delay = events, before, after, delay
        self.per_read = per_read
        self.hold_at = hold_at
        self.release = asyncio.Event()
        self.open_streams = 0
        self.calls = 0
        self.stops: list[tuple[str, str]] = []
        self.history: HistoryMessage | None = None
        self.history_calls = 0

    @asynccontextmanager
    async def stream_chat(
        self, body: dict[str, Any], *, trace_id: str, app: str | None = None
    ) -> AsyncIterator[AsyncIterator[list[SSEEvent]]]:
        self.calls += 1
        if self.before is not None:
            raise self.before

        async def gen() -> AsyncIterator[list[SSEEvent]]:
            i = 0
            while i < len(self.events):
                if i == self.hold_at:
                    await self.release.wait()
                await asyncio.sleep(self.delay)
                size = self.per_read
                if self.hold_at is not None and i < self.hold_at:
                    size = min(size, self.hold_at - i)
                yield self.events[i : i + size]
                i += size
            if self.after is not None:
                raise self.after

        self.open_streams += 1
        try:
            yield gen()
        finally:
            self.open_streams -= 1

    async def stop(self, task_id: str, user: str, *, trace_id: str, app: str | None = None) -> None:
        self.stops.append((task_id, user))

    async def history_message(
        self,
        conversation_id: str,
        message_id: str,
        user: str,
        *,
        trace_id: str,
        app: str | None = None,
    ) -> HistoryMessage | None:
        self.history_calls += 1
        return self.history


class Msg:
    """A job's JetStream message: records how it was settled."""

    def __init__(self) -> None:
        self.settled: list[tuple[str, float | None]] = []
        self.in_progress_acks = 0

    async def ack(self) -> None:
        self.settled.append(("ack", None))

    async def nack(self, delay: float | None = None) -> None:
        self.settled.append(("nak", delay))

    async def in_progress(self) -> None:
        self.in_progress_acks += 1
