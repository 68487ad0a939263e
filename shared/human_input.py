"""A run that waits for a human: the record kept server-side, and the answer's way in. No I/O.

How this works. When Dify's run reaches a Human Input node it sends ``human_input_required``
(with the form's ``form_token``), then ``workflow_paused``, and ends the stream. The worker keeps
a :class:`Pause` in the request bucket (``<key>.pause``) *before* the client sees the form: the
job itself, the form and its token (which never leaves the worker side), and ``continued``,
how many times the job was put back. Then it acks the job: the request stays open with no Dify
stream and no worker task, across restarts of every process.

An ``input`` frame reaches one worker as an :class:`InputRequest` (request/reply,
``tw.ctl.input``). The request key is a hash of (user, id), so another user's ``input`` names a
key with no pause: ``not_found``, and nothing reaches Dify. The worker asks Dify whether the
form is still open (``GET /form/human_input/{token}``: ``form_expired``, ``form_submitted``),
keeps the answer in the record and puts the job back. The pause moves through a small table,
each move a compare-and-set on the record, so that of an answer and a stop only one puts the
job back::

    waiting ──answer──► answered      the answer is kept; the job is put back (``continued``
       │                               + 1) to follow the run
       └────stop──────► stopping      the job is put back; its delivery stops the run at Dify

The copy that follows first opens the run's event stream (``continue_on_pause=true``), and only
then submits the kept answer (``POST /form/human_input/{token}`` as the request's user): Dify
replays a run's events only while it runs (a finished run gives its ``workflow_finished``
alone), so the follower is listening before the run moves on. A form that expired is
followed too (Dify went on without the answer). If the run pauses again, the follower writes a
fresh ``waiting`` record.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Final

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.exceptions import InternalError, TokenwireError, error_from_wire, error_to_wire
from shared.jobs import Job

__all__ = [
    "PAUSE_TRANSITIONS",
    "IllegalPauseMove",
    "InputRequest",
    "Pause",
    "PauseState",
    "decode_input_reply",
    "input_reply",
]


class PauseState(StrEnum):
    WAITING = "waiting"
    ANSWERED = "answered"
    STOPPING = "stopping"


#: state -> {move -> next state}; a move missing from a row is illegal there.
PAUSE_TRANSITIONS: Final[Mapping[PauseState, Mapping[str, PauseState]]] = {
    PauseState.WAITING: {"answer": PauseState.ANSWERED, "stop": PauseState.STOPPING},
    PauseState.ANSWERED: {},
    PauseState.STOPPING: {},
}


class IllegalPauseMove(InternalError):
    """A move the pause's state does not allow (the caller lost a race, or a bug)."""


class Pause(BaseModel):
    """What the request bucket keeps of a run waiting for a human."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    state: PauseState = PauseState.WAITING
    job: Job
    form_id: str
    form_token: str
    node_id: str | None = None
    expiration_time: int | None = None
    workflow_run_id: str | None = None
    task_id: str | None = None
    #: How many copies of the job were put back so far (the next one is ``continued + 1``).
    continued: int = 0
    #: The human's answer (``inputs``, ``action``), kept until the follower submits it.
    answer: dict[str, Any] | None = None

    def move(self, move: str, answer: dict[str, Any] | None = None) -> Pause:
        target = PAUSE_TRANSITIONS[self.state].get(move)
        if target is None:
            raise IllegalPauseMove(f"a pause in state {self.state.value} cannot take {move!r}")
        return self.model_copy(update={"state": target, "answer": answer})

    def answer_for(self, job: Job) -> dict[str, Any] | None:
        """The answer ``job`` (the copy put back after it) must submit, if any."""
        if self.state is PauseState.ANSWERED and job.continued == self.continued + 1:
            return self.answer
        return None

    def next_job(self) -> Job:
        """The copy of the job that follows the run Dify continues."""
        return self.job.model_copy(update={"continued": self.continued + 1})

    def next_msg_id(self) -> str:
        """Its JetStream ``Nats-Msg-Id``: put back twice, it is still stored once."""
        return f"{self.job.key}.c{self.continued + 1}"

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_bytes(cls, data: bytes) -> Pause | None:
        """The record, or None for anything that is not one."""
        try:
            return cls.model_validate(orjson.loads(data))
        except (orjson.JSONDecodeError, ValidationError):
            return None


class InputRequest(BaseModel):
    """An ``input`` frame on its way to a worker: the user-scoped request key, never the id
    alone."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    key: str
    form_id: str
    action: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    trace_id: str = ""

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_bytes(cls, data: bytes) -> InputRequest:
        return cls.model_validate(orjson.loads(data))


def input_reply(error: TokenwireError | None = None) -> bytes:
    """A worker's reply to an :class:`InputRequest`: ``{}`` (the answer was kept) or
    ``{"error": …}`` in the catalogue's wire form (:func:`~shared.exceptions.error_to_wire`)."""
    return b"{}" if error is None else orjson.dumps({"error": error_to_wire(error)})


def decode_input_reply(data: bytes) -> TokenwireError | None:
    """The error a worker replied with (code and retry hint kept), or None."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return InternalError("a worker's reply to an answer is not JSON")
    error = obj.get("error") if isinstance(obj, dict) else None
    if error is None:
        return None
    if not isinstance(error, dict):
        return InternalError("a worker's reply to an answer is malformed")
    return error_from_wire(error)
