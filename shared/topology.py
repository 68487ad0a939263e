"""What JetStream must hold, as plain data: streams, the job consumer, the request bucket.

Both processes declare this topology at start (idempotently, through the NATS edge:
``shared/natsedge.py`` ``ensure_topology`` and ``ensure_bucket``), so whichever starts first
creates it and a gateway never publishes into a stream that does not exist yet. The values are
chosen here, once, and explained in docs/operations.md:

* ``TW_JOBS`` — work-queue retention (a job is deleted when a worker acks it), file storage,
  ``duplicate_window`` = ``TOKENWIRE_JOB_DEDUP_WINDOW_S`` so a chat re-sent with the same id
  (e.g. after a reconnect) is stored once; at ``TOKENWIRE_JOBS_MAX_BYTES`` new jobs are
  refused (``discard: new``), never stored ones dropped.
* ``TW_FRAMES`` — limits retention with ``max_age`` = ``TOKENWIRE_FRAME_TTL_S``: every frame
  of every request, kept for ``resume``. Workers publish into it with core NATS (no per-token
  ack round trip); the stream captures the subject and republishes what it stored on
  ``tw.live.>``, the gateways' live path. With ``TOKENWIRE_FRAME_PARTITIONS`` = N it is N
  streams of the same config, ``TW_FRAMES`` (``tw.frames.0.>``, republished on
  ``tw.live.0.>``), ``TW_FRAMES_1`` (``tw.frames.1.>``) …, each with
  ``TOKENWIRE_FRAMES_MAX_BYTES`` / N: partition 0 is declared first, so a store of the old
  layout (``tw.frames.>``) narrows before the others overlap it.
* ``TW_DEAD`` — jobs that exhausted their attempts or age, with the last error in headers,
  kept ``TOKENWIRE_DEAD_LETTER_TTL_S`` for ``tokenwire jobs list/replay``.
* ``tw_connections`` — one entry per open connection (a user's slot), ``ttl`` =
  ``TOKENWIRE_CONNECTION_TTL_S``: the owning gateway re-writes its entries every ttl/3, so a
  killed gateway's connections stop counting at most ttl after it died.
* ``tw_rates`` — each user's token bucket; ``ttl`` = the time an empty bucket takes to fill
  (an entry that expired is a full bucket), at least one second.
* ``tw_owners`` — who owns each run, task, form and file tokenwire created (Dify does not
  scope them to a user), ``ttl`` = ``TOKENWIRE_OWNERSHIP_TTL_S``: as long as Dify keeps them
  usable, so an id outlives neither its record nor Dify's.
* ``TW_UPLOADS`` — an upload's chunks while it is staged between the gateway that received it
  and the worker that sends it to Dify: ``max_age`` ``TOKENWIRE_UPLOAD_STAGE_TTL_S``, deleted
  as soon as the worker is done.
* job consumer — durable, explicit ack, ``ack_wait`` short (a dead worker's job comes back
  fast) because live workers send in-progress acks; ``max_ack_pending`` caps answers streaming
  at once across the whole cluster.
"""

from __future__ import annotations

from typing import Any

from shared.ratelimit import Rate
from shared.settings import Settings
from shared.subjects import (
    CONNECTIONS_BUCKET,
    DEAD_ALL,
    DEAD_STREAM,
    JOB_CONSUMER,
    JOBS_ALL,
    JOBS_STREAM,
    OWNERS_BUCKET,
    RATES_BUCKET,
    REQUESTS_BUCKET,
    UPLOADS_ALL,
    UPLOADS_STREAM,
    frames_stream,
    partition_frames,
    partition_live,
)

__all__ = [
    "SLOT_LIFETIME_S",
    "app_slots_bucket_config",
    "connection_bucket_config",
    "frame_stream_configs",
    "job_consumer_config",
    "owner_bucket_config",
    "rate_bucket_config",
    "request_bucket_config",
    "stream_configs",
    "upload_stream_config",
]


def stream_configs(settings: Settings) -> list[dict[str, Any]]:
    """Keyword arguments for ``nats.js.api.StreamConfig``, one dict per stream."""
    return [_jobs_stream(settings), *frame_stream_configs(settings), _dead_stream(settings)]


def frame_stream_configs(settings: Settings) -> list[dict[str, Any]]:
    """One stream per frame partition, partition 0 (``TW_FRAMES``) first."""
    per_stream = settings.frames_max_bytes // settings.frame_partitions
    return [
        {
            "name": frames_stream(partition),
            "subjects": [partition_frames(partition)],
            "retention": "limits",
            "storage": "file",
            "num_replicas": settings.stream_replicas,
            "max_age": settings.frame_ttl_s,
            # Full: the oldest frames go first (finished requests), so running answers keep
            # theirs; size it for frame_ttl_s of traffic (docs/operations.md).
            "max_bytes": per_stream,
            "discard": "old",
            "allow_direct": True,
            # The gateways' live path: what the stream stored, in its order, with its stream
            # sequences, so a gateway, a resume and a worker's read see one order (fencing:
            # shared/sequencing.py) and a frame the stream refused never reaches a client.
            "republish": {"src": partition_frames(partition), "dest": partition_live(partition)},
        }
        for partition in range(settings.frame_partitions)
    ]


