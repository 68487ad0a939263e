"""The life of one request, as a state machine with an explicit transition table.

How this works: ``TRANSITIONS`` maps each state to the frame kinds it allows and the state each
one leads to, as h11's ``_state.py`` does; nothing else decides. The worker runs every outgoing
frame through a :class:`RequestMachine` before publishing, so "exactly one ``end`` or
``error`` per request", "no ``delta`` before ``start`` or after ``end``" and "one ``start`` per
answer" are enforced in one place rather than hoped for in each handler::

    accepted ──► queued ◄──┐
       │  │        │       │ (retry after an outage, waiting for a stream)
       │  └────────┼──► started ──► ended | failed
       │           │       │  ▲ delta, replace, event
       │           │       │  └─┘
       │           └──►  reset ──► queued | started          (answered again from the start)
       └──────────────────────────► ended | failed           (stopped or refused before start)

The gateway stamps ``accepted`` itself: a machine starts in ``accepted`` (:func:`rebuild` skips
that frame when it rebuilds a request's state from its kept frames).

One move is not a frame's: an operator may put a dead-lettered request back
(``tokenwire jobs replay``), and :meth:`RequestMachine.reopen` takes it from ``ended`` or
``failed`` to ``reset`` — the ``reset`` frame that follows tells the client the request is
answered again. Nothing else leaves a terminal state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Final

from shared.exceptions import InternalError

__all__ = [
    "FRAME_KINDS",
    "FRAME_TO_STATE",
    "TERMINAL",
    "TRANSITIONS",
    "IllegalTransition",
    "RequestMachine",
    "RequestState",
    "rebuild",
]


class RequestState(Enum):
    ACCEPTED = "accepted"
    QUEUED = "queued"
    STARTED = "started"
    RESET = "reset"
    ENDED = "ended"
    FAILED = "failed"


S = RequestState
TERMINAL: Final = frozenset({S.ENDED, S.FAILED})

# state -> {frame kind -> next state}. A kind missing from a state's row is illegal there.
TRANSITIONS: Final[Mapping[RequestState, Mapping[str, RequestState]]] = {
    S.ACCEPTED: {
        "queued": S.QUEUED,
        "start": S.STARTED,
        "reset": S.RESET,
        "end": S.ENDED,
        "error": S.FAILED,
    },
    S.QUEUED: {
        "queued": S.QUEUED,
        "start": S.STARTED,
        "reset": S.RESET,
        "end": S.ENDED,
        "error": S.FAILED,
    },
    S.STARTED: {
        "delta": S.STARTED,
        "replace": S.STARTED,
        "event": S.STARTED,
        "reset": S.RESET,
        "end": S.ENDED,
        "error": S.FAILED,
    },
    S.RESET: {
        "queued": S.QUEUED,
        "start": S.STARTED,
        "end": S.ENDED,
        "error": S.FAILED,
    },
    S.ENDED: {},
    S.FAILED: {},
}

#: Every frame kind that belongs to a request, in the order of the protocol's table.
FRAME_KINDS: Final = (
    "accepted",
    "queued",
    "start",
    "delta",
    "replace",
    "event",
    "reset",
    "end",
    "error",
)

#: The state a frame kind leads to, wherever it is legal (each kind leads to one state).
FRAME_TO_STATE: Final[Mapping[str, RequestState]] = {"accepted": S.ACCEPTED} | {
    kind: target for row in TRANSITIONS.values() for kind, target in row.items()
}


class IllegalTransition(InternalError):
    """A frame that the request's state does not allow: a bug in tokenwire, never sent."""

    def __init__(self, state: RequestState, frame_type: str) -> None:
        super().__init__(f"{frame_type!r} is not allowed in state {state.value}")
        self.state = state
        self.frame_type = frame_type


class RequestMachine:
    """Tracks one request's state from the frames it emits."""

    __slots__ = ("state",)

    def __init__(self, state: RequestState = S.ACCEPTED) -> None:
        self.state = state

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def can_emit(self, frame_type: str) -> bool:
        return frame_type in TRANSITIONS[self.state]

    def emit(self, frame_type: str) -> None:
        """Move on by one frame, or raise :class:`IllegalTransition`."""
        try:
            self.state = TRANSITIONS[self.state][frame_type]
        except KeyError:
            raise IllegalTransition(self.state, frame_type) from None

    def reopen(self) -> None:
        """A closed request was replayed by an operator: it starts over with a ``reset``."""
        if not self.done:
            raise IllegalTransition(self.state, "reset (reopen)")
        self.state = S.RESET


def rebuild(kinds: Iterable[str]) -> RequestMachine:
    """The machine after frames an earlier delivery published, in seq order.

    ``accepted`` is the state a machine starts in, and a ``reset`` after the request closed is
    a replay's reopening. A kept frame the table refuses cannot come from a worker that ran its
    frames through a machine; it is skipped rather than trusted.
    """
    machine = RequestMachine(S.ACCEPTED)
    for kind in kinds:
        if kind == "reset" and machine.done:
            machine.reopen()
        elif kind != "accepted" and machine.can_emit(kind):
            machine.emit(kind)
    return machine
