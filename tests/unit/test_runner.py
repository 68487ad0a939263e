"""JobRunner against in-memory fakes of NATS and Dify: every way a delivery can end.

Fast and deterministic: a test that needs an answer to be mid-way holds the fake Dify stream
(``hold_at``) rather than hoping a delay is long enough, and waits for frames with a deadline.
The same behaviours are checked over real processes in tests/integration (spine, nothing_lost,
chaos); the decisions themselves are tested without any pump in test_delivery.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from shared.breaker import CircuitBreaker
from shared.delivery import Kept
from shared.dify_api import DifyIds, HistoryMessage
from shared.exceptions import (
    DifyRejected,
    DifyStreamCut,
    DifyUnavailable,
    ErrorCode,
)
from shared.jobs import Job
from shared.settings import Settings
from shared.subjects import request_frames
from tests.unit.fakes import FakeBus, FakeDify, Msg, event
from tests.unit.helpers import answer_of, assert_frames, seqs_of
from worker.runner import JobRunner

SETTINGS = Settings(
    job_ack_wait_s=3,
    lease_check_s=0.05,
    recovery_poll_s=0.01,
    recovery_timeout_s=2,
    job_max_attempts=3,
    retry_base_s=0.5,
)
SUBJECT = request_frames("gw", "c", "k1", partitions=1)


def job(**kw: Any) -> Job:
    return Job(
        key="k1",
        id="r1",
        user="u1",
        conn="c",
        reply=SUBJECT,
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
HELD = [
    {"id": "r1", "seq": 1, "type": "accepted"},
    {"id": "r1", "seq": 2, "type": "start"},
    {"id": "r1", "seq": 3, "type": "delta", "text": "Hel"},
]


def runner(bus: FakeBus, dify: FakeDify, settings: Settings = SETTINGS) -> JobRunner:
    return JobRunner(bus, dify, settings, breaker=CircuitBreaker(threshold=2, cooldown_s=1))


async def test_answer_then_ack() -> None:
    bus, dify, msg = FakeBus(), FakeDify(ANSWER), Msg()
    await runner(bus, dify).run(job(), msg)
    assert_frames(bus.frames, "start", "delta", "delta", "end")
    assert answer_of(bus.frames) == "Hello" and msg.settled == [("ack", None)]
    assert bus.ids["k1"] == DifyIds("t1", "m1", "c1")
    assert bus.statuses["k1"]["state"] == "done"


async def test_frames_the_stream_lost_are_kept_again_before_the_ack() -> None:
    bus, msg = FakeBus(), Msg()
    bus.lose = {3}  # the first delta reached the client live, but not the frames stream
    await runner(bus, FakeDify(ANSWER)).run(job(), msg)
    assert sorted(f["seq"] for f in await bus.kept_frames(SUBJECT)) == [2, 3, 4, 5]
    assert msg.settled == [("ack", None)]


async def test_keeping_frames_rides_out_a_leader_election() -> None:
    bus, msg = FakeBus(), Msg()
    bus.lose, bus.unconfirmed = {4}, 1
    await runner(bus, FakeDify(ANSWER)).run(job(), msg)
    assert sorted(f["seq"] for f in await bus.kept_frames(SUBJECT)) == [2, 3, 4, 5]
    assert msg.settled == [("ack", None)]


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
    assert bus.statuses["k1"]["state"] == "queued"


async def test_last_attempt_is_dead_lettered_with_a_final_error() -> None:
    bus, msg = FakeBus(), Msg()
    await runner(bus, FakeDify([], before=DifyUnavailable("down"))).run(job(), msg, delivered=3)
    assert bus.dead == [("k1", "upstream_unavailable", 3)]
    assert bus.frames[-1]["type"] == "error" and bus.frames[-1]["retryable"] is True
    assert msg.settled == [("ack", None)]
    assert bus.statuses["k1"]["state"] == "dead"


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
    assert_frames(bus.frames, "error")
    assert bus.frames[0]["code"] == "conversation_not_found"
    assert msg.settled == [("ack", None)]


async def test_cut_mid_answer_is_recovered_from_history_without_asking_again() -> None:
    bus, msg = FakeBus(), Msg()
    dify = FakeDify(ANSWER[:1], after=DifyStreamCut("cut"))
    dify.history = HistoryMessage(answer="Hello world", status="normal", retriever_resources=[])
    await runner(bus, dify).run(job(), msg)
    assert_frames(bus.frames, "start", "delta", "delta", "end")
    assert answer_of(bus.frames) == "Hello world" and dify.calls == 1


async def test_history_that_disagrees_is_applied_with_replace() -> None:
    bus = FakeBus()
    dify = FakeDify(ANSWER[:1], after=DifyStreamCut("cut"))
    dify.history = HistoryMessage(answer="[moderated]", status="normal", retriever_resources=[])
    await runner(bus, dify).run(job(), Msg())
    assert [f["type"] for f in bus.frames][-2:] == ["replace", "end"]
    assert answer_of(bus.frames) == "[moderated]"


async def test_cut_with_no_history_fails_the_request_with_upstream_cut() -> None:
    bus, msg = FakeBus(), Msg()
    settings = SETTINGS.model_copy(update={"recovery_timeout_s": 0.05})
    dify = FakeDify(ANSWER[:1], after=DifyStreamCut("cut"))
    await runner(bus, dify, settings).run(job(), msg)
    assert_frames(bus.frames, "start", "delta", "error")
    assert bus.frames[-1]["code"] == "upstream_cut" and msg.settled == [("ack", None)]


async def test_redelivery_continues_after_kept_frames_without_asking_dify() -> None:
    bus, msg = FakeBus(), Msg()
    bus.seed(SUBJECT, HELD)
    bus.ids["k1"] = DifyIds("t1", "m1", "c1")
    dify = FakeDify(ANSWER)
    dify.history = HistoryMessage(answer="Hello", status="normal", retriever_resources=[])
    await runner(bus, dify).run(job(), msg, delivered=2)
    assert seqs_of(bus.frames) == [1, 2, 3, 4, 5]
    assert answer_of(bus.frames) == "Hello" and dify.calls == 0
    assert bus.leases["k1"]


async def test_redelivery_of_a_closed_request_only_acks() -> None:
    bus, dify, msg = FakeBus(), FakeDify(ANSWER), Msg()
    bus.seed(SUBJECT, [*HELD, {"id": "r1", "seq": 4, "type": "end", "stopped": False}])
    await runner(bus, dify).run(job(), msg, delivered=2)
    assert len(bus.frames) == 4 and dify.calls == 0 and msg.settled == [("ack", None)]


async def test_a_replayed_dead_letter_is_reset_and_answered_after_its_error() -> None:
    bus, msg = FakeBus(), Msg()
    dead = [
        {"id": "r1", "seq": 1, "type": "accepted"},
        {"id": "r1", "seq": 2, "type": "queued", "reason": "x", "attempt": 1, "retry_in_ms": 1},
        {"id": "r1", "seq": 3, "type": "error", "code": "upstream_unavailable"},
    ]
    bus.seed(SUBJECT, dead)
    dify = FakeDify(ANSWER)
    await runner(bus, dify).run(job(replay=1), msg)
    rest = bus.frames[3:]
    assert_frames(rest, "reset", "start", "delta", "delta", "end")
    assert rest[0]["reason"] == "replayed" and seqs_of(rest) == [4, 5, 6, 7, 8]
    assert answer_of(rest) == "Hello" and dify.calls == 1 and msg.settled == [("ack", None)]


async def test_failed_recovery_resets_and_asks_again() -> None:
    bus = FakeBus()
    bus.seed(SUBJECT, [*HELD[:2], {"id": "r1", "seq": 3, "type": "delta", "text": "x"}])
    bus.ids["k1"] = DifyIds("t1", "m1", "c1")
    dify = FakeDify(ANSWER)  # history never has the message
    await runner(bus, dify).run(job(), Msg(), delivered=2)
    kinds = [f["type"] for f in bus.frames]
    assert kinds[3] == "reset" and kinds[-1] == "end" and dify.calls == 1
    assert bus.frames[3]["reason"] == "recovery_failed"
    assert answer_of(bus.frames) == "Hello"


async def test_stop_mid_answer_calls_dify_stop_and_ends_stopped() -> None:
    bus, msg = FakeBus(), Msg()
    dify = FakeDify(ANSWER * 50, hold_at=2)  # the stream waits after the first delta
    r = runner(bus, dify)
    task = asyncio.create_task(r.run(job(), msg))
    await bus.wait_for("delta")
    assert r.request_stop("k1")
    await asyncio.wait_for(task, 5)
    assert bus.frames[-1]["type"] == "end" and bus.frames[-1]["stopped"] is True
    assert dify.stops == [("t1", "u1")] and msg.settled == [("ack", None)]
    assert dify.open_streams == 0


async def test_stop_recorded_before_the_job_ran_never_calls_dify() -> None:
    bus, dify = FakeBus(), FakeDify(ANSWER)
    bus.stops.add("k1")
    await runner(bus, dify).run(job(), Msg())
    assert_frames(bus.frames, "end")
    assert bus.frames[0]["stopped"] is True and dify.calls == 0


async def test_lost_lease_stops_publishing_and_leaves_the_message_alone() -> None:
    bus, msg = FakeBus(), Msg()
    dify = FakeDify(ANSWER * 100, hold_at=2)
    task = asyncio.create_task(runner(bus, dify).run(job(), msg))
    await bus.wait_for("delta")
    bus.leases["k1"] = "someone-else"
    await asyncio.wait_for(task, 2)
    # The stream to Dify is closed when run() returns: nothing can publish after this point.
    assert dify.open_streams == 0
    assert bus.frames[-1]["type"] == "delta"
    assert msg.settled == []


async def test_drain_hands_back_what_does_not_finish() -> None:
    bus, msg = FakeBus(), Msg()
    dify = FakeDify(ANSWER * 100, hold_at=2)  # never finishes on its own
    r = runner(bus, dify)
    task = asyncio.create_task(r.run(job(), msg))
    await bus.wait_for("delta")
    await r.drain(0.05)
    await asyncio.wait_for(task, 5)
    # Handed back once, for redelivery at once; the unfinished answer is left to the next
    # worker (no end, no error, no reset from this one).
    assert msg.settled == [("nak", 0.0)]
    assert bus.frames[-1]["type"] == "delta" and dify.open_streams == 0
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
    assert msg.settled == [("nak", 2.0)]


async def test_jobs_beyond_the_stream_cap_wait_in_line_told_their_position() -> None:
    bus = FakeBus()
    settings = SETTINGS.model_copy(update={"worker_concurrency": 1})
    r = JobRunner(bus, FakeDify(ANSWER * 5, delay=0.01), settings)
    jobs = [job().model_copy(update={"id": f"r{i}", "key": f"k{i}"}) for i in range(3)]
    await asyncio.gather(*(r.run(j, Msg()) for j in jobs))
    by_id = {j.id: bus.of(j.id) for j in jobs}
    assert by_id["r0"][0]["type"] == "start"
    assert (by_id["r1"][0]["type"], by_id["r1"][0]["position"]) == ("queued", 1)
    assert (by_id["r2"][0]["type"], by_id["r2"][0]["position"]) == ("queued", 2)
    for frames in by_id.values():
        assert frames[-1]["type"] == "end" and answer_of(frames) == "Hello" * 5
        assert seqs_of(frames) == list(range(2, 2 + len(frames)))
    ends = [i for i, f in enumerate(bus.frames) if f["type"] == "end"]
    starts = [i for i, f in enumerate(bus.frames) if f["type"] == "start"]
    assert [bus.frames[i]["id"] for i in starts] == ["r0", "r1", "r2"]  # in arrival order
    assert all(s > e for s, e in zip(starts[1:], ends[:-1], strict=True))  # one stream at a time


LONG = [event("message", answer=w) for w in ("The ", "quick ", "brown ", "fox")] + [
    event("message_end", metadata={})
]


@pytest.mark.parametrize("died_after", range(6))
async def test_a_worker_dying_after_any_frame_is_finished_exactly_by_the_next(
    died_after: int,
) -> None:
    """Wherever the first worker died (after ``died_after`` of its frames were kept), the next
    delivery finishes the same answer with one gapless seq and one end, and asks Dify again
    only if no ``start`` was kept."""
    first = FakeBus()
    await runner(first, FakeDify(LONG)).run(job(), Msg())
    full = first.frames[:-1]  # start, four deltas: the end never made it
    bus, msg = FakeBus(), Msg()
    bus.seed(SUBJECT, [{"id": "r1", "seq": 1, "type": "accepted"}, *full[:died_after]])
    bus.ids["k1"] = first.ids["k1"]
    dify = FakeDify(LONG)
    dify.history = HistoryMessage(
        answer="The quick brown fox", status="normal", retriever_resources=[]
    )
    await runner(bus, dify).run(job(), msg, delivered=2)
    seen = bus.frames
    assert seqs_of(seen) == list(range(1, len(seen) + 1))
    assert [f["type"] for f in seen].count("end") == 1 and seen[-1]["type"] == "end"
    assert answer_of(seen) == "The quick brown fox" and msg.settled == [("ack", None)]
    assert dify.calls == (1 if died_after == 0 else 0)


async def test_a_redelivery_fences_first_then_stamps_its_generation_on_every_frame() -> None:
    bus, msg = FakeBus(), Msg()
    bus.seed(SUBJECT, HELD)
    bus.ids["k1"] = DifyIds("t1", "m1", "c1")
    dify = FakeDify(ANSWER)
    dify.history = HistoryMessage(answer="Hello", status="normal", retriever_resources=[])
    bus.fence_races = 2  # the older delivery kept frames meanwhile: read again, twice
    await runner(bus, dify).run(job(), msg, delivered=2)
    kept = [orjson.loads(d) for d in bus.kept[SUBJECT]]
    (fence,) = [f for f in kept if f["type"] == "fence"]
    gen = bus.revision
    assert (fence["gen"], fence["after"]) == (gen, 3)
    after = kept[kept.index(fence) + 1 :]
    assert after and all(f["gen"] == gen for f in after)
    assert Kept.of(kept).answer == "Hello" and msg.settled == [("ack", None)]


async def test_a_delivery_that_finds_a_newer_fence_publishes_nothing_and_leaves_the_job() -> None:
    bus, msg = FakeBus(), Msg()
    bus.seed(SUBJECT, [*HELD, {"id": "r1", "type": "fence", "gen": 10**9, "after": 3}])
    await runner(bus, FakeDify(ANSWER)).run(job(), msg, delivered=2)
    assert len(bus.frames) == 4 and msg.settled == []
