"""Answers one job: Dify's stream in, frames out, the job acked once the request has closed.

How this works. :meth:`JobRunner.run` takes one delivery of a job and ends it one of three ways:

* **answered** — the request closed with exactly one ``end`` or ``error``; the job is acked.
* **retry later** — Dify could not be reached (refused, timeout before the first byte, 429,
  5xx) or this worker's circuit is open: the client gets ``queued`` and the job goes back to
  JetStream with a delay (nak). Past ``job_max_attempts`` or ``job_max_age_s`` it is
  dead-lettered instead and closed with ``upstream_unavailable``.
* **recovered** — Dify had already started this answer (ids recorded in the request bucket
  before ``start`` was sent) when the stream broke or the previous worker died. Dify keeps
  generating without its client, so asking again would bill twice and put two answers in the
  conversation: instead the runner waits for the message in Dify's history and continues the
  client's stream from what it already holds. Only if that fails does it ``reset`` and ask again.

The pump (Dify → mapper → NATS) races the request's stop event; a stop calls Dify's stop
endpoint with the task id and the same user, then closes the request with ``end`` (stopped).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry import trace

from shared.exceptions import (
    DifyStreamCut,
    DifyUnavailable,
    ErrorCode,
    InternalError,
    TokenwireError,
)
from shared.frames import Delta, End, Queued, Replace, Reset, ServerFrame, encode, error_frame
from shared.jobs import Job
from shared.logs import trace_id_var
from shared.mapping import DifyStreamMapper
from shared.sequencing import SeqCounter
from shared.settings import Settings
from shared.state import RequestMachine, RequestState
from worker import metrics
from worker.breaker import BreakerState, CircuitBreaker, backoff_s
from worker.dify import DifyClient, HistoryMessage

__all__ = ["Bus", "DifyIds", "JobMessage", "JobRunner", "Running", "dify_body"]

log = logging.getLogger("tokenwire.worker")
tracer = trace.get_tracer("tokenwire.worker")

# How long a stop waits for Dify to name the task (its first event) so it can be stopped
# at Dify too, instead of leaving Dify generating an answer nobody reads.
STOP_TASK_ID_GRACE_S = 10.0
# A job waiting for one of the worker's Dify streams hears its place in line this often.
BUSY_REFRESH_S = 5.0


class JobMessage(Protocol):
    """The job's JetStream message, as the runner needs it (FastStream's NatsMessage fits)."""

    async def ack(self) -> None: ...
    async def nack(self, delay: float | None = None) -> None: ...
    async def in_progress(self) -> None: ...


@dataclass(frozen=True, slots=True)
class DifyIds:
    """What Dify named a request when it began answering; recorded before ``start`` is sent."""

    task_id: str | None
    message_id: str | None
    conversation_id: str | None


class Bus(Protocol):
    """What the runner needs of NATS (the seam unit tests replace)."""

    async def publish(self, subject: str, data: bytes) -> None: ...
    async def kept_frames(self, subject: str) -> list[dict[str, Any]]: ...
    async def stop_recorded(self, key: str) -> bool: ...
    async def save_ids(self, key: str, ids: DifyIds) -> None: ...
    async def load_ids(self, key: str) -> DifyIds | None: ...
    async def save_status(self, key: str, status: dict[str, Any]) -> None: ...
    async def dead_letter(self, job: Job, error: TokenwireError, attempts: int) -> None: ...
    async def take_lease(self, key: str, lease: str) -> None: ...
    async def lease_holder(self, key: str) -> str | None: ...
    async def ensure_kept(self, subject: str, published: dict[int, bytes]) -> None: ...


@dataclass(slots=True)
class Running:
    """One request this worker is answering."""

    job: Job
    lease: str = ""
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task_known: asyncio.Event = field(default_factory=asyncio.Event)
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    handback: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: str = "completed"
    # Every frame this delivery published, by seq: what ensure_kept may need to publish again.
    published: dict[int, bytes] = field(default_factory=dict)


class _Retry(Exception):
    """Dify is unavailable before the answer started: send the job back for later."""

    def __init__(self, cause: DifyUnavailable) -> None:
        super().__init__(str(cause))
        self.cause = cause


class JobRunner:
    def __init__(
        self,
        bus: Bus,
        dify: DifyClient,
        settings: Settings,
        *,
        worker_id: str = "worker",
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.bus = bus
        self.dify = dify
        self.settings = settings
        self.worker_id = worker_id
        self.heartbeat_s = max(settings.job_ack_wait_s / 3, 0.5)
        self.breaker = breaker or CircuitBreaker(
            threshold=settings.breaker_threshold,
            cooldown_s=settings.breaker_cooldown_s,
            max_cooldown_s=settings.retry_max_s,
        )
        self.running: dict[str, Running] = {}
        # Streams to Dify now, and the deliveries waiting for one, oldest first.
        self._streaming = 0
        self._line: list[Running] = []
        self._turns = asyncio.Condition()
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    def request_stop(self, key: str) -> bool:
        """Stop request ``key`` if this worker runs it; returns whether it does."""
        running = self.running.get(key)
        if running is None:
            return False
        running.stop.set()
        return True

    # --- one delivery ---------------------------------------------------------------------

    async def run(self, job: Job, msg: JobMessage, *, delivered: int = 1) -> None:
        """Handle one delivery of ``job``: answer, retry later, or recover. Never raises.

        A redelivery first takes the request's lease and waits one lease check, so that a
        worker still streaming an earlier delivery (stalled past the ack wait, or cut off from
        NATS) notices and stops: two workers never publish one request's frames at once.
        """
        metrics.job_received(delivered)
        if self.draining:
            # Shutting down: leave it to another worker at once.
            with contextlib.suppress(Exception):
                await msg.nack(delay=0)
            metrics.job_finished("handed_back")
            return
        if delivered == 1:
            metrics.observe_queue_wait(time.time() - job.created_ms / 1000)
        trace = trace_id_var.set(job.trace_id)
        running = Running(job, lease=uuid.uuid4().hex)
        self.running[job.key] = running
        self._idle.clear()
        heartbeat = asyncio.create_task(self._heartbeat(msg, running))
        work = asyncio.create_task(self._deliver(job, running, delivered))
        lost = asyncio.create_task(running.lost.wait())
        handback = asyncio.create_task(running.handback.wait())
        settle, delay = "ack", 0.0
        try:
            await asyncio.wait({work, lost, handback}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                settle, delay = work.result()
            else:
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
                if running.lost.is_set():
                    log.warning("lease lost: another delivery owns this request; stopping")
                    settle = "none"  # the message belongs to the newer delivery now
                else:
                    log.info("draining: job handed back to another worker")
                    settle = "nak"
        finally:
            lost.cancel()
            handback.cancel()
            heartbeat.cancel()
            if self.running.get(job.key) is running:
                del self.running[job.key]
            if not self.running:
                self._idle.set()
            with contextlib.suppress(Exception):
                if settle == "nak":
                    await msg.nack(delay=delay)
                elif settle == "ack":
                    await msg.ack()
            outcome = {"nak": "handed_back", "none": "dropped"}.get(settle, running.outcome)
            metrics.job_finished(outcome)
            trace_id_var.reset(trace)

    async def drain(self, grace_s: float) -> None:
        """Stop taking jobs, let running answers finish for up to ``grace_s`` seconds, then
        hand the rest back to JetStream (another worker recovers them from Dify's history)."""
        self.draining = True
        metrics.set_draining(True)
        log.info("draining", extra={"running": len(self.running), "grace_s": grace_s})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
        for running in list(self.running.values()):
            running.handback.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await self._idle.wait()

    async def _deliver(self, job: Job, running: Running, delivered: int) -> tuple[str, float]:
        """One delivery's work; returns how to settle the message: ("ack"|"nak", delay)."""
        attempt = delivered + job.replay
        try:
            if delivered > 1 or job.replay:
                await self.bus.take_lease(job.key, running.lease)
                await asyncio.sleep(self.settings.lease_check_s * 1.5)
            kept = await self._kept(job, delivered)
            seq = SeqCounter(max((f["seq"] for f in kept), default=1))
            machine = _machine_after(kept)
            if machine.done and not job.replay:
                return "ack", 0.0  # closed by an earlier delivery that died before its ack
            if await self.bus.stop_recorded(job.key):
                running.stop.set()
            await self._status(job, "running", attempt)
            log.info("job started", extra={"attempt": attempt, "conn": job.conn})
            try:
                await self._attempt(job, running, kept, seq, machine)
                settle: tuple[str, float] = ("ack", 0.0)
            except _Retry as retry:
                settle = await self._retry_or_give_up(job, retry.cause, attempt, seq)
            # Frames travel on core NATS (no per-token ack), so a stream leader change can
            # drop some from TW_FRAMES; make sure all of them are kept before the job is done.
            await self._ensure_kept(job, running)
            if settle[0] == "ack":
                await self._status(job, "done", attempt)
            return settle
        except InternalError as exc:
            # NATS blinked (restart, leader change): nothing is lost if the job goes back;
            # the next delivery continues from the frames kept so far.
            log.warning("job sent back: tokenwire could not finish it", extra={"error": str(exc)})
            return "nak", 1.0
        except Exception:
            log.exception("job failed inside tokenwire; sent back")
            return "nak", 2.0

    async def _ensure_kept(self, job: Job, running: Running) -> None:
        """Retry through a NATS leader change (about a minute at most) rather than hand the job
        back: this delivery still holds every frame it published, a later one would not."""
        for wait in (0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0):
            try:
                await self.bus.ensure_kept(job.reply, running.published)
                return
            except InternalError as exc:
                log.warning("frames not confirmed kept yet", extra={"error": str(exc)})
                await asyncio.sleep(wait)
        await self.bus.ensure_kept(job.reply, running.published)

    async def _kept(self, job: Job, delivered: int) -> list[dict[str, Any]]:
        """Frames an earlier delivery already published (none on a first delivery)."""
        if delivered <= 1 and not job.replay:
            return []
        return await self.bus.kept_frames(job.reply)

    async def _attempt(
        self,
        job: Job,
        running: Running,
        kept: list[dict[str, Any]],
        seq: SeqCounter,
        machine: RequestMachine,
    ) -> None:
        if running.stop.is_set():
            await self._publish(job, DifyStreamMapper(job.id, seq, machine).stopped())
            return
        ids = await self.bus.load_ids(job.key) if kept else None
        if ids is not None and ids.message_id and not job.replay:
            # Dify began this answer in an earlier delivery: recover it, never ask twice.
            if await self._recover(job, ids, _answer_of(kept), seq, machine, running):
                return
            machine = await self._reset(job, seq, "recovery_failed")
        elif machine.state in (RequestState.STARTED, RequestState.FAILED, RequestState.ENDED):
            machine = await self._reset(job, seq, "replayed" if job.replay else "retry")
        now = time.monotonic()
        if not self.breaker.allow(now):
            raise _Retry(
                DifyUnavailable(
                    "Dify is unavailable (circuit open)", code=ErrorCode.UPSTREAM_UNAVAILABLE
                )
            )
        async with self._stream_slot(job, running, seq, machine):
            await self._answer(job, DifyStreamMapper(job.id, seq, machine), running)

    @contextlib.asynccontextmanager
    async def _stream_slot(
        self, job: Job, running: Running, seq: SeqCounter, machine: RequestMachine
    ) -> AsyncIterator[None]:
        """One of this worker's ``worker_concurrency`` streams to Dify, taken in arrival order.

        A worker holds a few more jobs than it streams (``worker_prefetch``); those wait here
        and their clients are told with ``queued`` frames (reason ``busy``, their position in
        the line), refreshed while they wait. The job's owner sends them, so ``seq`` stays one
        sequence.
        """
        limit = self.settings.worker_concurrency

        def my_turn() -> bool:
            return self._line[0] is running and self._streaming < limit

        async with self._turns:
            if self._streaming >= limit or self._line:
                # In the order the gateways accepted the chats, not the order deliveries got
                # here: a few awaits before this point can reorder deliveries by milliseconds.
                bisect.insort(self._line, running, key=lambda r: (r.job.created_ms, r.job.key))
                try:
                    while not my_turn():
                        queued = Queued(
                            id=job.id,
                            seq=seq.next(),
                            reason="busy",
                            attempt=1,
                            retry_in_ms=int(BUSY_REFRESH_S * 1000),
                            position=self._line.index(running) + 1,
                        )
                        machine.emit("queued")
                        await self._publish(job, [queued])
                        metrics.job_queued("busy")
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(BUSY_REFRESH_S):
                                await self._turns.wait_for(my_turn)
                finally:
                    self._line.remove(running)
                    self._turns.notify_all()
            self._streaming += 1
        try:
            yield
        finally:
            async with self._turns:
                self._streaming -= 1
                self._turns.notify_all()

    async def _reset(self, job: Job, seq: SeqCounter, reason: str) -> RequestMachine:
        """Discard the partial answer: the request starts over, after a ``reset``."""
        await self._publish(job, [Reset(id=job.id, seq=seq.next(), reason=reason)])
        return RequestMachine(RequestState.RESET)

    # --- asking Dify ----------------------------------------------------------------------

    async def _answer(self, job: Job, mapper: DifyStreamMapper, running: Running) -> None:
        pump = asyncio.create_task(self._pump(job, mapper, running))
        stopper = asyncio.create_task(running.stop.wait())
        try:
            await asyncio.wait({pump, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not stopper.done():
                await self._after_pump(job, mapper, pump, running)
            else:
                await self._stop(job, mapper, pump, running)
        finally:
            # Also when cancelled (lease lost, handed back while draining): not one more
            # frame from this delivery.
            pump.cancel()
            stopper.cancel()

    async def _stop(
        self, job: Job, mapper: DifyStreamMapper, pump: asyncio.Task[None], running: Running
    ) -> None:
        # Let Dify name the task first, so that it can be stopped there too.
        if mapper.task_id is None and not pump.done():
            waiter = asyncio.create_task(running.task_known.wait())
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
                await self.dify.stop(mapper.task_id, job.user, trace_id=job.trace_id, app=job.app)
            except TokenwireError as exc:
                log.warning("Dify stop call failed", extra={"error": str(exc)})
        await self._publish(job, mapper.stopped())

    async def _after_pump(
        self, job: Job, mapper: DifyStreamMapper, pump: asyncio.Task[None], running: Running
    ) -> None:
        exc = pump.exception()
        if exc is None:
            self.breaker.success()
            metrics.set_breaker_open(False)
            return
        if isinstance(exc, DifyUnavailable) and not mapper.started:
            self.breaker.failure(time.monotonic())
            metrics.set_breaker_open(self.breaker.state is not BreakerState.CLOSED)
            raise _Retry(exc)
        self.breaker.success()  # Dify answered something: it is up
        metrics.set_breaker_open(False)
        if isinstance(exc, TokenwireError):
            metrics.dify_error(exc.code.value)
        if isinstance(exc, DifyStreamCut) and mapper.message_id:
            log.info("Dify's stream broke mid-answer; recovering from history")
            ids = DifyIds(mapper.task_id, mapper.message_id, mapper.conversation_id)
            if await self._recover(job, ids, mapper.answer, mapper.seq, mapper.machine, running):
                return
        if not isinstance(exc, TokenwireError):
            log.error("unexpected error while streaming", exc_info=exc)
            exc = InternalError("tokenwire failed while streaming the answer")
        log.info("request failed", extra={"code": exc.code.value, "error": str(exc)})
        await self._publish(job, mapper.fail(exc))

    async def _pump(self, job: Job, mapper: DifyStreamMapper, running: Running) -> None:
        with (
            metrics.running_stream(),
            tracer.start_as_current_span(
                "dify chat-messages", attributes={"tokenwire.request_id": job.trace_id}
            ) as span,
        ):
            await self._stream(job, mapper, running)
            span.set_attribute("tokenwire.frames", mapper.seq.last)

    async def _stream(self, job: Job, mapper: DifyStreamMapper, running: Running) -> None:
        asked = time.monotonic()
        first_text = True
        async with self.dify.stream_chat(
            dify_body(job), trace_id=job.trace_id, app=job.app
        ) as events:
            async for event in events:
                was_started = mapper.started
                frames = mapper.feed(event)
                if not was_started and mapper.message_id is not None:
                    # Recorded before `start` leaves: whoever takes this job over knows that
                    # Dify is answering it and must not be asked again.
                    await self._save_ids(
                        job, DifyIds(mapper.task_id, mapper.message_id, mapper.conversation_id)
                    )
                if frames:
                    if first_text and mapper.answer:
                        first_text = False
                        metrics.observe_dify_first_token(time.monotonic() - asked)
                    await self._publish(job, frames)
                if mapper.task_id is not None and not running.task_known.is_set():
                    running.task_known.set()
                if mapper.machine.done:
                    return
        await self._publish(job, mapper.finish())

    async def _save_ids(self, job: Job, ids: DifyIds) -> None:
        """Record Dify's ids, retrying through a NATS blip; the answer goes on regardless
        (losing the record only matters if this worker also dies before the end)."""
        for attempt in range(5):
            try:
                await self.bus.save_ids(job.key, ids)
                return
            except TokenwireError as exc:
                log.warning("cannot record Dify's ids yet", extra={"error": str(exc)})
                await asyncio.sleep(0.2 * (attempt + 1))

    # --- recovering from Dify's history ---------------------------------------------------

    async def _recover(
        self,
        job: Job,
        ids: DifyIds,
        held: str,
        seq: SeqCounter,
        machine: RequestMachine,
        running: Running,
    ) -> bool:
        """Finish the client's answer from Dify's stored message; False if that cannot be done."""
        if not ids.conversation_id or not ids.message_id:
            return False
        deadline = time.monotonic() + self.settings.recovery_timeout_s
        message: HistoryMessage | None = None
        while time.monotonic() < deadline and not running.stop.is_set():
            try:
                message = await self.dify.history_message(
                    ids.conversation_id,
                    ids.message_id,
                    job.user,
                    trace_id=job.trace_id,
                    app=job.app,
                )
            except TokenwireError as exc:
                log.info("history not reachable yet", extra={"error": str(exc)})
                message = None
            if message is not None and message.finished:
                break
            await asyncio.sleep(self.settings.recovery_poll_s)
        if running.stop.is_set() and ids.task_id:
            with contextlib.suppress(TokenwireError):
                await self.dify.stop(ids.task_id, job.user, trace_id=job.trace_id, app=job.app)
        if message is None or not message.finished:
            log.warning("could not recover the answer from Dify's history")
            return False
        if message.failed:
            return False
        frames: list[ServerFrame] = []
        if machine.state is not RequestState.STARTED:
            return False
        if message.answer.startswith(held):
            rest = message.answer[len(held) :]
            if rest:
                frames.append(Delta(id=job.id, seq=seq.next(), text=rest))
        else:
            frames.append(Replace(id=job.id, seq=seq.next(), text=message.answer))
        frames.append(
            End(
                id=job.id,
                seq=seq.next(),
                conversation_id=ids.conversation_id,
                message_id=ids.message_id,
                usage=None,
                retriever_resources=message.retriever_resources,
                stopped=message.stopped or running.stop.is_set(),
            )
        )
        machine.emit("end")
        await self._publish(job, frames)
        log.info("answer recovered from Dify's history", extra={"chars": len(message.answer)})
        return True

    # --- outages ----------------------------------------------------------------------------

    async def _retry_or_give_up(
        self,
        job: Job,
        cause: DifyUnavailable,
        attempt: int,
        seq: SeqCounter,
    ) -> tuple[str, float]:
        age_s = time.time() - job.created_ms / 1000
        if attempt >= self.settings.job_max_attempts or age_s >= self.settings.job_max_age_s:
            final = DifyUnavailable(
                f"Dify stayed unavailable ({attempt} attempts, {age_s:.0f} s): {cause.message}",
                code=ErrorCode.UPSTREAM_UNAVAILABLE,
            )
            await self.bus.dead_letter(job, final, attempt)
            running = self.running.get(job.key)
            if running is not None:
                running.outcome = "dead_lettered"
            await self._status(job, "dead", attempt, error=str(cause))
            await self._publish(job, [error_frame(final, id=job.id, seq=seq.next())])
            log.warning("job dead-lettered", extra={"attempts": attempt, "error": str(cause)})
            return "ack", 0.0
        now = time.monotonic()
        delay = self.breaker.retry_in(now) or backoff_s(
            attempt, self.settings.retry_base_s, self.settings.retry_max_s
        )
        reason = "circuit_open" if "circuit open" in cause.message else cause.code.value
        metrics.job_queued(cause.code.value)
        metrics.dify_error(cause.code.value)
        await self._publish(
            job,
            [
                Queued(
                    id=job.id,
                    seq=seq.next(),
                    reason=reason,
                    attempt=attempt,
                    retry_in_ms=int(delay * 1000),
                )
            ],
        )
        await self._status(job, "queued", attempt, error=str(cause))
        log.info(
            "Dify unavailable; job sent back",
            extra={"attempt": attempt, "delay_s": round(delay, 2)},
        )
        return "nak", delay

    # --- plumbing ---------------------------------------------------------------------------

    async def _status(
        self, job: Job, state: str, attempt: int, *, error: str | None = None
    ) -> None:
        with contextlib.suppress(Exception):
            await self.bus.save_status(
                job.key,
                {
                    "state": state,
                    "attempts": attempt,
                    "last_error": error,
                    "worker": self.worker_id,
                    "updated_ms": int(time.time() * 1000),
                },
            )

    async def _publish(self, job: Job, frames: list[ServerFrame]) -> None:
        running = self.running.get(job.key)
        for frame in frames:
            data = encode(frame)
            await self.bus.publish(job.reply, data)
            metrics.frame_published(frame.type)
            seq = getattr(frame, "seq", None)
            if running is not None and isinstance(seq, int):
                running.published[seq] = data
            if isinstance(frame, End):
                if running is not None:
                    running.outcome = "stopped" if frame.stopped else "completed"
                tokens = (frame.usage or {}).get("completion_tokens")
                if isinstance(tokens, int):
                    metrics.answer_tokens(tokens)
            elif (
                frame.type == "error" and running is not None and running.outcome != "dead_lettered"
            ):
                running.outcome = "error"
            elif frame.type == "reset":
                metrics.reset_sent()

    async def _heartbeat(self, msg: JobMessage, running: Running) -> None:
        """Keep the job ours (in-progress acks) and watch the lease."""
        next_ack = time.monotonic() + self.heartbeat_s
        while True:
            await asyncio.sleep(min(self.settings.lease_check_s, self.heartbeat_s))
            if time.monotonic() >= next_ack:
                next_ack = time.monotonic() + self.heartbeat_s
                with contextlib.suppress(Exception):
                    await msg.in_progress()
            try:
                holder = await self.bus.lease_holder(running.job.key)
            except TokenwireError:
                continue  # cannot tell while NATS is away; nobody can take over then either
            if holder is not None and holder != running.lease:
                running.lost.set()
                return


def _answer_of(frames: list[dict[str, Any]]) -> str:
    text = ""
    for frame in frames:
        kind = frame.get("type")
        if kind == "delta":
            text += frame.get("text", "")
        elif kind == "replace":
            text = frame.get("text", "")
        elif kind == "reset":
            text = ""
    return text


def _machine_after(frames: list[dict[str, Any]]) -> RequestMachine:
    """The request's state after the frames an earlier delivery published."""
    machine = RequestMachine(RequestState.ACCEPTED)
    for frame in frames:
        kind = str(frame.get("type"))
        if machine.can_emit(kind):
            machine.emit(kind)
    return machine


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
