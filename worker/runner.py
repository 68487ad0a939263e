"""Answers one job: Dify's stream in, frames out, the job acked once the request has closed.

How this works: :meth:`JobRunner.run` registers the request (so a ``stop`` can find it), keeps
the job alive with in-progress acks, and races two things: the *pump* (Dify's SSE stream →
:class:`~shared.mapping.DifyStreamMapper` → frames published to the request's subject) and the
request's *stop* event. Whatever wins, exactly one ``end`` or ``error`` closes the request; the
mapper's state machine refuses anything after it. Only then is the job acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.exceptions import InternalError, TokenwireError
from shared.frames import Reset, ServerFrame, encode
from shared.jobs import Job
from shared.logs import trace_id_var
from shared.mapping import DifyStreamMapper
from shared.sequencing import SeqCounter
from shared.state import RequestMachine, RequestState
from worker.dify import DifyClient

__all__ = ["Bus", "JobMessage", "JobRunner", "Running"]

log = logging.getLogger("tokenwire.worker")

# How long a stop waits for Dify to name the task (its first event) so it can be stopped
# at Dify too, instead of leaving Dify generating an answer nobody reads.
STOP_TASK_ID_GRACE_S = 10.0


class JobMessage(Protocol):
    """The job's JetStream message, as the runner needs it (FastStream's NatsMessage fits)."""

    async def ack(self) -> None: ...
    async def in_progress(self) -> None: ...


class Bus(Protocol):
    """What the runner needs of NATS (the seam unit tests replace)."""

    async def publish(self, subject: str, data: bytes) -> None: ...
    async def last_seq(self, subject: str) -> int: ...
    async def stop_recorded(self, key: str) -> bool: ...


@dataclass(slots=True)
class Running:
    """One request this worker is answering."""

    job: Job
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task_known: asyncio.Event = field(default_factory=asyncio.Event)


class JobRunner:
    def __init__(
        self,
        bus: Bus,
        dify: DifyClient,
        *,
        heartbeat_s: float,
        api_keys: dict[str, str] | None = None,
    ) -> None:
        self.bus = bus
        self.dify = dify
        self.heartbeat_s = heartbeat_s
        self.running: dict[str, Running] = {}

    def request_stop(self, key: str) -> bool:
        """Stop request ``key`` if this worker runs it; returns whether it does."""
        running = self.running.get(key)
        if running is None:
            return False
        running.stop.set()
        return True

    async def run(self, job: Job, msg: JobMessage, *, delivered: int = 1) -> None:
        """Answer ``job`` and ack it. Never raises for a request's own failure."""
        token = trace_id_var.set(job.trace_id)
        running = Running(job)
        self.running[job.key] = running
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        try:
            mapper = await self._mapper_for(job, delivered)
            if await self.bus.stop_recorded(job.key):
                running.stop.set()
            log.info("job started", extra={"attempt": delivered, "conn": job.conn})
            await self._answer(job, mapper, running)
            log.info("job finished", extra={"state": mapper.machine.state.value})
        except Exception:
            log.exception("job failed inside tokenwire")
        finally:
            heartbeat.cancel()
            self.running.pop(job.key, None)
            with contextlib.suppress(Exception):
                await msg.ack()
            trace_id_var.reset(token)

    async def _mapper_for(self, job: Job, delivered: int) -> DifyStreamMapper:
        """A fresh mapper numbering from 2 (``accepted`` is 1), or, for a redelivered job,
        continuing after the last frame the previous attempt published, with a ``reset``."""
        if delivered <= 1:
            return DifyStreamMapper(job.id, SeqCounter(1))
        last = max(await self.bus.last_seq(job.reply), 1)
        seq = SeqCounter(last)
        machine = RequestMachine(RequestState.ACCEPTED)
        if last > 1:
            reset = Reset(id=job.id, seq=seq.next(), reason="redelivered")
            machine.emit("reset")
            await self._publish(job, [reset])
        return DifyStreamMapper(job.id, seq, machine)

    async def _answer(self, job: Job, mapper: DifyStreamMapper, running: Running) -> None:
        if running.stop.is_set():
            await self._publish(job, mapper.stopped())
            return
        pump = asyncio.create_task(self._pump(job, mapper, running))
        stopper = asyncio.create_task(running.stop.wait())
        await asyncio.wait({pump, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not stopper.done():
            stopper.cancel()
            await self._close_after_pump(job, mapper, pump)
            return
        # Stop requested. Let Dify name the task first, so that it can be stopped there too.
        if mapper.task_id is None and not pump.done():
            waiter = asyncio.create_task(running.task_known.wait())
            await asyncio.wait({pump, waiter}, timeout=STOP_TASK_ID_GRACE_S)
            waiter.cancel()
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump
        if mapper.task_id is not None and not mapper.machine.done:
            try:
                await self.dify.stop(mapper.task_id, job.user, trace_id=job.trace_id)
            except TokenwireError as exc:
                log.warning("Dify stop call failed", extra={"error": str(exc)})
        await self._publish(job, mapper.stopped())

    async def _close_after_pump(
        self, job: Job, mapper: DifyStreamMapper, pump: asyncio.Task[None]
    ) -> None:
        exc = pump.exception()
        if exc is None:
            return
        if not isinstance(exc, TokenwireError):
            log.error("unexpected error while streaming", exc_info=exc)
            exc = InternalError("tokenwire failed while streaming the answer")
        log.info("request failed", extra={"code": exc.code.value, "error": str(exc)})
        await self._publish(job, mapper.fail(exc))

    async def _pump(self, job: Job, mapper: DifyStreamMapper, running: Running) -> None:
        async with self.dify.stream_chat(dify_body(job), trace_id=job.trace_id) as events:
            async for event in events:
                frames = mapper.feed(event)
                if frames:
                    await self._publish(job, frames)
                if mapper.task_id is not None and not running.task_known.is_set():
                    running.task_known.set()
                if mapper.machine.done:
                    return
        await self._publish(job, mapper.finish())

    async def _publish(self, job: Job, frames: list[ServerFrame]) -> None:
        for frame in frames:
            await self.bus.publish(job.reply, encode(frame))

    async def _heartbeat(self, msg: JobMessage) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            with contextlib.suppress(Exception):
                await msg.in_progress()


def dify_body(job: Job) -> dict[str, Any]:
    """The JSON body of Dify's ``POST /chat-messages`` for ``job`` (streaming mode)."""
    body: dict[str, Any] = {
        "query": job.query,
        "inputs": job.inputs,
        "response_mode": "streaming",
        "user": job.user,
        "auto_generate_name": True,
    }
    if job.conversation_id:
        body["conversation_id"] = job.conversation_id
    if job.files:
        body["files"] = job.files
    return body
