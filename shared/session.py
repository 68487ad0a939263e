"""One browser connection as a sans-I/O session: inputs in, commands out, no I/O and no clock.

How this works, in the way of ``websockets``' ``Protocol`` and h11's ``Connection``: the pump
(``gateway/connection.py``) owns the socket, NATS and the timer. It feeds the session what
happened, and carries out the commands each call returns, in order:

* **inputs**: a client frame (:meth:`Session.receive_client`), a request's frame from the bus
  (:meth:`~Session.receive_bus`), the result of an I/O the session asked for (rate checked, job
  stored or not, request looked up, replay started or failed, token verified), the clock
  (:meth:`~Session.tick`, with ``now`` passed in, never read) and the socket's fate (the send
  queue overflowed, the client left, the close went out);
* **commands** (:data:`Command`): :class:`Send` bytes to the client, :class:`CheckRate`,
  :class:`StoreJob`, :class:`PublishFrame`, :class:`RequestStop`, :class:`LookUp`,
  :class:`StartReplay` / :class:`StopReplay`, :class:`VerifyToken`,
  :class:`SubscribeConnection` / :class:`Unsubscribe`, :class:`CheckCallRate`,
  :class:`CallWorker`, :class:`Close`, plus :class:`Tally` (a metric) and :class:`Log` (a
  log line) so that what is counted is decided here too.

A ``call`` is checked here first (its method and params, :func:`shared.calls.build_request`:
``unknown_method`` and ``bad_params`` cost no rate and reach no worker), then spends one of
the user's call tokens (:class:`CheckCallRate`, its own rate in the same family as chats),
then goes to a worker (:class:`CallWorker`: the pump sends it in the background and feeds
back :meth:`Session.call_answered` or :meth:`~Session.call_failed`). It is answered by exactly
one ``result`` or ``error`` with its ``id`` and no ``seq``; nothing of it is kept.

A ``chat`` takes one token from the connection's frame bucket (like every frame), must fit the
in-flight caps (per connection here, per user as the pump reports it) and the user's rate
(:class:`CheckRate`), then becomes a stored job (:class:`StoreJob`) and ``accepted`` (seq 1).
Each request's frames pass through its :class:`~shared.sequencing.Reorderer`, so the client
gets each seq exactly once, in order; frames waiting behind a missing one for
:data:`GAP_WAIT_S` (core NATS lost it) or a NATS reconnect make the session read the request
back from the frames stream (:class:`StartReplay`). A ``resume`` replays a request's kept
frames; a ``chat`` that JetStream already holds is answered the same way. A replay that cannot
start fails its request with the (retryable) error and leaves nothing behind: no request view,
no count of a replay that never ran.

The connection's own state is a transition table, as h11's ``_state.py`` has: each state lists
the events it allows and where each leads (:data:`CONNECTION_TRANSITIONS`)::

    open ──close──► draining ──flushed──► closing ──close_sent──► closed
      │                │                     ▲  ▲                   ▲
      │                └──────abandon────────┘  │                   │
      ├──────────────────abandon────────────────┘                   │
      └──────────────client_left (also from draining and closing)───┘

``draining``: the close is decided; what is queued (the ``error`` that explains it) still goes
out, nothing new is sent. ``abandon`` skips that: a client that does not read (4101) gets no
more time. ``closing``: the close frame is on its way. ``closed``: the socket is gone. Any
other event raises :class:`IllegalConnectionTransition`; asking to close a connection that is
already closing is not an event (the first close wins).
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Any, Final

import orjson

from shared.calls import build_request
from shared.exceptions import (
    ClientError,
    CloseCode,
    DuplicateRequest,
    ErrorCode,
    Forbidden,
    IdleTimeout,
    InternalError,
    LimitExceeded,
    RateLimited,
    TokenExpired,
    TokenwireError,
    TooBusy,
    Unauthorized,
    UnknownRequest,
)
from shared.frames import (
    Accepted,
    AuthFrame,
    CallFrame,
    ChatFrame,
    ClientLimits,
    Hello,
    InputFrame,
    PingFrame,
    Pong,
    Result,
    ResumeFrame,
    RunFrame,
    StopFrame,
    decode_client_frame,
    encode,
    error_frame,
    peek_frame,
)
from shared.jobs import Job
from shared.ratelimit import BucketState, Rate, take
from shared.sequencing import Generations, Reorderer, SequenceGap, Verdict
from shared.subjects import request_frames, request_key

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = [
    "CONNECTION_TRANSITIONS",
    "FEATURES",
    "GAP_WAIT_S",
    "SERVER_NAME",
    "CallWorker",
    "CheckCallRate",
    "CheckRate",
    "Close",
    "Command",
    "ConnectionEvent",
    "ConnectionState",
    "IllegalConnectionTransition",
    "Log",
    "LookUp",
    "Metric",
    "PublishFrame",
    "ReplayPurpose",
    "RequestStop",
    "RequestView",
    "Send",
    "Session",
    "SessionConfig",
    "SessionError",
    "StartReplay",
    "StopReplay",
    "StoreJob",
    "StreamPosition",
    "SubmitInput",
    "SubscribeConnection",
    "Tally",
    "Unsubscribe",
    "VerifyToken",
    "error_bytes",
    "peek_request_id",
]

SERVER_NAME: Final = "tokenwire/0.1"
#: What ``hello.features`` announces: the parts of protocol v1's second part this gateway
#: serves (``call``, ``files``, and ``run``/``input``: one-shot apps and human input).
FEATURES: Final[tuple[str, ...]] = ("call", "files", "run", "input")
# How long frames may wait behind a missing one before the request is read from the stream.
GAP_WAIT_S: Final = 1.0
# The longest pause between attempts to read a request back while JetStream cannot answer.
CATCH_UP_MAX_DELAY_S: Final = 5.0
# The retry hint of a resume whose replay NATS could not start (the client resumes again).
REPLAY_RETRY_S: Final = 1.0
# How many JSON tokens of an oversize frame are looked at for its id (a bounded peek).
PEEK_TOKENS: Final = 256
_TERMINAL_KINDS: Final = frozenset({"end", "error"})


# --- errors -------------------------------------------------------------------------------


class SessionError(InternalError):
    """The session was fed something out of turn: a bug in tokenwire, never the client's."""


