"""The life of one request, as a state machine with an explicit transition table.

How this works: every frame of a request moves its state (``FRAME_TO_STATE``); the table
``TRANSITIONS`` lists which moves are legal. The worker runs its outgoing frames through a
:class:`RequestMachine` before publishing, so "exactly one ``end`` or ``error`` per request" and
"no ``delta`` after ``end``" are enforced in one place rather than hoped for in each handler::

    accepted ──► queued ◄──┐
       │  │        │       │ (retry after an outage)
       │  └────────┼──► started ──► ended | failed
       │           │       │
       │           └──►  reset ──► queued | started          (a worker died; answered again)
       └──────────────────────────► ended | failed           (stopped or refused before start)
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from shared.exceptions import InternalError

__all__ = [
    "FRAME_TO_STATE",
    "TERMINAL",
    "TRANSITIONS",
    "IllegalTransition",
    "RequestMachine",
    "RequestState",
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

TRANSITIONS: Final[dict[RequestState, frozenset[RequestState]]] = {
    S.ACCEPTED: frozenset({S.QUEUED, S.STARTED, S.RESET, S.ENDED, S.FAILED}),
    S.QUEUED: frozenset({S.QUEUED, S.STARTED, S.RESET, S.ENDED, S.FAILED}),
    S.STARTED: frozenset({S.STARTED, S.RESET, S.ENDED, S.FAILED}),
    S.RESET: frozenset({S.QUEUED, S.STARTED, S.ENDED, S.FAILED}),
    S.ENDED: frozenset(),
    S.FAILED: frozenset(),
}

# delta, replace and event keep a started request started (STARTED -> STARTED).
FRAME_TO_STATE: Final[dict[str, RequestState]] = {
    "accepted": S.ACCEPTED,
    "queued": S.QUEUED,
    "start": S.STARTED,
    "delta": S.STARTED,
    "replace": S.STARTED,
    "event": S.STARTED,
    "reset": S.RESET,
    "end": S.ENDED,
    "error": S.FAILED,
}


class IllegalTransition(InternalError):
    """A frame that the request's state does not allow: a bug in tokenwire, never sent."""


class RequestMachine:
    """Tracks one request's state from the frames it emits."""

    __slots__ = ("state",)

    def __init__(self, state: RequestState = S.ACCEPTED) -> None:
        self.state = state

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def can_emit(self, frame_type: str) -> bool:
        target = FRAME_TO_STATE.get(frame_type)
        if target is None:
            return False
        if frame_type in ("delta", "replace", "event"):
            return self.state is S.STARTED
        return target in TRANSITIONS[self.state]

    def emit(self, frame_type: str) -> None:
        """Move on by one frame, or raise :class:`IllegalTransition`."""
        if not self.can_emit(frame_type):
            raise IllegalTransition(f"{frame_type!r} is not allowed in state {self.state.value}")
        self.state = FRAME_TO_STATE[frame_type]
