"""One connection's send queue and the one writer that drains it into the socket.

How this works: frames are put without waiting (:meth:`Outbox.put` says False when the queue
is full: the connection's session then closes it as a slow consumer, 4101), so a client that
does not read never blocks NATS. Replays are the exception: they would fill the queue at NATS
speed, so they wait (:meth:`Outbox.wait_for_room`) while it is more than half full. At the
close the writer may let queued frames out first (:meth:`Outbox.stop`, for the ``error`` that
explains the close), for at most :data:`FLUSH_TIMEOUT_S`.

The queue, the writer task and the replays' event are made on the first frame and dropped
again once the queue is empty: most connections are idle most of the time, and an idle one
should hold nothing here but this object (a task and a queue cost ~3 KiB each).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from starlette.websockets import WebSocket

__all__ = ["FLUSH_TIMEOUT_S", "Outbox"]

# How long queued frames (e.g. the error that explains a close) may take to flush before it.
FLUSH_TIMEOUT_S = 5.0


class Outbox:
    """A bounded queue of frames for one WebSocket, and its writer task (both made on use)."""

    __slots__ = ("_closing", "_half", "_queue", "_room", "_size", "_writer", "ws")

    def __init__(self, ws: WebSocket, size: int) -> None:
        self.ws = ws
        self._size = size
        self._half = size // 2
        self._queue: deque[bytes] | None = None
        # Set while the queue is at most half full (or the connection closes): replays wait.
        self._room: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    def put(self, data: bytes) -> bool:
        """Queue ``data``; False (and nothing queued) when the queue is full."""
        if self._closing:
            return True  # the writer is gone or going: nothing more is sent
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        elif len(queue) >= self._size:
            return False
        queue.append(data)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write(queue))
        return True

    @property
    def queued(self) -> int:
        return 0 if self._queue is None else len(self._queue)

    @property
    def busy(self) -> bool:
        """At least half full: a burst from NATS should let the writer run first."""
        return self.queued >= self._half and self.queued > 0

    async def wait_for_room(self, still: Callable[[], bool]) -> None:
        """Wait while the queue is more than half full and ``still()`` holds."""
        while self.queued > self._half and still() and not self._closing:
            room = self._room
            if room is None:
                room = self._room = asyncio.Event()
            room.clear()
            await room.wait()

    def release(self) -> None:
        """Let every waiting replay go (the connection is closing: nobody waits for it)."""
        if self._room is not None:
            self._room.set()

    async def stop(self, *, flush: bool) -> None:
        """Stop the writer; with ``flush``, what is queued goes out first (bounded in time)."""
        self._closing = True
        self.release()
        writer, self._writer = self._writer, None
        if writer is None:
            return
        if flush:
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(writer), FLUSH_TIMEOUT_S)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer
        self._queue = None

    async def _write(self, queue: deque[bytes]) -> None:
        """Drain the queue into the socket; end (and let go of the queue) once it is empty."""
        while queue:
            text = queue.popleft().decode()
            if len(queue) <= self._half and self._room is not None:
                self._room.set()
            await self.ws.send_text(text)
            del text  # an idle connection must not hold its last frame's buffer
        if not self._closing:
            # Empty: give the task and the queue back; the next put makes new ones (a frame put
            # while the last send was awaited is in this queue, and was drained above).
            self._writer = None
            self._queue = None
