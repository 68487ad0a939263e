"""When JetStream's storage fills: new chats are refused before `accepted`, nothing accepted is
lost, and operators see it in the metrics.

TW_JOBS is given a small byte limit and no worker runs, so the queue fills: the chats it cannot
store get a retryable `bus_unavailable` error at seq 1 (with a retry hint) and were never
accepted; every accepted chat is answered exactly once a worker starts, and a refused chat sent
again then is accepted and answered. TW_FRAMES with a small limit drops the oldest requests'
frames first: the newest answer stays complete for `resume`.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from tests.integration.stack import Stack
from tests.integration.wsclient import Client, answer_of, assert_seq_complete
from tokenwire.simulator import expected_final_answer

pytestmark = pytest.mark.integration

STACK_ENV = {
    "TOKENWIRE_JOBS_MAX_BYTES": "6000",
    "TOKENWIRE_FRAMES_MAX_BYTES": "65536",
}
QUERY = "Will this fit in the queue? " + "x" * 300
LONG = {"tw_sim": {"tokens": 3000, "delay_ms": 0}}


async def test_a_full_job_queue_refuses_new_chats_and_loses_none(stack: Stack) -> None:
    stack.gateway()
    refused: dict[str, dict[str, object]] = {}
    accepted: list[str] = []
    async with Client(stack.ws_url(user="filler")) as client:
        for n in range(40):
            rid = f"q{n}"
            await client.chat(f"{QUERY} {n}", rid=rid)
            first = await client.wait_for(rid, {"accepted", "error"}, timeout=20)
            if first["type"] == "accepted":
                accepted.append(rid)
            else:
                refused[rid] = first
            if len(refused) >= 3:
                break
        assert accepted, "nothing fitted at all"
        assert len(refused) >= 3, "the queue never filled"
        for rid, error in refused.items():
            assert error["seq"] == 1 and error["code"] == "bus_unavailable", error
            assert error["retryable"] is True and error.get("retry_after_ms"), error
            assert "full" in str(error["message"]), error
            # Refused means never stored: nothing more comes for it.
            assert [f["type"] for f in client.frames[rid]] == ["error"]

        worker = stack.worker()
        for rid in accepted:
            frames = await client.finish(rid, timeout=60)
            assert frames[-1]["type"] == "end", frames[-1]
            assert_seq_complete(frames)
            n = int(rid[1:])
            assert answer_of(frames) == expected_final_answer(f"{QUERY} {n}", tokens=40)

        # The queue drains as the answers are acked: a refused chat sent again after its
        # retry hint, with the same id, is accepted and answered.
        again = next(iter(refused))
        hint_s = float(refused[again]["retry_after_ms"]) / 1000  # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        while True:
            client.frames[again].clear()
            await client.chat(f"{QUERY} {again[1:]}", rid=again)
            first = await client.wait_for(again, {"accepted", "error"}, timeout=20)
            if first["type"] == "accepted":
                break
            assert time.monotonic() < deadline, f"still refused: {first}"
            await asyncio.sleep(min(hint_s, 1.0))
        frames = await client.finish(again, timeout=60)
        assert frames[-1]["type"] == "end", frames
        assert answer_of(frames) == expected_final_answer(f"{QUERY} {again[1:]}", tokens=40)

    # Operators see how full the streams are (the worker refreshes these every few seconds).
    metrics_url = worker.health_url.replace("/healthz", "/metrics")  # type: ignore[union-attr]
    deadline = time.monotonic() + 20
    while True:
        text = httpx.get(metrics_url, timeout=5).text
        limit = re.search(r'tokenwire_worker_stream_max_bytes\{stream="TW_JOBS"\} (\S+)', text)
        if limit is not None:
            break
        assert time.monotonic() < deadline, "no stream usage in the worker's metrics"
        time.sleep(0.5)
    assert float(limit.group(1)) == 6000
    assert re.search(r'tokenwire_worker_stream_bytes\{stream="TW_FRAMES"\} \d', text)


async def test_a_full_frame_store_keeps_the_newest_answers(stack: Stack) -> None:
    stack.gateway()
    stack.worker()
    async with Client(stack.ws_url(user="talker")) as client:
        rids = []
        for n in range(8):  # each 3,000-token answer keeps about 20 KiB of frames
            rid = await client.chat(f"fill the frames {n}", rid=f"f{n}", inputs=LONG)
            await client.finish(rid, timeout=60)
            rids.append(rid)
    async with Client(stack.ws_url(user="talker")) as client:
        newest = rids[-1]
        await client.send({"type": "resume", "id": newest, "after": 0})
        frames = await client.finish(newest, timeout=30)
        assert_seq_complete(frames)
        assert answer_of(frames) == expected_final_answer("fill the frames 7", LONG["tw_sim"])
        oldest = rids[0]
        await client.send({"type": "resume", "id": oldest, "after": 0})
        gone = await client.wait_for(oldest, {"error", "end"}, timeout=30)
        # The store dropped the oldest request's frames first: its resume says so.
        assert gone["code"] == "unknown_request", gone
