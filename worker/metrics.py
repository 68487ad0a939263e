"""The worker's Prometheus metrics: the families, and one small helper per event.

Every family is registered in prometheus-client's default registry, which the worker serves on
``/metrics`` of its own port (``--metrics-port``, default 9100). Handlers call the helpers,
never the metric objects, so label values stay inside the bounded sets below: a label never
holds a user id, a request id, a job key or any other unbounded value, and a value the helpers
do not know becomes ``"other"`` (``shared/metric_labels.py``, shared with the gateway).

Families (all prefixed ``tokenwire_worker_``):

===============================  =========  ==============  =======================================
name                             type       labels          what
===============================  =========  ==============  =======================================
``jobs_received_total``          counter    —               jobs pulled from the job consumer
``jobs_redelivered_total``       counter    —               of those, deliveries after the first
``jobs_total``                   counter    ``outcome``     jobs finished: completed, stopped,
                                                            error, handed_back, dead_lettered,
                                                            dropped
``jobs_queued_total``            counter    ``reason``      ``queued`` frames sent (Dify down or
                                                            saturated), by error code
``queue_wait_seconds``           histogram  —               job stored by a gateway → picked up
``streams_running``              gauge      —               answers streaming from Dify now
``dify_requests_total``          counter    ``endpoint``,   Dify calls by HTTP status (``none``:
                                            ``status``      no response: refused, timed out)
``dify_latency_seconds``         histogram  ``endpoint``    Dify call → response headers
``dify_first_token_seconds``     histogram  —               Dify call → first answer text
``dify_errors_total``            counter    ``code``        requests failed or retried, by
                                                            protocol error code
``dify_breaker_open``            gauge      —               1 while the Dify circuit breaker is
                                                            open
``frames_published_total``       counter    ``type``        server frames published to NATS
``answer_tokens_total``          counter    —               completion tokens Dify reported
``resets_total``                 counter    —               ``reset`` frames sent
``stops_total``                  counter    —               stops this worker acted on
``fenced_total``                 counter    —               deliveries fenced out by a newer one
``consumer_pending``             gauge      —               job consumer: jobs not yet delivered
``consumer_ack_pending``         gauge      —               job consumer: delivered, not yet acked
``queue_oldest_age_seconds``     gauge      —               age of the oldest job still stored
``dead_letters``                 gauge      —               jobs kept in the dead-letter stream
``stream_bytes``                 gauge      stream          bytes stored in TW_JOBS, TW_FRAMES*
``stream_max_bytes``             gauge      stream          that stream's byte limit
``asyncio_tasks``                gauge      —               asyncio tasks alive in the process
``draining``                     gauge      —               1 from SIGTERM until the process exits
===============================  =========  ==============  =======================================

The four JetStream gauges describe the whole cluster, not this worker: every worker sets them
from ``consumer_info``/``stream_info`` now and then (:func:`set_consumer_lag`,
:func:`set_queue_age`, :func:`set_dead_letters`), so aggregate them with ``max``, never ``sum``.

``tokenwire worker --processes N`` runs N worker processes behind one metrics port served by
their supervisor: each child writes its values into the supervisor's
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode) and :func:`exposition`
sums them, also those of children that died (a counter never goes back). Each gauge names how
the children combine (``multiprocess_mode``): ``streams_running`` adds up over the live
processes, the breaker and ``draining`` are the highest, and the cluster-wide gauges are the
value most recently set by any child. With one process the default registry serves, as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from shared import loop_gauges
from shared.delivery import Outcome
from shared.metric_labels import ERROR_CODES, LATENCY_BUCKETS, SERVER_FRAME_TYPES
from shared.metric_labels import bounded as _bounded

__all__ = [
    "ANSWER_TOKENS",
    "ASYNCIO_TASKS",
    "CONSUMER_ACK_PENDING",
    "CONSUMER_PENDING",
    "DEAD_LETTERS",
    "DIFY_BREAKER_OPEN",
    "DIFY_ENDPOINTS",
    "DIFY_ERRORS",
    "DIFY_FIRST_TOKEN",
    "DIFY_LATENCY",
    "DIFY_REQUESTS",
    "DRAINING",
    "ERROR_CODES",
    "FENCED",
    "FRAMES_PUBLISHED",
    "JOBS",
    "JOBS_QUEUED",
    "JOBS_RECEIVED",
    "JOBS_REDELIVERED",
    "JOB_OUTCOMES",
    "LATENCY_BUCKETS",
    "QUEUE_OLDEST_AGE",
    "QUEUE_WAIT",
    "QUEUE_WAIT_BUCKETS",
    "RESETS",
    "SERVER_FRAME_TYPES",
    "STOPS",
    "STREAMS_RUNNING",
    "STREAM_BYTES",
    "STREAM_MAX_BYTES",
    "answer_tokens",
    "count_tasks",
    "dify_error",
    "dify_response",
    "exposition",
    "fenced",
    "frame_published",
    "job_finished",
    "job_queued",
    "job_received",
    "observe_dify_first_token",
    "observe_queue_wait",
    "reset_sent",
    "running_stream",
    "set_breaker_open",
    "set_consumer_lag",
    "set_dead_letters",
    "set_draining",
    "set_queue_age",
    "stop_acted",
    "stream_finished",
    "stream_started",
    "watch_tasks",
]

#: Seconds; a job normally waits milliseconds, minutes while Dify is down or workers are few.
QUEUE_WAIT_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
)

#: completed, stopped, error, handed_back, dead_lettered, dropped.
JOB_OUTCOMES: Final = frozenset(outcome.value for outcome in Outcome)
DIFY_ENDPOINTS: Final = frozenset(
    {"chat", "stop", "messages", "info", "workflow", "completion", "workflow_events", "form"}
    | {"call", "upload"}
)

JOBS_RECEIVED: Final = Counter(
    "tokenwire_worker_jobs_received",
    "Jobs pulled from the job consumer (every delivery).",
)
JOBS_REDELIVERED: Final = Counter(
    "tokenwire_worker_jobs_redelivered",
    "Job deliveries after the first (a worker died, drained or gave the job back).",
)
JOBS: Final = Counter(
    "tokenwire_worker_jobs",
    "Jobs finished by this worker, by outcome "
    "(completed, stopped, error, handed_back, dead_lettered, dropped).",
    ["outcome"],
)
JOBS_QUEUED: Final = Counter(
    "tokenwire_worker_jobs_queued",
    "'queued' frames sent because Dify was unavailable or saturated, by error code.",
    ["reason"],
)
QUEUE_WAIT: Final = Histogram(
    "tokenwire_worker_queue_wait_seconds",
    "Time from a gateway storing the job to a worker picking it up, in seconds.",
    buckets=QUEUE_WAIT_BUCKETS,
)
STREAMS_RUNNING: Final = Gauge(
    "tokenwire_worker_streams_running",
    "Answers streaming from Dify on this worker now.",
    multiprocess_mode="livesum",
)
DIFY_REQUESTS: Final = Counter(
    "tokenwire_worker_dify_requests",
    "Calls to Dify by endpoint and HTTP status ('none': no response at all).",
    ["endpoint", "status"],
)
DIFY_LATENCY: Final = Histogram(
    "tokenwire_worker_dify_latency_seconds",
    "Time from calling Dify to its response headers, in seconds.",
    ["endpoint"],
    buckets=LATENCY_BUCKETS,
)
DIFY_FIRST_TOKEN: Final = Histogram(
    "tokenwire_worker_dify_first_token_seconds",
    "Time from calling Dify to the first answer text, in seconds.",
    buckets=LATENCY_BUCKETS,
)
DIFY_ERRORS: Final = Counter(
    "tokenwire_worker_dify_errors",
    "Dify failures (final or retried), by protocol error code.",
    ["code"],
)
DIFY_BREAKER_OPEN: Final = Gauge(
    "tokenwire_worker_dify_breaker_open",
    "1 while this worker's Dify circuit breaker is open (Dify considered down).",
    multiprocess_mode="livemax",
)
FRAMES_PUBLISHED: Final = Counter(
    "tokenwire_worker_frames_published",
    "Server frames published to NATS, by type.",
    ["type"],
)
ANSWER_TOKENS: Final = Counter(
    "tokenwire_worker_answer_tokens",
    "Completion tokens of finished answers, as Dify's usage reports them.",
)
RESETS: Final = Counter(
    "tokenwire_worker_resets",
    "'reset' frames sent (an answer started again).",
)
FENCED: Final = Counter(
    "tokenwire_worker_fenced",
    "Deliveries that found a newer delivery of their job (a higher generation) and stopped.",
)
STOPS: Final = Counter(
    "tokenwire_worker_stops",
    "Stops this worker acted on.",
)
CONSUMER_PENDING: Final = Gauge(
    "tokenwire_worker_consumer_pending",
    "Job consumer: jobs stored and not yet delivered to any worker (cluster-wide).",
    multiprocess_mode="mostrecent",
)
CONSUMER_ACK_PENDING: Final = Gauge(
    "tokenwire_worker_consumer_ack_pending",
    "Job consumer: jobs delivered and not yet acked, i.e. being answered (cluster-wide).",
    multiprocess_mode="mostrecent",
)
QUEUE_OLDEST_AGE: Final = Gauge(
    "tokenwire_worker_queue_oldest_age_seconds",
    "Age of the oldest job still in the job stream, in seconds (0 when empty).",
    multiprocess_mode="mostrecent",
)
DEAD_LETTERS: Final = Gauge(
    "tokenwire_worker_dead_letters",
    "Jobs kept in the dead-letter stream (cluster-wide).",
    multiprocess_mode="mostrecent",
)
STREAM_BYTES: Final = Gauge(
    "tokenwire_worker_stream_bytes",
    "Bytes stored in a JetStream stream of tokenwire's (cluster-wide).",
    ["stream"],
    multiprocess_mode="mostrecent",
)
STREAM_MAX_BYTES: Final = Gauge(
    "tokenwire_worker_stream_max_bytes",
    "The byte limit of that stream (TOKENWIRE_JOBS_MAX_BYTES, TOKENWIRE_FRAMES_MAX_BYTES).",
    ["stream"],
    multiprocess_mode="mostrecent",
)
DRAINING: Final = Gauge(
    "tokenwire_worker_draining",
    "1 from SIGTERM until the process exits.",
    multiprocess_mode="livemax",
)
ASYNCIO_TASKS: Final = Gauge(
    "tokenwire_worker_asyncio_tasks",
    "asyncio tasks alive in the worker process (growth at constant load is a leak).",
    multiprocess_mode="livesum",
)


def count_tasks() -> None:
    """Set the task gauge to this process's asyncio tasks now (called from its event loop)."""
    loop_gauges.count_tasks(ASYNCIO_TASKS)


