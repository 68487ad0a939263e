"""The worker's pump: takes one delivery of a job, asks the core what to do, carries it out.

How this works. :meth:`JobRunner.run` holds the job (in-progress acks, the lease:
``worker/lease.py``) while :meth:`JobRunner._deliver` gathers the facts — the frames kept so
far, Dify's recorded ids, a recorded stop — and lets :func:`shared.delivery.plan` pick the first
move. Every later question is the core's too: :func:`~shared.delivery.judge_stream` says what
the end of Dify's stream means, :func:`~shared.delivery.after_unavailable` decides retry or
dead letter, and :class:`~shared.delivery.RequestFrames` stamps the worker's own frames through
the request's state table. The delivery ends in a :class:`~shared.delivery.Settlement`:

* **answered** — the request closed with exactly one ``end`` or ``error``: ack.
* **retry later** — Dify could not be reached (refused, timeout before the first byte, 429,
  5xx) or this worker's circuit is open: the client gets ``queued`` and the job goes back to
  JetStream with a delay (nak). Past ``job_max_attempts`` or ``job_max_age_s`` it is
  dead-lettered instead and closed with ``upstream_unavailable``.
* **recovered** — Dify had already started this answer (its ids recorded before ``start`` was
  sent) when the stream broke or the previous worker died: the answer is read from Dify's
  history (``worker/recovery.py``) instead of asking twice; only if that fails is the request
  ``reset`` and asked again.
* **handed back** (draining) or **left alone** (another delivery took the lease).
* **waiting for a human** — a workflow run paused at a Human Input node: its form (with the
  token) is kept in the request bucket before the client sees it (``worker/human_input.py``)
  and the job is acked; answering the form puts a copy of the job back (``continued``), whose
  delivery *follows* the run (``GET /workflow/{run_id}/events``) on the same request.

Which endpoint a job goes to is its app's kind (``worker/apps.py``: Dify's ``/info``, cached):
``wrong_app_kind`` and ``unknown_app`` close the request before Dify is asked; an app with
``max_active`` has its own line first (:class:`~worker.waiting_line.AppLine`). A delivery
that finds a workflow run id recorded follows that run instead of starting it again (a dead
worker's run, or one a human answered); a stream cut mid-run is sent back to be followed.

The rest lives next door: asking Dify and racing the stop in ``worker/streaming.py``, the
stream slots and the waiting line in ``worker/waiting_line.py``, publishing and making sure the
frames were kept in ``worker/publishing.py``, the operators' view in ``worker/status.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

from shared.apps import DEFAULT_APP, AppKind, Route
from shared.breaker import BreakerState, CircuitBreaker
from shared.coalesce import Coalescer
from shared.delivery import (
    ACK,
    HAND_BACK,
    LEAVE,
    RESET_RECOVERY_FAILED,
    Action,
    DeadLetter,
    JobStatus,
    Kept,
    Outcome,
    Plan,
    RequestFrames,
    RetryPolicy,
    Settle,
    Settlement,
    StreamEnd,
    after_unavailable,
    final_outcome,
    judge_stream,
    plan,
    settlement_after_failure,
)
from shared.dify_api import DifyIds
from shared.exceptions import (
    BusRetryable,
    CircuitOpen,
    DifyStreamCut,
    DifyUnavailable,
    InternalError,
    TokenwireError,
)
from shared.frames import Fence, encode
from shared.human_input import Pause, PauseState
from shared.jobs import Job
from shared.logs import trace_id_var
from shared.mapping import DifyStreamMapper, PendingForm
from shared.settings import Settings
from shared.sse import SSEEvent
from worker import metrics
from worker.apps import AppKinds
from worker.human_input import HumanInput
from worker.lease import Lease
from worker.ownership import Ownership
from worker.publishing import Publisher
from worker.recovery import HistoryReader
from worker.status import StatusBoard
from worker.streaming import StreamOpener, stream_answer
from worker.types import Bus, DifyApi, JobMessage, RunEventsApi
from worker.waiting_line import BUSY_REFRESH_S, AppLine, WaitingLine

__all__ = ["JobRunner", "Running"]

log = logging.getLogger("tokenwire.worker")


@dataclass(slots=True)
class Running:
    """One delivery this worker is carrying out."""

    job: Job
    lease: Lease
    publisher: Publisher
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    handback: asyncio.Event = field(default_factory=asyncio.Event)
    #: Where the job goes at Dify (None: a chat at ``/chat-messages``, as before apps).
    route: Route | None = None
    #: The run paused for a human: the request stays open, the job is acked.
    waiting: bool = False
    #: This delivery's attempt (JetStream's delivery count plus operator replays).
    attempt: int = 1


#: How often a redelivery reads and tries to store its fence before it sends the job back
#: (each failure means a frame was kept meanwhile: the older delivery is still publishing).
_FENCE_TRIES: Final = 50
_FENCE_RETRY_S: Final = 0.1

#: A run whose event stream keeps breaking (or that Dify cannot serve for now) is followed
#: up to this many deliveries (of ``TOKENWIRE_JOB_MAX_ATTEMPTS``), then fails with that error.
FOLLOW_ATTEMPTS: Final = 30


class _FollowLater(InternalError):
    """A workflow run's stream broke mid-run: send the job back, its next delivery follows the
    run (``/workflow/{id}/events``) after the frames kept so far."""


class JobRunner:
    def __init__(
        self,
        bus: Bus,
        dify: DifyApi,
        settings: Settings,
        *,
        worker_id: str = "worker",
        breaker: CircuitBreaker | None = None,
        kinds: AppKinds | None = None,
        human: HumanInput | None = None,
        events: RunEventsApi | None = None,
        app_lines: dict[str, AppLine] | None = None,
    ) -> None:
        self.bus = bus
        self.dify = dify
        self.settings = settings
        # Apps (worker/apps.py) and runs waiting for a human (worker/human_input.py); without
        # them (unit tests of chats) every job is a chat of the default app.
        self.kinds = kinds
        self.human = human
        self.events = events
        self.app_lines = app_lines or {}
        self.heartbeat_s = max(settings.job_ack_wait_s / 3, 0.5)
        self.breaker = breaker or CircuitBreaker(
            threshold=settings.breaker_threshold,
            cooldown_s=settings.breaker_cooldown_s,
            max_cooldown_s=settings.retry_max_s,
        )
        self.policy = RetryPolicy(
            max_attempts=settings.job_max_attempts,
            max_age_s=settings.job_max_age_s,
            base_s=settings.retry_base_s,
            max_s=settings.retry_max_s,
        )
        self.line = WaitingLine(settings.worker_concurrency)
        self.history = HistoryReader(
            dify, timeout_s=settings.recovery_timeout_s, poll_s=settings.recovery_poll_s
        )
        self.status = StatusBoard(bus, worker_id)
        self.running: dict[str, Running] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        # Who owns the uploaded files a job names (worker/ownership.py); None: not checked.
        self.owners: Ownership | None = None

    def request_stop(self, key: str) -> bool:
        """Stop request ``key`` if this worker runs it; returns whether it does."""
        running = self.running.get(key)
        if running is None:
            return False
        running.stop.set()
        return True

    # --- one delivery ---------------------------------------------------------------------

    async def run(self, job: Job, msg: JobMessage, *, delivered: int = 1) -> None:
        """Handle one delivery of ``job``: answer, retry later, or recover. Never raises."""
        metrics.job_received(delivered)
        if self.draining:
            # Shutting down: leave it to another worker at once.
            with contextlib.suppress(Exception):
                await msg.nack(delay=0)
            metrics.job_finished(Outcome.HANDED_BACK.value)
            return
        if delivered == 1:
            metrics.observe_queue_wait(time.time() - job.created_ms / 1000)
        trace = trace_id_var.set(job.trace_id)
        running = Running(
            job,
            Lease(self.bus, job.key, check_s=self.settings.lease_check_s),
            Publisher(self.bus, job.reply),
        )
        self.running[job.key] = running
        self._idle.clear()
        holding = asyncio.create_task(running.lease.hold(msg, self.heartbeat_s))
        work = asyncio.create_task(self._deliver(running, delivered))
        lost = asyncio.create_task(running.lease.lost.wait())
        handback = asyncio.create_task(running.handback.wait())
        settlement = ACK
        try:
            await asyncio.wait({work, lost, handback}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                settlement = work.result()
            else:
                running.publisher.close()
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
                if running.lease.lost.is_set():
                    _fenced_out(None, running.lease.gen)
                    settlement = LEAVE  # the message belongs to the newer delivery now
                else:
                    log.info("draining: job handed back to another worker")
                    settlement = HAND_BACK
        finally:
            running.publisher.close()  # not one more frame (and no timer) from this delivery
            lost.cancel()
            handback.cancel()
            holding.cancel()
            if self.running.get(job.key) is running:
                del self.running[job.key]
            if not self.running:
                self._idle.set()
            with contextlib.suppress(Exception):
                await _settle(msg, settlement)
            metrics.job_finished(final_outcome(settlement, running.publisher.outcome).value)
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

    async def _deliver(self, running: Running, delivered: int) -> Settlement:
        """One delivery's work, to its settlement. Never raises."""
        job = running.job
        attempt = running.attempt = delivered + job.replay
        redelivered = delivered > 1 or bool(job.replay) or bool(job.continued)
        try:
            waiting = False
            if redelivered:  # a run (or a chatflow) may wait for a human: then it is not ours
                waiting = await self._still_waiting(job)
            if redelivered:
                fenced = await self._fence(running, await running.lease.take())
                if fenced is None:
                    return LEAVE  # a newer delivery fenced this one out already
                kept, ids, stop_recorded = fenced
                stop_recorded = stop_recorded and (not kept.closed or bool(job.replay))
            else:
                # A first delivery: nothing kept yet; only a stop sent before it ran can matter
                # (read before Dify is asked: a stopped chat never reaches Dify).
                kept, ids = Kept(), None
                stop_recorded = await self.bus.stop_recorded(job.key)
            if stop_recorded:
                running.stop.set()
            first = plan(
                kept,
                ids,
                replay=bool(job.replay),
                stop_requested=running.stop.is_set(),
                waiting=waiting and kept.waiting,
            )
            if first.action in (Action.CLOSED, Action.WAIT):
                return ACK  # closed (or paused) by an earlier delivery that died before its ack
            # The operators' record goes alongside the answer, not before its first token.
            report = asyncio.create_task(self.status.report(job, JobStatus.RUNNING, attempt))
            log.info("job started", extra={"attempt": attempt, "conn": job.conn})
            frames = RequestFrames(job.id, kept)
            running.publisher.coalescer = Coalescer(
                kept.last_seq, interval_s=self.settings.coalesce_ms / 1000
            )
            try:
                unavailable = await self._carry_out(first, running, frames, kept, ids)
            finally:
                await report  # never raises (best effort), and lands before the next status
            settlement = ACK
            if unavailable is not None:
                settlement = await self._retry_or_dead_letter(running, frames, unavailable, attempt)
            await running.publisher.ensure_kept()
            if settlement.settle is Settle.ACK and unavailable is None:
                done = JobStatus.WAITING if running.waiting else JobStatus.DONE
                await self.status.report(job, done, attempt)  # dead stays dead
            return settlement
        except InternalError as exc:
            # NATS blinked (restart, leader change): nothing is lost if the job goes back;
            # the next delivery continues from the frames kept so far.
            log.warning("job sent back: tokenwire could not finish it", extra={"error": str(exc)})
            return settlement_after_failure(exc)
        except Exception as exc:
            log.exception("job failed inside tokenwire; sent back")
            return settlement_after_failure(exc)

    async def _fence(self, running: Running, gen: int) -> tuple[Kept, DifyIds | None, bool] | None:
        """Read where the request stands and store this delivery's fence right after the
        frames read (shared/sequencing.py); from then on only this generation's frames count.
        Returns the kept state, Dify's ids and whether a stop is recorded; None when a newer
        delivery's fence is there (this one must not publish at all)."""
        job = running.job
        for _ in range(_FENCE_TRIES):
            # The reads a redelivery needs, at once (one round trip, not three).
            (frames, last), ids, stop_recorded = await asyncio.gather(
                self.bus.read_kept(job.reply),
                self.bus.load_ids(job.key),
                self.bus.stop_recorded(job.key),
            )
            kept = Kept.of(frames)
            ids = ids if frames else None
            if kept.gen > gen:
                _fenced_out(kept.gen, gen)
                return None
            if kept.gen == gen:  # ours is kept already (its acknowledgement was lost)
                break
            fence = encode(Fence(id=job.id, gen=gen, after=kept.last_seq))
            try:
                if await self.bus.publish_fence(job.reply, fence, last):
                    break
            except BusRetryable as exc:
                log.info("fence not confirmed yet", extra={"error": str(exc)})
            # Another frame was kept since the read (the older delivery still publishes, or
            # the fence went in unacknowledged): read again.
            await asyncio.sleep(_FENCE_RETRY_S)
        else:
            raise InternalError("could not fence the older delivery out; sent back")
        running.publisher.gen = gen
        log.info("fence kept", extra={"gen": gen, "after": kept.last_seq})
        return kept, ids, stop_recorded

    async def _carry_out(
        self,
        first: Plan,
        running: Running,
        frames: RequestFrames,
        kept: Kept,
        ids: DifyIds | None,
    ) -> DifyUnavailable | None:
        """Carry out the plan; returns why Dify was unavailable, if it was, for a retry."""
        job, publish = running.job, running.publisher.publish
        if first.action is Action.STOP:
            running.route = self.kinds.cached(job) if self.kinds is not None else None
            await self._stop_at_dify(running, ids)
            mapper = DifyStreamMapper(
                job.id, frames.seq, frames.machine, workflow=_is_workflow(running.route), ids=ids
            )
            await publish(mapper.stopped())
            return None
        try:
            running.route = await self._route(job)
        except DifyUnavailable as exc:
            return exc
        except TokenwireError as exc:  # unknown_app, wrong_app_kind, a key Dify refuses
            log.info("request refused", extra={"code": exc.code.value, "error": str(exc)})
            await publish([frames.error(exc)])
            return None
        follow = first.action is Action.FOLLOW and ids is not None and self.events is not None
        mapper = DifyStreamMapper(
            job.id,
            frames.seq,
            frames.machine,
            workflow=_is_workflow(running.route),
            ids=ids if follow else None,
            skip_events=kept.part_events if follow and not kept.waiting else 0,
            skip_text=kept.part_text if follow and not kept.waiting else 0,
            skip_pause=follow and kept.waiting,
            held=kept.answer if follow else None,
        )
        reset = first.reset
        if first.action is Action.RECOVER:
            assert ids is not None, "plan() recovers only with recorded ids"
            if await self._recover(running, frames, ids, held=kept.answer):
                return None
            reset = RESET_RECOVERY_FAILED
        if reset is not None:
            await publish([frames.reset(reset, reopen=first.reopen)])
        refused = await self.owners.check_files(job) if self.owners is not None else None
        if refused is not None:
            # A file this user did not upload through tokenwire: not_found, before Dify.
            log.info("request refused", extra={"code": refused.code.value})
            await publish([frames.error(refused)])
            return None
        if not self.breaker.allow(time.monotonic()):
            return CircuitOpen("Dify is unavailable (circuit open)")
        # This request is the half-open probe: however it ends, the breaker must hear of it.
        probe = self.breaker.probe_out

        async def tell_position(position: int) -> None:
            queued = frames.queued(
                "busy", attempt=1, retry_in_ms=int(BUSY_REFRESH_S * 1000), position=position
            )
            await publish([queued])
            metrics.job_queued("busy")

        opener: StreamOpener | None = None
        if follow:
            assert ids is not None and ids.workflow_run_id and self.events is not None
            opener = await self._follower(job, ids.workflow_run_id, self.events)

        app_line = self.app_lines.get(job.app or DEFAULT_APP)
        try:
            async with contextlib.AsyncExitStack() as holding:
                if app_line is not None:
                    await holding.enter_async_context(app_line.slot(job, tell_position))
                await holding.enter_async_context(self.line.slot(job, tell_position))
                return await self._ask(running, frames, mapper, opener)
        finally:
            if probe and self.breaker.probe_out:
                self.breaker.release()  # stopped or cancelled before Dify said anything

    async def _ask(
        self,
        running: Running,
        frames: RequestFrames,
        mapper: DifyStreamMapper,
        opener: StreamOpener | None = None,
    ) -> DifyUnavailable | None:
        job = running.job
        asked = await stream_answer(
            self.dify,
            self.bus,
            running.publisher,
            job,
            mapper,
            running.stop,
            route=running.route,
            open_stream=opener,
            on_forms=self._form_keeper(job, mapper) if self.human is not None else None,
        )
        if self.kinds is not None:
            self.kinds.saw(job, asked.error)
        await self._record_run(job, mapper)
        if not asked.stopped and asked.error is None and mapper.paused and not mapper.machine.done:
            running.waiting = True
            log.info("run waits for a human; the job is acked")
        if asked.stopped:
            if mapper.started:  # Dify answered before the stop: it is up
                self.breaker.success()
                metrics.set_breaker_open(False)
            return None
        if (
            isinstance(asked.error, DifyStreamCut | DifyUnavailable)
            and mapper.workflow_run_id
            and self.events is not None
            and running.attempt < min(FOLLOW_ATTEMPTS, self.settings.job_max_attempts)
            and (mapper.started or isinstance(asked.error, DifyStreamCut))
        ):
            raise _FollowLater("the run's stream broke mid-run; its events are followed next")
        verdict = judge_stream(asked.error, started=mapper.started, message_id=mapper.message_id)
        if verdict.dify_up:
            self.breaker.success()
        else:
            self.breaker.failure(time.monotonic())
        metrics.set_breaker_open(self.breaker.state is not BreakerState.CLOSED)
        if verdict.end is StreamEnd.ANSWERED:
            return None
        if verdict.end is StreamEnd.UNAVAILABLE:
            assert isinstance(verdict.error, DifyUnavailable)
            return verdict.error
        assert verdict.error is not None
        if asked.error is verdict.error:
            metrics.dify_error(verdict.error.code.value)
        if verdict.end is StreamEnd.RECOVER:
            log.info("Dify's stream broke mid-answer; recovering from history")
            ids = DifyIds(mapper.task_id, mapper.message_id, mapper.conversation_id)
            if await self._recover(running, frames, ids, held=mapper.answer):
                return None
        if asked.error is not verdict.error:
            log.error("unexpected error while streaming", exc_info=asked.error)
        log.info(
            "request failed",
            extra={"code": verdict.error.code.value, "error": str(verdict.error)},
        )
        await running.publisher.publish(mapper.fail(verdict.error))
        return None

    async def _route(self, job: Job) -> Route | None:
        """Where ``job`` goes (None: a chat at ``/chat-messages``)."""
        if self.kinds is None:
            return None
        route = await self.kinds.route(job)
        return None if route.kind is AppKind.CHAT and job.kind == "chat" else route

    async def _follower(self, job: Job, run_id: str, events: RunEventsApi) -> StreamOpener:
        """Opens the run's event stream; when a human's answer is kept for this copy of the
        job, it is submitted once the stream listens (Dify's replay ends with the run)."""
        pending = await self.human.pending_answer(job) if self.human is not None else None
        human = self.human

        @contextlib.asynccontextmanager
        async def follow() -> AsyncIterator[AsyncIterator[list[SSEEvent]]]:
            async with events.stream_run_events(
                run_id, job.user, trace_id=job.trace_id, app=job.app
            ) as reads:
                if pending is not None and human is not None:
                    await human.submit(*pending)
                yield reads

        return follow

    async def _record_run(self, job: Job, mapper: DifyStreamMapper) -> None:
        """A workflow run this user started through tokenwire: ``runs.get`` may read it (Dify
        lets any user of the app read any run). Best effort: a failure only hides the run."""
        if self.owners is None or not mapper.workflow_run_id or job.continued:
            return
        try:
            await self.owners.record("run", mapper.workflow_run_id, job.user)
        except TokenwireError as exc:
            log.warning("cannot record the run's owner", extra={"error": str(exc)})

    async def _still_waiting(self, job: Job) -> bool:
        """Whether this very copy of the job paused its run and nobody answered yet."""
        if self.human is None:
            return False
        loaded = await self.human.runs.load_pause(job.key)
        pause = Pause.from_bytes(loaded[0]) if loaded is not None else None
        return (
            pause is not None
            and pause.state is PauseState.WAITING
            and pause.continued == job.continued
        )

    def _form_keeper(self, job: Job, mapper: DifyStreamMapper) -> Any:
        human = self.human
        assert human is not None

        async def keep(forms: list[PendingForm]) -> None:
            await human.keep(job, mapper.ids(), forms)

        return keep

    async def _stop_at_dify(self, running: Running, ids: DifyIds | None) -> None:
        """A stop found recorded: a run Dify has (one that waited for a human, or whose
        worker died) is stopped there too, with the same user; best effort."""
        route, job = running.route, running.job
        if ids is None or not ids.task_id or route is None or not route.one_shot:
            return
        metrics.stop_acted()
        try:
            await self.dify.stop(
                ids.task_id, job.user, trace_id=job.trace_id, app=job.app, route=route
            )
        except TokenwireError as exc:
            log.warning("Dify stop call failed", extra={"error": str(exc)})

    async def _recover(
        self, running: Running, frames: RequestFrames, ids: DifyIds, *, held: str
    ) -> bool:
        """Finish the client's answer from Dify's stored message; False if that cannot be done."""
        message = await self.history.wait(running.job, ids, running.stop)
        if message is None:
            return False
        out = frames.from_history(message, held=held, ids=ids, stopped=running.stop.is_set())
        if out is None:
            return False
        await running.publisher.publish(out)
        log.info("answer recovered from Dify's history", extra={"chars": len(message.answer)})
        return True

    async def _retry_or_dead_letter(
        self, running: Running, frames: RequestFrames, cause: DifyUnavailable, attempt: int
    ) -> Settlement:
        job = running.job
        decision = after_unavailable(
            cause,
            attempt=attempt,
            age_s=time.time() - job.created_ms / 1000,
            policy=self.policy,
            breaker_wait_s=self.breaker.retry_in(time.monotonic()),
        )
        if isinstance(decision, DeadLetter):
            await self.bus.dead_letter(job, decision.error, attempt)
            running.publisher.outcome = Outcome.DEAD_LETTERED
            await self.status.report(job, JobStatus.DEAD, attempt, error=str(cause))
            await running.publisher.publish([frames.error(decision.error)])
            log.warning("job dead-lettered", extra={"attempts": attempt, "error": str(cause)})
            return ACK
        metrics.job_queued(cause.code.value)
        metrics.dify_error(cause.code.value)
        queued = frames.queued(
            decision.reason, attempt=attempt, retry_in_ms=int(decision.delay_s * 1000)
        )
        await running.publisher.publish([queued])
        await self.status.report(job, JobStatus.QUEUED, attempt, error=str(cause))
        log.info(
            "Dify unavailable; job sent back",
            extra={"attempt": attempt, "delay_s": round(decision.delay_s, 2)},
        )
        return Settlement(Settle.NAK, decision.delay_s)


def _fenced_out(newer: int | None, gen: int) -> None:
    """This delivery found a newer one of its job: it publishes nothing more and leaves the
    message alone (whatever it still sent is dropped by every reader: its generation is
    older)."""
    metrics.fenced()
    log.warning(
        "fenced: a newer delivery owns this request; stopping without ack",
        extra={"gen": gen, "newer_gen": newer if newer is not None else "?"},
    )


def _is_workflow(route: Route | None) -> bool:
    return route is not None and route.kind is AppKind.WORKFLOW


async def _settle(msg: JobMessage, settlement: Settlement) -> None:
    if settlement.settle is Settle.ACK:
        await msg.ack()
    elif settlement.settle is Settle.NAK:
        await msg.nack(delay=settlement.delay_s)
