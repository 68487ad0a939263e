"""Fencing a stale worker (issue 17): a worker frozen mid-answer past the ack wait, another
finishing the answer, then the first thawed. Nothing the thawed worker sends reaches a client
or a later ``resume``, although it does publish (its frames are in the stream, after the fence).

Real processes: nats-server, the Dify simulator, two workers, a gateway, WebSocket clients.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from typing import Any

import nats
import orjson
import pytest
from nats.js.api import DeliverPolicy

from shared.delivery import Kept
from shared.subjects import FRAMES_STREAM, request_frames_any_connection, request_key
from tests.integration.promtext import samples, value
from tests.integration.stack import Proc, Stack
from tests.integration.wsclient import Client, answer_of, assert_seq_complete
from tokenwire.simulator import expected_final_answer

pytestmark = pytest.mark.integration

# The conftest's FAST timings (ack wait 3 s, lease checks every 0.5 s), and: no coalescing, so
# the thawed worker publishes each token it finds waiting at once; Dify's history is given up
# on quickly, so the second worker answers again (reset) and streams for seconds, long enough
# to thaw the first one in the middle of it.
STACK_ENV = {"TOKENWIRE_COALESCE_MS": "0", "TOKENWIRE_RECOVERY_TIMEOUT_S": "0.5"}
USER = "fence-user"


@pytest.mark.timeout(120)
async def test_worker_frozen_past_the_ack_wait_then_thawed_reaches_no_client(stack: Stack) -> None:
    workers = [stack.worker("worker-a"), stack.worker("worker-b")]
    gateway = stack.gateway()
    query = f"frozen worker {uuid.uuid4().hex[:6]}"
    # 12 s of answer: Dify's message is still unfinished when the job comes back (after one
    # ack wait, or two when the frozen worker had already pulled the redelivery).
    controls = {"delay_ms": 40, "tokens": 300}
    expected = expected_final_answer(query, controls)
    async with Client(stack.ws_url(user=USER)) as client:
        rid = await client.chat(query, inputs={"tw_sim": controls})
        await _deltas(client, rid, 5)
        frozen = _owner_of(workers, client)
        frozen.signal(signal.SIGSTOP)
        try:
            # Past the ack wait the job goes to the other worker, which fences the frozen one
            # out, finds Dify's message unfinished and answers again from the start.
            reset = await client.wait_for(rid, "reset", timeout=30)
            await _deltas(client, rid, 10, after=reset["seq"])
        finally:
            frozen.signal(signal.SIGCONT)  # mid-answer of the second worker
        frames = await client.finish(rid, timeout=60)

    assert frames[-1]["type"] == "end", frames[-1]
    assert_seq_complete(frames)
    assert answer_of(frames) == expected

    # A later resume from 0, on another connection, gives the same frames.
    async with Client(stack.ws_url(user=USER)) as again:
        await again.send({"type": "resume", "id": rid, "after": 0})
        replayed = await again.finish(rid, timeout=30)
    assert [_strip(f) for f in replayed] == [_strip(f) for f in frames]

    # The thawed worker ran again and found itself fenced out (its log and its metric).
    assert "fenced: a newer delivery owns this request" in frozen.log_text()
    assert value(_metrics(frozen), "tokenwire_worker_fenced_total") >= 1
    kept = await _kept(stack, request_key(USER, rid))
    fences = [i for i, f in enumerate(kept) if f["type"] == "fence"]
    assert fences, "no fence was kept"
    folded = Kept.of(kept)
    assert folded.closed and folded.answer == expected
    assert folded.last_seq == frames[-1]["seq"]
    # Whatever it published before it noticed (usually the tokens Dify sent it while it was
    # frozen; on a loaded machine its lease check may come first) is kept after the fence and
    # dropped by the gateway: the answers and the replay above held none of it.
    stale = [f for f in kept[fences[-1] :] if f.get("gen", 0) < kept[fences[-1]]["gen"]]
    print(f"the thawed worker published {len(stale)} frames after the fence")
    if stale:
        gateway_metrics = samples(f"http://127.0.0.1:{gateway.port}/metrics")  # type: ignore[attr-defined]
        assert value(gateway_metrics, "tokenwire_gateway_stale_frames_total") >= 1


def _strip(frame: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k != "gen"}


async def _deltas(client: Client, rid: str, count: int, *, after: int = 0) -> None:
    async with asyncio.timeout(30):
        while sum(f["type"] == "delta" and f["seq"] > after for f in client.frames[rid]) < count:
            await asyncio.sleep(0.01)


def _owner_of(workers: list[Proc], client: Client) -> Proc:
    conn = client.hello["session"]
    owners = [w for w in workers if conn in w.log_text()]
    assert len(owners) == 1, [w.name for w in owners]
    return owners[0]


def _metrics(proc: Proc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert proc.health_url is not None
    return samples(proc.health_url.replace("/healthz", "/metrics"))


async def _kept(stack: Stack, key: str) -> list[dict[str, Any]]:
    """Every frame the stream keeps for the request, in the stream's order."""
    nc = await nats.connect(stack.nats_url)
    try:
        js = nc.jetstream()
        out: list[dict[str, Any]] = []
        done = asyncio.Event()

        async def collect(msg: Any) -> None:
            out.append(orjson.loads(msg.data))
            if msg.metadata.num_pending == 0:
                done.set()

        sub = await js.subscribe(
            request_frames_any_connection(key, partitions=1),
            stream=FRAMES_STREAM,  # the stack's one partition
            cb=collect,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        await asyncio.wait_for(done.wait(), 10)
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()
