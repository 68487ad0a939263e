"""The gateway's Prometheus metrics: the families, and one small helper per event.

Every family is registered in prometheus-client's default registry, so the gateway's existing
``/metrics`` route serves them as soon as this module is imported. Handlers call the helpers,
never the metric objects, so label values stay inside the bounded sets below: a label never
holds a user id, a request id, a connection id or any other unbounded value, and a value the
helpers do not know becomes ``"other"``.

Families (all prefixed ``tokenwire_gateway_``):

================================  =========  ==============  ==================================
name                              type       labels          what
================================  =========  ==============  ==================================
``connections``                   gauge      —               WebSocket connections open now
``connections_opened_total``      counter    —               WebSocket upgrades accepted
``connections_closed_total``      counter    ``code``        closes, by WebSocket close code
``frames_in_total``               counter    ``type``        client frames read (``invalid``:
                                                             refused before its type was known)
``frames_out_total``              counter    ``type``        server frames sent
``requests_accepted_total``       counter    —               chats durably queued (``accepted``)
``requests_total``                counter    ``outcome``     requests closed on this gateway:
                                                             completed, stopped, error, detached
``ttft_seconds``                  histogram  —               ``accepted`` → first ``delta`` sent
``resumes_total``                 counter    ``outcome``     ``resume`` frames: replayed
                                                             (the replay ran), unknown,
                                                             error (NATS could not say or
                                                             replay: the request fails,
                                                             retryable, nothing is left),
                                                             refused (``too_busy``: over
                                                             ``TOKENWIRE_MAX_RESUMES``)
``stale_frames_total``            counter    —               frames of a fenced (older)
                                                             delivery, dropped
``refusals_total``                counter    ``kind``        refused before any work: auth,
                                                             origin, rate_limit,
                                                             connection_limit, inflight_limit,
                                                             frame, draining, handshake_limit,
                                                             resume_limit
``in_progress``                   gauge      ``work``        handshakes or resumes in progress
                                                             now (admission control's gates)
``asyncio_tasks``                 gauge      —               asyncio tasks alive in the process
                                                             (about one per connection, its
                                                             reader: growing beyond is a leak)
``draining``                      gauge      —               1 from SIGTERM until exit
``nats_connected``                gauge      —               1 while the NATS link is up
================================  =========  ==============  ==================================

``tokenwire gateway --workers N`` runs N processes on one port and ``/metrics`` is answered by
whichever of them accepts the scrape, so with N > 1 the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode) and :func:`exposition`
serves the sum of every child, also of those that died (a counter never goes back). Each gauge
names how its children combine (``multiprocess_mode``): connections and tasks add up over the
live processes, ``draining`` is the highest, ``nats_connected`` the lowest. With one process the
default registry is the whole truth, as before.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from shared import loop_gauges
from shared.exceptions import CloseCode
from shared.frames import (
    AuthFrame,
    ChatFrame,
    PingFrame,
    ResumeFrame,
    StopFrame,
)
from shared.metric_labels import LATENCY_BUCKETS, OTHER, SERVER_FRAME_TYPES
from shared.metric_labels import bounded as _bounded
from shared.session import Metric, Tally

__all__ = [
    "ASYNCIO_TASKS",
    "CLIENT_FRAME_TYPES",
    "CLOSE_CODES",
    "CONNECTIONS",
    "CONNECTIONS_CLOSED",
    "CONNECTIONS_OPENED",
    "DRAINING",
    "FRAMES_IN",
    "FRAMES_OUT",
    "GATED_WORK",
    "IN_PROGRESS",
    "NATS_CONNECTED",
    "REFUSALS",
    "REFUSAL_KINDS",
    "REQUESTS",
    "REQUESTS_ACCEPTED",
    "REQUEST_OUTCOMES",
    "RESUMES",
    "RESUME_OUTCOMES",
    "SERVER_FRAME_TYPES",
    "STALE_FRAMES",
    "TTFT",
    "TTFT_BUCKETS",
    "connection_closed",
    "connection_opened",
    "count_tasks",
    "exposition",
    "frame_in",
    "frame_out",
    "in_progress",
    "observe_ttft",
    "record",
    "refusal",
    "request_accepted",
    "request_finished",
    "resume",
    "set_draining",
    "set_nats_connected",
    "watch_tasks",
]

#: Seconds; from 10 ms (a warm, local Dify) to a minute (a cold agent app).
TTFT_BUCKETS: Final = LATENCY_BUCKETS

#: Close codes kept as their own label value: RFC 6455's and every code of :class:`CloseCode`.
CLOSE_CODES: Final = frozenset(range(1000, 1016)) | frozenset(int(c) for c in CloseCode)
CLIENT_FRAME_TYPES: Final = frozenset(
    get_args(model.model_fields["type"].annotation)[0]
    for model in (ChatFrame, StopFrame, ResumeFrame, PingFrame, AuthFrame)
) | {"invalid"}
REQUEST_OUTCOMES: Final = frozenset({"completed", "stopped", "error", "detached"})
RESUME_OUTCOMES: Final = frozenset({"replayed", "unknown", "error", "refused"})
#: The work admission control bounds (gateway/limits.py's Gate).
GATED_WORK: Final = frozenset({"handshake", "resume"})
REFUSAL_KINDS: Final = frozenset(
    {
        "auth",
        "origin",
        "rate_limit",
        "connection_limit",
        "inflight_limit",
        "frame",
        "draining",
        "handshake_limit",
        "resume_limit",
    }
)

CONNECTIONS: Final = Gauge(
    "tokenwire_gateway_connections",
    "WebSocket connections open now.",
    multiprocess_mode="livesum",
)
CONNECTIONS_OPENED: Final = Counter(
    "tokenwire_gateway_connections_opened",
    "WebSocket upgrades accepted.",
)
CONNECTIONS_CLOSED: Final = Counter(
    "tokenwire_gateway_connections_closed",
    "WebSocket connections closed, by close code (4100-4199: the client should resume).",
    ["code"],
)
FRAMES_IN: Final = Counter(
    "tokenwire_gateway_frames_in",
    "Client frames read, by type ('invalid': refused before its type was known).",
    ["type"],
)
FRAMES_OUT: Final = Counter(
    "tokenwire_gateway_frames_out",
    "Server frames sent to clients, by type.",
    ["type"],
)
REQUESTS_ACCEPTED: Final = Counter(
    "tokenwire_gateway_requests_accepted",
    "Chat requests durably queued (an 'accepted' frame was sent).",
)
REQUESTS: Final = Counter(
    "tokenwire_gateway_requests",
    "Requests closed on this gateway, by outcome "
    "(completed, stopped, error; detached: the client left first).",
    ["outcome"],
)
TTFT: Final = Histogram(
    "tokenwire_gateway_ttft_seconds",
    "Time to first token: 'accepted' sent to the first 'delta' sent, in seconds.",
    buckets=TTFT_BUCKETS,
)
RESUMES: Final = Counter(
    "tokenwire_gateway_resumes",
    "Resume frames handled, by outcome (replayed, unknown, error).",
    ["outcome"],
)
STALE_FRAMES: Final = Counter(
    "tokenwire_gateway_stale_frames",
    "Request frames dropped because a newer delivery of the request fenced theirs out "
    "(a worker that stalled past the ack wait and then published).",
)
REFUSALS: Final = Counter(
    "tokenwire_gateway_refusals",
    "Connections or frames refused before any work, by kind.",
    ["kind"],
)
IN_PROGRESS: Final = Gauge(
    "tokenwire_gateway_in_progress",
    "Handshakes or resumes in progress now, by work (capped by TOKENWIRE_MAX_HANDSHAKES "
    "and TOKENWIRE_MAX_RESUMES).",
    ["work"],
    multiprocess_mode="livesum",
)
for _work in sorted(GATED_WORK):
    IN_PROGRESS.labels(work=_work)  # 0 until the gate is watched: both series always exist
ASYNCIO_TASKS: Final = Gauge(
    "tokenwire_gateway_asyncio_tasks",
    "asyncio tasks alive in the gateway process: about one per connection (its reader), none "
    "per NATS subscription; growth at constant load is a leak.",
    multiprocess_mode="livesum",
)
DRAINING: Final = Gauge(
    "tokenwire_gateway_draining",
    "1 from SIGTERM until the process exits.",
    multiprocess_mode="livemax",
)
NATS_CONNECTED: Final = Gauge(
    "tokenwire_gateway_nats_connected",
    "1 while the gateway's NATS connection is up.",
    multiprocess_mode="livemin",
)


def connection_opened() -> None:
    """A WebSocket upgrade was accepted."""
    CONNECTIONS_OPENED.inc()
    CONNECTIONS.inc()


def connection_closed(code: int) -> None:
    """A connection that :func:`connection_opened` counted has closed with ``code``."""
    CONNECTIONS.dec()
    CONNECTIONS_CLOSED.labels(code=str(code) if code in CLOSE_CODES else OTHER).inc()


def frame_in(kind: str) -> None:
    """A client frame of type ``kind`` was read (``"invalid"`` if it had no known type)."""
    FRAMES_IN.labels(type=_bounded(kind, CLIENT_FRAME_TYPES)).inc()


def frame_out(kind: str) -> None:
    """A server frame of type ``kind`` was sent to a client."""
    FRAMES_OUT.labels(type=_bounded(kind, SERVER_FRAME_TYPES)).inc()


def request_accepted() -> None:
    """A chat was durably queued and its ``accepted`` frame sent."""
    REQUESTS_ACCEPTED.inc()


def request_finished(outcome: str) -> None:
    """A request closed on this gateway: completed, stopped, error or detached."""
    REQUESTS.labels(outcome=_bounded(outcome, REQUEST_OUTCOMES)).inc()


def observe_ttft(seconds: float) -> None:
    """Time from ``accepted`` to the request's first ``delta``, as the client saw it."""
    TTFT.observe(max(seconds, 0.0))


