"""The gateway's NATS wiring: store jobs, hear its connections' frames, stop, replay for resume.

Mirrors ``worker/bus.py``: one connection per process, the topology declared at start, and
every nats-py call made through the one NATS edge (``shared/natsedge.py``), which translates
its errors into tokenwire's (``BusUnavailable``, ``BusRetryable``). The frames of every
connection arrive on one wildcard subscription, ``tw.frames.*.<gateway id>.>``, made at start
and routed to connections by :class:`gateway.router.Router`; a connection only registers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue
from opentelemetry import propagate

from gateway import metrics
from gateway.replay_client import WorkerMadeConsumers
from gateway.router import FrameSink, Router
from shared import natsedge
from shared.exceptions import BusRetryable, BusUnavailable, TokenwireError
from shared.jobs import Job
from shared.natsedge import KvEntry, map_nats_errors
from shared.replay_proxy import encode_has_ask, read_has_reply
from shared.session import StreamPosition
from shared.settings import Settings
from shared.subjects import (
    CALLS_SUBJECT,
    INPUT_SUBJECT,
    JOB_CHAT,
    REPLAY_SUBJECT,
    REQUESTS_BUCKET,
    UPLOADS_STREAM,
    KeptSpan,
    frame_partition,
    frames_stream,
    gateway_frames,
    new_gateway_id,
    request_frames_any_connection,
    stop_flag_key,
    stop_subject,
)
from shared.topology import connection_bucket_config, rate_bucket_config, upload_stream_config

__all__ = [
    "LIMITS_TIMEOUT_S",
    "FrameHandler",
    "GatewayBus",
    "KvEntry",
    "frame_pending_limits",
    "live_position",
    "map_nats_errors",
]

log = logging.getLogger("tokenwire.gateway")

FrameHandler = Callable[[Msg], Awaitable[None]]


LIMITS_TIMEOUT_S = 1.0
# How long a worker may take to say whether a request's frames are kept (restricted NATS).
_REPLAY_ASK_TIMEOUT_S = 5.0
# Look-ups whose span waits for the replay that follows each (one loop hop, normally); a
# look-up whose connection closed before its replay leaves one, so the oldest are dropped, and
# one older than a few seconds is asked again (a key asked anew since has a second subject).
_SPANS_KEPT = 1024
_SPAN_FRESH_S = 5.0

# What the frame subscription may hold before nats-py drops frames (a slow consumer: the event
# loop fell behind), sized for the whole gateway: a share per connection it may hold, and at
# least what one connection's own subscription could hold before there was one per gateway.
_PENDING_MSGS_PER_CONNECTION = 64
_PENDING_BYTES_PER_CONNECTION = 32 * 1024
_PENDING_MSGS_FLOOR = 65_536
_PENDING_BYTES_FLOOR = 128 * 1024 * 1024


def frame_pending_limits(settings: Settings) -> tuple[int, int]:
    """``(messages, bytes)`` the gateway's frame subscription may queue (nothing is reserved:
    the queue only grows while frames arrive faster than the gateway routes them)."""
    connections = settings.max_connections
    return (
        max(_PENDING_MSGS_FLOOR, _PENDING_MSGS_PER_CONNECTION * connections),
        max(_PENDING_BYTES_FLOOR, _PENDING_BYTES_PER_CONNECTION * connections),
    )


class GatewayBus:
    """One NATS connection for the whole gateway process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: This process's name in its frame subjects (``TOKENWIRE_GATEWAY_ID``, or fresh).
        self.gateway_id = settings.gateway_id or new_gateway_id()
        self.partitions = settings.frame_partitions
        #: Who hears which connection's frames (after a reconnect, each reads back).
        self.router = Router()
        self.nc: Client | None = None
        self._js: JetStreamContext | None = None
        # Replays' consumers: made by JetStream itself, or by a worker when restricted.
        self._replay_js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._buckets: dict[str, KeyValue] = {}
        self._frames: Subscription | None = None
        # Each look-up's answer (where the request's frames are), for the replay that follows.
        self._spans: OrderedDict[str, tuple[float, KeptSpan]] = OrderedDict()

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "GatewayBus.start() not awaited"
        return self._js

    async def start(self) -> None:
        self.nc = await natsedge.connect(
            self.settings,
            name="tokenwire-gateway",
            process=self.gateway_id,
            error_cb=self._on_error,
            disconnected_cb=_on_disconnected,
            reconnected_cb=self._on_reconnected,
            **natsedge.RECONNECT_FOREVER,
        )
        metrics.set_nats_connected(True)
        self._js = self.nc.jetstream()
        restricted = self.settings.nats_restricted
        self._replay_js = WorkerMadeConsumers(self.nc) if restricted else self._js
        if restricted:
            self._kv = await self._await_bucket(REQUESTS_BUCKET)
        else:
            self._kv = await natsedge.ensure_topology(self._js, self.settings)
            await natsedge.ensure_stream(self._js, upload_stream_config(self.settings))
        for spec in (connection_bucket_config(self.settings), rate_bucket_config(self.settings)):
            if restricted:
                await self._await_bucket(spec["bucket"])
            else:
                await self._ensure_bucket(spec)
            # The limits must not hold a client up for long when JetStream is electing a new
            # leader: their own context answers (or fails, and the limits fail open) in 1 s.
            limits_js = self.nc.jetstream(timeout=LIMITS_TIMEOUT_S)
            bucket = await natsedge.open_bucket(limits_js, spec["bucket"])
            assert bucket is not None, "declared above"
            self._buckets[spec["bucket"]] = bucket
        # Last: until it is in place no connection is let in (attach refuses), and nats-py
        # makes it again by itself on every reconnect.
        msgs, size = frame_pending_limits(self.settings)
        self._frames = await natsedge.subscribe(
            self.nc,
            gateway_frames(self.gateway_id),
            self._route,
            pending_msgs_limit=msgs,
            pending_bytes_limit=size,
        )
        log.info(
            "hearing frames",
            extra={"gateway_id": self.gateway_id, "frame_partitions": self.partitions},
        )

    async def _route(self, msg: Msg) -> None:
        await self.router.route(msg)

    def attach(self, conn_id: str, sink: FrameSink) -> None:
        """Hear connection ``conn_id``'s frames (no NATS call: the subscription is the
        gateway's); BusUnavailable before the gateway's subscription is in place."""
        if self._frames is None:
            raise BusUnavailable("cannot hear the connection's frames: not subscribed to NATS yet")
        self.router.register(conn_id, sink)

    def detach(self, conn_id: str, sink: FrameSink) -> None:
        """Hear nothing more for connection ``conn_id``."""
        self.router.unregister(conn_id, sink)

    async def _on_error(self, exc: Exception) -> None:
        await _log_error(exc)
        dropped = natsedge.dropped_subject(exc, self._frames)
        if dropped is not None:
            self.router.lost(dropped)  # that connection reads its requests back

    async def _await_bucket(self, name: str) -> KeyValue:
        """A bucket the workers declare (a restricted gateway may not): wait until it exists."""
        waited = 0.0
        while True:
            bucket = await natsedge.open_bucket(self.js, name)
            if bucket is not None:
                return bucket
            if waited % 10 == 0:
                log.warning(
                    "waiting for a worker to declare the streams and buckets",
                    extra={"bucket": name},
                )
            await asyncio.sleep(1.0)
            waited += 1.0

    async def _ensure_bucket(self, spec: dict[str, Any]) -> KeyValue:
        """Create a KV bucket, or bring an existing one's TTL to ours (the last start wins)."""
        bucket, updated = await natsedge.ensure_bucket(self.js, spec)
        if updated:
            log.info("KV bucket TTL updated", extra={"bucket": spec["bucket"], "ttl": spec["ttl"]})
        return bucket

    async def _on_reconnected(self) -> None:
        log.info("NATS reconnected")
        metrics.set_nats_connected(True)
        self.router.reconnected()

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    # --- small KV operations for the edge's shared limits (gateway/limits.py) --------------

    async def kv_get(self, bucket: str, key: str) -> KvEntry | None:
        """The entry, or None when the key is absent, deleted or expired."""
        return await natsedge.kv_get(self._buckets[bucket], key)

    async def kv_create(self, bucket: str, key: str, value: bytes) -> int | None:
        """Write ``key`` only if it holds nothing: its revision, or None if it exists."""
        return await natsedge.kv_create(self._buckets[bucket], key, value)

    async def kv_update(self, bucket: str, key: str, value: bytes, last: int) -> int | None:
        """Compare-and-set: the new revision, or None if ``key`` changed since ``last``."""
        return await natsedge.kv_update(self._buckets[bucket], key, value, last)

    async def kv_beat(self, bucket: str, key: str, value: bytes, ttl_s: float) -> None:
        """Write ``key`` to expire ``ttl_s`` after this write (a gateway's liveness entry)."""
        js = self.nc.jetstream(timeout=LIMITS_TIMEOUT_S) if self.nc is not None else self.js
        await natsedge.kv_beat(js, bucket, key, value, ttl_s)

    async def kv_delete(self, bucket: str, key: str, last: int) -> None:
        """Delete ``key`` unless it changed since ``last`` (then it is someone else's now)."""
        await natsedge.kv_delete(self._buckets[bucket], key, last)

    async def publish_job(self, job: Job) -> bool:
        """Store ``job`` in JetStream; returns True if it was a duplicate of a stored job.

        While JetStream elects a new leader (a node died) it answers nothing, or too late,
        for a moment: the publish is retried for up to ``TOKENWIRE_JOB_STORE_TIMEOUT_S``.
        Retrying is safe, the job's ``Nats-Msg-Id`` makes a second copy a duplicate; and a
        duplicate after our own unanswered attempt is that attempt, not an earlier chat.
        """
        deadline = time.monotonic() + self.settings.job_store_timeout_s
        delay = 0.1
        headers = {"Nats-Msg-Id": job.key, "Tw-Trace-Id": job.trace_id}
        propagate.inject(headers)  # traceparent, when tracing is on: the worker continues it
        maybe_stored = False
        while True:
            try:
                with map_nats_errors("store the request"):
                    ack = await self.js.publish(
                        JOB_CHAT, job.to_bytes(), timeout=5.0, headers=headers
                    )
                return bool(ack.duplicate) and not maybe_stored
            except BusRetryable as exc:
                if time.monotonic() > deadline:
                    raise
                maybe_stored = maybe_stored or exc.maybe_done
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def publish_frame(self, subject: str, data: bytes) -> None:
        """Keep a frame the gateway itself stamped (``accepted``) with the request's others."""
        assert self.nc is not None
        with map_nats_errors("keep the frame"):
            await self.nc.publish(subject, data)

    async def request(self, subject: str, data: bytes, timeout_s: float, what: str) -> bytes:
        """One NATS request to the workers' queue group; its answer's bytes.

        With no worker subscribed at all NATS says so at once ("no responders"); with workers
        that do not answer in ``timeout_s`` the call times out. Both are retryable
        ``bus_unavailable`` errors with a retry hint, never a hang.
        """
        if self.nc is None or not self.nc.is_connected:
            exc: TokenwireError = BusUnavailable(f"cannot {what}: NATS is not connected")
            exc.retry_after_s = 1.0
            raise exc
        try:
            with map_nats_errors(what):
                msg = await self.nc.request(subject, data, timeout=timeout_s)
        except BusRetryable as exc:
            if exc.maybe_done:
                err = BusRetryable(f"cannot {what}: no worker answered in {timeout_s:g} s")
            else:
                err = BusRetryable(f"cannot {what}: no worker is running")
            err.retry_after_s = 1.0
            raise err from exc
        return bytes(msg.data)

    async def call(self, data: bytes, timeout_s: float) -> bytes:
        """Send an encoded call (shared/calls.py) to one worker; the reply's bytes."""
        return await self.request(CALLS_SUBJECT, data, timeout_s, "call a worker")

    async def stage_chunk(self, subject: str, data: bytes) -> int:
        """Store one chunk of an upload in ``TW_UPLOADS`` (acknowledged); its sequence."""
        return await natsedge.publish_acked(self.js, subject, data, UPLOADS_STREAM)

    async def discard_chunks(self, subject: str) -> None:
        """Delete an upload's staged chunks (it was refused, or failed)."""
        await natsedge.purge_subject(self.js, UPLOADS_STREAM, subject)

    async def submit_input(self, data: bytes, timeout_s: float) -> bytes:
        """Hand an answer to a form (shared/human_input.py ``InputRequest``) to one worker;
        the reply's bytes (shared/calls.py's reply shape)."""
        if self.nc is None or not self.nc.is_connected:
            raise BusUnavailable("cannot answer the form: NATS is not connected")
        try:
            with map_nats_errors("answer the form"):
                msg = await self.nc.request(INPUT_SUBJECT, data, timeout=timeout_s)
        except BusRetryable as exc:
            raise BusRetryable(f"cannot answer the form: no worker answered ({exc})") from exc
        return bytes(msg.data)

    async def request_stop(self, key: str) -> None:
        """Record the stop (for a job still queued) and tell the worker running it."""
        assert self.nc is not None and self._kv is not None
        await natsedge.kv_put(self._kv, stop_flag_key(key), b"1")
        with map_nats_errors("stop the request"):
            await self.nc.publish(stop_subject(key), b"")

    async def has_frames(self, key: str) -> bool:
        """Whether any frame of request ``key`` is still kept (resume of a known id)."""
        span: KeptSpan | None
        if self.settings.nats_restricted:
            reply = await self.request(
                REPLAY_SUBJECT, encode_has_ask(key), _REPLAY_ASK_TIMEOUT_S, "look up the request"
            )
            found, span = read_has_reply(reply)
            if span is None:  # nothing kept, or where is not said (frames on two subjects,
                return found  # or an older worker)
        else:
            # Where the frames are, not only whether: the replay that follows uses it rather
            # than asking again (two direct gets per resume, not three).
            span = await natsedge.kept_span(
                self.js,
                self._stream_of(key),
                request_frames_any_connection(key, partitions=self.partitions),
            )
            if span is None:
                return False
        self._spans[key] = (time.monotonic(), span)
        self._spans.move_to_end(key)
        while len(self._spans) > _SPANS_KEPT:
            self._spans.popitem(last=False)
        return True

    async def replay(self, key: str, handler: FrameHandler) -> Any:
        """Every kept frame of request ``key`` in order, then the live rest (ordered consumer),
        from its partition's stream, whichever gateway and connection asked it."""
        assert self._replay_js is not None, "GatewayBus.start() not awaited"
        any_connection = request_frames_any_connection(key, partitions=self.partitions)
        stream = self._stream_of(key)
        # The request's literal subject from its first frame when there is one subject (the
        # usual case): far cheaper for nats-server than the wildcard from the stream's start.
        # A resume's look-up found it just now; a catch-up asks. A restricted gateway may not
        # read the stream: it has the span only from its look-up's worker (or none: wildcard).
        span = None
        found = self._spans.pop(key, None)
        if found is not None and time.monotonic() - found[0] < _SPAN_FRESH_S:
            span = found[1]
        elif not self.settings.nats_restricted:  # a catch-up, or a look-up long past
            span = await natsedge.kept_span(self.js, stream, any_connection)
        if span is not None and span.subject is not None:
            try:
                with map_nats_errors("replay the request"):
                    return await self._replay_js.subscribe(
                        span.subject,
                        stream=stream,
                        cb=handler,
                        ordered_consumer=True,
                        config=ConsumerConfig(
                            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                            opt_start_seq=span.first_seq,
                        ),
                    )
            except BusUnavailable:
                if not self.settings.nats_restricted:
                    raise
                # A worker from before literal replays refused it (a rolling upgrade): the
                # wildcard, which every worker allows.
        with map_nats_errors("replay the request"):
            return await self._replay_js.subscribe(
                any_connection,
                stream=stream,
                cb=handler,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
            )

    def _stream_of(self, key: str) -> str:
        return frames_stream(frame_partition(key, self.partitions))


def live_position(msg: Msg) -> StreamPosition | None:
    """Where a live frame (the frames stream's republish) sits in the stream: its
    ``Nats-Sequence`` and the subject's previous one, ``Nats-Last-Sequence``; None without them."""
    headers = msg.headers
    if not headers:
        return None
    try:
        return StreamPosition(int(headers["Nats-Sequence"]), int(headers["Nats-Last-Sequence"]))
    except (KeyError, ValueError):
        return None


async def _log_error(exc: Exception) -> None:
    log.warning("NATS error", extra={"error": f"{type(exc).__name__}: {exc}"})


async def _on_disconnected() -> None:
    log.warning("NATS disconnected")
    metrics.set_nats_connected(False)
