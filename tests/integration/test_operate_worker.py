"""Operating workers: /metrics after real answers, and SIGTERM drains without losing an answer."""

from __future__ import annotations

import asyncio
import signal
import uuid

import pytest

from tests.integration.promtext import samples, value
from tests.integration.stack import Stack
from tests.integration.wsclient import Client, answer_of, assert_seq_complete
from tokenwire.simulator import expected_final_answer

pytestmark = pytest.mark.integration


async def test_worker_metrics_after_answered_chats(stack: Stack) -> None:
    worker = stack.worker()
    stack.gateway()
    async with Client(stack.ws_url(user="metrics")) as client:
        rids = [
            await client.chat(f"count me {i}", inputs={"tw_sim": {"delay_ms": 2}}) for i in range(3)
        ]
        for rid in rids:
            assert (await client.finish(rid))[-1]["type"] == "end"
        failed = await client.chat("fail me", inputs={"tw_sim": {"fault": "400"}})
        assert (await client.finish(failed))[-1]["type"] == "error"
    m = samples(worker.health_url.replace("/healthz", "/metrics"))  # type: ignore[union-attr]
    assert value(m, "tokenwire_worker_jobs_received_total") >= 4
    assert value(m, "tokenwire_worker_jobs_total", outcome="completed") >= 3
    assert value(m, "tokenwire_worker_jobs_total", outcome="error") >= 1
    # Tokens 2 ms apart are coalesced (TOKENWIRE_COALESCE_MS): at least one delta per answer.
    assert value(m, "tokenwire_worker_frames_published_total", type="delta") >= 3
    assert value(m, "tokenwire_worker_frames_published_total", type="end") >= 3
    assert value(m, "tokenwire_worker_dify_requests_total", endpoint="chat", status="200") >= 3
    assert value(m, "tokenwire_worker_dify_requests_total", endpoint="chat", status="400") >= 1
    assert value(m, "tokenwire_worker_queue_wait_seconds_count") >= 4
    assert value(m, "tokenwire_worker_dify_first_token_seconds_count") >= 3
    assert value(m, "tokenwire_worker_answer_tokens_total") >= 3 * 40
    assert value(m, "tokenwire_worker_streams_running") == 0
    names = {name for name, _ in m}
    assert "tokenwire_worker_consumer_pending" in names and "tokenwire_worker_dead_letters" in names
    assert not any("metrics" in str(labels) for _, labels in m), "a user id leaked into labels"


async def test_sigterm_worker_finishes_its_running_answer(stack: Stack) -> None:
    worker = stack.worker(TOKENWIRE_WORKER_DRAIN_S="30")
    stack.gateway()
    query = f"finish me {uuid.uuid4().hex[:4]}"
    controls = {"delay_ms": 30, "tokens": 60}
    async with Client(stack.ws_url(user="drain-a")) as client:
        rid = await client.chat(query, inputs={"tw_sim": controls})
        await client.wait_for(rid, "delta")
        worker.signal(signal.SIGTERM)
        frames = await client.finish(rid, timeout=60)
    assert [f["type"] for f in frames][-1] == "end"
    assert_seq_complete(frames)
    assert answer_of(frames) == expected_final_answer(query, controls)
    # A drained worker exits 0 (uvicorn no longer re-raises the SIGTERM that drained it).
    assert worker.popen is not None and await asyncio.to_thread(worker.popen.wait, 30) == 0
    assert "draining" in worker.log_text() and "Traceback" not in worker.log_text()
    assert "handed back" not in worker.log_text()


async def test_sigterm_worker_hands_a_long_answer_to_another(stack: Stack) -> None:
    first = stack.worker("worker-a", TOKENWIRE_WORKER_DRAIN_S="1")
    stack.gateway()
    query = f"too long to wait for {uuid.uuid4().hex[:4]}"
    controls = {"delay_ms": 40, "tokens": 200}
    async with Client(stack.ws_url(user="drain-b")) as client:
        rid = await client.chat(query, inputs={"tw_sim": controls})
        await client.wait_for(rid, "delta")
        first.signal(signal.SIGTERM)
        stack.worker("worker-b")
        frames = await client.finish(rid, timeout=90)
    assert frames[-1]["type"] == "end"
    assert_seq_complete(frames)
    assert answer_of(frames) == expected_final_answer(query, controls)
    assert "handed back" in first.log_text()
    assert first.popen is not None and await asyncio.to_thread(first.popen.wait, 30) == 0