async def watch_tasks() -> None:
    """Keep the task gauge fresh (see :func:`shared.loop_gauges.watch_tasks`)."""
    await loop_gauges.watch_tasks(ASYNCIO_TASKS)


# Labelled children, looked up once per label value (``labels()`` costs a lock and a dict
# walk; frame_published runs once per frame).
_CHILDREN: dict[tuple[int, str], Any] = {}
_DIFY_REQUESTS: dict[tuple[str, int | None], Any] = {}


def _child(family: Any, value: str, allowed: frozenset[str]) -> Any:
    """The child of a one-label ``family`` for ``value`` (bounded to ``allowed``)."""
    key = (id(family), value)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = family.labels(_bounded(value, allowed))
    return child


def job_received(delivered: int) -> None:
    """A job was pulled; ``delivered`` is JetStream's delivery count (1 the first time)."""
    JOBS_RECEIVED.inc()
    if delivered > 1:
        JOBS_REDELIVERED.inc()


def job_finished(outcome: str) -> None:
    """This worker is done with a job: completed, stopped, error, handed_back, ... ."""
    _child(JOBS, outcome, JOB_OUTCOMES).inc()


def job_queued(reason: str) -> None:
    """A ``queued`` frame was sent; ``reason`` is the error code that caused the wait."""
    _child(JOBS_QUEUED, reason, ERROR_CODES).inc()


