"""What every implementation of :class:`worker.types.Bus` must do: one suite, two backends.

Like FastStream's ``tests/brokers/base`` classes: :class:`BusContract` holds the tests and is
not collected itself; ``tests/unit/test_bus_contract.py`` subclasses it for the in-memory
:class:`tests.unit.fakes.FakeBus`, ``tests/integration/test_bus_contract.py`` for
:class:`worker.bus.NatsBus` over a real nats-server. Each subclass provides two fixtures:
``bus`` (the implementation) and ``probe`` (what a gateway or ``tokenwire jobs`` would see
or do on the other side of it: :class:`Probe`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Protocol

import orjson
import pytest

from shared.dify_api import DifyIds
from shared.exceptions import DifyUnavailable
from shared.jobs import Job
from shared.subjects import request_frames
from worker.types import Bus

#: Frame subjects of the suite spread over this many partitions (a backend with a stream per
#: partition must read each subject from its own).
PARTITIONS = 3

__all__ = ["PARTITIONS", "BusContract", "Probe"]


class Probe(Protocol):
    async def record_stop(self, key: str) -> None:
        """What a gateway does for ``stop`` of a request that no worker runs yet."""
        ...

    async def status(self, key: str) -> dict[str, Any] | None:
        """What ``tokenwire jobs`` reads as the job's state."""
        ...

    async def dead_letters(self) -> list[tuple[str, str, int]]:
        """``(key, error code, attempts)`` of every dead-lettered job."""
        ...


def frame(seq: int, kind: str = "delta", **fields: Any) -> bytes:
    return orjson.dumps({"id": "r1", "seq": seq, "type": kind, **fields})


async def kept(bus: Bus, subject: str, count: int) -> list[dict[str, Any]]:
    """The kept frames once there are ``count`` of them: frames go out on core NATS and the
    stream stores them a moment later, so a reader right after the publish may see fewer."""
    async with asyncio.timeout(5):
        while len(frames := await bus.kept_frames(subject)) < count:
            await asyncio.sleep(0.01)
    return frames


class BusContract:
    @pytest.fixture
    def key(self) -> str:
        return uuid.uuid4().hex

    @pytest.fixture
    def subject(self, key: str) -> str:
        return request_frames("gw", f"c{uuid.uuid4().hex[:8]}", key, partitions=PARTITIONS)

    # --- frames -------------------------------------------------------------------------

    async def test_published_frames_are_kept_in_order(self, bus: Bus, subject: str) -> None:
        for seq in (1, 2, 3):
            await bus.publish(subject, frame(seq, text=str(seq)))
        frames = await kept(bus, subject, 3)
        assert [(f["seq"], f["text"]) for f in frames] == [(1, "1"), (2, "2"), (3, "3")]

    async def test_nothing_is_kept_for_a_subject_never_published(
        self, bus: Bus, subject: str
    ) -> None:
        assert await bus.kept_frames(subject) == []

    async def test_frames_of_one_request_are_not_another_s(self, bus: Bus, subject: str) -> None:
        await bus.publish(subject, frame(1))
        await kept(bus, subject, 1)
        assert await bus.kept_frames(subject + "x") == []

    async def test_ensure_kept_publishes_exactly_what_is_missing(
        self, bus: Bus, subject: str
    ) -> None:
        published = {seq: frame(seq, text=str(seq)) for seq in (1, 2, 3, 4)}
        for seq in (1, 2, 4):  # seq 3 never reached the stream
            await bus.publish(subject, published[seq])
        await kept(bus, subject, 3)
        await bus.ensure_kept(subject, published)
        frames = await kept(bus, subject, 4)
        assert sorted(f["seq"] for f in frames) == [1, 2, 3, 4]
        assert next(f for f in frames if f["seq"] == 3)["text"] == "3"
        await bus.ensure_kept(subject, published)  # all there now: nothing more
        assert len(await bus.kept_frames(subject)) == 4

    async def test_ensure_kept_of_an_empty_subject_keeps_everything(
        self, bus: Bus, subject: str
    ) -> None:
        published = {seq: frame(seq) for seq in (2, 3)}
        await bus.ensure_kept(subject, published)  # acknowledged publishes: kept at once
        assert sorted(f["seq"] for f in await bus.kept_frames(subject)) == [2, 3]

    async def test_ensure_kept_with_nothing_published_does_nothing(
        self, bus: Bus, subject: str
    ) -> None:
        await bus.ensure_kept(subject, {})
        assert await bus.kept_frames(subject) == []

    # --- per-request facts --------------------------------------------------------------

    async def test_dify_ids_are_recorded_and_read_back(self, bus: Bus, key: str) -> None:
        assert await bus.load_ids(key) is None
        await bus.save_ids(key, DifyIds("t1", "m1", "c1"))
        assert await bus.load_ids(key) == DifyIds("t1", "m1", "c1")
        await bus.save_ids(key, DifyIds("t2", None, None))
        assert await bus.load_ids(key) == DifyIds("t2", None, None)

    async def test_a_stop_recorded_by_a_gateway_is_seen(
        self, bus: Bus, probe: Probe, key: str
    ) -> None:
        assert not await bus.stop_recorded(key)
        await probe.record_stop(key)
        assert await bus.stop_recorded(key)

    async def test_the_last_lease_taken_holds_the_request(self, bus: Bus, key: str) -> None:
        assert await bus.lease_holder(key) is None
        await bus.take_lease(key, "first")
        assert await bus.lease_holder(key) == "first"
        await bus.take_lease(key, "second")
        assert await bus.lease_holder(key) == "second"

    async def test_status_is_what_operators_read(self, bus: Bus, probe: Probe, key: str) -> None:
        assert await probe.status(key) is None
        record = {"state": "queued", "attempts": 2, "last_error": "down", "worker": "w"}
        await bus.save_status(key, record)
        assert await probe.status(key) == record

    async def test_a_dead_letter_keeps_the_job_with_why(
        self, bus: Bus, probe: Probe, key: str
    ) -> None:
        job = Job(
            key=key,
            id="r1",
            user="u1",
            conn="c",
            reply=request_frames("gw", "c", key, partitions=PARTITIONS),
            query="q",
            trace_id="t",
            created_ms=int(time.time() * 1000),
        )
        await bus.dead_letter(job, DifyUnavailable("Dify stayed unavailable"), 3)
        assert (key, "upstream_unavailable", 3) in await probe.dead_letters()
