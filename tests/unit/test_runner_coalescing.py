"""The runner with coalescing on, against the fakes: real timers, random token timings.

The rule itself is tested without a clock in test_coalesce.py; here the shell carries it out
(the publisher's deadline timer, the reads of Dify's stream, the kept frames), and a worker
that dies anywhere is finished exactly by the next delivery.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.breaker import CircuitBreaker
from shared.dify_api import HistoryMessage
from shared.jobs import Job
from shared.settings import Settings
from shared.sse import SSEEvent
from shared.subjects import request_frames
from tests.unit.fakes import FakeBus, FakeDify, Msg, event
from tests.unit.helpers import answer_of, assert_frames, seqs_of
from worker.runner import JobRunner

SUBJECT = request_frames("gw", "c", "k1", partitions=1)
BASE = Settings(
    job_ack_wait_s=3,
    lease_check_s=0.01,
    recovery_poll_s=0.01,
    recovery_timeout_s=2,
    coalesce_ms=16,
)


def job() -> Job:
    return Job(
        key="k1",
        id="r1",
        user="u1",
        conn="c",
        reply=SUBJECT,
        query="q",
        trace_id="t",
        created_ms=int(time.time() * 1000),
    )


def answer(words: list[str]) -> list[SSEEvent]:
    return [event("message", answer=w) for w in words] + [event("message_end", metadata={})]


def runner(bus: FakeBus, dify: Any, settings: Settings = BASE) -> JobRunner:
    return JobRunner(bus, dify, settings, breaker=CircuitBreaker(threshold=2, cooldown_s=1))


async def run_timed(words: list[str], gaps: list[float], per_read: int) -> FakeBus:
    """One delivery whose Dify sends ``words`` with ``gaps`` between reads."""
    events = answer(words)
    bus = FakeBus()
    dify = FakeDify(events)

    @asynccontextmanager
    async def stream_chat(body: Any, *, trace_id: str, app: str | None = None) -> Any:
        dify.calls += 1

        async def gen() -> AsyncIterator[list[SSEEvent]]:
            for n, i in enumerate(range(0, len(events), per_read)):
                await asyncio.sleep(gaps[n % len(gaps)])
                yield events[i : i + per_read]

        yield gen()

    dify.stream_chat = stream_chat  # type: ignore[method-assign]
    msg = Msg()
    await runner(bus, dify).run(job(), msg)
    assert msg.settled == [("ack", None)]
    return bus


async def test_one_read_of_many_tokens_is_one_delta() -> None:
    bus = FakeBus()
    words = [f"w{i} " for i in range(50)]
    await runner(bus, FakeDify(answer(words), per_read=51)).run(job(), Msg())
    assert_frames(bus.frames, "start", "delta", "end")
    assert answer_of(bus.frames) == "".join(words) and seqs_of(bus.frames) == [2, 3, 4]


async def test_paced_tokens_go_one_frame_each() -> None:
    words = ["a", "b", "c", "d"]
    bus = await run_timed(words, [0.03], per_read=1)  # 30 ms apart: slower than 16 ms
    assert_frames(bus.frames, "start", "delta", "delta", "delta", "delta", "end")


async def test_fast_tokens_are_merged_and_the_timer_sends_them() -> None:
    words = [f"t{i} " for i in range(40)]
    bus = await run_timed(words, [0.001], per_read=1)  # 1 ms apart
    deltas = [f for f in bus.frames if f["type"] == "delta"]
    assert answer_of(bus.frames) == "".join(words)
    assert seqs_of(bus.frames) == list(range(2, 2 + len(bus.frames)))
    assert 2 <= len(deltas) < 20  # the first at once, then about one per 16 ms
    assert [f["seq"] for f in await bus.kept_frames(SUBJECT)] == seqs_of(bus.frames)


async def test_coalescing_off_sends_one_delta_per_token() -> None:
    bus = FakeBus()
    words = [f"w{i} " for i in range(10)]
    off = BASE.model_copy(update={"coalesce_ms": 0})
    await runner(bus, FakeDify(answer(words), per_read=11), off).run(job(), Msg())
    assert [f["type"] for f in bus.frames].count("delta") == 10


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    words=st.lists(st.text(alphabet="abc ", min_size=1, max_size=3), min_size=1, max_size=14),
    gaps_ms=st.lists(st.sampled_from([0, 1, 3, 10, 20]), min_size=1, max_size=5),
    per_read=st.integers(min_value=1, max_value=4),
    cut=st.floats(min_value=0, max_value=1),
)
async def test_random_timings_and_a_death_anywhere_give_the_same_answer(
    words: list[str], gaps_ms: list[int], per_read: int, cut: float
) -> None:
    """One worker answers with random token timings; the client holds the same answer with a
    gapless seq. Then the worker is taken to have died after a random number of its frames
    were kept: the next delivery finishes exactly that answer, each seq once."""
    first = await run_timed(words, [g / 1000 for g in gaps_ms], per_read)
    full = "".join(words)
    assert answer_of(first.frames) == full
    assert seqs_of(first.frames) == list(range(2, 2 + len(first.frames)))

    held = first.frames[: int(cut * (len(first.frames) - 1))]  # the end never made it
    bus, msg = FakeBus(), Msg()
    bus.seed(SUBJECT, [{"id": "r1", "seq": 1, "type": "accepted"}, *held])
    bus.ids["k1"] = first.ids["k1"]
    dify = FakeDify(answer(words), per_read=per_read)
    dify.history = HistoryMessage(answer=full, status="normal", retriever_resources=[])
    await runner(bus, dify).run(job(), msg, delivered=2)
    seen = bus.frames
    assert seqs_of(seen) == list(range(1, len(seen) + 1))
    assert [f["type"] for f in seen].count("end") == 1 and seen[-1]["type"] == "end"
    assert answer_of(seen) == full and msg.settled == [("ack", None)]