def observe_queue_wait(seconds: float) -> None:
    """Time the job waited in JetStream (now minus the job's ``created_ms``)."""
    QUEUE_WAIT.observe(max(seconds, 0.0))


def stream_started() -> None:
    STREAMS_RUNNING.inc()


def stream_finished() -> None:
    STREAMS_RUNNING.dec()


@contextlib.contextmanager
def running_stream() -> Iterator[None]:
    """Count an answer in ``streams_running`` for as long as the block runs."""
    stream_started()
    try:
        yield
    finally:
        stream_finished()


def dify_response(status: int | None, seconds: float, endpoint: str = "chat") -> None:
    """Dify answered a call with HTTP ``status`` after ``seconds`` (None: no response)."""
    requests = _DIFY_REQUESTS.get((endpoint, status))
    if requests is None:
        label = str(status) if status is not None and 100 <= status <= 599 else "none"
        name = _bounded(endpoint, DIFY_ENDPOINTS)
        requests = _DIFY_REQUESTS[(endpoint, status)] = DIFY_REQUESTS.labels(name, label)
    requests.inc()
    if status is not None:
        _child(DIFY_LATENCY, endpoint, DIFY_ENDPOINTS).observe(max(seconds, 0.0))


def observe_dify_first_token(seconds: float) -> None:
    """Time from calling Dify to the first answer text of the stream."""
    DIFY_FIRST_TOKEN.observe(max(seconds, 0.0))


