"""One task per gateway that feeds every connection's session the clock when it is due.

How this works: each connection tells the sweep its session's next deadline
(:meth:`Sweep.arm`: token expiry, idleness, a request to read back); the sweep keeps them in
one heap and sleeps until the earliest. When it wakes, every connection whose deadline has
come is called once (:meth:`Due.due`) with the time; the session decides what that means and
the connection re-arms with its new next deadline. A deadline that moves later is not
re-armed (the old one fires, the session finds nothing to do and names the later one), so a
busy connection costs one heap push per deadline that comes *earlier*, not one per frame.

This replaces a sleeping task per connection: 2,000 idle connections hold one task here,
not 2,000 (a task and its wait_for cost ~2 KiB each).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from typing import Protocol

__all__ = ["MIN_WAKE_S", "Due", "Sweep"]

log = logging.getLogger("tokenwire.gateway")

# The shortest sleep: a deadline in the past is handled on the next turn, never spun on.
MIN_WAKE_S = 0.005
# Stale heap entries tolerated before the heap is rebuilt without them.
_COMPACT_AT = 64


class Due(Protocol):
    def due(self, now: float) -> None:
        """The deadline this connection armed has come (the time is ``now``)."""


class Sweep:
    """The gateway's deadlines, in one heap, and the one task that waits for them."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Due]] = []
        self._armed: dict[Due, float] = {}  # the live deadline of each connection
        self._order = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._sleeping_until: float | None = None
        self._stale = 0  # heap entries no longer armed (superseded or disarmed)

    def __len__(self) -> int:
        """Connections with a deadline."""
        return len(self._armed)

    def arm(self, owner: Due, deadline: float | None) -> None:
        """``owner``'s next deadline is ``deadline`` (None: nothing due); kept only when it
        comes earlier than the one already armed."""
        if deadline is None:
            return
        armed = self._armed.get(owner)
        if armed is not None and armed <= deadline:
            return
        if armed is not None:
            self._stale += 1
        self._armed[owner] = deadline
        heapq.heappush(self._heap, (deadline, next(self._order), owner))
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        elif self._wake is not None and (
            self._sleeping_until is None or deadline < self._sleeping_until
        ):
            self._wake.set()

    def disarm(self, owner: Due) -> None:
        """``owner`` is gone: it is never called again (nor held, once the heap is compacted)."""
        if self._armed.pop(owner, None) is None:
            return
        self._stale += 1
        if self._stale > max(_COMPACT_AT, len(self._armed)):
            # Rebuilt when most entries are dead: a gone connection is not held until its
            # deadline (minutes, for idleness), and the heap stays O(connections).
            armed = self._armed
            self._heap = [e for e in self._heap if armed.get(e[2]) == e[0]]
            heapq.heapify(self._heap)
            self._stale = 0

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def fire(self, now: float) -> int:
        """Call every owner whose deadline is at or before ``now``; how many were called."""
        heap = self._heap
        called = 0
        while heap and heap[0][0] <= now:
            deadline, _, owner = heapq.heappop(heap)
            if self._armed.get(owner) != deadline:
                self._stale = max(0, self._stale - 1)
                continue  # superseded by an earlier deadline, or disarmed
            del self._armed[owner]
            called += 1
            try:
                owner.due(now)
            except Exception:
                log.exception("a connection's deadline failed")
        return called

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            wake.clear()
            while self._heap and self._heap[0][2] not in self._armed:
                self._stale = max(0, self._stale - 1)
                heapq.heappop(self._heap)  # drop what was disarmed, so a sleep is not wasted
            until = self._heap[0][0] if self._heap else None
            self._sleeping_until = until
            timeout = None if until is None else max(until - time.time(), MIN_WAKE_S)
            try:
                await asyncio.wait_for(wake.wait(), timeout)
            except TimeoutError:
                self.fire(time.time())
