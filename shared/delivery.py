"""What one delivery of a job does, decided from plain facts. No I/O, no clock, no asyncio.

How this works. A job can reach a worker many times (a worker died, drained, or Dify was down),
so each delivery first finds out where the request stands and then asks this module what to do.
``worker/runner.py`` gathers the facts, calls these functions, and carries out their answers:

1. :meth:`Kept.of` folds the frames earlier deliveries published (what the client may hold),
   in the stream's order and by the generation rule (shared/sequencing.py: a fenced
   delivery's frames do not count), into the request's state, its last ``seq``, the answer
   so far and the newest generation kept.
2. :func:`plan` picks the first move from that, Dify's recorded ids, the replay flag and a
   recorded stop::

       closed already (not replayed) ─────────────► CLOSED   ack, publish nothing
       stop recorded ─────────────────────────────► STOP     end (stopped), never ask Dify
       a run waits for a human (not put back) ────► WAIT     ack: the pause record holds it
       Dify runs a workflow for it (run id kept) ─► FOLLOW   read the run's events again
       Dify began it (ids + start kept) ──────────► RECOVER  finish from Dify's history
       Dify began it, no start kept ──────────────► ASK after reset "recovery_failed"
       the client holds part of an older answer ──► ASK after reset "retry" / "replayed"
       replayed after it closed ──────────────────► ASK after reset "replayed" (reopens it)
       otherwise ─────────────────────────────────► ASK

3. :func:`judge_stream` says what the end of Dify's stream means: answered, unavailable
   (nothing started: retry later), cut after Dify began (recover), or failed.
4. :func:`after_unavailable` decides retry-with-backoff (the breaker's wait first) or
   dead-letter, from the attempt count and the job's age.
5. :class:`RequestFrames` stamps every frame the worker itself writes (``queued``, ``reset``,
   ``error``, the end recovered from history), each through the request's
   :class:`~shared.state.RequestMachine`, so the transition table sees every frame.
6. :class:`Settlement` is how the job's message ends (:class:`Settle`), and :class:`Outcome`
   what the delivery counts as in ``tokenwire_worker_jobs_total``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, Final

from shared.breaker import backoff_s
from shared.dify_api import DifyIds, HistoryMessage
from shared.exceptions import (
    CircuitOpen,
    DifyStreamCut,
    DifyUnavailable,
    ErrorCode,
    InternalError,
    TokenwireError,
)
from shared.frames import Delta, End, ErrorFrame, Queued, Replace, Reset, ServerFrame, error_frame
from shared.sequencing import Generations, SeqCounter, Verdict
from shared.state import TERMINAL, RequestMachine, RequestState, rebuild

__all__ = [
    "ACK",
    "HAND_BACK",
    "LEAVE",
    "RESET_RECOVERY_FAILED",
    "RESET_REPLAYED",
    "RESET_RETRY",
    "Action",
    "DeadLetter",
    "JobStatus",
    "Kept",
    "Outcome",
    "Plan",
    "RequestFrames",
    "Retry",
    "RetryPolicy",
    "Settle",
    "Settlement",
    "StreamEnd",
    "StreamVerdict",
    "after_unavailable",
    "final_outcome",
    "judge_stream",
    "outcome_after",
    "plan",
    "settlement_after_failure",
    "status_record",
]

#: Reasons of the ``reset`` frames a worker sends.
RESET_RECOVERY_FAILED: Final = "recovery_failed"
RESET_RETRY: Final = "retry"
RESET_REPLAYED: Final = "replayed"


# --- 1. where the request stands ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kept:
    """A request as its kept frames show it: state, last ``seq``, answer so far."""

    state: RequestState = RequestState.ACCEPTED
    last_seq: int = 1  # the gateway's ``accepted`` is seq 1
    answer: str = ""
    #: The last kept frame is the run's ``workflow_paused``: it waits for a human.
    waiting: bool = field(default=False, compare=False)
    #: What the client holds of the run's current part (since its last pause): ``event``
    #: frames and characters of text. Dify's ``/workflow/{id}/events`` replays that part.
    part_events: int = field(default=0, compare=False)
    part_text: int = field(default=0, compare=False)

    #: The highest generation whose fence is kept (0: only the first delivery published).
    gen: int = field(default=0, compare=False)

    @classmethod
    def of(cls, frames: Iterable[Mapping[str, Any]]) -> Kept:
        """Fold kept frames, given in the frames stream's order, by the generation rule
        (:class:`~shared.sequencing.Generations`: a fenced delivery's frames do not count),
        each seq once, in seq order (a frame kept twice, or kept out of order after a leader
        change, counts once and in its place). Only the run of seqs without a gap counts: a
        reader releases nothing past a missing seq, so the next delivery continues there."""
        generations = Generations()
        by_seq: dict[int, Mapping[str, Any]] = {}
        for frame in frames:
            kind = str(frame.get("type"))
            seq = frame.get("after" if kind == "fence" else "seq")
            gen = frame.get("gen", 0)
            if not isinstance(seq, int) or not _is_int(seq) or not _is_int(gen):
                continue
            verdict = generations.offer(kind, gen, seq)
            if verdict is Verdict.FENCE:
                by_seq = {s: f for s, f in by_seq.items() if s <= seq}
            elif verdict is Verdict.COUNTS:
                by_seq.setdefault(seq, frame)
        last = 1  # the gateway's ``accepted``, kept or not
        while last + 1 in by_seq:
            last += 1
        ordered = [by_seq[seq] for seq in range(2, last + 1)]
        machine = rebuild(str(f.get("type")) for f in ordered)
        waiting, events, text = _part_of(ordered)
        return cls(machine.state, last, _answer_of(ordered), waiting, events, text, generations.gen)

    @property
    def closed(self) -> bool:
        return self.state in TERMINAL


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _part_of(frames: list[Mapping[str, Any]]) -> tuple[bool, int, int]:
    """(waiting, events, text) of the run's current part, the one Dify's
    ``/workflow/{id}/events`` replays: from the run's start, or from the event that resumed it
    after its last pause (``human_input_form_filled`` or ``_timeout``)."""
    waiting = False
    events = text = 0
    for frame in frames:
        kind = frame.get("type")
        if kind == "event" and frame.get("event") in _RESUMING_EVENTS:
            events = text = 0
        if kind == "event":
            events += 1
        elif kind == "delta":
            text += len(str(frame.get("text", "")))
        elif kind in ("replace", "reset"):
            events = text = 0  # answered again from the start (never within a run's part)
        waiting = kind == "event" and frame.get("event") == "workflow_paused"
    return waiting, events, text


_RESUMING_EVENTS: Final = frozenset({"human_input_form_filled", "human_input_form_timeout"})


def _answer_of(frames: Iterable[Mapping[str, Any]]) -> str:
    text = ""
    for frame in frames:
        kind = frame.get("type")
        if kind == "delta":
            text += str(frame.get("text", ""))
        elif kind == "replace":
            text = str(frame.get("text", ""))
        elif kind == "reset":
            text = ""
    return text


# --- 2. the first move --------------------------------------------------------------------


class Action(Enum):
    CLOSED = "closed"  # an earlier delivery closed the request and died before its ack
    STOP = "stop"  # the client stopped it before this delivery ran
    WAIT = "wait"  # the run waits for a human: nothing to do until the form is answered
    FOLLOW = "follow"  # Dify runs a workflow for it: read the run's events (continue it)
    RECOVER = "recover"  # Dify is answering it already: read the answer from its history
    ASK = "ask"  # ask Dify (after ``Plan.reset``, when set)


@dataclass(frozen=True, slots=True)
class Plan:
    action: Action
    #: The reason of a ``reset`` to send before asking Dify (the client holds a partial answer).
    reset: str | None = None
    #: The request had closed and an operator replayed it: the reset reopens it.
    reopen: bool = False


def plan(
    kept: Kept,
    ids: DifyIds | None,
    *,
    replay: bool,
    stop_requested: bool,
    waiting: bool = False,
) -> Plan:
    """The first move of a delivery. ``ids``: what Dify named the request in an earlier
    delivery (None if it never began); ``replay``: an operator put the job back after it was
    dead-lettered, so its earlier end does not count; ``waiting``: this copy of the job paused
    the run for a human, and nobody answered yet."""
    if kept.closed and not replay:
        return Plan(Action.CLOSED)
    if stop_requested:
        return Plan(Action.STOP)
    if waiting and not replay:
        return Plan(Action.WAIT)  # the worker that paused it died before its ack
    if ids is not None and ids.workflow_run_id and not replay:
        # Dify runs it and keeps every event of the run: follow it instead of running it twice.
        return Plan(Action.FOLLOW)
    if ids is not None and ids.message_id and not replay:
        # Dify began this answer and keeps generating without its client: asking again would
        # bill twice and put two answers in the conversation.
        if kept.state is RequestState.STARTED and ids.conversation_id:
            return Plan(Action.RECOVER)
        return Plan(Action.ASK, reset=RESET_RECOVERY_FAILED)
    if kept.closed:  # only when replayed: the dead letter's error does not count
        return Plan(Action.ASK, reset=RESET_REPLAYED, reopen=True)
    if kept.state is RequestState.STARTED:
        return Plan(Action.ASK, reset=RESET_REPLAYED if replay else RESET_RETRY)
    return Plan(Action.ASK)


# --- 3. what the end of Dify's stream means ------------------------------------------------


class StreamEnd(Enum):
    ANSWERED = "answered"  # the mapper closed the request (end, in-band error, stopped)
    UNAVAILABLE = "unavailable"  # Dify could not be reached and nothing started: retry later
    RECOVER = "recover"  # the stream broke after Dify began: finish from its history
    FAIL = "fail"  # close the request with ``error``


@dataclass(frozen=True, slots=True)
class StreamVerdict:
    end: StreamEnd
    #: Whether the stream showed Dify up (the breaker's success) or down (its failure).
    dify_up: bool
    #: What to fail with (for RECOVER: if recovery fails; for UNAVAILABLE: the cause).
    error: TokenwireError | None = None


def judge_stream(
    error: BaseException | None, *, started: bool, message_id: str | None
) -> StreamVerdict:
    """Dify's stream ended with ``error`` (None: normally). ``started``: Dify began answering
    (a ``start`` went out); ``message_id``: the id it gave the answer, if any."""
    if error is None:
        return StreamVerdict(StreamEnd.ANSWERED, dify_up=True)
    if isinstance(error, DifyUnavailable) and not started:
        return StreamVerdict(StreamEnd.UNAVAILABLE, dify_up=False, error=error)
    if isinstance(error, DifyStreamCut) and message_id:
        return StreamVerdict(StreamEnd.RECOVER, dify_up=True, error=error)
    if not isinstance(error, TokenwireError):
        error = InternalError("tokenwire failed while streaming the answer")
    return StreamVerdict(StreamEnd.FAIL, dify_up=True, error=error)


# --- 4. retry or dead-letter ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    max_age_s: float
    base_s: float
    max_s: float


@dataclass(frozen=True, slots=True)
class Retry:
    """Send the job back for ``delay_s``; the client hears ``queued`` with ``reason``."""

    delay_s: float
    reason: str
    cause: DifyUnavailable


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Keep the job in the dead-letter stream and close the request with ``error``."""

    error: DifyUnavailable
    cause: DifyUnavailable


def after_unavailable(
    cause: DifyUnavailable,
    *,
    attempt: int,
    age_s: float,
    policy: RetryPolicy,
    breaker_wait_s: float,
    rng: random.Random | None = None,
) -> Retry | DeadLetter:
    """Dify was unavailable before the answer started. ``breaker_wait_s``: seconds until the
    breaker lets the next probe through (0 while it is closed): every waiting job comes due
    then; with the breaker closed, exponential backoff by attempt."""
    if attempt >= policy.max_attempts or age_s >= policy.max_age_s:
        final = DifyUnavailable(
            f"Dify stayed unavailable ({attempt} attempts, {age_s:.0f} s): {cause.message}",
            code=ErrorCode.UPSTREAM_UNAVAILABLE,
        )
        return DeadLetter(final, cause)
    delay = breaker_wait_s or backoff_s(attempt, policy.base_s, policy.max_s, rng)
    reason = "circuit_open" if isinstance(cause, CircuitOpen) else cause.code.value
    return Retry(delay, reason, cause)


# --- 5. the frames the worker writes itself -----------------------------------------------


class RequestFrames:
    """Stamps a request's own frames with the next ``seq``, each through its state machine.

    The :class:`~shared.mapping.DifyStreamMapper` of the same delivery shares ``seq`` and
    ``machine``, so the frames mapped from Dify and these form one sequence and one state.
    """

    __slots__ = ("machine", "request_id", "seq")

    def __init__(self, request_id: str, kept: Kept) -> None:
        self.request_id = request_id
        self.seq = SeqCounter(kept.last_seq)
        self.machine = RequestMachine(kept.state)

    def queued(
        self, reason: str, *, attempt: int, retry_in_ms: int, position: int | None = None
    ) -> Queued:
        self.machine.emit("queued")
        return Queued(
            id=self.request_id,
            seq=self.seq.next(),
            reason=reason,
            attempt=attempt,
            retry_in_ms=retry_in_ms,
            position=position,
        )

    def reset(self, reason: str, *, reopen: bool = False) -> Reset:
        """``reopen``: the request had closed and is replayed (see ``RequestMachine.reopen``)."""
        if reopen:
            self.machine.reopen()
        else:
            self.machine.emit("reset")
        return Reset(id=self.request_id, seq=self.seq.next(), reason=reason)

    def error(self, exc: TokenwireError) -> ErrorFrame:
        self.machine.emit("error")
        return error_frame(exc, id=self.request_id, seq=self.seq.next())

    def from_history(
        self, message: HistoryMessage, *, held: str, ids: DifyIds, stopped: bool
    ) -> list[ServerFrame] | None:
        """The frames that finish the answer the client holds (``held``) from Dify's stored
        ``message``: the missing tail as a ``delta`` (or a ``replace`` when the stored answer
        does not continue what the client holds), then ``end``. None when the history cannot
        finish it (Dify failed it, or no ``start`` went out), so the caller asks again."""
        if not message.finished or message.failed:
            return None
        if self.machine.state is not RequestState.STARTED:
            return None
        frames: list[ServerFrame] = []
        if message.answer.startswith(held):
            rest = message.answer[len(held) :]
            if rest:
                self.machine.emit("delta")
                frames.append(Delta(id=self.request_id, seq=self.seq.next(), text=rest))
        else:
            self.machine.emit("replace")
            frames.append(Replace(id=self.request_id, seq=self.seq.next(), text=message.answer))
        self.machine.emit("end")
        frames.append(
            End(
                id=self.request_id,
                seq=self.seq.next(),
                conversation_id=ids.conversation_id,
                message_id=ids.message_id,
                usage=None,
                retriever_resources=message.retriever_resources,
                stopped=message.stopped or stopped,
            )
        )
        return frames


# --- 6. how the delivery ends ----------------------------------------------------------------


class Settle(Enum):
    """What happens to the job's JetStream message."""

    ACK = "ack"  # done with: the request closed (or was dead-lettered)
    NAK = "nak"  # back to JetStream, redelivered after the delay
    LEAVE = "leave"  # not ours any more: a newer delivery owns it (lease lost)


@dataclass(frozen=True, slots=True)
class Settlement:
    settle: Settle
    delay_s: float = 0.0


ACK: Final = Settlement(Settle.ACK)
HAND_BACK: Final = Settlement(Settle.NAK, 0.0)
LEAVE: Final = Settlement(Settle.LEAVE)


def settlement_after_failure(exc: BaseException) -> Settlement:
    """tokenwire itself failed mid-delivery: send the job back; the next delivery continues
    from the frames kept so far. A NATS blink comes back soon; a bug is given a little more."""
    return Settlement(Settle.NAK, 1.0 if isinstance(exc, InternalError) else 2.0)


class Outcome(StrEnum):
    """The ``outcome`` label of ``tokenwire_worker_jobs_total``."""

    COMPLETED = "completed"
    STOPPED = "stopped"
    ERROR = "error"
    HANDED_BACK = "handed_back"
    DEAD_LETTERED = "dead_lettered"
    DROPPED = "dropped"


def outcome_after(current: Outcome, frame: ServerFrame) -> Outcome:
    """The delivery's outcome once ``frame`` is published (a dead letter stays one)."""
    if isinstance(frame, End):
        return Outcome.STOPPED if frame.stopped else Outcome.COMPLETED
    if isinstance(frame, ErrorFrame) and current is not Outcome.DEAD_LETTERED:
        return Outcome.ERROR
    return current


def final_outcome(settlement: Settlement, answered: Outcome) -> Outcome:
    """What the delivery counts as: a job sent back was handed back, one left alone dropped."""
    if settlement.settle is Settle.NAK:
        return Outcome.HANDED_BACK
    if settlement.settle is Settle.LEAVE:
        return Outcome.DROPPED
    return answered


class JobStatus(StrEnum):
    """The job's state for operators (``tokenwire jobs``), kept in the request bucket."""

    RUNNING = "running"
    QUEUED = "queued"
    WAITING = "waiting"  # a run waiting for a human: no worker holds it
    DONE = "done"
    DEAD = "dead"


def status_record(
    state: JobStatus, *, attempt: int, worker: str, now_ms: int, error: str | None = None
) -> dict[str, Any]:
    return {
        "state": state.value,
        "attempts": attempt,
        "last_error": error,
        "worker": worker,
        "updated_ms": now_ms,
    }