class IllegalConnectionTransition(SessionError):
    """A move of the connection's state that :data:`CONNECTION_TRANSITIONS` does not allow."""


# --- the connection's state ---------------------------------------------------------------


class ConnectionState(Enum):
    OPEN = "open"
    DRAINING = "draining"
    CLOSING = "closing"
    CLOSED = "closed"


class ConnectionEvent(Enum):
    CLOSE = "close"  # a close is decided; queued frames still go out
    ABANDON = "abandon"  # a close is decided; nothing queued is worth waiting for
    FLUSHED = "flushed"  # the queued frames went out (or their time ran out)
    CLOSE_SENT = "close_sent"  # the close frame went out (or the socket ended meanwhile)
    CLIENT_LEFT = "client_left"  # the socket ended from the client's side


C = ConnectionState
E = ConnectionEvent
CONNECTION_TRANSITIONS: Final[dict[ConnectionState, dict[ConnectionEvent, ConnectionState]]] = {
    C.OPEN: {E.CLOSE: C.DRAINING, E.ABANDON: C.CLOSING, E.CLIENT_LEFT: C.CLOSED},
    C.DRAINING: {E.FLUSHED: C.CLOSING, E.ABANDON: C.CLOSING, E.CLIENT_LEFT: C.CLOSED},
    C.CLOSING: {E.CLOSE_SENT: C.CLOSED, E.CLIENT_LEFT: C.CLOSED},
    C.CLOSED: {},
}


# --- commands -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Queue ``data`` (one server frame of type ``kind``) for the client."""

    data: bytes
    kind: str


@dataclass(frozen=True, slots=True)
class Close:
    """Stop reading; let what is queued out if ``flush``; then close the socket with ``code``."""

    code: CloseCode
    flush: bool


@dataclass(frozen=True, slots=True)
class SubscribeConnection:
    """Hear this connection's frames; answer :meth:`Session.subscribed` or ``subscribe_failed``.

    The gateway hears all its connections on one subscription: the pump registers this one
    with it (``gateway/router.py``), which fails only before that subscription exists."""

    conn_id: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Stop hearing this connection's frames (the pump unregisters it: no NATS call)."""


@dataclass(frozen=True, slots=True)
class CheckRate:
    """Spend one of the user's chat tokens; answer :meth:`Session.rate_checked`."""

    request_id: str


@dataclass(frozen=True, slots=True)
class CheckCallRate:
    """Spend one of the user's call tokens; answer :meth:`Session.call_rate_checked`."""

    request_id: str


@dataclass(frozen=True, slots=True)
class CallWorker:
    """Send the call to a worker (in the background: a call never holds the reader up);
    answer :meth:`Session.call_answered` or :meth:`Session.call_failed`."""

    request_id: str
    method: str
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SubmitInput:
    """Hand a human's answer to the form request ``key`` waits on to a worker; answer
    :meth:`Session.input_answered` (``error`` None: the run continues on the request)."""

    request_id: str
    key: str
    form_id: str
    action: str
    inputs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StoreJob:
    """Store the job durably; answer :meth:`Session.job_stored` or ``store_failed``."""

    job: Job


@dataclass(frozen=True, slots=True)
class PublishFrame:
    """Keep a frame the gateway stamped itself (``accepted``) with the request's others;
    a failure changes nothing (the client already has it)."""

    subject: str
    data: bytes


@dataclass(frozen=True, slots=True)
class RequestStop:
    """Stop the request ``key`` at its worker; a failure is answered with ``stop_failed``."""

    key: str


@dataclass(frozen=True, slots=True)
class LookUp:
    """Whether any frame of ``key`` is kept; answer :meth:`Session.looked_up` or
    ``lookup_failed``."""

    request_id: str
    key: str


@dataclass(frozen=True, slots=True)
class StartReplay:
    """Read ``key``'s kept frames, then its live rest, into :meth:`Session.receive_bus`;
    answer :meth:`Session.replay_started` or ``replay_failed`` with ``serial``."""

    serial: int
    request_id: str
    key: str


@dataclass(frozen=True, slots=True)
class StopReplay:
    """End the replay ``serial`` (a no-op if it never started or already ended)."""

    serial: int


@dataclass(frozen=True, slots=True)
class VerifyToken:
    """Check a fresh token; answer :meth:`Session.token_verified` or ``token_refused``."""

    token: str


class Metric(StrEnum):
    """The gateway metrics a session counts (``gateway/metrics.py`` has the families)."""

    OPENED = "opened"
    CLOSED = "closed"
    FRAME_IN = "frame_in"
    REFUSAL = "refusal"
    ACCEPTED = "accepted"
    FINISHED = "finished"
    TTFT = "ttft"
    RESUME = "resume"
    STALE = "stale"  # a fenced (older) delivery's frame, dropped


@dataclass(frozen=True, slots=True)
class Tally:
    """Count one event of ``metric`` with ``label`` (or observe ``value`` seconds)."""

    metric: Metric
    label: str = ""
    value: float = 1.0


@dataclass(frozen=True, slots=True)
class Log:
    """A log line: a logging level, the message, and extra fields."""

    level: int
    message: str
    fields: tuple[tuple[str, str], ...] = ()


Command = (
    Send
    | Close
    | SubscribeConnection
    | Unsubscribe
    | CheckRate
    | CheckCallRate
    | CallWorker
    | StoreJob
    | SubmitInput
    | PublishFrame
    | RequestStop
    | LookUp
    | StartReplay
    | StopReplay
    | VerifyToken
    | Tally
    | Log
)


