"""The worker process: a FastStream app around :class:`~worker.runner.JobRunner`.

One durable pull consumer (``tw-workers``) is shared by every worker, so JetStream spreads
jobs across them; each worker runs up to ``TOKENWIRE_WORKER_CONCURRENCY`` answers at once and
the consumer's ``max_ack_pending`` caps the whole cluster. Stops arrive on a core subject that
every worker hears; the one running the request acts. ``/metrics`` and ``/healthz`` are served
on the worker's own port through FastStream's ASGI wrapper. Calls (``worker/calls.py``) come
as core NATS requests to a queue group, so each is answered by exactly one worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson
from faststream import AckPolicy
from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub
from nats.js.api import ConsumerConfig
from opentelemetry import trace
from prometheus_client import make_asgi_app
from pydantic import ValidationError

from shared.exceptions import TokenwireError
from shared.jobs import Job
from shared.natsedge import (
    RECONNECT_FOREVER,
    broker_security,
    ensure_bucket,
    ensure_stream,
    ensure_topology,
    nats_servers,
    respond,
)
from shared.settings import Settings
from shared.subjects import (
    CALLS_QUEUE,
    CALLS_SUBJECT,
    CONTROL_STOP_ALL,
    INPUT_QUEUE,
    INPUT_SUBJECT,
    JOBS_ALL,
    JOBS_STREAM,
    REPLAY_SUBJECT,
    UPLOADS_SUBJECT,
)
from shared.topology import (
    connection_bucket_config,
    job_consumer_config,
    owner_bucket_config,
    rate_bucket_config,
    upload_stream_config,
)
from shared.tracing import nats_middlewares
from worker import metrics as worker_metrics
from worker.assembly import assemble
from worker.calls import Calls
from worker.dify import DifyClient
from worker.human_input import answer_input
from worker.ownership import Ownership
from worker.queue_gauges import watch_queue
from worker.readiness import Readiness
from worker.replay_proxy import ReplayProxy
from worker.runner import JobRunner
from worker.uploads import Uploads
from worker.waiting_line import job_intake

__all__ = ["create_app"]


class Replier(Protocol):
    """What answers a request/reply subject (calls, uploads, replays): bytes in, bytes out."""

    async def handle(self, data: bytes) -> bytes: ...


log = logging.getLogger("tokenwire.worker")


#: Calls one worker answers at once (each is one short Dify request).
CALL_CONCURRENCY = 32
#: Uploads one worker sends to Dify at once.
UPLOAD_CONCURRENCY = 8


def app_names(settings: Settings) -> list[str]:
    """The configured app names, ``default`` first (what ``apps.list`` shows)."""
    return ["default", *sorted(name for name in settings.dify_apps if name != "default")]


async def _log_nats_error(exc: Exception) -> None:
    log.warning("NATS error", extra={"error": f"{type(exc).__name__}: {exc}"})


def create_app(settings: Settings) -> AsgiFastStream:
    """Build the worker app: broker, job subscriber, stop subscriber, HTTP routes."""
    broker = NatsBroker(
        nats_servers(settings),
        name="tokenwire-worker",
        **RECONNECT_FOREVER,
        security=broker_security(settings),
        # Said each time NATS refuses or cannot be reached, also while the first connect
        # retries: without it a worker waiting for NATS at start is silent.
        error_cb=_log_nats_error,
        logger=None,
        middlewares=nats_middlewares(settings.otel_endpoint),
    )
    holder: dict[str, Any] = {}

    async def probe_dify() -> object:
        dify: DifyClient | None = holder.get("dify")
        if dify is None:
            return None
        return await dify.info()

    readiness = Readiness(
        probe_dify,
        lambda: broker.connection is not None and broker.connection.is_connected,
    )
    consumer = job_consumer_config(settings)
    intake = job_intake(settings)

    @broker.subscriber(
        JOBS_ALL,
        stream=JStream(JOBS_STREAM, declare=False),
        durable=consumer["durable_name"],
        config=ConsumerConfig(**consumer),
        pull_sub=PullSub(batch_size=intake.batch, timeout=5.0),
        # Streams to Dify are capped at worker_concurrency inside the runner; the extra
        # deliveries wait in its line and their clients are told their position.
        max_workers=intake.max_workers,
        ack_policy=AckPolicy.MANUAL,
        title="jobs",
        description="Chat jobs stored by gateways; answered by streaming from Dify.",
    )
    async def on_job() -> None:
        # No parameters: a handler that asks for the message through FastStream's Context
        # has it resolved in a thread (fast_depends runs sync dependencies in a pool).
        msg: NatsMessage = broker.context.get_local("message")
        runner: JobRunner = holder["runner"]
        try:
            job = Job.from_bytes(msg.body)
        except (ValidationError, orjson.JSONDecodeError):
            log.error("dropping a job that cannot be parsed")
            await msg.reject()
            return
        delivered = msg.raw_message.metadata.num_delivered or 1
        await runner.run(job, msg, delivered=delivered)

    @broker.subscriber(CONTROL_STOP_ALL, title="stop", description="Stop a running request.")
    async def on_stop(msg: NatsMessage) -> None:
        key = msg.raw_message.subject.rsplit(".", 1)[-1]
        runner: JobRunner = holder["runner"]
        if runner.request_stop(key):
            log.info("stop requested", extra={"key": key})
        elif runner.human is not None:
            # No worker runs it: it may be a run waiting for a human (one worker wins).
            with contextlib.suppress(TokenwireError):
                await runner.human.stop(key)

    @broker.subscriber(
        INPUT_SUBJECT,
        queue=INPUT_QUEUE,
        title="input",
        description="A human's answer to the form a run waits on (request/reply).",
    )
    async def on_input() -> bytes:
        msg: NatsMessage = broker.context.get_local("message")
        runner: JobRunner = holder["runner"]
        return await answer_input(runner.human, msg.body)

    def replier(part: str) -> Callable[[], Awaitable[None]]:
        """A request/reply handler: ``holder[part].handle(body)``, answered through the NATS
        edge (a request that comes before startup, or without a reply subject, is dropped)."""

        async def reply() -> None:
            msg: NatsMessage = broker.context.get_local("message")
            handler: Replier | None = holder.get(part)
            if handler is None or not msg.raw_message.reply:
                return
            await respond(msg.raw_message, await handler.handle(msg.body))

        reply.__name__ = reply.__qualname__ = f"on_{part}"
        return reply

    broker.subscriber(
        CALLS_SUBJECT,
        queue=CALLS_QUEUE,
        max_workers=CALL_CONCURRENCY,
        no_reply=True,  # the handler answers, through the NATS edge
        title="calls",
        description="Calls to Dify's Service API (request/reply, one worker of the group).",
    )(replier("calls"))
    broker.subscriber(
        UPLOADS_SUBJECT,
        queue=CALLS_QUEUE,
        max_workers=UPLOAD_CONCURRENCY,
        no_reply=True,
        title="uploads",
        description="Send a staged upload to Dify as its user (request/reply).",
    )(replier("uploads"))
    broker.subscriber(
        REPLAY_SUBJECT,
        queue=CALLS_QUEUE,
        no_reply=True,
        title="replay",
        description="Create a restricted gateway's replay consumer (request/reply).",
    )(replier("replay"))

    async def startup() -> None:
        await broker.connect()
        nc = broker.connection
        js = nc.jetstream()
        kv = await ensure_topology(js, settings)
        # The gateways' buckets and stream too: a restricted gateway may not declare them.
        await ensure_stream(js, upload_stream_config(settings))
        for spec in (connection_bucket_config(settings), rate_bucket_config(settings)):
            await ensure_bucket(js, spec)
        holder["replay"] = ReplayProxy(nc, js, settings.frame_partitions)
        dify = DifyClient(settings)
        holder["dify"] = dify
        holder["runner"] = await assemble(
            nc, js, kv, dify, settings, worker_id=f"{socket.gethostname()}:{os.getpid()}"
        )
        holder["lag"] = asyncio.create_task(watch_queue(js, settings.frame_partitions))
        holder["tasks"] = asyncio.create_task(worker_metrics.watch_tasks())
        owners_kv, _ = await ensure_bucket(js, owner_bucket_config(settings))
        owners = Ownership(owners_kv)
        holder["owners"] = owners
        runner = holder["runner"]
        holder["calls"] = Calls(dify, owners, app_names(settings), lambda app: runner.breaker)
        runner.owners = owners  # a chat or run naming another user's file: not_found
        holder["uploads"] = Uploads(js, dify, owners, holder["calls"], settings)
        # The startup heap (FastStream, pydantic, httpx) never dies: keep full collections
        # from walking it, which stalled token delivery by tens of ms under load (bench/).
        gc.freeze()

    async def subscribed() -> None:
        # After FastStream started the subscribers: from here a job is taken as it arrives.
        readiness.subscribed = True
        dify = await readiness.dify()
        log.info("worker ready", extra={"dify": settings.dify_api_url, "dify_check": dify.state})

    async def drain() -> None:
        """SIGTERM: stop taking jobs, finish or hand back running answers, then close."""
        readiness.subscribed = False
        runner: JobRunner | None = holder.get("runner")
        for watcher in ("lag", "tasks"):
            task: asyncio.Task[None] | None = holder.get(watcher)
            if task is not None:
                task.cancel()
        if runner is not None:
            await runner.drain(settings.worker_drain_s)

    async def shutdown() -> None:
        # uvicorn re-raises SIGINT (or a second signal) on exit, so atexit may never run:
        # export buffered spans now.
        flush = getattr(trace.get_tracer_provider(), "force_flush", None)
        if flush is not None:
            flush()
        dify: DifyClient | None = holder.get("dify")
        if dify is not None:
            await dify.aclose()

    @get
    async def healthz(scope: Any) -> AsgiResponse:
        ok = broker.connection is not None and broker.connection.is_connected
        return AsgiResponse(b"ok" if ok else b"nats disconnected", status_code=200 if ok else 503)

    @get
    async def readyz(scope: Any) -> AsgiResponse:
        """200 when a question can be answered now; the body names what is missing."""
        ready, facts = await readiness.report()
        return AsgiResponse(
            orjson.dumps({"ready": ready, **facts}),
            status_code=200 if ready else 503,
            headers={"content-type": "application/json"},
        )

    return AsgiFastStream(
        broker,
        asgi_routes=[("/metrics", make_asgi_app()), ("/healthz", healthz), ("/readyz", readyz)],
        on_startup=[startup],
        after_startup=[subscribed],
        on_shutdown=[drain],
        after_shutdown=[shutdown],
        logger=None,
    )
