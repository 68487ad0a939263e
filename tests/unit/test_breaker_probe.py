"""The half-open probe always comes back: a stopped probe must not keep the circuit shut.

A probe stopped by its client before Dify said anything tells nothing about Dify; before this
was handled the breaker kept the probe slot taken, and every later job was sent back as
"circuit open" forever.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import worker.streaming
from shared.breaker import BreakerState, CircuitBreaker
from shared.jobs import Job
from tests.unit.fakes import FakeBus, FakeDify, Msg
from tests.unit.helpers import answer_of
from tests.unit.test_runner import ANSWER, SETTINGS, SUBJECT
from worker.runner import JobRunner


def job(key: str, rid: str) -> Job:
    return Job(
        key=key,
        id=rid,
        user="u1",
        conn="c",
        reply=SUBJECT,
        query="q",
        trace_id="t",
        created_ms=int(time.time() * 1000),
    )


def half_open() -> CircuitBreaker:
    breaker = CircuitBreaker(threshold=1, cooldown_s=0.01)
    breaker.failure(time.monotonic())
    assert breaker.state is BreakerState.OPEN
    return breaker


async def wait_until_open_ends(breaker: CircuitBreaker) -> None:
    deadline = time.monotonic() + 2
    while breaker.retry_in(time.monotonic()) > 0.05:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)


async def test_a_probe_stopped_before_dify_answered_lets_the_next_job_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker.streaming, "STOP_TASK_ID_GRACE_S", 0.05)
    breaker = half_open()
    await wait_until_open_ends(breaker)
    bus = FakeBus()
    silent = FakeDify(ANSWER, hold_at=0)  # Dify takes the request and says nothing yet
    runner = JobRunner(bus, silent, SETTINGS, breaker=breaker)
    probe = asyncio.create_task(runner.run(job("k1", "r1"), Msg()))
    deadline = time.monotonic() + 2
    while silent.calls == 0:
        assert time.monotonic() < deadline, "the probe never reached Dify"
        await asyncio.sleep(0.005)
    assert runner.request_stop("k1")
    await asyncio.wait_for(probe, 5)
    assert not breaker.probe_out, "the stopped probe still holds the half-open slot"

    answering = FakeDify(ANSWER)
    runner.dify = answering  # the same worker, Dify answering again
    msg = Msg()
    await runner.run(job("k2", "r2"), msg)
    assert answering.calls == 1 and msg.settled == [("ack", None)]
    assert answer_of([f for f in bus.frames if f["id"] == "r2"]) == "Hello"
    assert breaker.state is BreakerState.CLOSED


async def test_a_probe_stopped_after_dify_answered_closes_the_circuit() -> None:
    breaker = half_open()
    await wait_until_open_ends(breaker)
    bus = FakeBus()
    dify = FakeDify(ANSWER * 50, hold_at=2)  # Dify answers, then the user stops it
    runner = JobRunner(bus, dify, SETTINGS, breaker=breaker)
    task = asyncio.create_task(runner.run(job("k1", "r1"), Msg()))
    await bus.wait_for("delta")
    assert runner.request_stop("k1")
    await asyncio.wait_for(task, 5)
    assert breaker.state is BreakerState.CLOSED


def test_release_frees_only_a_pending_probe() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown_s=0.0)
    breaker.release()  # closed: nothing to release
    assert breaker.state is BreakerState.CLOSED
    breaker.failure(0.0)
    assert breaker.allow(1.0) and breaker.probe_out
    assert not breaker.allow(1.0)  # one probe at a time
    breaker.release()
    assert breaker.allow(1.0)  # the next one may probe
