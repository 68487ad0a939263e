"""The gateway's NATS wiring: store jobs, hear a connection's frames, stop, replay for resume.

Mirrors ``worker/bus.py``: one connection per process, the topology declared at start, and
every nats-py error translated here into tokenwire's (``BUS_UNAVAILABLE``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy, KeyValueConfig, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

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
from shared.topology import request_bucket_config, stream_configs

__all__ = ["FrameHandler", "GatewayBus", "map_nats_errors"]

log = logging.getLogger("tokenwire.gateway")

FrameHandler = Callable[[Msg], Awaitable[None]]


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

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "GatewayBus.start() not awaited"
        return self._js

    async def start(self) -> None:
        self.nc = await nats.connect(
            self.settings.nats_url,
            name="tokenwire-gateway",
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            error_cb=_log_error,
            disconnected_cb=_log_disconnected,
            reconnected_cb=_log_reconnected,
        )
        self._js = self.nc.jetstream()
        for spec in stream_configs(self.settings):
            config = StreamConfig(**spec)
            try:
                await self._js.add_stream(config=config)
            except nats.js.errors.BadRequestError:
                await self._js.update_stream(config=config)
        bucket = KeyValueConfig(**request_bucket_config(self.settings))
        self._kv = await self._js.create_key_value(config=bucket)

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    async def publish_job(self, job: Job) -> bool:
        """Store ``job`` in JetStream; returns True if it was a duplicate of a stored job."""
        with map_nats_errors("store the request"):
            ack = await self.js.publish(
                JOB_CHAT,
                job.to_bytes(),
                timeout=5.0,
                headers={"Nats-Msg-Id": job.key, "Tw-Trace-Id": job.trace_id},
            )
        return bool(ack.duplicate)

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


async def _log_disconnected() -> None:
    log.warning("NATS disconnected")


async def _log_reconnected() -> None:
    log.info("NATS reconnected")
