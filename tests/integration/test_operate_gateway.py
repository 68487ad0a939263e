"""Operating gateways: /metrics after real answers, SIGTERM drains to another gateway without
losing a frame, and OpenTelemetry traces that follow a request from gateway to worker."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar

import httpx
import pytest

from tests.integration.promtext import samples, value
from tests.integration.resilient import ResilientClient
from tests.integration.stack import Stack
from tests.integration.wsclient import Client, answer_of
from tokenwire.natsserver import free_port
from tokenwire.simulator import expected_final_answer

pytestmark = pytest.mark.integration

STACK_ENV = {"TOKENWIRE_DRAIN_DELAY_S": "0.5"}
T = TypeVar("T")


async def until(read: Callable[[], T], ok: Callable[[T], bool], timeout: float = 10.0) -> T:
    """Poll ``read`` until ``ok`` holds for what it returns, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not ok(got := read()):
        assert time.monotonic() < deadline, f"not yet after {timeout} s: {got!r}"
        await asyncio.sleep(0.02)
    return got


async def test_gateway_metrics_after_answered_chats(stack: Stack) -> None:
    stack.worker()
    gateway = stack.gateway()
    async with Client(stack.ws_url(user="gauge")) as client:
        rids = [
            await client.chat(f"measure {i}", inputs={"tw_sim": {"delay_ms": 2}}) for i in range(3)
        ]
        for rid in rids:
            await client.finish(rid)
        await client.send("not json")
        await client.next_other()
        live = samples(f"http://127.0.0.1:{gateway.port}/metrics")  # type: ignore[attr-defined]
    assert value(live, "tokenwire_gateway_connections") == 1
    # The gateway counts the close once it has finished closing: poll for it.
    m = await until(
        lambda: samples(f"http://127.0.0.1:{gateway.port}/metrics"),  # type: ignore[attr-defined]
        lambda m: value(m, "tokenwire_gateway_connections") == 0,
    )
    assert value(m, "tokenwire_gateway_connections_opened_total") >= 1
    assert (
        sum(v for (n, _), v in m.items() if n == "tokenwire_gateway_connections_closed_total") >= 1
    )
    assert value(m, "tokenwire_gateway_requests_accepted_total") >= 3
    assert value(m, "tokenwire_gateway_requests_total", outcome="completed") >= 3
    assert value(m, "tokenwire_gateway_frames_in_total", type="chat") >= 3
    assert value(m, "tokenwire_gateway_frames_in_total", type="invalid") >= 1
    # At least one delta per answer: coalescing may carry many of an answer's 40 tokens in one.
    assert value(m, "tokenwire_gateway_frames_out_total", type="delta") >= 3
    assert value(m, "tokenwire_gateway_ttft_seconds_count") >= 3
    assert value(m, "tokenwire_gateway_nats_connected") == 1
    assert not any("gauge" in str(labels) for _, labels in m), "a user id leaked into labels"


async def test_sigterm_gateway_clients_resume_on_another_and_lose_nothing(stack: Stack) -> None:
    stack.worker()
    first, second = stack.gateway("gateway-1"), stack.gateway("gateway-2")
    urls = [f"ws://127.0.0.1:{first.port}/v1/ws"]  # type: ignore[attr-defined]
    clients = [ResilientClient(urls, f"drain-{i}") for i in range(4)]
    await asyncio.gather(*(c.start() for c in clients))
    expected = {}
    for i, client in enumerate(clients):
        query = f"across a drain {i} {uuid.uuid4().hex[:4]}"
        controls = {"delay_ms": 30, "tokens": 100}
        expected[i] = expected_final_answer(query, controls)
        await client.chat("q", query, inputs={"tw_sim": controls})
    for client in clients:
        await until(
            lambda c=client: c.frames["q"], lambda fs: any(f["type"] == "delta" for f in fs)
        )
        client.urls = [f"ws://127.0.0.1:{second.port}/v1/ws"]  # type: ignore[attr-defined]
    first.signal(signal.SIGTERM)
    # Not ready at once: before the clients are closed (after TOKENWIRE_DRAIN_DELAY_S).
    await until(
        lambda: httpx.get(f"http://127.0.0.1:{first.port}/readyz").status_code,  # type: ignore[attr-defined]
        lambda status: status == 503,
        timeout=5.0,
    )
    try:
        await asyncio.gather(*(c.wait_all(60) for c in clients))
    finally:
        for client in clients:
            await client.close()
    for i, client in enumerate(clients):
        frames = client.frames["q"]
        assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
        assert frames[-1]["type"] == "end" and answer_of(frames) == expected[i]
        assert client.reconnects >= 1
    assert first.popen is not None and await asyncio.to_thread(first.popen.wait, 30) == 0
    assert "draining" in first.log_text()


class _Collector(BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        type(self).bodies.append(self.rfile.read(length))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


async def test_one_trace_follows_a_request_from_gateway_to_worker(stack: Stack) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{port}/v1/traces"
    try:
        worker = stack.worker(TOKENWIRE_OTEL_ENDPOINT=endpoint)
        gateway = stack.gateway(TOKENWIRE_OTEL_ENDPOINT=endpoint)
        async with Client(stack.ws_url(user="traced")) as client:
            await client.finish(await client.chat("trace me", inputs={"tw_sim": {"delay_ms": 2}}))
        gateway.stop()
        worker.stop()  # flushes the span batches
    finally:
        server.shutdown()
    spans: dict[str, list[tuple[str, bytes]]] = {}
    for body in _Collector.bodies:
        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            service = next(
                a.value.string_value for a in rs.resource.attributes if a.key == "service.name"
            )
            for ss in rs.scope_spans:
                for span in ss.spans:
                    spans.setdefault(service, []).append((span.name, span.trace_id))
    assert "tokenwire-gateway" in spans and "tokenwire-worker" in spans, spans.keys()
    dify = [t for name, t in spans["tokenwire-worker"] if name == "dify chat-messages"]
    assert dify, spans["tokenwire-worker"]
    assert dify[0] in {t for _, t in spans["tokenwire-gateway"]}, (
        "the worker's span is not in the gateway's trace"
    )