def dify_error(code: str) -> None:
    """A Dify call failed (for good or before a retry) with protocol error ``code``."""
    _child(DIFY_ERRORS, code, ERROR_CODES).inc()


def set_breaker_open(is_open: bool) -> None:
    DIFY_BREAKER_OPEN.set(1 if is_open else 0)


def frame_published(kind: str) -> None:
    """A server frame of type ``kind`` was published to NATS."""
    _child(FRAMES_PUBLISHED, kind, SERVER_FRAME_TYPES).inc()


def answer_tokens(count: int) -> None:
    """An answer ended; ``count`` is its ``usage.completion_tokens``."""
    if count > 0:
        ANSWER_TOKENS.inc(count)


def reset_sent() -> None:
    RESETS.inc()


def fenced() -> None:
    FENCED.inc()


def stop_acted() -> None:
    STOPS.inc()


def set_consumer_lag(pending: int, ack_pending: int) -> None:
    """From the job consumer's info: ``num_pending`` and ``num_ack_pending``."""
    CONSUMER_PENDING.set(max(pending, 0))
    CONSUMER_ACK_PENDING.set(max(ack_pending, 0))


def set_queue_age(seconds: float) -> None:
    """Age of the job stream's first message (work-queue retention: the oldest unanswered)."""
    QUEUE_OLDEST_AGE.set(max(seconds, 0.0))


def set_dead_letters(count: int) -> None:
    """Messages in the dead-letter stream."""
    DEAD_LETTERS.set(max(count, 0))


def set_stream_bytes(stream: str, used: int, limit: int) -> None:
    """How full one stream is: bytes stored and its limit (``limit`` <= 0: no limit)."""
    STREAM_BYTES.labels(stream=stream).set(max(used, 0))
    STREAM_MAX_BYTES.labels(stream=stream).set(max(limit, 0))


def set_draining(draining: bool) -> None:
    DRAINING.set(1 if draining else 0)


def exposition(multiprocess_dir: Path) -> bytes:
    """What the supervisor's ``/metrics`` answers: the sums over every worker process that
    wrote into ``multiprocess_dir`` (their ``PROMETHEUS_MULTIPROC_DIR``)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(multiprocess_dir))  # type: ignore[no-untyped-call]
    return generate_latest(registry)
