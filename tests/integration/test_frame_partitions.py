"""A frames store of three partitions: answers, resume on another gateway, a worker killed.

With ``TOKENWIRE_FRAME_PARTITIONS=3`` every request's frames are kept in the stream its key
hashes to; every reader must find them there. Checked as a client sees it (the exact answer,
seq without gaps) and as an operator sees the store (nats-server's ``/jsz``: each of the three
streams holds frames).
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest

from shared.subjects import frame_partition, frames_stream, request_key
from tests.integration.stack import Proc, Stack
from tests.integration.test_nothing_lost import _holding_deltas, sim_queries
from tests.integration.wsclient import Client, answer_of, assert_seq_complete
from tokenwire.natsserver import NatsServer
from tokenwire.simulator import expected_final_answer

pytestmark = pytest.mark.integration

PARTITIONS = 3
STACK_ENV = {"TOKENWIRE_FRAME_PARTITIONS": str(PARTITIONS)}
USER = "parted"


def rid_in(partition: int, tag: str) -> str:
    """A request id of ``USER`` whose frames are kept in ``partition``."""
    for n in range(1000):
        rid = f"{tag}-{n}"
        if frame_partition(request_key(USER, rid), PARTITIONS) == partition:
            return rid
    raise AssertionError("no id found")  # pragma: no cover: 1000 tries, 1/3 each


def owner_of(workers: list[Proc], client: Client) -> Proc:
    """The worker that started the connection's request last (a loaded machine may have had
    the job redelivered once already: the later delivery holds the lease)."""
    conn = client.hello["session"]
    starts = [
        (orjson.loads(line)["ts"], worker.name)
        for worker in workers
        for line in worker.log_text().splitlines()
        if conn in line and '"job started"' in line
    ]
    assert starts, "no worker started the request"
    latest = max(starts)[1]
    return next(w for w in workers if w.name == latest)


def kept_per_stream(nats: NatsServer) -> dict[str, int]:
    body = httpx.get(f"{nats.monitor_url}/jsz", params={"streams": "true"}, timeout=5).json()
    return {
        s["name"]: s["state"]["messages"]
        for account in body.get("account_details", [])
        for s in account.get("stream_detail", [])
    }


@pytest.mark.timeout(180)
async def test_three_partitions_answer_resume_elsewhere_and_survive_a_killed_worker(
    stack: Stack, nats: NatsServer
) -> None:
    workers = [stack.worker("worker-a"), stack.worker("worker-b")]
    first = stack.gateway("gateway-a")
    second = stack.gateway("gateway-b")
    controls: dict[str, Any] = {"delay_ms": 2, "tokens": 8}
    rids = {p: rid_in(p, f"short-{p}") for p in range(PARTITIONS)}
    queries = {rid: f"partition {p} {uuid.uuid4().hex[:6]}" for p, rid in rids.items()}
    async with Client(stack.ws_url(first.port, user=USER)) as client:  # type: ignore[attr-defined]
        for rid, query in queries.items():
            await client.chat(query, rid=rid, inputs={"tw_sim": controls})
        answered = {rid: await client.finish(rid) for rid in queries}
    for rid, query in queries.items():
        assert answered[rid][-1]["type"] == "end", answered[rid][-2:]
        assert_seq_complete(answered[rid])
        assert answer_of(answered[rid]) == expected_final_answer(query, controls)
    kept = kept_per_stream(nats)
    assert all(kept.get(frames_stream(p), 0) > 0 for p in range(PARTITIONS)), kept

    # Resumed on the other gateway, each request is read from its own partition's stream.
    async with Client(stack.ws_url(second.port, user=USER)) as client:  # type: ignore[attr-defined]
        for rid in queries:
            await client.send({"type": "resume", "id": rid, "after": 0})
        resumed = {rid: await client.finish(rid) for rid in queries}
    assert resumed == answered

    # A worker killed mid-answer, in a partition that is not TW_FRAMES: the other worker reads
    # what was kept of it there and finishes it from Dify's history.
    long = {"delay_ms": 40, "tokens": 150}
    rid, query = rid_in(2, "long"), f"survive in partition 2 {uuid.uuid4().hex[:6]}"
    async with Client(stack.ws_url(first.port, user=USER)) as client:  # type: ignore[attr-defined]
        await client.chat(query, rid=rid, inputs={"tw_sim": long})
        start = await client.wait_for(rid, "start")
        await _holding_deltas(client, rid, 10)
        owner_of(workers, client).kill()
        frames = await client.finish(rid, timeout=90)
    kinds = [f["type"] for f in frames]
    assert kinds[-1] == "end" and "reset" not in kinds, kinds
    assert_seq_complete(frames)
    assert answer_of(frames) == expected_final_answer(query, long)
    assert frames[-1]["message_id"] == start["message_id"]
    assert len(sim_queries(stack, query)) == 1, "Dify was asked twice"
