"""Asking Dify: its stream in, through the mapper, frames out; a stop races the stream.

How this works. :func:`stream_answer` runs the pump (Dify → :class:`DifyStreamMapper` →
:class:`~worker.publishing.Publisher`) as a task and races it against the request's stop
event. It does not judge how the stream ended: it returns what the pump raised (or None) and
the runner asks :func:`shared.delivery.judge_stream` what that means. A stop first lets Dify
name the task (up to ``STOP_TASK_ID_GRACE_S``), so the generation is stopped at Dify too, with
the same user; then the request closes with ``end`` (stopped).

Dify's ids are recorded before ``start`` leaves: whoever takes this job over knows that Dify is
answering it and must not be asked again. Likewise a human-input form is handed to
``on_forms`` (kept server-side with its token) before the client hears of it.

A chat asks ``POST /chat-messages``; a caller may name another ``route`` (a workflow or
completion app: its endpoint and its stop) or open another stream (``open_stream``: the events
of a workflow run Dify already has).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Final

from opentelemetry import trace

from shared.apps import Route
from shared.dify_api import DifyIds, dify_body, request_body
from shared.exceptions import TokenwireError
from shared.frames import ServerFrame
from shared.jobs import Job
from shared.mapping import DifyStreamMapper, PendingForm
from shared.sse import SSEEvent
from worker import metrics
from worker.publishing import Publisher
from worker.types import DifyApi, RequestRecords

__all__ = ["STOP_TASK_ID_GRACE_S", "Asked", "stream_answer"]

log = logging.getLogger("tokenwire.worker")
tracer = trace.get_tracer("tokenwire.worker")

# How long a stop waits for Dify to name the task (its first event) so it can be stopped
# at Dify too, instead of leaving Dify generating an answer nobody reads.
STOP_TASK_ID_GRACE_S: Final = 10.0
# Recording Dify's ids is retried through a NATS blip this many times.
_SAVE_IDS_TRIES: Final = 5


@dataclass(frozen=True, slots=True)
class Asked:
    """How asking Dify ended: stopped by the client, or the stream's error (None: it ended)."""

    stopped: bool
    error: BaseException | None = None


#: Opens the stream to read (default: the job's ``chat`` at ``POST /chat-messages``).
StreamOpener = Callable[[], AbstractAsyncContextManager[AsyncIterator[list[SSEEvent]]]]
#: Keeps a run's human-input forms server-side before the client sees them.
FormKeeper = Callable[[list[PendingForm]], Awaitable[None]]


async def stream_answer(
    dify: DifyApi,
    records: RequestRecords,
    publisher: Publisher,
    job: Job,
    mapper: DifyStreamMapper,
    stop: asyncio.Event,
    *,
    route: Route | None = None,
    open_stream: StreamOpener | None = None,
    on_forms: FormKeeper | None = None,
) -> Asked:
    """Ask Dify (``route``: a one-shot app's endpoint and stop; None: a chat) and race the
    request's stop."""
    task_known = asyncio.Event()
    if open_stream is None:
        body = dify_body(job) if route is None else _route_body(job, route)
        open_stream = _opener(dify, job, body, route)
    pump = asyncio.create_task(
        _pump(records, publisher, job, mapper, task_known, open_stream, on_forms)
    )
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({pump, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not stopper.done():
            return Asked(stopped=False, error=pump.exception())
        await _stop(dify, publisher, job, mapper, pump, task_known, route)
        return Asked(stopped=True)
    finally:
        # Also when cancelled (lease lost, handed back while draining): not one more frame
        # from this delivery, and the stream to Dify closed before this returns.
        pump.cancel()
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump


async def _stop(
    dify: DifyApi,
    publisher: Publisher,
    job: Job,
    mapper: DifyStreamMapper,
    pump: asyncio.Task[None],
    task_known: asyncio.Event,
    route: Route | None = None,
) -> None:
    # Let Dify name the task first, so that it can be stopped there too.
    if mapper.task_id is None and not pump.done():
        waiter = asyncio.create_task(task_known.wait())
        try:
            await asyncio.wait({pump, waiter}, timeout=STOP_TASK_ID_GRACE_S)
        finally:
            waiter.cancel()
    pump.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await pump
    if mapper.task_id is not None and not mapper.machine.done:
        metrics.stop_acted()
        try:
            if route is None or not route.one_shot:
                await dify.stop(mapper.task_id, job.user, trace_id=job.trace_id, app=job.app)
            else:
                await dify.stop(
                    mapper.task_id, job.user, trace_id=job.trace_id, app=job.app, route=route
                )
        except TokenwireError as exc:
            log.warning("Dify stop call failed", extra={"error": str(exc)})
    await publisher.publish(mapper.stopped())


def _route_body(job: Job, route: Route) -> dict[str, Any]:
    return request_body(job, route.kind)


def _opener(dify: DifyApi, job: Job, body: dict[str, Any], route: Route | None) -> StreamOpener:
    def open_stream() -> AbstractAsyncContextManager[AsyncIterator[list[SSEEvent]]]:
        if route is None or not route.one_shot:
            return dify.stream_chat(body, trace_id=job.trace_id, app=job.app)
        return dify.stream_chat(body, trace_id=job.trace_id, app=job.app, route=route)

    return open_stream


async def _pump(
    records: RequestRecords,
    publisher: Publisher,
    job: Job,
    mapper: DifyStreamMapper,
    task_known: asyncio.Event,
    open_stream: StreamOpener,
    on_forms: FormKeeper | None,
) -> None:
    with (
        metrics.running_stream(),
        tracer.start_as_current_span(
            "dify chat-messages", attributes={"tokenwire.request_id": job.trace_id}
        ) as span,
    ):
        asked = time.monotonic()
        first_text = True
        async with open_stream() as reads:
            async for events in reads:
                # Everything parsed from one read of Dify's stream is handed over at once:
                # the coalescer sends its text as one delta.
                was_started = mapper.started
                frames: list[ServerFrame] = []
                for event in events:
                    frames += mapper.feed(event)
                    if mapper.machine.done:
                        break
                if not was_started and mapper.began:
                    await _save_ids(records, job, mapper.ids())
                if mapper.forms and on_forms is not None:
                    # Kept (with their tokens) before the client sees them: an answer that
                    # comes at once finds its form.
                    await on_forms(mapper.take_forms())
                if frames:
                    if first_text and mapper.answer:
                        first_text = False
                        metrics.observe_dify_first_token(time.monotonic() - asked)
                    await publisher.publish(frames)
                if mapper.task_id is not None:
                    task_known.set()
                if mapper.machine.done:
                    break
            else:
                await publisher.publish(mapper.finish())
        span.set_attribute("tokenwire.frames", publisher.coalescer.seq.last)


async def _save_ids(records: RequestRecords, job: Job, ids: DifyIds) -> None:
    """Record Dify's ids, retrying through a NATS blip; the answer goes on regardless
    (losing the record only matters if this worker also dies before the end)."""
    for attempt in range(_SAVE_IDS_TRIES):
        try:
            await records.save_ids(job.key, ids)
            return
        except TokenwireError as exc:
            log.warning("cannot record Dify's ids yet", extra={"error": str(exc)})
            await asyncio.sleep(0.2 * (attempt + 1))
