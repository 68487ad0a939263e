"""The gateway's NATS wiring: store jobs, hear a connection's frames, stop, replay for resume.

Mirrors ``worker/bus.py``: one connection per process, the topology declared at start, and
every nats-py error translated here into tokenwire's (``BUS_UNAVAILABLE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NamedTuple

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy, KeyValueConfig, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue
from opentelemetry import propagate

from gateway import metrics
from shared.exceptions import ErrorCode, InternalError
from shared.jobs import Job
from shared.settings import Settings
from shared.subjects import (
    FRAMES_STREAM,
    JOB_CHAT,
    connection_frames,
    request_frames_any_connection,
    stop_subject,
)
from shared.topology import (
    connection_bucket_config,
    rate_bucket_config,
    request_bucket_config,
    stream_configs,
)

__all__ = ["LIMITS_TIMEOUT_S", "FrameHandler", "GatewayBus", "KvEntry", "map_nats_errors"]

log = logging.getLogger("tokenwire.gateway")

FrameHandler = Callable[[Msg], Awaitable[None]]


LIMITS_TIMEOUT_S = 1.0
# How long storing a job is retried while JetStream has no leader for the stream.
# No stream leader yet (no responders, no stream response) or an ack lost to the election.
_RETRYABLE = (
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.errors.TimeoutError,
)
# JetStream's "wrong last sequence" error codes (a compare-and-set lost).
_WRONG_LAST_SEQUENCE = (10071, 10164)


class KvEntry(NamedTuple):
    value: bytes
    revision: int


@contextlib.contextmanager
def map_nats_errors(what: str) -> Iterator[None]:
    """Translate nats-py's errors into :class:`InternalError` (``bus_unavailable``)."""
    try:
        yield
    except (nats.errors.Error, TimeoutError) as exc:
        raise InternalError(
            f"cannot {what}: NATS is unavailable ({type(exc).__name__})",
            code=ErrorCode.BUS_UNAVAILABLE,
        ) from exc