def resume(outcome: str) -> None:
    """A ``resume`` frame was handled: replayed, unknown or error."""
    RESUMES.labels(outcome=_bounded(outcome, RESUME_OUTCOMES)).inc()


def refusal(kind: str) -> None:
    """Something was refused before any work: auth, origin, rate_limit, … (see the table)."""
    REFUSALS.labels(kind=_bounded(kind, REFUSAL_KINDS)).inc()


def in_progress(work: str) -> Callable[[int], None]:
    """What a gate calls with its count of ``work`` in progress whenever it changes (a set,
    not a function read at scrape time, so that multiprocess mode adds the processes up)."""
    return IN_PROGRESS.labels(work=_bounded(work, GATED_WORK)).set


def set_draining(draining: bool) -> None:
    DRAINING.set(1 if draining else 0)


def set_nats_connected(connected: bool) -> None:
    NATS_CONNECTED.set(1 if connected else 0)


def count_tasks() -> None:
    """Set the task gauge to this process's asyncio tasks now (called from its event loop)."""
    loop_gauges.count_tasks(ASYNCIO_TASKS)


async def watch_tasks() -> None:
    """Keep the task gauge fresh (see :func:`shared.loop_gauges.watch_tasks`)."""
    await loop_gauges.watch_tasks(ASYNCIO_TASKS)


def record(tally: Tally) -> None:
    """Count what a connection's session decided to count (:class:`shared.session.Tally`)."""
    metric = tally.metric
    if metric is Metric.FRAME_IN:
        frame_in(tally.label)
    elif metric is Metric.REFUSAL:
        refusal(tally.label)
    elif metric is Metric.FINISHED:
        request_finished(tally.label)
    elif metric is Metric.TTFT:
        observe_ttft(tally.value)
    elif metric is Metric.ACCEPTED:
        request_accepted()
    elif metric is Metric.RESUME:
        resume(tally.label)
    elif metric is Metric.OPENED:
        connection_opened()
    elif metric is Metric.CLOSED:
        connection_closed(int(tally.label))
    elif metric is Metric.STALE:
        STALE_FRAMES.inc(tally.value)


def exposition() -> bytes:
    """What ``/metrics`` answers: this process's families, or, under a supervisor
    (``PROMETHEUS_MULTIPROC_DIR`` set), the sums over every gateway process of the pod."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return generate_latest()
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
