"""Operating workers: /metrics after real answers, and SIGTERM drains without losing an answer."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.stack import Stack
from tests.integration.wsclient import Client, answer_of, assert_seq_complete
from tokenwire.natsserver import NatsServer
from tokenwire.simulator import expected_final_answer

pytestmark = pytest.mark.integration

ENV = {
    "TOKENWIRE_JOB_ACK_WAIT_S": "3",
    "TOKENWIRE_RECOVERY_POLL_S": "0.3",
    "TOKENWIRE_LEASE_CHECK_S": "0.5",
}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    nats = NatsServer(tmp_path / "nats", stop_grace=5.0)
    nats.start()
    s = Stack(nats_url=nats.url, workdir=tmp_path, env_extra=ENV)
    s.simulator()
    try:
        yield s
    except BaseException:
        print(s.logs())
        raise
    finally:
        s.close()
        nats.stop()


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url, timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


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
    assert value(m, "tokenwire_worker_frames_published_total", type="delta") >= 3 * 40
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
    # uvicorn re-raises the captured SIGTERM after a clean shutdown: -15 is a clean exit.
    assert worker.popen is not None and await asyncio.to_thread(worker.popen.wait, 30) in (0, -15)
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
    assert first.popen is not None and await asyncio.to_thread(first.popen.wait, 30) in (0, -15)