# --- configuration and request views ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """What a session needs of the settings."""

    limits: ClientLimits = field(default_factory=ClientLimits)
    max_inflight_per_connection: int = 32
    max_inflight_per_user: int = 64
    frame_rate: str = "50/s"
    frame_burst: int = 200
    idle_timeout_s: float = 300.0
    reorder_window: int = 1024
    # With TOKENWIRE_AUTH=none there is no token to refresh: `auth` frames are ignored.
    requires_token: bool = True
    # hello.features (see FEATURES).
    features: tuple[str, ...] = FEATURES
    # Where workers send this connection's frames: this gateway process's subjects, the
    # request's partition of the frames store (shared/subjects.py).
    gateway_id: str = "gateway"
    frame_partitions: int = 1

    @classmethod
    def from_settings(
        cls, settings: Settings, *, requires_token: bool, gateway_id: str
    ) -> SessionConfig:
        return cls(
            limits=ClientLimits(
                max_frame_bytes=settings.max_frame_bytes,
                max_query_chars=settings.max_query_chars,
                max_inputs_bytes=settings.max_inputs_bytes,
                max_inputs_depth=settings.max_inputs_depth,
                max_files=settings.max_files,
            ),
            max_inflight_per_connection=settings.max_inflight_per_connection,
            max_inflight_per_user=settings.max_inflight_per_user,
            frame_rate=settings.frame_rate,
            frame_burst=settings.frame_burst,
            idle_timeout_s=settings.idle_timeout_s,
            reorder_window=settings.reorder_window,
            requires_token=requires_token,
            gateway_id=gateway_id,
            frame_partitions=settings.frame_partitions,
        )


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """Where a frame from the bus sits in the frames stream (its stream sequence ``seq``).

    ``previous`` is the stream sequence of the request subject's message before it, for a
    frame of the live path (the stream's republish: ``Nats-Last-Sequence``); None for a frame
    of a replay (an ordered consumer, gapless by construction). With it the session reads each
    request's frames exactly in the stream's order, once, whichever way they come."""

    seq: int
    previous: int | None = None


class ReplayPurpose(Enum):
    RESUME = "resume"  # the client asked for it
    DUPLICATE = "duplicate"  # a chat JetStream already held: answered from its kept frames
    CATCH_UP = "catch_up"  # frames were lost on the way: read them back


@dataclass(slots=True)
class RequestView:
    """What this connection knows of one of its requests."""

    id: str
    key: str
    reorderer: Reorderer[tuple[bytes, str]]
    # A chat whose job is being stored (frames may already arrive: they wait for seq 1).
    storing: bool = False
    # The replay running or being started, and why.
    replay: int | None = None
    purpose: ReplayPurpose | None = None
    # True until the first replayed frame arrives: it tells whether the kept frames still
    # reach back to what the client holds.
    awaiting_first: bool = False
    # A catch-up that did not stop at "the late frame came after all" (a reconnect, a retry).
    catch_up_always: bool = False
    catch_up_delay: float = GAP_WAIT_S
    # When `accepted` went out, until the first `delta` (time to first token).
    accepted_at: float | None = None
    # The stream sequence of the last frame read (0: none yet), and the generation rule
    # applied to the frames in that order (shared/sequencing.py).
    stream_seq: int = 0
    generations: Generations = field(default_factory=Generations)
    # The seq a ``resume`` said the client holds (its replay starts at the stream's start, so
    # fences older than that come by: what the client holds is not this view's doing).
    resumed_after: int = 0
    stale_seen: bool = False


# --- helpers ------------------------------------------------------------------------------


def error_bytes(exc: TokenwireError, *, id: str | None = None, seq: int | None = None) -> bytes:
    """The wire bytes of the ``error`` frame for ``exc`` (with its ``retry_after_ms`` hint)."""
    return encode(error_frame(exc, id=id, seq=seq))


_SKIP = re.compile(rb'[^"{}\[\]]*')
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_COLON_STRING = re.compile(rb'\s*:\s*("(?:[^"\\]|\\.)*")')
_ID = re.compile(r"[\x21-\x7e]{1,128}")


def peek_request_id(data: bytes | str) -> str | None:
    """The top-level ``"id"`` of a frame too large to parse, when a bounded look can find it.

    Strings are skipped whole (a ``"id"`` inside a query is not a key) and nesting is counted
    (an ``id`` in ``inputs`` is not the request's); at most :data:`PEEK_TOKENS` tokens are
    looked at, so a hostile frame costs little. None when the id is not found or not valid.
    """
    raw = data.encode() if isinstance(data, str) else data
    depth = pos = 0
    for _ in range(PEEK_TOKENS):
        pos = _SKIP.match(raw, pos).end()  # type: ignore[union-attr]  # always matches
        if pos >= len(raw):
            return None
        char = raw[pos : pos + 1]
        if char in (b"{", b"["):
            depth += 1
            pos += 1
            continue
        if char in (b"}", b"]"):
            depth -= 1
            pos += 1
            continue
        string = _STRING.match(raw, pos)
        if string is None:
            return None  # a string cut short: nothing after it can be read
        pos = string.end()
        if depth == 1 and string.group() == b'"id"':
            value = _COLON_STRING.match(raw, pos)
            if value is None:
                continue
            try:
                rid = orjson.loads(value.group(1))
            except orjson.JSONDecodeError:
                return None
            return rid if isinstance(rid, str) and _ID.fullmatch(rid) else None
    return None


_CALL_TYPE = re.compile(rb'"type"\s*:\s*"call"')


def _is_call(data: bytes | str, code: ErrorCode) -> bool:
    """Whether a refused frame is a ``call`` (its error then has no ``seq``): read whole when
    it is JSON that failed validation, looked at (a bounded search) when it is too large."""
    raw = data.encode() if isinstance(data, str) else data
    if code is ErrorCode.FRAME_TOO_LARGE:
        return bool(_CALL_TYPE.search(raw, 0, 512))
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and obj.get("type") == "call"


def _outcome(data: bytes, kind: str) -> str:
    """How a request ended, for the requests_total metric (a byte search, no JSON parse)."""
    if kind == "error":
        return "error"
    return "stopped" if b'"stopped":true' in data else "completed"


def _trace_id() -> str:
    return secrets.token_hex(8)


@functools.lru_cache(maxsize=8)
def _frame_rate(text: str, burst: float) -> Rate:
    """One Rate for every session of the same settings (it is immutable)."""
    return Rate.parse(text, burst)


# --- the session --------------------------------------------------------------------------


