"""The worker's NATS wiring: declare the topology, publish frames, keep per-request facts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.js.api import DeliverPolicy, KeyValueConfig, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from shared.exceptions import ErrorCode, InternalError, TokenwireError
from shared.jobs import Job
from shared.settings import Settings
from shared.subjects import DEAD_CHAT, FRAMES_STREAM
from shared.topology import request_bucket_config, stream_configs
from worker.runner import DifyIds

__all__ = [
    "NatsBus",
    "ensure_topology",
    "ids_key",
    "lease_key",
    "map_nats_errors",
    "status_key",
    "stop_flag_key",
]


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


def stop_flag_key(key: str) -> str:
    """The KV key under which a gateway records that request ``key`` must stop."""
    return f"{key}.stop"


def ids_key(key: str) -> str:
    """The KV key holding the ids Dify gave request ``key`` (task, message, conversation)."""
    return f"{key}.dify"


def lease_key(key: str) -> str:
    """The KV key naming the delivery that owns request ``key`` (set on redelivery only)."""
    return f"{key}.lease"


def status_key(key: str) -> str:
    """The KV key holding the job's state for operators (``tokenwire jobs``)."""
    return f"{key}.job"


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
        with map_nats_errors("publish a frame"):
            await self.nc.publish(subject, data)

    async def kept_frames(self, subject: str) -> list[dict[str, Any]]:
        """Every frame kept for ``subject``, oldest first (what the client may already hold)."""
        with map_nats_errors("read the kept frames"):
            await self.nc.flush(timeout=5)
            try:
                info = await self.js.stream_info(FRAMES_STREAM, subjects_filter=subject)
            except nats.js.errors.NotFoundError:
                return []
            if not info.state.subjects:
                return []
            return await self._read_all(subject)

    async def _read_all(self, subject: str) -> list[dict[str, Any]]:
        frames: list[dict[str, Any]] = []
        done = asyncio.Event()

        async def collect(msg: Any) -> None:
            frames.append(orjson.loads(msg.data))
            if msg.metadata.num_pending == 0:
                done.set()

        sub = await self.js.subscribe(
            subject,
            stream=FRAMES_STREAM,
            cb=collect,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        try:
            await asyncio.wait_for(done.wait(), timeout=10)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return frames

    async def ensure_kept(self, subject: str, published: dict[int, bytes]) -> None:
        """Publish again, with JetStream acks, any of ``published`` the frames stream lost.

        Cheap when nothing was lost: one stream-info call compares the subject's message count
        with the highest seq. Duplicates are harmless: readers release each seq once.
        """
        if not published:
            return
        with map_nats_errors("check the kept frames"):
            await self.nc.flush(timeout=5)
            info = await self.js.stream_info(FRAMES_STREAM, subjects_filter=subject)
            stored = (info.state.subjects or {}).get(subject, 0)
            if stored >= max(published):
                return
            kept = {frame["seq"] for frame in await self._read_all(subject)}
            for seq in sorted(set(published) - kept):
                await self.js.publish(subject, published[seq], stream=FRAMES_STREAM, timeout=5.0)

    async def stop_recorded(self, key: str) -> bool:
        return await self._get(stop_flag_key(key)) is not None

    async def save_ids(self, key: str, ids: DifyIds) -> None:
        value = {
            "task_id": ids.task_id,
            "message_id": ids.message_id,
            "conversation_id": ids.conversation_id,
        }
        await self._put(ids_key(key), value)

    async def load_ids(self, key: str) -> DifyIds | None:
        value = await self._get(ids_key(key))
        if not isinstance(value, dict):
            return None
        return DifyIds(value.get("task_id"), value.get("message_id"), value.get("conversation_id"))

    async def save_status(self, key: str, status: dict[str, Any]) -> None:
        await self._put(status_key(key), status)

    async def dead_letter(self, job: Job, error: TokenwireError, attempts: int) -> None:
        """Keep the job in the dead-letter stream, with why and after how many attempts."""
        headers = {
            "Tw-Key": job.key,
            "Tw-Error-Code": error.code.value,
            "Tw-Error": error.message[:500],
            "Tw-Attempts": str(attempts),
        }
        with map_nats_errors("dead-letter the job"):
            await self.js.publish(DEAD_CHAT, job.to_bytes(), timeout=5.0, headers=headers)

    async def take_lease(self, key: str, lease: str) -> None:
        await self._put(lease_key(key), {"lease": lease})

    async def lease_holder(self, key: str) -> str | None:
        value = await self._get(lease_key(key))
        return str(value["lease"]) if isinstance(value, dict) and "lease" in value else None

    async def _put(self, name: str, value: dict[str, Any]) -> None:
        with map_nats_errors("record request state"):
            await self.kv.put(name, orjson.dumps(value))

    async def _get(self, name: str) -> Any:
        with map_nats_errors("read request state"):
            try:
                entry = await self.kv.get(name)
            except nats.js.errors.NotFoundError:  # KeyNotFoundError too: nothing recorded
                return None
        if not entry.value:
            return None
        try:
            return orjson.loads(entry.value)
        except orjson.JSONDecodeError:
            return entry.value
