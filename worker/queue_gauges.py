"""The cluster-wide queue gauges every worker refreshes: consumer lag, oldest job, dead letters,
and how full the job stream and each frame stream (one per partition) are.

They describe JetStream, not this worker (aggregate them with ``max``): each worker reads them
every few seconds through the NATS edge, and a round that NATS cannot answer is skipped. The
oldest job's age is its own ``created_ms`` (when a gateway accepted it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from nats.js.client import JetStreamContext

from shared import natsedge
from shared.jobs import Job
from shared.subjects import DEAD_STREAM, JOB_CONSUMER, JOBS_ALL, JOBS_STREAM, frames_stream
from worker import metrics

__all__ = ["refresh", "watch_queue"]


async def watch_queue(js: JetStreamContext, partitions: int = 1, every_s: float = 5.0) -> None:
    """Refresh the gauges every ``every_s`` seconds until cancelled."""
    while True:
        with contextlib.suppress(Exception):  # a gauge must never take the worker down
            await refresh(js, partitions)
        await asyncio.sleep(every_s)


async def refresh(js: JetStreamContext, partitions: int = 1) -> None:
    """One round; ``partitions``: ``TOKENWIRE_FRAME_PARTITIONS`` (a stream each)."""
    lag = await natsedge.consumer_lag(js, JOBS_STREAM, JOB_CONSUMER)
    if lag is not None:
        metrics.set_consumer_lag(*lag)
    jobs = await natsedge.stream_state(js, JOBS_STREAM)
    age = 0.0
    if jobs is not None and jobs.messages:
        # Work-queue retention: the stream's first message is the oldest job not yet answered.
        first = await natsedge.get_message(
            js, JOBS_STREAM, jobs.first_seq, subject=JOBS_ALL, next=True
        )
        if first is not None and first.data:
            age = time.time() - Job.from_bytes(first.data).created_ms / 1000
    metrics.set_queue_age(age)
    dead = await natsedge.stream_state(js, DEAD_STREAM)
    metrics.set_dead_letters(dead.messages or 0 if dead is not None else 0)
    for name in (JOBS_STREAM, *(frames_stream(p) for p in range(partitions))):
        usage = await natsedge.stream_usage(js, name)
        if usage is not None:
            metrics.set_stream_bytes(name, *usage)
