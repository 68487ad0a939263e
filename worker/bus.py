"""The worker's NATS wiring: publish frames, keep per-request facts, dead-letter jobs.

Mirrors ``gateway/bus.py``: every nats-py call goes through the one NATS edge
(``shared/natsedge.py``), which translates its errors into tokenwire's (``BusUnavailable``,
``BusRetryable``), so nothing here catches a ``nats.*`` type. :class:`NatsBus` implements
:class:`worker.types.Bus`; the bus contract suite checks it against the in-memory fake.
"""

from __future__ import annotations

from typing import Any

import orjson
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from shared import natsedge
from shared.dify_api import DifyIds
from shared.exceptions import TokenwireError
from shared.jobs import Job
from shared.natsedge import map_nats_errors
from shared.subjects import (
    DEAD_CHAT,
    JOB_CONTINUE,
    frames_stream_of,
    ids_key,
    lease_key,
    pause_key,
    status_key,
    stop_flag_key,
)

__all__ = ["NatsBus"]


class NatsBus:
    """Implements :class:`worker.types.Bus` over one NATS connection."""

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
        await self._flush()
        return [orjson.loads(data) for data in await self._read(subject)]

    async def read_kept(self, subject: str) -> tuple[list[dict[str, Any]], int]:
        """Every frame kept for ``subject`` in the stream's order, and the last one's stream
        sequence (what a fence is published after)."""
        await self._flush()
        kept = await natsedge.read_subject_seqs(self.js, frames_stream_of(subject), subject)
        return [orjson.loads(data) for _, data in kept], (kept[-1][0] if kept else 0)

    async def publish_fence(self, subject: str, data: bytes, after_stream_seq: int) -> bool:
        stored = await natsedge.publish_expecting(
            self.js, subject, data, frames_stream_of(subject), after_stream_seq
        )
        return stored is not None

    async def ensure_kept(self, subject: str, published: dict[int, bytes], *, gen: int = 0) -> None:
        """Publish again, with JetStream acks, any of ``published`` the frames stream lost.

        Cheap when nothing was lost: one stream-info call compares the subject's message count
        with the highest seq (for the first delivery; a later one's subject also holds older
        generations' frames, so it reads them). Duplicates are harmless: readers release each
        seq once.
        """
        if not published:
            return
        await self._flush()
        stream = frames_stream_of(subject)
        if not gen:
            stored = await natsedge.subject_count(self.js, stream, subject)
            if stored >= max(published):
                return
        kept = set()
        for data in await self._read(subject):
            frame = orjson.loads(data)
            if frame.get("gen", 0) == gen and frame.get("type") != "fence":
                kept.add(frame.get("seq"))
        for seq in sorted(set(published) - kept):
            with map_nats_errors("keep a frame again"):
                await self.js.publish(subject, published[seq], stream=stream, timeout=5.0)

    async def stop_recorded(self, key: str) -> bool:
        return await natsedge.kv_get(self.kv, stop_flag_key(key)) is not None

    async def save_ids(self, key: str, ids: DifyIds) -> None:
        await self._put(ids_key(key), ids.to_record())

    async def load_ids(self, key: str) -> DifyIds | None:
        return DifyIds.from_record(await self._get(ids_key(key)))

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

    # --- runs waiting for a human (worker.types.PausedRuns) ---------------------------------

    async def load_pause(self, key: str) -> tuple[bytes, int] | None:
        entry = await natsedge.kv_get(self.kv, pause_key(key))
        return (entry.value, entry.revision) if entry is not None and entry.value else None

    async def save_pause(self, key: str, data: bytes) -> None:
        await natsedge.kv_put(self.kv, pause_key(key), data)

    async def update_pause(self, key: str, data: bytes, revision: int) -> bool:
        return await natsedge.kv_update(self.kv, pause_key(key), data, revision) is not None

    async def put_back(self, job: Job, msg_id: str) -> None:
        """Store a copy of ``job`` that follows its run; ``msg_id`` makes a second copy a
        duplicate."""
        headers = {"Nats-Msg-Id": msg_id, "Tw-Trace-Id": job.trace_id}
        with map_nats_errors("put the job back"):
            await self.js.publish(JOB_CONTINUE, job.to_bytes(), timeout=5.0, headers=headers)

    async def take_lease(self, key: str, lease: str) -> int:
        return await natsedge.kv_put(self.kv, lease_key(key), orjson.dumps({"lease": lease}))

    async def lease_holder(self, key: str) -> str | None:
        value = await self._get(lease_key(key))
        return str(value["lease"]) if isinstance(value, dict) and "lease" in value else None

    async def _flush(self) -> None:
        """Let our own core-NATS publishes reach the stream before reading it."""
        with map_nats_errors("flush published frames"):
            await self.nc.flush(timeout=5)

    async def _read(self, subject: str) -> list[bytes]:
        # The subject names its partition: the stream is found even after the count changed.
        return await natsedge.read_subject(self.js, frames_stream_of(subject), subject)

    async def _put(self, name: str, value: dict[str, Any]) -> None:
        await natsedge.kv_put(self.kv, name, orjson.dumps(value))

    async def _get(self, name: str) -> Any:
        entry = await natsedge.kv_get(self.kv, name)
        if entry is None or not entry.value:
            return None
        try:
            return orjson.loads(entry.value)
        except orjson.JSONDecodeError:
            return entry.value
