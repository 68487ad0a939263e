"""JobRunner against in-memory fakes of NATS and Dify: every way a delivery can end.

Fast and deterministic; the same behaviours are checked over real processes in
tests/integration (spine, nothing_lost, chaos)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest

from shared.exceptions import (
    DifyRejected,
    DifyStreamCut,
    DifyUnavailable,
    ErrorCode,
    TokenwireError,
)
from shared.jobs import Job
from shared.settings import Settings
from shared.sse import SSEEvent
from tests.unit.helpers import answer_of
from worker.breaker import CircuitBreaker
from worker.dify import HistoryMessage
from worker.runner import DifyIds, JobRunner

SETTINGS = Settings(
    job_ack_wait_s=3,
    lease_check_s=0.05,
    recovery_poll_s=0.01,
    recovery_timeout_s=2,
    job_max_attempts=3,
    retry_base_s=0.5,
)


class FakeBus:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.ids: dict[str, DifyIds] = {}
        self.stops: set[str] = set()
        self.dead: list[tuple[str, str, int]] = []
        self.leases: dict[str, str] = {}

    async def publish(self, subject: str, data: bytes) -> None:
        self.frames.append(orjson.loads(data))

    async def kept_frames(self, subject: str) -> list[dict[str, Any]]:
        return list(self.frames)

    async def stop_recorded(self, key: str) -> bool:
        return key in self.stops

    async def save_ids(self, key: str, ids: DifyIds) -> None:
        self.ids[key] = ids

    async def load_ids(self, key: str) -> DifyIds | None:
        return self.ids.get(key)

    async def save_status(self, key: str, status: dict[str, Any]) -> None:
        pass

    async def dead_letter(self, job: Job, error: TokenwireError, attempts: int) -> None:
        self.dead.append((job.key, error.code.value, attempts))

    async def take_lease(self, key: str, lease: str) -> None:
        self.leases[key] = lease

    async def lease_holder(self, key: str) -> str | None:
        return self.leases.get(key)

    async def ensure_kept(self, subject: str, published: dict[int, bytes]) -> None:
        pass


def event(name: str, **fields: Any) -> SSEEvent:
    body = {"event": name, "conversation_id": "c1", "message_id": "m1", "task_id": "t1", **fields}
    return SSEEvent(event="", data=orjson.dumps(body).decode(), id=None, retry=None)


class FakeDify:
    """Plays a script: a list of events, or an exception to raise before/after some events."""

    def __init__(
        self,
        events: list[SSEEvent],
        *,
        before: Exception | None = None,
        after: Exception | None = None,
        delay: float = 0.0,
    ) -> None:
        self.events, self.before, self.after, self.delay = events, before, after, delay
        self.calls = 0
        self.stops: list[tuple[str, str]] = []
        self.history: HistoryMessage | None = None

    @asynccontextmanager
    async def stream_chat(
        self, body: dict[str, Any], *, trace_id: str, app: str | None = None
    ) -> AsyncIterator[AsyncIterator[SSEEvent]]:
        self.calls += 1
        if self.before is not None:
            raise self.before

        async def gen() -> AsyncIterator[SSEEvent]:
            for e in self.events:
                await asyncio.sleep(self.delay)
                yield e
            if self.after is not None:
                raise self.after

        yield gen()

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
        return self.history


class Msg:
    def __init__(self) -> None:
        self.settled: list[tuple[str, float | None]] = []

    async def ack(self) -> None:
        self.settled.append(("ack", None))

    async def nack(self, delay: float | None = None) -> None:
        self.settled.append(("nak", delay))

    async def in_progress(self) -> None:
        pass


def job(**kw: Any) -> Job:
    return Job(
        key="k1",
        id="r1",
        user="u1",
        conn="c",
        reply="tw.frames.c.k1",
        query="q",
        trace_id="t",
        created_ms=int(time.time() * 1000),
        **kw,
    )


ANSWER = [
    event("message", answer="Hel"),
    event("message", answer="lo"),
    event("message_end", metadata={}),
]


def runner(bus: FakeBus, dify: FakeDify) -> JobRunner:
    return JobRunner(bus, dify, SETTINGS, breaker=CircuitBreaker(threshold=2, cooldown_s=1))  # type: ignore[arg-type]


async def test_answer_then_ack() -> None:
    bus, dify, msg = FakeBus(), FakeDify(ANSWER), Msg()
    await runner(bus, dify).run(job(), msg)
    assert [f["type"] for f in bus.frames] == ["start", "delta", "delta", "end"]
    assert answer_of(bus.frames) == "Hello" and msg.settled == [("ack", None)]
    assert bus.ids["k1"] == DifyIds("t1", "m1", "c1")


async def test_unavailable_before_start_is_queued_and_sent_back() -> None:
    bus, msg = FakeBus(), Msg()
    dify = FakeDify([], before=DifyUnavailable("down", code=ErrorCode.DIFY_RATE_LIMITED))
    await runner(bus, dify).run(job(), msg)
    (queued,) = bus.frames
    assert (
        queued["type"] == "queued"
        and queued["reason"] == "dify_rate_limited"
        and queued["attempt"] == 1
    )
    assert msg.settled[0][0] == "nak" and 0.3 <= (msg.settled[0][1] or 0) <= 0.7


async def test_last_attempt_is_dead_lettered_with_a_final_error() -> None:
    bus, msg = FakeBus(), Msg()
    await runner(bus, FakeDify([], before=DifyUnavailable("down"))).run(job(), msg, delivered=3)
    assert bus.dead == [("k1", "upstream_unavailable", 3)]
    assert bus.frames[-1]["type"] == "error" and bus.frames[-1]["retryable"] is True
    assert msg.settled == [("ack", None)]


async def test_open_circuit_does_not_call_dify() -> None:
    bus, dify = FakeBus(), FakeDify([], before=DifyUnavailable("down"))
    r = runner(bus, dify)
    for _ in range(3):
        await r.run(job(), Msg())
    assert dify.calls == 2  # the breaker opened after two failures
    assert bus.frames[-1]["reason"] == "circuit_open"


async def test_rejection_fails_at_once() -> None:
    bus, msg = FakeBus(), Msg()
    dify = FakeDify([], before=DifyRejected("no", code=ErrorCode.CONVERSATION_NOT_FOUND))
    await runner(bus, dify).run(job(), msg)
    assert [f["type"] for f in bus.frames] == ["error"] and bus.frames[0][
        "code"
    ] == "conversation_not_found"
    assert msg.settled == [("ack", None)]


async def test_cut_mid_answer_is_recovered_from_history_without_asking_again() -> None:
    bus, msg = FakeBus(), Msg()
    dify = FakeDify(ANSWER[:1], after=DifyStreamCut("cut"))
    dify.history = HistoryMessage(answer="Hello world", status="normal", retriever_resources=[])
    await runner(bus, dify).run(job(), msg)
    assert [f["type"] for f in bus.frames] == ["start", "delta", "delta", "end"]
    assert answer_of(bus.frames) == "Hello world" and dify.calls == 1


async def test_history_that_disagrees_is_applied_with_replace() -> None:
    bus = FakeBus()
    dify = FakeDify(ANSWER[:1], after=DifyStreamCut("cut"))
    dify.history = HistoryMessage(answer="[moderated]", status="normal", retriever_resources=[])
    await runner(bus, dify).run(job(), Msg())
    assert [f["type"] for f in bus.frames][-2:] == ["replace", "end"]
    assert answer_of(bus.frames) == "[moderated]"


async def test_redelivery_continues_after_kept_frames_without_asking_dify() -> None:
    bus, msg = FakeBus(), Msg()
    bus.frames = [
        {"id": "r1", "seq": 1, "type": "accepted"},
        {"id": "r1", "seq": 2, "type": "start"},
        {"id": "r1", "seq": 3, "type": "delta", "text": "Hel"},
    ]
    bus.ids["k1"] = DifyIds("t1", "m1", "c1")
    dify = FakeDify(ANSWER)
    dify.history = HistoryMessage(answer="Hello", status="normal", retriever_resources=[])
    await runner(bus, dify).run(job(), msg, delivered=2)
    assert [f["seq"] for f in bus.frames] == [1, 2, 3, 4, 5]
    assert answer_of(bus.frames) == "Hello" and dify.calls == 0
    assert bus.leases["k1"]


async def test_failed_recovery_resets_and_asks_again() -> None:
    bus = FakeBus()
    bus.frames = [
        {"id": "r1", "seq": 1, "type": "accepted"},
        {"id": "r1", "seq": 2, "type": "start"},
        {"id": "r1", "seq": 3, "type": "delta", "text": "x"},
    ]
    bus.ids["k1"] = DifyIds("t1", "m1", "c1")
    dify = FakeDify(ANSWER)  # history never has the message
    await runner(bus, dify).run(job(), Msg(), delivered=2)
    kinds = [f["type"] for f in bus.frames]
    assert kinds[3] == "reset" and kinds[-1] == "end" and dify.calls == 1
    assert answer_of(bus.frames) == "Hello"


async def test_stop_mid_answer_calls_dify_stop_and_ends_stopped() -> None:
    bus, msg = FakeBus(), Msg()
    dify = FakeDify(ANSWER * 50, delay=0.01)
    r = runner(bus, dify)
    task = asyncio.create_task(r.run(job(), msg))
    while not any(f["type"] == "delta" for f in bus.frames):
        await asyncio.sleep(0.005)
    assert r.request_stop("k1")
    await task
    assert bus.frames[-1]["type"] == "end" and bus.frames[-1]["stopped"] is True
    assert dify.stops == [("t1", "u1")] and msg.settled == [("ack", None)]


async def test_stop_recorded_before_the_job_ran_never_calls_dify() -> None:
    bus, dify = FakeBus(), FakeDify(ANSWER)
    bus.stops.add("k1")
    await runner(bus, dify).run(job(), Msg())
    assert [f["type"] for f in bus.frames] == ["end"] and bus.frames[0]["stopped"] is True
    assert dify.calls == 0


async def test_lost_lease_stops_publishing_and_leaves_the_message_alone() -> None:
    bus, msg = FakeBus(), Msg()
    dify = FakeDify(ANSWER * 100, delay=0.01)
    task = asyncio.create_task(runner(bus, dify).run(job(), msg))
    while not any(f["type"] == "delta" for f in bus.frames):
        await asyncio.sleep(0.005)
    bus.leases["k1"] = "someone-else"
    await asyncio.wait_for(task, 2)
    count = len(bus.frames)
    await asyncio.sleep(0.1)
    assert len(bus.frames) == count and bus.frames[-1]["type"] == "delta"
    assert msg.settled == []


async def test_drain_hands_back_what_does_not_finish() -> None:
    bus, msg = FakeBus(), Msg()
    r = runner(bus, FakeDify(ANSWER * 100, delay=0.01))
    task = asyncio.create_task(r.run(job(), msg))
    while not any(f["type"] == "delta" for f in bus.frames):
        await asyncio.sleep(0.005)
    await r.drain(0.05)
    await task
    assert msg.settled == [("nak", None)] or msg.settled[0][0] == "nak"
    late = Msg()
    await r.run(job(), late)
    assert late.settled == [("nak", 0)]


@pytest.mark.parametrize("exc", [TimeoutError(), RuntimeError("bug")])
async def test_tokenwire_side_failures_send_the_job_back(exc: Exception) -> None:
    class Broken(FakeBus):
        async def stop_recorded(self, key: str) -> bool:
            raise exc

    msg = Msg()
    await runner(Broken(), FakeDify(ANSWER)).run(job(), msg)
    assert msg.settled[0][0] == "nak"


async def test_jobs_beyond_the_stream_cap_wait_in_line_told_their_position() -> None:
    bus = FakeBus()
    settings = SETTINGS.model_copy(update={"worker_concurrency": 1})
    r = JobRunner(bus, FakeDify(ANSWER * 5, delay=0.01), settings)  # type: ignore[arg-type]
    jobs = [job().model_copy(update={"id": f"r{i}", "key": f"k{i}"}) for i in range(3)]
    await asyncio.gather(*(r.run(j, Msg()) for j in jobs))
    by_id = {j.id: [f for f in bus.frames if f["id"] == j.id] for j in jobs}
    assert by_id["r0"][0]["type"] == "start"
    assert (by_id["r1"][0]["type"], by_id["r1"][0]["position"]) == ("queued", 1)
    assert (by_id["r2"][0]["type"], by_id["r2"][0]["position"]) == ("queued", 2)
    for frames in by_id.values():
        assert frames[-1]["type"] == "end" and answer_of(frames) == "Hello" * 5
        assert [f["seq"] for f in frames] == list(range(2, 2 + len(frames)))
    ends = [i for i, f in enumerate(bus.frames) if f["type"] == "end"]
    starts = [i for i, f in enumerate(bus.frames) if f["type"] == "start"]
    assert [bus.frames[i]["id"] for i in starts] == ["r0", "r1", "r2"]  # in arrival order
    assert all(s > e for s, e in zip(starts[1:], ends[:-1], strict=True))  # one stream at a time
