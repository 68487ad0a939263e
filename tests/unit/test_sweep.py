"""The gateway's one sweep task and the outbox made on use (gateway/sweep.py, gateway/outbox.py)."""

from __future__ import annotations

import asyncio
import time
from typing import cast

from starlette.websockets import WebSocket

from gateway.outbox import Outbox
from gateway.sweep import Sweep


class Owner:
    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.calls: list[float] = []
        self.then: float | None = None  # the deadline to arm after being called

    def due(self, now: float) -> None:
        self.calls.append(now)
        self.sweep.arm(self, self.then)
        self.then = None


async def test_only_the_due_owners_are_called_once_each() -> None:
    sweep = Sweep()
    a, b, c = Owner(sweep), Owner(sweep), Owner(sweep)
    base = time.time() + 3600  # far ahead: fire() is called by hand
    for owner, at in ((a, base + 10), (b, base + 20), (c, base + 30)):
        sweep.arm(owner, at)
    assert sweep.fire(base + 25) == 2
    assert (a.calls, b.calls, c.calls) == ([base + 25], [base + 25], [])
    assert len(sweep) == 1
    sweep.stop()


async def test_a_deadline_that_comes_earlier_wins_and_a_later_one_waits_for_the_first() -> None:
    sweep = Sweep()
    owner = Owner(sweep)
    now = time.time()
    sweep.arm(owner, now + 60)
    sweep.arm(owner, now + 0.05)  # earlier: the sweep wakes for it
    sweep.arm(owner, now + 30)  # later: ignored until the armed one fires
    await asyncio.sleep(0.3)
    assert len(owner.calls) == 1 and owner.calls[0] >= now + 0.05
    assert len(sweep) == 0  # nothing armed after the call (the owner named nothing)
    sweep.stop()


async def test_an_owner_re_arms_from_its_call_and_a_disarmed_one_is_never_called() -> None:
    sweep = Sweep()
    busy, gone = Owner(sweep), Owner(sweep)
    now = time.time()
    busy.then = now + 0.05
    sweep.arm(busy, now + 0.02)
    sweep.arm(gone, now + 0.02)
    sweep.disarm(gone)
    await asyncio.sleep(0.4)
    assert len(busy.calls) == 2
    assert gone.calls == []
    sweep.stop()


async def test_disarmed_owners_are_not_held_by_the_heap() -> None:
    sweep = Sweep()
    owners = [Owner(sweep) for _ in range(300)]
    for n, owner in enumerate(owners):
        sweep.arm(owner, time.time() + 3600 + n)
    for owner in owners[:-1]:
        sweep.disarm(owner)
    assert len(sweep) == 1
    assert len(sweep._heap) < 100  # compacted, not 300 entries until their deadlines
    sweep.stop()


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def send_text(self, text: str) -> None:
        await self.gate.wait()
        self.sent.append(text)


async def test_an_idle_outbox_holds_no_task_and_no_queue() -> None:
    ws = FakeSocket()
    outbox = Outbox(cast(WebSocket, ws), 8)
    assert outbox._writer is None and outbox._queue is None
    assert outbox.put(b"one") and outbox.put(b"two")
    assert outbox._writer is not None
    await asyncio.sleep(0.01)
    assert ws.sent == ["one", "two"]
    assert outbox._writer is None and outbox._queue is None  # given back once empty
    assert outbox.put(b"three")
    await asyncio.sleep(0.01)
    assert ws.sent == ["one", "two", "three"]


async def test_a_client_that_does_not_read_fills_the_queue_and_order_is_kept() -> None:
    ws = FakeSocket()
    ws.gate.clear()  # the client reads nothing
    outbox = Outbox(cast(WebSocket, ws), 4)
    assert outbox.put(b"0")
    await asyncio.sleep(0)  # the writer took "0" and waits on the socket
    assert all(outbox.put(str(n).encode()) for n in range(1, 5))
    assert not outbox.put(b"5")  # full: the session closes it (4101)
    assert outbox.busy
    ws.gate.set()
    await outbox.stop(flush=True)
    assert ws.sent == ["0", "1", "2", "3", "4"]


async def test_a_replay_waits_for_room_and_is_let_go_at_the_close() -> None:
    ws = FakeSocket()
    ws.gate.clear()
    outbox = Outbox(cast(WebSocket, ws), 4)
    for n in range(5):
        outbox.put(str(n).encode())
    waiter = asyncio.create_task(outbox.wait_for_room(lambda: True))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    ws.gate.set()
    await asyncio.wait_for(waiter, 1)
    ws.gate.clear()
    for n in range(5):
        outbox.put(str(n).encode())
    waiter = asyncio.create_task(outbox.wait_for_room(lambda: True))
    await asyncio.sleep(0.01)
    await outbox.stop(flush=False)
    await asyncio.wait_for(waiter, 1)