def _jobs_stream(settings: Settings) -> dict[str, Any]:
    return {
        "name": JOBS_STREAM,
        "subjects": [JOBS_ALL],
        "retention": "workqueue",
        "storage": "file",
        "num_replicas": settings.stream_replicas,
        "duplicate_window": settings.job_dedup_window_s,
        "max_age": 24 * 3600.0,
        # Full: refuse the new job (the gateway says so, retryable) rather than drop a
        # stored one, which would lose a question already told `accepted`.
        "max_bytes": settings.jobs_max_bytes,
        "discard": "new",
    }


def _dead_stream(settings: Settings) -> dict[str, Any]:
    return {
        "name": DEAD_STREAM,
        "subjects": [DEAD_ALL],
        "retention": "limits",
        "storage": "file",
        "num_replicas": settings.stream_replicas,
        "max_age": settings.dead_letter_ttl_s,
        "discard": "old",
    }


def job_consumer_config(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for the durable job consumer's ``ConsumerConfig``."""
    return {
        "durable_name": JOB_CONSUMER,
        "ack_policy": "explicit",
        "ack_wait": settings.job_ack_wait_s,
        # The worker gives up (dead letter) after job_max_attempts; this is a safety net
        # for a job that kills every worker that takes it.
        "max_deliver": settings.job_max_attempts + 5,
        "max_ack_pending": settings.max_inflight_jobs,
        "filter_subject": JOBS_ALL,
    }


def request_bucket_config(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for the KV bucket of per-request facts (stop flags, Dify ids)."""
    return {
        "bucket": REQUESTS_BUCKET,
        "ttl": settings.frame_ttl_s,
        "storage": "file",
        "replicas": settings.stream_replicas,
        "history": 1,
    }


# How long a connection slot lasts unless its gateway re-writes it (gateway/limits.py
# re-writes a slot a quarter of this after it was written): a slot counts only while its
# gateway's liveness entry does, so this only bounds the garbage a dead gateway leaves.
SLOT_LIFETIME_S = 86_400.0


def connection_bucket_config(settings: Settings) -> dict[str, Any]:
    """The KV bucket of connection slots (per-user cap across gateways) and of each gateway's
    liveness entry (an entry TTL of ``TOKENWIRE_CONNECTION_TTL_S``)."""
    return {
        "bucket": CONNECTIONS_BUCKET,
        "ttl": SLOT_LIFETIME_S,
        "msg_ttl": True,
        "storage": "file",
        "replicas": settings.stream_replicas,
        "history": 1,
    }


def rate_bucket_config(settings: Settings) -> dict[str, Any]:
    """The KV bucket of per-user token buckets (request rate across gateways)."""
    rate = Rate.parse(settings.rate_per_user, settings.rate_burst)
    calls = Rate.parse(settings.call_rate_per_user, settings.call_rate_burst)
    return {
        "bucket": RATES_BUCKET,
        # Both families share it: an entry that expired must be a full bucket for either.
        "ttl": max(1.0, rate.refill_s, calls.refill_s),
        "storage": "file",
        "replicas": settings.stream_replicas,
        "history": 1,
    }


def owner_bucket_config(settings: Settings) -> dict[str, Any]:
    """The KV bucket of owners (runs, tasks, forms, files tokenwire created)."""
    return {
        "bucket": OWNERS_BUCKET,
        "ttl": settings.ownership_ttl_s,
        "storage": "file",
        "replicas": settings.stream_replicas,
        "history": 1,
    }


def upload_stream_config(settings: Settings) -> dict[str, Any]:
    """The stream that stages uploads between a gateway and a worker (``StreamConfig``)."""
    return {
        "name": UPLOADS_STREAM,
        "subjects": [UPLOADS_ALL],
        "retention": "limits",
        "storage": "file",
        "num_replicas": settings.stream_replicas,
        "max_age": settings.upload_stage_ttl_s,
        "max_bytes": settings.uploads_max_bytes,
        "discard": "new",  # full: refuse the next upload, never drop one being sent
        "allow_direct": True,
    }


def app_slots_bucket_config(settings: Settings) -> dict[str, Any]:
    """The KV bucket of apps' cluster-wide stream slots (``max_active``): ``ttl`` =
    ``TOKENWIRE_APP_SLOT_TTL_S``, so a killed worker's slots free themselves."""
    return {
        "bucket": "tw_app_slots",
        "ttl": settings.app_slot_ttl_s,
        "storage": "file",
        "replicas": settings.stream_replicas,
        "history": 1,
    }
