"""``tokenwire jobs``: what is queued, running and dead-lettered, and putting dead jobs back.

It reads JetStream directly: jobs waiting or running are the messages of ``TW_JOBS`` (work-queue
retention: a job leaves the stream when a worker acks it), their state and attempts are in the
``tw_requests`` bucket (written by workers), and dead jobs are the messages of ``TW_DEAD``.
A replayed job keeps its request key, so its frames continue the original request's ``seq`` and
the original client can ``resume`` it.

Every NATS call goes through the one NATS edge (``shared/natsedge.py``): a stream, consumer,
bucket or key that does not exist yet reads as empty, and any other NATS failure is one
tokenwire error that the command prints in one line.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from shared import natsedge
from shared.jobs import Job
from shared.natsedge import map_nats_errors
from shared.settings import Settings
from shared.subjects import (
    DEAD_ALL,
    DEAD_STREAM,
    JOB_CHAT,
    JOB_CONSUMER,
    JOBS_ALL,
    JOBS_STREAM,
    REQUESTS_BUCKET,
    ids_key,
    status_key,
)

__all__ = ["JobRow", "connect", "list_jobs", "purge", "replay", "show"]


@dataclass(frozen=True, slots=True)
class JobRow:
    state: str  # queued | running | dead
    key: str
    id: str
    user: str
    app: str | None
    age_s: float
    attempts: int
    last_error: str | None
    seq: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@asynccontextmanager
async def connect(settings: Settings) -> AsyncIterator[tuple[JetStreamContext, KeyValue | None]]:
    nc = await natsedge.connect(
        settings, name="tokenwire-jobs", connect_timeout=5, max_reconnect_attempts=2
    )
    try:
        js = nc.jetstream()
        yield js, await natsedge.open_bucket(js, REQUESTS_BUCKET)
    finally:
        await nc.close()


async def _messages(js: JetStreamContext, stream: str, subjects: str) -> AsyncIterator[Any]:
    state = await natsedge.stream_state(js, stream)
    if state is None:
        return
    seq = state.first_seq
    while state.messages and seq <= state.last_seq:
        msg = await natsedge.get_message(js, stream, seq, subject=subjects, next=True)
        if msg is None:
            return
        yield msg
        seq = (msg.seq or seq) + 1


async def _status(kv: KeyValue | None, key: str) -> dict[str, Any]:
    if kv is None:
        return {}
    entry = await natsedge.kv_get(kv, status_key(key))
    value = orjson.loads(entry.value) if entry is not None and entry.value else {}
    return value if isinstance(value, dict) else {}


async def list_jobs(js: JetStreamContext, kv: KeyValue | None, *, limit: int = 500) -> list[JobRow]:
    """Queued and running jobs (oldest first), then dead-lettered ones."""
    now = time.time()
    rows: list[JobRow] = []
    delivered_upto = await natsedge.delivered_upto(js, JOBS_STREAM, JOB_CONSUMER)
    async for msg in _messages(js, JOBS_STREAM, JOBS_ALL):
        job = Job.from_bytes(msg.data)
        status = await _status(kv, job.key)
        state = status.get("state")
        if state not in ("queued", "running"):
            state = "running" if msg.seq <= delivered_upto else "queued"
        rows.append(
            _row(state, job, msg.seq, now, status.get("attempts", 0), status.get("last_error"))
        )
        if len(rows) >= limit:
            return rows
    async for msg in _messages(js, DEAD_STREAM, DEAD_ALL):
        job = Job.from_bytes(msg.data)
        headers = msg.headers or {}
        attempts = int(headers.get("Tw-Attempts", "0") or 0)
        error = f"{headers.get('Tw-Error-Code', '')}: {headers.get('Tw-Error', '')}".strip(": ")
        rows.append(_row("dead", job, msg.seq, now, attempts, error or None))
        if len(rows) >= limit:
            break
    return rows


def _row(state: str, job: Job, seq: int, now: float, attempts: Any, error: Any) -> JobRow:
    return JobRow(
        state=state,
        key=job.key,
        id=job.id,
        user=job.user,
        app=job.app,
        age_s=round(max(now - job.created_ms / 1000, 0.0), 1),
        attempts=int(attempts or 0),
        last_error=str(error) if error else None,
        seq=seq,
    )


async def show(js: JetStreamContext, kv: KeyValue | None, key: str) -> dict[str, Any] | None:
    """Everything known of one job: the row, the job as stored, Dify's ids."""
    for row in await list_jobs(js, kv, limit=100_000):
        if key in (row.key, row.id):
            stream = DEAD_STREAM if row.state == "dead" else JOBS_STREAM
            stored = await natsedge.get_message(js, stream, row.seq)
            job = Job.from_bytes((stored.data if stored is not None else None) or b"{}")
            detail: dict[str, Any] = row.as_dict()
            detail["job"] = job.model_dump(exclude={"inputs", "files"}) | {
                "inputs_keys": sorted(job.inputs),
                "files": len(job.files),
            }
            detail["dify"] = await _status_raw(kv, ids_key(row.key))
            return detail
    return None


async def _status_raw(kv: KeyValue | None, name: str) -> Any:
    if kv is None:
        return None
    entry = await natsedge.kv_get(kv, name)
    return orjson.loads(entry.value) if entry is not None and entry.value else None


async def replay(js: JetStreamContext, keys: list[str] | None) -> list[str]:
    """Requeue dead jobs (those named by key or id, or all when ``keys`` is None)."""
    replayed: list[str] = []
    async for msg in _messages(js, DEAD_STREAM, DEAD_ALL):
        job = Job.from_bytes(msg.data)
        if keys is not None and job.key not in keys and job.id not in keys:
            continue
        again = job.model_copy(update={"replay": job.replay + 1})
        headers = {"Nats-Msg-Id": f"{job.key}.replay.{msg.seq}", "Tw-Trace-Id": job.trace_id}
        with map_nats_errors("replay a dead job"):
            await js.publish(JOB_CHAT, again.to_bytes(), timeout=5.0, headers=headers)
            await js.delete_msg(DEAD_STREAM, msg.seq)
        replayed.append(job.key)
    return replayed


async def purge(js: JetStreamContext, *, dead: bool, queued: bool) -> dict[str, int]:
    """Drop every dead-lettered job and/or every job still waiting or running."""
    out: dict[str, int] = {}
    for wanted, stream in ((dead, DEAD_STREAM), (queued, JOBS_STREAM)):
        if not wanted:
            continue
        state = await natsedge.stream_state(js, stream)
        if state is not None:
            with map_nats_errors("purge the jobs"):
                await js.purge_stream(stream)
        out[stream] = state.messages if state is not None else 0
    return out
