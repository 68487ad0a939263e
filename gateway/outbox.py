"""One connection's send queue and the one writer that drains it into the socket.

How this works: frames are put without waiting (:meth:`Outbox.put` says False when the queue
is full: the connection's session then closes it as a slow consumer, 4101), so a client that
does not read never blocks NATS. Replays are the exception: they would fill the queue at NATS
speed, so they wait (:meth:`Outbox.wait_for_room`) while it is more than half full. At the
close the writer may let queued frames out first (:meth:`Outbox.stop`, for the ``error`` that
explains the close), for at most :data:`FLUSH_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from starlette.websockets import WebSocket

__all__ = ["FLUSH_TIMEOUT_S", "Outbox"]

# How long queued frames (e.g. the error that explains a close) may take to flush before it.
FLUSH_TIMEOUT_S = 5.0


class Outbox:
    """A bounded queue of frames for one WebSocket, and its writer task."""

    def __init__(self, ws: WebSocket, size: int) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(size)
        self._half = size // 2
        # Set while the queue is at most half full: replays wait for it.
        self._room = asyncio.Event()
        self._room.set()
        self._writer: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write())

    def put(self, data: bytes) -> bool:
        """Queue ``data``; False (and nothing queued) when the queue is full."""
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            return False
        return True

    @property
    def busy(self) -> bool:
        """At least half full: a burst from NATS should let the writer run first."""
        return self.queue.qsize() >= self._half

    async def wait_for_room(self, still: Callable[[], bool]) -> None:
        """Wait while the queue is more than half full and ``still()`` holds."""
        while self.queue.qsize() > self._half and still():
            self._room.clear()
            await self._room.wait()

    def release(self) -> None:
        """Let every waiting replay go (the connection is closing: nobody waits for it)."""
        self._room.set()

    async def stop(self, *, flush: bool) -> None:
        """Stop the writer; with ``flush``, what is queued goes out first (bounded in time)."""
        self.release()
        writer, self._writer = self._writer, None
        if writer is None:
            return
        if flush:
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)
                with contextlib.suppress(TimeoutError, Exception):
                    await asyncio.wait_for(asyncio.shield(writer), FLUSH_TIMEOUT_S)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer

    async def _write(self) -> None:
        while True:
            data = await self.queue.get()
            if self.queue.qsize() <= self._half:
                self._room.set()
            if data is None:
                return
            text = data.decode()
            del data  # an idle connection must not hold its last frame's 4 KiB buffer
            await self.ws.send_text(text)
