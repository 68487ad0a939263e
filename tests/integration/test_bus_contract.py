"""The bus contract against worker.bus.NatsBus over a real nats-server with JetStream."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
from nats.js.kv import KeyValue
from prometheus_client import REGISTRY

from shared import natsedge
from shared.jobs import Job
from shared.settings import Settings
from shared.subjects import (
    DEAD_ALL,
    DEAD_STREAM,
    JOB_CHAT,
    frame_partition,
    frames_stream,
    request_frames,
    request_key,
    status_key,
    stop_flag_key,
)
from tests.unit.bus_contract import PARTITIONS, BusContract
from tokenwire.natsserver import NatsServer
from worker.bus import NatsBus
from worker.queue_gauges import refresh

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("bus-contract") / "nats") as nats:
        yield nats


class NatsProbe:
    """The other side of the bus, through the same edge a gateway and `tokenwire jobs` use."""

    def __init__(self, bus: NatsBus, kv: KeyValue) -> None:
        self.bus = bus
        self.kv = kv

    async def record_stop(self, key: str) -> None:
        await natsedge.kv_put(self.kv, stop_flag_key(key), b"1")

    async def status(self, key: str) -> dict[str, Any] | None:
        entry = await natsedge.kv_get(self.kv, status_key(key))
        return orjson.loads(entry.value) if entry is not None else None

    async def dead_letters(self) -> list[tuple[str, str, int]]:
        js = self.bus.js
        state = await natsedge.stream_state(js, DEAD_STREAM)
        out: list[tuple[str, str, int]] = []
        seq = state.first_seq if state is not None else 0
        while state is not None and seq <= state.last_seq:
            msg = await natsedge.get_message(js, DEAD_STREAM, seq, subject=DEAD_ALL, next=True)
            if msg is None:
                break
            headers = msg.headers or {}
            out.append((headers["Tw-Key"], headers["Tw-Error-Code"], int(headers["Tw-Attempts"])))
            seq = (msg.seq or seq) + 1
        return out


class TestNatsBus(BusContract):
    @pytest.fixture
    async def bus(self, server: NatsServer) -> AsyncIterator[NatsBus]:
        settings = Settings(nats_url=server.url, frame_partitions=PARTITIONS)
        nc = await natsedge.connect(settings, name="bus-contract")
        js = nc.jetstream()
        kv = await natsedge.ensure_topology(js, settings)
        try:
            yield NatsBus(nc, js, kv)
        finally:
            await nc.close()

    @pytest.fixture
    def probe(self, bus: NatsBus) -> NatsProbe:
        return NatsProbe(bus, bus.kv)


async def test_queue_gauges_show_the_oldest_job_and_the_dead_letters(server: NatsServer) -> None:
    """The worker's cluster-wide gauges, read through the same edge (worker/queue_gauges.py)."""
    settings = Settings(nats_url=server.url)
    nc = await natsedge.connect(settings, name="gauges")
    try:
        js = nc.jetstream()
        await natsedge.ensure_topology(js, settings)
        old = Job(
            key="gauge-job",
            id="r1",
            user="u1",
            conn="c",
            reply=request_frames("gw", "c", "gauge-job", partitions=1),
            query="q",
            trace_id="t",
            created_ms=int(time.time() * 1000) - 30_000,
        )
        await js.publish(JOB_CHAT, old.to_bytes())
        await refresh(js)
        age = REGISTRY.get_sample_value("tokenwire_worker_queue_oldest_age_seconds")
        assert age is not None and 29 <= age <= 120
        dead = REGISTRY.get_sample_value("tokenwire_worker_dead_letters")
        assert dead == (await natsedge.stream_state(js, DEAD_STREAM)).messages  # type: ignore[union-attr]
    finally:
        await nc.close()


async def test_frames_are_kept_in_their_partition_s_stream(server: NatsServer) -> None:
    """A worker keeps and reads a request's frames in the stream its key hashes to."""
    settings = Settings(nats_url=server.url, frame_partitions=PARTITIONS)
    nc = await natsedge.connect(settings, name="partitions")
    try:
        js = nc.jetstream()
        kv = await natsedge.ensure_topology(js, settings)
        bus = NatsBus(nc, js, kv)
        by_partition: dict[int, str] = {}
        for i in itertools.count():  # one request in each partition
            key = request_key("u", f"part-{i}")
            by_partition.setdefault(frame_partition(key, PARTITIONS), key)
            if len(by_partition) == PARTITIONS:
                break
        for partition, key in sorted(by_partition.items()):
            subject = request_frames("gw", "c", key, partitions=PARTITIONS)
            await bus.ensure_kept(subject, {1: b'{"id":"r1","seq":1,"type":"accepted"}'})
            assert [f["seq"] for f in await bus.kept_frames(subject)] == [1]
            for other in range(PARTITIONS):
                count = await natsedge.subject_count(js, frames_stream(other), subject)
                assert count == (1 if other == partition else 0), (partition, other)
        await refresh(js, PARTITIONS)
        for partition in range(PARTITIONS):
            used = REGISTRY.get_sample_value(
                "tokenwire_worker_stream_bytes", {"stream": frames_stream(partition)}
            )
            assert used is not None and used > 0, partition
    finally:
        await nc.close()
