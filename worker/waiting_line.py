"""The worker's streams to Dify, and the line of deliveries waiting for one.

How this works. A worker holds a few more jobs than it streams (``worker_prefetch`` over
``worker_concurrency``); a delivery takes one of the ``limit`` stream slots with
:meth:`WaitingLine.slot`. When none is free, or others already wait, it joins the line in the
order the gateways accepted the chats (``created_ms``, then key) — not the order deliveries got
here, which a few awaits can shuffle by milliseconds — and ``on_wait(position)`` is called on
joining and every ``refresh_s`` while it waits, so its client hears ``queued`` (reason
``busy``) with its place in line. The delivery that owns the job sends those frames, so
``seq`` stays one sequence.

An app with ``max_active`` has a line of its own first (:class:`AppLine`): the same order and
the same ``queued`` frames, but its head leaves only with one of the app's cluster-wide slots
(``worker/apps.py`` :class:`~worker.apps.AppSlots`), trying again every ``poll_s``. Each worker
keeps its own line oldest first; the cap itself holds across the cluster.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from shared.jobs import Job
from shared.settings import Settings

if TYPE_CHECKING:
    from worker.apps import AppSlots, HeldSlot

__all__ = [
    "BUSY_REFRESH_S",
    "MAX_PULL_BATCH",
    "AppLine",
    "Intake",
    "WaitingLine",
    "job_intake",
]

#: A job waiting for one of the worker's Dify streams hears its place in line this often.
BUSY_REFRESH_S: Final = 5.0
#: At most this many jobs per pull round trip to JetStream.
MAX_PULL_BATCH: Final = 16


@dataclass(frozen=True, slots=True)
class Intake:
    """How the worker's job subscriber pulls: ``batch`` jobs per JetStream round trip, and
    ``max_workers`` deliveries handled at once (FastStream's ``max_workers``)."""

    batch: int
    max_workers: int


def job_intake(settings: Settings) -> Intake:
    """Pull in batches without holding more jobs than with single pulls.

    FastStream's concurrent pull subscriber handles ``max_workers`` deliveries at once and
    holds up to ``batch`` more, fetched but waiting for a free handler (no in-progress acks
    there, not in the line yet). So the batch comes out of the prefetch: a worker still holds
    at most ``worker_concurrency + worker_prefetch + 1`` jobs, at least half of its prefetch
    waits in the line told its position, and a burst of chats is taken in a few round trips
    to JetStream instead of one per chat.
    """
    batch = max(1, min(MAX_PULL_BATCH, settings.worker_prefetch // 2))
    held = settings.worker_concurrency + settings.worker_prefetch + 1
    return Intake(batch=batch, max_workers=max(2, held - batch))


class _Place:
    __slots__ = ("order",)

    def __init__(self, job: Job) -> None:
        self.order = (job.created_ms, job.key)


class WaitingLine:
    def __init__(self, limit: int, *, refresh_s: float = BUSY_REFRESH_S) -> None:
        self.limit = limit
        self.refresh_s = refresh_s
        self.streaming = 0
        self._line: list[_Place] = []
        self._turns = asyncio.Condition()

    @property
    def waiting(self) -> int:
        return len(self._line)

    @asynccontextmanager
    async def slot(
        self, job: Job, on_wait: Callable[[int], Awaitable[None]]
    ) -> AsyncIterator[None]:
        """Hold one stream slot for the block; wait in line for it first if need be."""
        place = _Place(job)

        def my_turn() -> bool:
            return self._line[0] is place and self.streaming < self.limit

        async with self._turns:
            if self.streaming >= self.limit or self._line:
                bisect.insort(self._line, place, key=lambda p: p.order)
                try:
                    while not my_turn():
                        await on_wait(self._line.index(place) + 1)
                        with suppress(TimeoutError):
                            async with asyncio.timeout(self.refresh_s):
                                await self._turns.wait_for(my_turn)
                finally:
                    self._line.remove(place)
                    self._turns.notify_all()
            self.streaming += 1
        try:
            yield
        finally:
            async with self._turns:
                self.streaming -= 1
                self._turns.notify_all()


class AppLine:
    """One app's line: oldest first, its head leaves with one of the app's ``limit`` slots."""

    def __init__(
        self,
        app: str,
        limit: int,
        slots: AppSlots,
        *,
        refresh_s: float = BUSY_REFRESH_S,
        poll_s: float = 0.25,
    ) -> None:
        self.app = app
        self.limit = limit
        self.slots = slots
        self.refresh_s = refresh_s
        self.poll_s = poll_s
        self._line: list[_Place] = []
        self._turns = asyncio.Condition()

    @property
    def waiting(self) -> int:
        return len(self._line)

    @asynccontextmanager
    async def slot(
        self, job: Job, on_wait: Callable[[int], Awaitable[None]]
    ) -> AsyncIterator[None]:
        """Hold one of the app's slots for the block; wait in line for it first if need be."""
        place = _Place(job)
        loop = asyncio.get_running_loop()
        held: HeldSlot | None = None
        told_at: float | None = None
        async with self._turns:
            bisect.insort(self._line, place, key=lambda p: p.order)
            try:
                while True:
                    if self._line[0] is place:
                        held = await self.slots.try_take(self.app, self.limit)
                        if held is not None:
                            break
                    now = loop.time()
                    if told_at is None or now - told_at >= self.refresh_s:
                        told_at = now
                        await on_wait(self._line.index(place) + 1)
                    with suppress(TimeoutError):
                        async with asyncio.timeout(self.poll_s):
                            await self._turns.wait()
            finally:
                self._line.remove(place)
                self._turns.notify_all()
        assert held is not None
        keeper = asyncio.create_task(self.slots.keep(held))
        try:
            yield
        finally:
            keeper.cancel()
            with suppress(asyncio.CancelledError):
                await keeper
            await self.slots.release(held)
            async with self._turns:
                self._turns.notify_all()
