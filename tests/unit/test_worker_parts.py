"""The worker's small modules, each against fakes of its seam (worker/types.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.coalesce import Coalescer
from shared.dify_api import DifyIds, HistoryMessage
from shared.exceptions import BusUnavailable
from shared.frames import Delta, End
from shared.jobs import Job
from shared.settings import Settings
from shared.subjects import request_frames
from tests.unit.fakes import FakeBus, FakeDify, Msg
from worker.lease import Lease
from worker.publishing import Publisher
from worker.recovery import HistoryReader
from worker.waiting_line import MAX_PULL_BATCH, WaitingLine, job_intake


def job(key: str, created_ms: int = 0) -> Job:
    return Job(
        key=key,
        id=key,
        user="u1",
        conn="c",
        reply=request_frames("gw", "c", key, partitions=1),
        query="q",
        trace_id="t",
        created_ms=created_ms or int(time.time() * 1000),
    )


# --- the waiting line ---------------------------------------------------------------------


async def test_the_line_serves_in_the_order_gateways_accepted_the_chats() -> None:
    line = WaitingLine(1, refresh_s=60)
    order: list[str] = []
    told: dict[str, list[int]] = {}
    holder_in = asyncio.Event()
    release = asyncio.Event()

    async def use(j: Job) -> None:
        async def on_wait(position: int) -> None:
            told.setdefault(j.key, []).append(position)

        async with line.slot(j, on_wait):
            order.append(j.key)
            if j.key == "first":
                holder_in.set()
                await release.wait()

    holder = asyncio.create_task(use(job("first", 1)))
    await holder_in.wait()
    # Deliveries arrive late-first: the line still serves the earlier chat first.
    late = asyncio.create_task(use(job("late", 30)))
    early = asyncio.create_task(use(job("early", 20)))
    async with asyncio.timeout(5):
        while line.waiting < 2:
            await asyncio.sleep(0)
    release.set()
    await asyncio.gather(holder, late, early)
    assert order == ["first", "early", "late"]
    assert told["late"][0] == 1 and told["early"] == [1]  # early jumped ahead of late
    assert line.streaming == 0 and line.waiting == 0


async def test_a_free_slot_is_taken_without_waiting() -> None:
    line = WaitingLine(2)

    async def never(position: int) -> None:
        raise AssertionError("told to wait with a free slot")

    async with line.slot(job("a"), never), line.slot(job("b"), never):
        assert line.streaming == 2
    assert line.streaming == 0


# --- the lease ----------------------------------------------------------------------------


async def test_the_lease_is_lost_when_another_delivery_takes_it() -> None:
    bus, msg = FakeBus(), Msg()
    lease = Lease(bus, "k1", check_s=0.01)
    await lease.take()
    holding = asyncio.create_task(lease.hold(msg, heartbeat_s=0.02))
    async with asyncio.timeout(5):
        while msg.in_progress_acks < 2:  # it keeps the job ours meanwhile
            await asyncio.sleep(0.005)
    assert not lease.lost.is_set()
    bus.leases["k1"] = "newer"
    await asyncio.wait_for(holding, 5)
    assert lease.lost.is_set()


async def test_the_lease_is_not_lost_while_nats_cannot_tell() -> None:
    class Away(FakeBus):
        checks = 0

        async def lease_holder(self, key: str) -> str | None:
            self.checks += 1
            raise BusUnavailable("NATS is away")

    bus = Away()
    lease = Lease(bus, "k1", check_s=0.01)
    holding = asyncio.create_task(lease.hold(Msg(), heartbeat_s=1))
    async with asyncio.timeout(5):
        while bus.checks < 3:
            await asyncio.sleep(0.005)
    assert not lease.lost.is_set() and not holding.done()
    holding.cancel()


# --- publishing ---------------------------------------------------------------------------


async def test_the_publisher_remembers_frames_and_follows_the_outcome() -> None:
    bus = FakeBus()
    publisher = Publisher(bus, "s")
    await publisher.publish([Delta(id="r1", seq=2, text="a")])
    end = End(id="r1", seq=3, conversation_id=None, message_id=None, stopped=True)
    await publisher.publish([end])
    assert sorted(publisher.published) == [2, 3]
    assert publisher.outcome.value == "stopped"


async def test_the_publisher_keeps_frames_through_unconfirmed_checks() -> None:
    bus = FakeBus()
    bus.unconfirmed = 2
    bus.lose = {2}
    publisher = Publisher(bus, "s")
    await publisher.publish([Delta(id="r1", seq=2, text="a")])
    await publisher.ensure_kept()
    assert [f["seq"] for f in await bus.kept_frames("s")] == [2]


# --- reading Dify's history ---------------------------------------------------------------


async def test_history_is_polled_until_the_message_is_finished() -> None:
    dify = FakeDify([])
    dify.history = HistoryMessage(answer="", status="generating", retriever_resources=[])
    reader = HistoryReader(dify, timeout_s=5, poll_s=0.005)

    async def finish_later() -> None:
        async with asyncio.timeout(5):
            while dify.history_calls < 3:
                await asyncio.sleep(0.001)
        dify.history = HistoryMessage(answer="done", status="normal", retriever_resources=[])

    finisher = asyncio.create_task(finish_later())
    message = await reader.wait(job("k1"), DifyIds("t1", "m1", "c1"), asyncio.Event())
    await finisher
    assert message is not None and message.answer == "done" and dify.history_calls >= 4


async def test_a_stop_while_reading_history_stops_dify_too() -> None:
    dify = FakeDify([])
    stop = asyncio.Event()
    stop.set()
    reader = HistoryReader(dify, timeout_s=5, poll_s=0.005)
    assert await reader.wait(job("k1"), DifyIds("t1", "m1", "c1"), stop) is None
    assert dify.stops == [("t1", "u1")]


async def test_history_without_a_conversation_is_not_read() -> None:
    dify = FakeDify([])
    reader = HistoryReader(dify, timeout_s=5, poll_s=0.005)
    assert await reader.wait(job("k1"), DifyIds("t1", "m1", None), asyncio.Event()) is None
    assert dify.history_calls == 0


# --- job intake ---------------------------------------------------------------------------


@pytest.mark.parametrize(("concurrency", "prefetch"), [(64, 16), (4, 0), (1, 1), (8, 100)])
def test_batched_pulls_hold_no_more_jobs_than_single_pulls(concurrency: int, prefetch: int) -> None:
    settings = Settings(worker_concurrency=concurrency, worker_prefetch=prefetch)
    intake = job_intake(settings)
    assert 1 <= intake.batch <= MAX_PULL_BATCH
    # Handled at once plus fetched and waiting: what one pull at a time held.
    assert intake.max_workers + intake.batch <= max(concurrency + prefetch + 1, 2 + 1)
    assert intake.max_workers >= concurrency  # every stream slot can be used
    assert intake.max_workers - concurrency >= prefetch // 2  # half the prefetch in the line


# --- publishing with coalescing -------------------------------------------------------------


async def test_the_publisher_sends_waiting_text_when_its_timer_fires() -> None:
    bus = FakeBus()
    publisher = Publisher(bus, "s", Coalescer(1, interval_s=0.02))
    await publisher.publish([Delta(id="r1", seq=2, text="a")])  # the first: at once
    await publisher.publish([Delta(id="r1", seq=3, text="b")])
    await publisher.publish([Delta(id="r1", seq=4, text="c")])
    assert [f["text"] for f in bus.frames] == ["a"]
    await asyncio.sleep(0.05)
    assert [(f["seq"], f["text"]) for f in bus.frames] == [(2, "a"), (3, "bc")]
    assert sorted(publisher.published) == [2, 3]


async def test_a_closed_publisher_sends_nothing_more() -> None:
    bus = FakeBus()
    publisher = Publisher(bus, "s", Coalescer(1, interval_s=0.02))
    await publisher.publish([Delta(id="r1", seq=2, text="a"), Delta(id="r1", seq=3, text="b")])
    await publisher.publish([Delta(id="r1", seq=4, text="c")])
    publisher.close()
    await asyncio.sleep(0.05)
    assert [f["text"] for f in bus.frames] == ["ab"]


class _StallingBus(FakeBus):
    """Its publish of ``stall_seq`` waits forever (a cancelled publish in flight)."""

    def __init__(self, stall_seq: int) -> None:
        super().__init__()
        self.stall_seq = stall_seq

    async def publish(self, subject: str, data: bytes) -> None:
        if b'"seq":%d,' % self.stall_seq in data and self.stall_seq:
            self.stall_seq = 0
            await asyncio.Event().wait()
        await super().publish(subject, data)


async def test_a_publish_cancelled_mid_way_skips_no_seq() -> None:
    bus = _StallingBus(stall_seq=3)
    publisher = Publisher(bus, "s")
    task = asyncio.create_task(
        publisher.publish([Delta(id="r1", seq=2, text="a"), Delta(id="r1", seq=3, text="b")])
    )
    await asyncio.sleep(0.01)
    task.cancel()  # a stop cancels the pump while seq 3 is on its way
    await publisher.publish(
        [
            End(
                id="r1",
                seq=4,
                conversation_id=None,
                message_id=None,
                usage=None,
                retriever_resources=[],
                stopped=True,
            )
        ]
    )
    assert [f["seq"] for f in bus.frames] == [2, 3, 4]


def test_the_timer_works_where_uvloop_hands_back_a_plain_handle() -> None:
    """uvloop schedules a deadline less than half a millisecond away with ``call_soon``: its
    handle has no ``when()``. Arming again before it runs must not ask it."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[dict[str, object]]:
        bus = FakeBus()
        publisher = Publisher(bus, "s", Coalescer(1, interval_s=0.0003))
        await publisher.publish([Delta(id="r1", seq=2, text="a")])  # at once
        await publisher.publish([Delta(id="r1", seq=3, text="b")])  # waits ~0.3 ms
        await publisher.publish([Delta(id="r1", seq=4, text="c")])  # arms again at once
        await asyncio.sleep(0.01)
        await publisher.ensure_kept()
        return bus.frames

    frames = uvloop.run(main())
    assert "".join(str(f["text"]) for f in frames) == "abc"
    assert [f["seq"] for f in frames] == list(range(2, 2 + len(frames)))
