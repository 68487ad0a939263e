"""The worker's NATS wiring: declare the topology, publish frames, read back what is kept."""

from __future__ import annotations

import contextlib
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from shared.exceptions import InternalError
from shared.frames import peek_id_seq
from shared.settings import Settings
from shared.subjects import FRAMES_STREAM
from shared.topology import request_bucket_config, stream_configs

__all__ = ["NatsBus", "ensure_topology", "stop_flag_key"]


def stop_flag_key(key: str) -> str:
    """The KV key under which a gateway records that request ``key`` must stop."""
    return f"{key}.stop"


async def ensure_topology(js: JetStreamContext, settings: Settings) -> KeyValue:
    """Create (or update to the current settings) every stream and the request bucket."""
    for spec in stream_configs(settings):
        config = StreamConfig(**spec)
        try:
            await js.add_stream(config=config)
        except nats.js.errors.BadRequestError:
            await js.update_stream(config=config)
    return await js.create_key_value(config=KeyValueConfig(**request_bucket_config(settings)))


class NatsBus:
    """Implements :class:`worker.runner.Bus` over one NATS connection."""

    def __init__(self, nc: Client, js: JetStreamContext, kv: KeyValue) -> None:
        self.nc = nc
        self.js = js
        self.kv = kv

    async def publish(self, subject: str, data: bytes) -> None:
        # Core NATS: the frames stream captures the subject, with no per-token ack round trip.
        try:
            await self.nc.publish(subject, data)
        except nats.errors.Error as exc:
            raise InternalError(f"cannot publish to NATS: {type(exc).__name__}") from exc

    async def last_seq(self, subject: str) -> int:
        try:
            msg: Any = await self.js.get_last_msg(FRAMES_STREAM, subject)
        except nats.js.errors.NotFoundError:
            return 0
        _, seq, _ = peek_id_seq(msg.data)
        return int(seq)

    async def stop_recorded(self, key: str) -> bool:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError, nats.js.errors.NotFoundError):
            entry = await self.kv.get(stop_flag_key(key))
            return bool(entry.value)
        return False
