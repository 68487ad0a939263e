"""worker/waiting_line.py AppLine against a fake of the cluster-wide slots (worker/apps.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from shared.jobs import Job
from worker.apps import HeldSlot
from worker.waiting_line import AppLine


class FakeSlots:
    """``limit`` slots shared by every line, as the KV bucket is across workers."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.peak = 0

    async def try_take(self, app: str, limit: int) -> HeldSlot | None:
        for slot in range(limit):
            key = f"{app}.{slot}"
            if key not in self.held:
                self.held.add(key)
                self.peak = max(self.peak, len(self.held))
                return HeldSlot(key, 1)
        return None

    async def keep(self, held: HeldSlot) -> None:
        await asyncio.Event().wait()

    async def release(self, held: HeldSlot) -> None:
        self.held.discard(held.key)


def job(n: int) -> Job:
    return Job(
        key=f"k{n}",
        id=f"r{n}",
        user="u",
        conn="c",
        reply="s",
        query="q",
        trace_id="t",
        created_ms=1000 + n,
    )


async def test_one_slot_serves_the_oldest_first_and_tells_positions() -> None:
    slots = FakeSlots()
    line = AppLine("capped", 1, slots, refresh_s=0.05, poll_s=0.01)  # type: ignore[arg-type]
    order: list[int] = []
    told: dict[int, list[int]] = {n: [] for n in range(4)}

    async def ask(n: int, delay: float) -> None:
        await asyncio.sleep(delay)

        async def on_wait(position: int) -> None:
            told[n].append(position)

        async with line.slot(job(n), on_wait):
            order.append(n)
            await asyncio.sleep(0.05)

    # The youngest arrives first; the rest queue up out of order.
    await asyncio.gather(ask(3, 0), ask(2, 0.01), ask(0, 0.012), ask(1, 0.014))
    assert order == [3, 0, 1, 2]
    assert slots.peak == 1 and not slots.held
    # Job 2 was first in line, then the older 0 and 1 joined ahead of it.
    assert told[3] == [] and told[0] and told[2][0] == 1 and max(told[2]) >= 2


async def test_two_lines_share_the_cluster_cap() -> None:
    slots = FakeSlots()
    lines = [AppLine("capped", 2, slots, poll_s=0.01) for _ in range(3)]  # type: ignore[arg-type]
    active: list[int] = []
    seen: list[Any] = []

    async def ask(n: int) -> None:
        async def on_wait(position: int) -> None:
            seen.append(position)

        async with lines[n % 3].slot(job(n), on_wait):
            active.append(n)
            assert len(slots.held) <= 2
            await asyncio.sleep(0.02)

    await asyncio.gather(*(ask(n) for n in range(9)))
    assert sorted(active) == list(range(9)) and slots.peak == 2