class Session:
    """One connection's protocol decisions; see the module docstring."""

    # Slotted: one per connection, mostly idle (no instance dict).
    __slots__ = (
        "_admitting",
        "_bucket",
        "_calls",
        "_catch_ups",
        "_inputs",
        "_new_trace_id",
        "_rate",
        "_replays",
        "_resolving",
        "_serials",
        "client_close_code",
        "close_code",
        "config",
        "conn_id",
        "expires_at",
        "last_activity",
        "opened",
        "requests",
        "state",
        "user",
    )

    def __init__(
        self,
        config: SessionConfig,
        *,
        conn_id: str,
        user: str,
        expires_at: float | None,
        now: float,
        new_trace_id: Callable[[], str] = _trace_id,
    ) -> None:
        self.config = config
        self.conn_id = conn_id
        self.user = user
        self.expires_at = expires_at
        self.state = ConnectionState.OPEN
        self.close_code: CloseCode | None = None
        self.client_close_code = 1005  # "no status": what the client sent, if it closed
        self.opened = False
        self.last_activity = now
        self.requests: dict[str, RequestView] = {}
        self._new_trace_id = new_trace_id
        self._rate = _frame_rate(config.frame_rate, config.frame_burst)
        self._bucket: BucketState | None = None
        # chats and runs waiting for their rate check
        self._admitting: dict[str, ChatFrame | RunFrame] = {}
        self._inputs: set[str] = set()  # request ids whose form answer a worker is handling
        self._calls: dict[str, CallFrame] = {}  # calls waiting for their rate check or answer
        self._resolving: dict[str, ResumeFrame] = {}  # resumes waiting for their look-up
        self._replays: dict[int, tuple[str, ReplayPurpose]] = {}  # serial -> (id, purpose)
        self._serials = itertools.count(1)
        self._catch_ups: dict[str, float] = {}  # request id -> when to read it back

    # --- what the pump asks -------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Requests in flight on this connection (for the per-user cap)."""
        return len(self.requests)

    def next_deadline(self) -> float | None:
        """When :meth:`tick` has something to do next (None: nothing is due ever)."""
        if self.state is not ConnectionState.OPEN:
            return None
        # Called after every input (the pump re-arms its timer): no allocation on the way.
        due = self.expires_at
        if not self.requests and not self._calls:
            idle = self.last_activity + self.config.idle_timeout_s
            due = idle if due is None else min(due, idle)
        if self._catch_ups:
            soonest = min(self._catch_ups.values())
            due = soonest if due is None else min(due, soonest)
        return due

    # --- the connection's life ----------------------------------------------------------

    def start(self) -> list[Command]:
        """The first command: hear this connection's frames."""
        return [SubscribeConnection(self.conn_id)]

    def subscribed(self) -> list[Command]:
        """The subscription is in place: the connection is open for the client."""
        if self.state is not ConnectionState.OPEN or self.opened:
            raise SessionError("subscribed() out of turn")
        self.opened = True
        hello = Hello(
            session=self.conn_id,
            user=self.user,
            server=SERVER_NAME,
            limits=self.config.limits.announced(),
            features=list(self.config.features),
        )
        return [Tally(Metric.OPENED), Send(encode(hello), "hello")]

    def subscribe_failed(self, exc: TokenwireError) -> list[Command]:
        """NATS would not let us hear the connection: say why, close with 4102."""
        return self.close(CloseCode.BUS_UNAVAILABLE, exc)

    def close(self, code: CloseCode, exc: TokenwireError | None = None) -> list[Command]:
        """Close with ``code``, after ``exc``'s error frame if given; once (later calls: no-op)."""
        if self.state is not ConnectionState.OPEN:
            return []
        out: list[Command] = []
        if exc is not None:
            out.append(self._error(exc))
        flush = code is not CloseCode.SLOW_CONSUMER
        self._move(E.CLOSE if flush else E.ABANDON)
        self.close_code = code
        out += self._detach()
        out.append(Close(code, flush))
        return out

    def fail(self) -> list[Command]:
        """The pump itself failed (a bug): close with 1011 unless a close is already on."""
        return self.close(CloseCode.INTERNAL_ERROR)

    def send_overflowed(self) -> list[Command]:
        """The send queue is full: the client does not read. Close 4101, waiting for nothing."""
        if self.state is ConnectionState.OPEN:
            return [
                Log(logging.WARNING, "slow consumer: closing"),
                *self.close(CloseCode.SLOW_CONSUMER),
            ]
        if self.state is ConnectionState.DRAINING:
            self._move(E.ABANDON)
            self.close_code = CloseCode.SLOW_CONSUMER
            return [Log(logging.WARNING, "slow consumer: closing")]
        return []

    def flushed(self) -> list[Command]:
        """What was queued went out (or could not in time): the close frame is next."""
        self._move(E.FLUSHED)
        return []

    def closed(self) -> list[Command]:
        """The close went out (or the socket ended while it did)."""
        self._move(E.CLOSE_SENT)
        return self._final_tallies()

    def client_left(self, code: int = 1005) -> list[Command]:
        """The socket ended from the client's side, with the client's close ``code``."""
        was_open = self.state is ConnectionState.OPEN
        self._move(E.CLIENT_LEFT)
        self.client_close_code = code
        out = self._detach() if was_open else []
        return out + self._final_tallies()

    # --- the clock ----------------------------------------------------------------------

    def tick(self, now: float) -> list[Command]:
        """The time is ``now``: the token's expiry (4002), idleness (4103), catch-ups."""
        if self.state is not ConnectionState.OPEN:
            return []
        if self.expires_at is not None and now >= self.expires_at:
            exc = TokenExpired("the token expired: send a fresh one in an auth frame before exp")
            return self.close(CloseCode.TOKEN_EXPIRED, exc)  # refresh the token, then resume
        idle = self.config.idle_timeout_s
        # Not idle while an answer streams; its end counts as activity.
        if not self.requests and not self._calls and now - self.last_activity >= idle:
            return self.close(
                CloseCode.IDLE_TIMEOUT,
                IdleTimeout(f"no activity for {idle:g} s: reconnect when needed"),
            )
        out: list[Command] = []
        for rid, at in list(self._catch_ups.items()):
            if at > now:
                continue
            del self._catch_ups[rid]
            view = self.requests.get(rid)
            if view is None or view.replay is not None:
                continue
            if not view.catch_up_always and not view.reorderer.waiting:
                continue  # the late frame came after all
            if view.catch_up_delay == GAP_WAIT_S:
                out.append(
                    Log(logging.WARNING, "frames missing: reading the request back from the stream")
                )
            out += self._start_replay(view, ReplayPurpose.CATCH_UP)
        return out

    # --- client frames ------------------------------------------------------------------

    def receive_client(
        self, data: str | bytes, now: float, *, user_inflight: int = 0
    ) -> list[Command]:
        """One client frame; ``user_inflight`` is the user's requests on this gateway now."""
        if self.state is not ConnectionState.OPEN:
            return []
        self.last_activity = now
        decision = take(self._rate, self._bucket, now)
        self._bucket = decision.state
        if not decision.allowed:
            return self._refuse_flood(data, decision.retry_after_s)
        try:
            frame = decode_client_frame(data, self.config.limits)
        except ClientError as exc:
            return self._refuse_frame(data, exc)
        out: list[Command] = [Tally(Metric.FRAME_IN, frame.type)]
        if isinstance(frame, ChatFrame | RunFrame):
            out += self._chat(frame, user_inflight)
        elif isinstance(frame, InputFrame):
            out += self._input(frame)
        elif isinstance(frame, StopFrame):
            out.append(RequestStop(request_key(self.user, frame.id)))
        elif isinstance(frame, ResumeFrame):
            out += self._resume(frame)
        elif isinstance(frame, PingFrame):
            out.append(Send(encode(Pong()), "pong"))
        elif isinstance(frame, AuthFrame) and self.config.requires_token:
            out.append(VerifyToken(frame.token))
        elif isinstance(frame, CallFrame):
            out += self._call(frame)
        return out

    # --- calls --------------------------------------------------------------------------

    def _call(self, frame: CallFrame) -> list[Command]:
        if frame.id in self._calls:
            dup = DuplicateRequest(f"call {frame.id!r} is already waiting for its answer")
            return [self._error(dup, frame.id)]
        try:
            build_request(frame.method, frame.params, self.user)  # refused here, before NATS
        except ClientError as refused:
            return [Tally(Metric.REFUSAL, "call"), self._error(refused, frame.id)]
        cap = self.config.max_inflight_per_connection
        if len(self._calls) >= cap:
            over = LimitExceeded(f"at most {cap} calls may wait for their answer at once")
            return [Tally(Metric.REFUSAL, "inflight_limit"), self._error(over, frame.id)]
        self._calls[frame.id] = frame
        return [CheckCallRate(frame.id)]

    def call_rate_checked(
        self, request_id: str, error: TokenwireError | None = None
    ) -> list[Command]:
        """The user's call rate said yes (``error`` None) or no."""
        frame = self._calls.get(request_id)
        if frame is None:
            raise SessionError(f"no call rate check was asked for {request_id!r}")
        if self.state is not ConnectionState.OPEN:
            self._calls.pop(request_id, None)
            return []
        if error is not None:
            del self._calls[request_id]
            tally = [Tally(Metric.REFUSAL, "rate_limit")] if isinstance(error, RateLimited) else []
            return [*tally, self._error(error, request_id)]
        return [CallWorker(request_id, frame.method, dict(frame.params))]

    def call_answered(self, request_id: str, data: dict[str, Any], now: float) -> list[Command]:
        """A worker answered the call: its one ``result``."""
        if self._calls.pop(request_id, None) is None:
            raise SessionError(f"no call {request_id!r} was sent")
        self.last_activity = now
        if self.state is not ConnectionState.OPEN:
            return []
        return [Send(encode(Result(id=request_id, data=data)), "result")]

    def call_failed(self, request_id: str, exc: TokenwireError, now: float) -> list[Command]:
        """The call failed (Dify refused it, no worker answered, …): its one ``error``."""
        if self._calls.pop(request_id, None) is None:
            raise SessionError(f"no call {request_id!r} was sent")
        self.last_activity = now
        if self.state is not ConnectionState.OPEN:
            return []
        return [self._error(exc, request_id)]

    def _holds(self, request_id: str) -> bool:
        return (
            request_id in self.requests
            or request_id in self._admitting
            or request_id in self._resolving
        )

    def _refuse_flood(self, data: str | bytes, wait: float) -> list[Command]:
        """Over the frame rate: refuse the frame (tied to its id when it is a new chat)."""
        exc = RateLimited(
            f"more than {self.config.frame_rate} frames on this connection", retry_after_s=wait
        )
        try:
            frame = decode_client_frame(data, self.config.limits)
        except ClientError:
            frame = None
        out: list[Command] = [Tally(Metric.REFUSAL, "rate_limit")]
        if isinstance(frame, ChatFrame | RunFrame) and not self._holds(frame.id):
            out.append(self._error(exc, frame.id, 1))
        elif isinstance(frame, CallFrame) and frame.id not in self._calls:
            out.append(self._error(exc, frame.id))  # the call's one answer (no seq)
        else:
            out.append(self._error(exc))
        return out

    def _refuse_frame(self, data: str | bytes, exc: ClientError) -> list[Command]:
        """A frame that cannot be read: an ``error`` and nothing else changes."""
        out: list[Command] = [Tally(Metric.FRAME_IN, "invalid"), Tally(Metric.REFUSAL, "frame")]
        rid = exc.request_id
        if rid is None and exc.code is ErrorCode.FRAME_TOO_LARGE:
            rid = peek_request_id(data)
        tied = exc.code in (ErrorCode.INVALID_FRAME, ErrorCode.FRAME_TOO_LARGE)
        if rid is not None and tied and _is_call(data, exc.code):
            # A call's one answer: its id, no seq (a waiting call of that id is untouched).
            out.append(self._error(exc, None if rid in self._calls else rid))
        elif rid is not None and tied and not self._holds(rid):
            # A request we refuse is one that ends at once: tie the error to its id, so the
            # client can fail it (a live request's seq is never disturbed).
            out.append(self._error(exc, rid, 1))
        else:
            out.append(self._error(exc))
        return out

    # --- human input ----------------------------------------------------------------------

    def _input(self, frame: InputFrame) -> list[Command]:
        """An answer to a form: the request key is the user's own, so another user's id names
        no request at all (``not_found`` from the worker, nothing reaches Dify)."""
        if frame.id in self._inputs:
            exc = DuplicateRequest(f"an answer to request {frame.id!r} is already on its way")
            return [self._error(exc, frame.id)]
        self._inputs.add(frame.id)
        key = request_key(self.user, frame.id)
        return [SubmitInput(frame.id, key, frame.form_id, frame.action, dict(frame.inputs))]

    def input_answered(
        self, request_id: str, now: float, error: TokenwireError | None = None
    ) -> list[Command]:
        """The worker submitted the answer (the run goes on in the request's own frames), or
        refused it: an ``error`` with the request's ``id`` and no ``seq`` (it does not end the
        request: a form that expired or was answered elsewhere leaves the run to Dify)."""
        self._inputs.discard(request_id)
        self.last_activity = now
        if self.state is not ConnectionState.OPEN:
            return []
        if error is None:
            return [Log(logging.INFO, "form answered")]
        return [self._error(error, request_id)]

    def _chat(self, frame: ChatFrame | RunFrame, user_inflight: int) -> list[Command]:
        if self._holds(frame.id):
            return [
                self._error(
                    DuplicateRequest(f"request {frame.id!r} is already running on this connection")
                )
            ]
        cap = self.config.max_inflight_per_connection
        if len(self.requests) >= cap:
            exc = LimitExceeded(f"at most {cap} requests may run at once")
            return [Tally(Metric.REFUSAL, "inflight_limit"), self._error(exc, frame.id, 1)]
        per_user = self.config.max_inflight_per_user
        if user_inflight >= per_user:
            exc = LimitExceeded(f"at most {per_user} requests of one user may run at once")
            return [Tally(Metric.REFUSAL, "inflight_limit"), self._error(exc, frame.id, 1)]
        self._admitting[frame.id] = frame
        return [CheckRate(frame.id)]

    def rate_checked(
        self, request_id: str, now: float, error: TokenwireError | None = None
    ) -> list[Command]:
        """The user's rate said yes (``error`` None) or no: store the job, or refuse it."""
        frame = self._admitting.pop(request_id, None)
        if frame is None:
            raise SessionError(f"no rate check was asked for {request_id!r}")
        if self.state is not ConnectionState.OPEN:
            return []
        if error is not None:
            out: list[Command] = []
            if isinstance(error, RateLimited):
                out.append(Tally(Metric.REFUSAL, "rate_limit"))
            out.append(self._error(error, frame.id, 1))
            return out
        key = request_key(self.user, frame.id)
        # Registered before the job is stored: the worker may answer before the ack returns.
        self.requests[frame.id] = RequestView(
            id=frame.id, key=key, reorderer=self._reorderer(1), storing=True
        )
        job = Job(
            key=key,
            id=frame.id,
            user=self.user,
            conn=self.conn_id,
            reply=self._reply_subject(key),
            kind=frame.type,
            query=frame.query,
            conversation_id=(
                (frame.conversation_id or None) if isinstance(frame, ChatFrame) else None
            ),
            inputs=frame.inputs,
            files=[f.model_dump(exclude_none=True) for f in frame.files],
            app=frame.app,
            trace_id=self._new_trace_id(),
            created_ms=int(now * 1000),
        )
        return [StoreJob(job)]

    def job_stored(self, request_id: str, now: float, *, duplicate: bool) -> list[Command]:
        """The job is stored; ``duplicate``: JetStream already held it (a chat re-sent)."""
        view = self.requests.get(request_id)
        if view is None or not view.storing:
            return []  # the request failed meanwhile (its error went out)
        view.storing = False
        if self.state is not ConnectionState.OPEN:
            return []
        if duplicate:
            # The same chat was stored before (a client re-sending after a reconnect): it is
            # one request, so answer it from its kept frames instead of asking twice.
            view.awaiting_first = True
            return [
                Log(logging.INFO, "chat re-sent; replaying the stored request"),
                *self._start_replay(view, ReplayPurpose.DUPLICATE),
            ]
        accepted = encode(Accepted(id=request_id, seq=1))
        view.accepted_at = now
        out: list[Command] = [Tally(Metric.ACCEPTED)]
        out += self._release(view, 1, accepted, "accepted", now)
        out.append(Log(logging.INFO, "chat accepted"))
        out.append(PublishFrame(self._reply_subject(view.key), accepted))
        return out

    def store_failed(self, request_id: str, exc: TokenwireError, now: float) -> list[Command]:
        """The job could not be stored: the request fails at seq 1, nothing of it stays."""
        view = self.requests.get(request_id)
        if view is None or not view.storing:
            return []
        out = self._drop(view, now)
        if self.state is ConnectionState.OPEN:
            out.append(self._error(exc, request_id, 1))
        return out

    def _resume(self, frame: ResumeFrame) -> list[Command]:
        if self._holds(frame.id):
            return []  # already live on this connection: frames after `after` come anyway
        self._resolving[frame.id] = frame
        return [LookUp(frame.id, request_key(self.user, frame.id))]

    def looked_up(self, request_id: str, *, found: bool) -> list[Command]:
        """Whether the resumed request still has kept frames."""
        frame = self._resolving.pop(request_id, None)
        if frame is None:
            raise SessionError(f"no look-up was asked for {request_id!r}")
        if self.state is not ConnectionState.OPEN or self._holds(frame.id):
            return []
        if not found:
            exc = UnknownRequest(f"request {frame.id!r} is unknown or has expired")
            return [Tally(Metric.RESUME, "unknown"), self._error(exc, frame.id, frame.after + 1)]
        view = RequestView(
            id=frame.id,
            key=request_key(self.user, frame.id),
            reorderer=self._reorderer(frame.after + 1),
            awaiting_first=True,
            resumed_after=frame.after,
        )
        self.requests[frame.id] = view
        return self._start_replay(view, ReplayPurpose.RESUME)

    def resume_refused(self, request_id: str, exc: TokenwireError) -> list[Command]:
        """The gateway had no room for the look-up (admission control, ``too_busy``): an
        ``error`` with the request's ``id`` and no ``seq``, so the request is untouched and
        the client sends the same ``resume`` again after the hint."""
        frame = self._resolving.pop(request_id, None)
        if frame is None:
            raise SessionError(f"no look-up was asked for {request_id!r}")
        if self.state is not ConnectionState.OPEN:
            return []
        return [Tally(Metric.RESUME, "refused"), self._error(exc, frame.id)]

    def lookup_failed(self, request_id: str, exc: TokenwireError) -> list[Command]:
        """The look-up failed (NATS): the request fails with that retryable error, at the seq
        the client expects next (it holds its frames up to ``after``; it may resume again)."""
        frame = self._resolving.pop(request_id, None)
        if frame is None:
            raise SessionError(f"no look-up was asked for {request_id!r}")
        if self.state is not ConnectionState.OPEN:
            return []
        return [Tally(Metric.RESUME, "error"), self._error(exc, frame.id, frame.after + 1)]

    def stop_failed(self, exc: TokenwireError) -> list[Command]:
        """A ``stop`` could not reach NATS: say so (the client may send it again)."""
        if self.state is not ConnectionState.OPEN:
            return []
        return [self._error(exc)]

    def token_verified(self, user: str, expires_at: float | None) -> list[Command]:
        """A fresh token extends the connection's life; it must name the same user."""
        if user != self.user:
            return self.token_refused(Forbidden("the new token is for another user"))
        if self.state is not ConnectionState.OPEN:
            return []
        self.expires_at = expires_at
        return [Log(logging.INFO, "token refreshed")]

    def token_refused(self, exc: TokenwireError) -> list[Command]:
        """A bad fresh token closes the connection (4001, 4002, 4003); a failure to check it
        (the JWKS endpoint is down) is only reported."""
        if self.state is not ConnectionState.OPEN:
            return []
        if isinstance(exc, (Unauthorized, Forbidden)):
            code = exc.close_code or CloseCode.UNAUTHORIZED  # each knows its own (4001-4003)
            return [Tally(Metric.REFUSAL, "auth"), *self.close(code, exc)]
        return [self._error(exc)]

    # --- replays ------------------------------------------------------------------------

    def _start_replay(self, view: RequestView, purpose: ReplayPurpose) -> list[Command]:
        serial = next(self._serials)
        view.replay, view.purpose = serial, purpose
        self._replays[serial] = (view.id, purpose)
        return [StartReplay(serial, view.id, view.key)]

    def replay_started(self, serial: int) -> list[Command]:
        """The replay ``serial`` runs: its frames come through :meth:`receive_bus`."""
        entry = self._replays.pop(serial, None)
        if entry is None:
            raise SessionError(f"no replay {serial} was asked for")
        rid, purpose = entry
        out: list[Command] = []
        if purpose is ReplayPurpose.RESUME:
            out.append(Tally(Metric.RESUME, "replayed"))
        view = self.requests.get(rid)
        if self.state is not ConnectionState.OPEN or view is None or view.replay != serial:
            out.append(StopReplay(serial))  # its request ended (or the connection) meanwhile
        return out

    def replay_failed(self, serial: int, exc: TokenwireError, now: float) -> list[Command]:
        """The replay ``serial`` could not start (NATS)."""
        entry = self._replays.pop(serial, None)
        if entry is None:
            raise SessionError(f"no replay {serial} was asked for")
        rid, purpose = entry
        view = self.requests.get(rid)
        if self.state is not ConnectionState.OPEN or view is None or view.replay != serial:
            return []
        view.replay = view.purpose = None
        if purpose is ReplayPurpose.CATCH_UP:
            # JetStream may be electing a leader: keep trying while the request lives.
            self._catch_ups[rid] = now + view.catch_up_delay
            view.catch_up_delay = min(view.catch_up_delay * 2, CATCH_UP_MAX_DELAY_S)
            view.catch_up_always = True
            return [Log(logging.WARNING, "cannot catch up yet", (("error", str(exc)),))]
        # Nothing of the request reached the client from here, and nothing is left behind, so
        # the idle timeout and a later resume of the id work.
        out = self._drop(view, now)
        if purpose is ReplayPurpose.RESUME and exc.retryable:
            # NATS could not start the replay in time (a reconnect storm, a leader election):
            # nothing was done, so the request is untouched and the client resumes it again
            # after the hint, as when the gateway had no room for the look-up.
            busy = TooBusy(
                f"cannot replay the request yet ({exc}): resume again shortly",
                retry_after_s=exc.retry_after_s or REPLAY_RETRY_S,
                request_id=view.id,
            )
            return [*out, Tally(Metric.RESUME, "refused"), self._error(busy, view.id)]
        # Else it fails with the error at the seq the client expects next (exactly one error,
        # never a hang).
        if purpose is ReplayPurpose.RESUME:
            out.append(Tally(Metric.RESUME, "error"))
        out.append(self._error(exc, view.id, view.reorderer.next_seq))
        return out

    def bus_reconnected(self) -> list[Command]:
        """NATS came back: frames published meanwhile never reached us; read them back."""
        if self.state is not ConnectionState.OPEN:
            return []
        out: list[Command] = []
        for view in list(self.requests.values()):
            if view.replay is not None:
                continue  # a replay reads the stream already, and does not lose frames
            view.catch_up_always = True
            if view.id not in self._catch_ups:  # else the one scheduled runs, whatever comes
                out += self._start_replay(view, ReplayPurpose.CATCH_UP)
        return out

    # --- frames from workers ------------------------------------------------------------

    def receive_bus(
        self, data: bytes, now: float, position: StreamPosition | None = None
    ) -> list[Command]:
        """A request frame from NATS, live or replayed, at ``position`` in the frames stream
        (None: unknown, taken as it comes). Each request's frames are read in the stream's
        order, once; the generation rule drops a fenced delivery's frames; the reorderer
        drops a seq already sent."""
        if self.state is not ConnectionState.OPEN:
            return []
        try:
            request_id, seq, kind, gen = peek_frame(data)
        except (ValueError, KeyError, TypeError):
            return [Log(logging.WARNING, "dropping a malformed frame from NATS")]
        if not (
            isinstance(request_id, str)
            and isinstance(seq, int)
            and isinstance(kind, str)
            and isinstance(gen, int)
        ):
            return [Log(logging.WARNING, "dropping a malformed frame from NATS")]
        view = self.requests.get(request_id)
        if view is None:
            return []
        if position is not None:
            if position.seq <= view.stream_seq:
                return []  # read already (live and replayed, or kept twice)
            if position.previous is not None:
                if view.replay is not None:
                    return []  # the replay reads the stream, this frame too, in order
                if position.previous != view.stream_seq:
                    return self._missed(view)
            view.stream_seq = position.seq
        verdict = view.generations.offer(kind, gen, seq)
        if verdict is Verdict.STALE:
            return self._stale(view)
        if verdict is Verdict.EARLY:
            if position is not None and position.previous is None:
                # The stream itself no longer holds the fence (expired): never guess.
                return self._fail(view, UnknownRequest(f"request {request_id!r} has expired"), now)
            return self._missed(view)
        if verdict is Verdict.FENCE:
            return self._fenced(view, seq, now)
        if view.awaiting_first:
            view.awaiting_first = False
            if seq > view.reorderer.next_seq:
                # The oldest kept frame is past what the client holds: never replay a partial
                # answer as if it were whole.
                return self._fail(view, UnknownRequest(f"request {request_id!r} has expired"), now)
        return self._release(view, seq, data, kind, now)

    def _missed(self, view: RequestView) -> list[Command]:
        """The live path skipped part of the request's stream: read it back from the stream
        (the replay is then the request's one source, in order)."""
        view.catch_up_always = True
        if view.replay is not None or view.id in self._catch_ups:
            return []  # a read-back runs, or is due: it brings this frame too
        return [
            Log(logging.WARNING, "frames missed on the live path: reading the request back"),
            *self._start_replay(view, ReplayPurpose.CATCH_UP),
        ]

    def _stale(self, view: RequestView) -> list[Command]:
        out: list[Command] = [Tally(Metric.STALE)]
        if not view.stale_seen:
            view.stale_seen = True
            out.append(
                Log(
                    logging.WARNING,
                    "dropping a fenced delivery's frames: a newer delivery answers the request",
                    (("gen", str(view.generations.gen)),),
                )
            )
        return out

    def _fenced(self, view: RequestView, after: int, now: float) -> list[Command]:
        """A newer delivery continues the request after seq ``after``: what waits past it is
        an older delivery's and never counts. Having sent more than ``after`` cannot happen
        with frames read in the stream's order (a resumed view's older fences come before what
        the client already held); if it did, fail rather than send a seq twice."""
        if view.reorderer.delivered > max(after, view.resumed_after):
            exc = InternalError(
                f"a newer delivery continues after seq {after}, "
                f"but seq {view.reorderer.delivered} was sent"
            )
            return [Log(logging.ERROR, "fence behind what was sent"), *self._fail(view, exc, now)]
        dropped = view.reorderer.discard_above(after)
        out: list[Command] = [
            Log(
                logging.INFO,
                "a newer delivery took the request over",
                (("gen", str(view.generations.gen)), ("after", str(after))),
            )
        ]
        if dropped:
            out.append(Tally(Metric.STALE, value=float(dropped)))
        return out

    def _release(
        self, view: RequestView, seq: int, data: bytes, kind: str, now: float
    ) -> list[Command]:
        try:
            ready = view.reorderer.push(seq, (data, kind))
        except SequenceGap as exc:
            return [
                Log(logging.ERROR, "sequence gap", (("error", str(exc)),)),
                *self._fail(view, exc, now),
            ]
        if view.reorderer.waiting and view.replay is None and view.id not in self._catch_ups:
            # A frame is missing: core NATS lost it (e.g. while a node failed over). Give it
            # a moment, then read the request's kept frames from the stream.
            self._catch_ups[view.id] = now + GAP_WAIT_S
        out: list[Command] = []
        for item, item_kind in ready:
            out.append(Send(item, item_kind))
            if item_kind == "delta" and view.accepted_at is not None:
                out.append(Tally(Metric.TTFT, value=max(now - view.accepted_at, 0.0)))
                view.accepted_at = None
            if item_kind in _TERMINAL_KINDS:
                out.append(Tally(Metric.FINISHED, _outcome(item, item_kind)))
                out += self._drop(view, now)
                break  # nothing follows the end
        return out

    def _fail(self, view: RequestView, exc: TokenwireError, now: float) -> list[Command]:
        """End the request here with ``exc``, at the seq the client expects next."""
        out = self._drop(view, now)
        out.append(self._error(exc, view.id, view.reorderer.next_seq))
        out.append(Tally(Metric.FINISHED, "error"))
        return out

    def _drop(self, view: RequestView, now: float) -> list[Command]:
        """Forget a request that ended (its end counts as activity)."""
        self.requests.pop(view.id, None)
        self._catch_ups.pop(view.id, None)
        self.last_activity = now
        if view.replay is None:
            return []
        serial, view.replay = view.replay, None
        return [StopReplay(serial)]

    # --- internals ----------------------------------------------------------------------

    def _move(self, event: ConnectionEvent) -> None:
        target = CONNECTION_TRANSITIONS[self.state].get(event)
        if target is None:
            raise IllegalConnectionTransition(
                f"a connection in state {self.state.value} cannot take {event.value}"
            )
        self.state = target

    def _detach(self) -> list[Command]:
        """Hear nothing more: the connection's subscription and every replay end."""
        out: list[Command] = [Unsubscribe()] if self.opened else []
        self._catch_ups.clear()
        for view in self.requests.values():
            if view.replay is not None:
                out.append(StopReplay(view.replay))
                view.replay = None
        return out

    def _final_tallies(self) -> list[Command]:
        if not self.opened:
            return []
        # Requests still in flight are answered anyway and can be resumed elsewhere.
        out: list[Command] = [Tally(Metric.FINISHED, "detached") for _ in self.requests]
        code = int(self.close_code) if self.close_code is not None else self.client_close_code
        out.append(Tally(Metric.CLOSED, str(code)))
        return out

    def _reply_subject(self, key: str) -> str:
        """Where request ``key``'s frames go: this connection, on this gateway."""
        config = self.config
        return request_frames(
            config.gateway_id, self.conn_id, key, partitions=config.frame_partitions
        )

    def _reorderer(self, next_seq: int) -> Reorderer[tuple[bytes, str]]:
        return Reorderer(next_seq, window=self.config.reorder_window)

    def _error(self, exc: TokenwireError, id: str | None = None, seq: int | None = None) -> Send:
        return Send(error_bytes(exc, id=id, seq=seq), "error")