class GatewayBus:
    """One NATS connection for the whole gateway process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._buckets: dict[str, KeyValue] = {}
        # Called after NATS reconnects (connections catch up on frames lost meanwhile).
        self.reconnect_hooks: set[Callable[[], None]] = set()

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "GatewayBus.start() not awaited"
        return self._js

    async def start(self) -> None:
        self.nc = await nats.connect(
            [url.strip() for url in self.settings.nats_url.split(",") if url.strip()],
            name="tokenwire-gateway",
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            error_cb=_log_error,
            disconnected_cb=_on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        metrics.set_nats_connected(True)
        self._js = self.nc.jetstream()
        for spec in stream_configs(self.settings):
            config = StreamConfig(**spec)
            try:
                await self._js.add_stream(config=config)
            except nats.js.errors.BadRequestError:
                await self._js.update_stream(config=config)
        bucket = KeyValueConfig(**request_bucket_config(self.settings))
        self._kv = await self._js.create_key_value(config=bucket)
        for spec in (connection_bucket_config(self.settings), rate_bucket_config(self.settings)):
            await self._ensure_bucket(spec)
            # The limits must not hold a client up for long when JetStream is electing a new
            # leader: their own context answers (or fails, and the limits fail open) in 1 s.
            limits_js = self.nc.jetstream(timeout=LIMITS_TIMEOUT_S)
            self._buckets[spec["bucket"]] = await limits_js.key_value(spec["bucket"])

    async def _ensure_bucket(self, spec: dict[str, Any]) -> KeyValue:
        """Create a KV bucket, or bring an existing one's TTL to ours (the last start wins)."""
        try:
            return await self.js.create_key_value(config=KeyValueConfig(**spec))
        except nats.js.errors.BadRequestError:
            info = await self.js.stream_info(f"KV_{spec['bucket']}")
            config = info.config
            config.max_age = spec["ttl"]
            config.duplicate_window = min(config.duplicate_window or spec["ttl"], spec["ttl"])
            await self.js.update_stream(config=config)
            log.info("KV bucket TTL updated", extra={"bucket": spec["bucket"], "ttl": spec["ttl"]})
            return await self.js.key_value(spec["bucket"])

    async def _on_reconnected(self) -> None:
        log.info("NATS reconnected")
        metrics.set_nats_connected(True)
        for hook in list(self.reconnect_hooks):
            hook()

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    # --- small KV operations for the edge's shared limits (gateway/limits.py) --------------

    async def kv_get(self, bucket: str, key: str) -> KvEntry | None:
        """The entry, or None when the key is absent, deleted or expired."""
        with map_nats_errors("read shared limits"):
            try:
                entry = await self._buckets[bucket].get(key)
            except nats.js.errors.KeyNotFoundError:
                return None
        return KvEntry(entry.value or b"", entry.revision or 0)

    async def kv_create(self, bucket: str, key: str, value: bytes) -> int | None:
        """Write ``key`` only if it holds nothing: its revision, or None if it exists."""
        with map_nats_errors("update shared limits"):
            try:
                revision: int = await self._buckets[bucket].create(key, value)
            except nats.js.errors.KeyWrongLastSequenceError:
                return None
        return revision

    async def kv_update(self, bucket: str, key: str, value: bytes, last: int) -> int | None:
        """Compare-and-set: the new revision, or None if ``key`` changed since ``last``."""
        with map_nats_errors("update shared limits"):
            try:
                revision: int = await self._buckets[bucket].update(key, value, last=last)
            except nats.js.errors.KeyWrongLastSequenceError:
                return None
        return revision

    async def kv_delete(self, bucket: str, key: str, last: int) -> None:
        """Delete ``key`` unless it changed since ``last`` (then it is someone else's now)."""
        with map_nats_errors("update shared limits"):
            try:
                await self._buckets[bucket].delete(key, last=last)
            except nats.js.errors.APIError as exc:
                if exc.err_code not in _WRONG_LAST_SEQUENCE:
                    raise

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
            except InternalError as exc:
                if not isinstance(exc.__cause__, _RETRYABLE) or time.monotonic() > deadline:
                    raise
                maybe_stored = maybe_stored or isinstance(exc.__cause__, nats.errors.TimeoutError)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def publish_frame(self, subject: str, data: bytes) -> None:
        """Keep a frame the gateway itself stamped (``accepted``) with the request's others."""
        assert self.nc is not None
        with map_nats_errors("keep the frame"):
            await self.nc.publish(subject, data)

    async def subscribe_connection(self, conn: str, handler: FrameHandler) -> Subscription:
        assert self.nc is not None
        with map_nats_errors("subscribe"):
            sub: Subscription = await self.nc.subscribe(
                connection_frames(conn), cb=handler, pending_msgs_limit=65536
            )
        return sub

    async def request_stop(self, key: str) -> None:
        """Record the stop (for a job still queued) and tell the worker running it."""
        assert self.nc is not None and self._kv is not None
        with map_nats_errors("stop the request"):
            await self._kv.put(f"{key}.stop", b"1")
            await self.nc.publish(stop_subject(key), b"")

    async def has_frames(self, key: str) -> bool:
        """Whether any frame of request ``key`` is still kept (resume of a known id)."""
        with map_nats_errors("look up the request"):
            try:
                await self.js.get_last_msg(FRAMES_STREAM, request_frames_any_connection(key))
            except nats.js.errors.NotFoundError:
                return False
        return True

    async def replay(self, key: str, handler: FrameHandler) -> Any:
        """Every kept frame of request ``key`` in order, then the live rest (ordered consumer)."""
        with map_nats_errors("replay the request"):
            return await self.js.subscribe(
                request_frames_any_connection(key),
                stream=FRAMES_STREAM,
                cb=handler,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
            )


async def _log_error(exc: Exception) -> None:
    log.warning("NATS error", extra={"error": f"{type(exc).__name__}: {exc}"})


async def _on_disconnected() -> None:
    log.warning("NATS disconnected")
    metrics.set_nats_connected(False)
