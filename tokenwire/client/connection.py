"""A Python client for tokenwire's WebSocket protocol v1, with reconnect and resume built in.

How this works
--------------
A :class:`Connection` runs one background task that owns the socket: connect, wait for
``hello``, (re)send every unfinished request, then read frames until the socket closes. Each
``chat`` is a :class:`ChatStream` holding its request's state: the last ``seq`` applied, the
running answer ``text`` (``replace`` and ``reset`` applied), the status and the events.

A frame is applied only when its ``seq`` is above the last one the request holds, so what the
gateway replays after a ``resume`` is never applied twice. When the socket closes, the close
code's policy (:func:`shared.exceptions.close_policy`, the catalogue the browser SDK reads
as web/sdk/close-codes.js) says what happens next:

* ``reconnect``: wait an exponential backoff with jitter (at least the ``retry_after_ms`` of
  an error that came just before, plus up to ``jitter`` of it again at random, so that clients
  told the same hint do not all come back at once), reconnect (to the next of ``urls``, when
  more gateways are given); on the new ``hello`` every unfinished request
  is sent again: ``resume {id, after: last_seq}`` once the gateway has acknowledged it, else
  the same ``chat`` (same id: the gateway never asks Dify twice).
* ``refresh_token`` (4002, the token expired): the same, with a fresh token from the token
  provider (it is asked before every connect); without a provider, or after
  ``MAX_REFRESH_TRIES`` refusals in a row with no progress in between, give up.
* ``wait_for_user`` (4103 idle, 1000): reconnect only when there is something to send: at
  once if requests are unfinished, else on the next :meth:`Connection.chat`.
* ``give_up`` (4001, 4003, …): the connection ends; unfinished requests fail.

A ``resume`` the gateway is too busy for (``too_busy``: an ``error`` with the request's ``id``
and no ``seq``; the request is untouched) is sent again after its ``retry_after_ms`` with the
same jitter, on the same socket (a new socket resumes it anyway).

The backoff starts over only once a socket made progress (a request frame applied) or stayed
open ``stable_after_s``: a ``hello`` followed at once by the same close does not reset it.

``hello.limits.max_frame_bytes`` is the largest frame the gateway reads: a ``chat`` over it
fails locally with ``frame_too_large`` and is never sent.

A ``call`` (:meth:`Connection.call` and the typed methods of
:class:`~tokenwire.client.calls.ServiceApi`: ``conversations()``, ``messages()``,
``feedback()``, ``suggested()``, ``parameters()``, ``upload()``, …) waits for its one
``result`` or ``error``; one whose socket closed before its answer is sent again after the
reconnect (calls are not resumable: the gateway keeps nothing of them).

A ``ping`` goes out every ``ping_interval_s``; a socket that then stays silent for
``pong_timeout_s`` is dropped and replaced. This mirrors the browser SDK (web/sdk/tokenwire.js).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final
from urllib.parse import quote, urlsplit

import orjson
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from shared.exceptions import CloseCode, ClosePolicy, ErrorCode, close_policy
from shared.frames import (
    Accepted,
    Delta,
    End,
    ErrorFrame,
    Event,
    Hello,
    Pong,
    Queued,
    Replace,
    Reset,
    Result,
    Start,
    decode_server_frame,
)
from tokenwire.client.calls import CallError, ServiceApi

__all__ = [
    "CONNECTION_CLOSED",
    "FRAME_TOO_LARGE",
    "MAX_REFRESH_TRIES",
    "PROTOCOL",
    "Backoff",
    "ChatStream",
    "Connection",
    "ConnectionState",
    "RequestFrame",
    "RequestStatus",
    "StateChange",
    "TokenProvider",
]

PROTOCOL: Final = "tokenwire.v1"
#: Code of the local ``error`` a request gets when the connection ends for good.
CONNECTION_CLOSED: Final = "connection_closed"
#: Code of the local ``error`` of a chat over the gateway's ``hello.limits.max_frame_bytes``.
FRAME_TOO_LARGE: Final = ErrorCode.FRAME_TOO_LARGE.value
_TOO_BUSY: Final = ErrorCode.TOO_BUSY.value
#: Token refreshes (closes with 4002) in a row without progress before the connection gives up.
MAX_REFRESH_TRIES: Final = 3

RequestFrame = Accepted | Queued | Start | Delta | Replace | Event | Reset | End | ErrorFrame
TokenProvider = Callable[[], str | Awaitable[str | None] | None]


class ConnectionState(StrEnum):
    IDLE = "idle"
    CONNECTING = "connecting"
    OPEN = "open"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


class RequestStatus(StrEnum):
    SENDING = "sending"
    ACCEPTED = "accepted"
    QUEUED = "queued"
    ANSWERING = "answering"
    DONE = "done"
    STOPPED = "stopped"
    ERROR = "error"


_FINAL: Final = frozenset({RequestStatus.DONE, RequestStatus.STOPPED, RequestStatus.ERROR})


@dataclass(frozen=True, slots=True)
class StateChange:
    """What :attr:`Connection.on_state` callbacks receive."""

    state: ConnectionState
    attempt: int = 0
    delay_s: float = 0.0
    code: int | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff; a delay is uniform in ``[base * (1 - jitter), base]``."""

    initial_s: float = 0.5
    max_s: float = 15.0
    factor: float = 2.0
    jitter: float = 0.5

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """The wait before reconnect ``attempt`` (0-based)."""
        base = min(self.max_s, self.initial_s * self.factor ** max(0, attempt))
        jitter = min(1.0, max(0.0, self.jitter))
        return max(0.0, base * (1.0 - jitter * rand()))

    def after_hint(self, hint_s: float, rand: Callable[[], float] = random.random) -> float:
        """The wait for a server's retry hint: uniform in ``[hint, hint * (1 + jitter)]``, never
        less than the hint, spread so that a crowd told the same hint does not return at once."""
        jitter = min(1.0, max(0.0, self.jitter))
        return max(0.0, hint_s) * (1.0 + jitter * rand())


@dataclass(eq=False)
class ChatStream:
    """One chat request: ``async for frame in stream`` yields each frame once, in seq order,
    and ends after ``end`` or ``error``; :attr:`text` is the answer so far."""

    connection: Connection = field(repr=False)
    id: str
    query: str
    conversation_id: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)
    app: str | None = None
    last_seq: int = 0
    status: RequestStatus = RequestStatus.SENDING
    queued: Queued | None = None
    start: Start | None = None
    end: End | None = None
    error: ErrorFrame | None = None
    events: list[Event] = field(default_factory=list)
    frames: list[RequestFrame] = field(default_factory=list, repr=False)
    stop_wanted: bool = False
    #: ``chat`` (a conversational app) or ``run`` (a workflow or completion app).
    kind: str = "chat"
    #: Refusals of this request's form answers (``input``): ``error`` frames with no ``seq``
    #: (``not_found``, ``form_expired``, ``form_submitted``); they do not end the request.
    refusals: list[ErrorFrame] = field(default_factory=list)
    _asked_in: str | None = field(default=None, repr=False)
    _follow_only: bool = field(default=False, repr=False)  # asked elsewhere: resume, never ask
    _sent_on: int = field(default=-1, repr=False)
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    # The answer's pieces since the last ``replace``/``reset``, joined when :attr:`text` is
    # read: ``self.text += delta`` copies the whole answer on every frame (issue 17: 11 s of
    # CPU for 100,000 deltas, against 0.1 s for 10,000).
    _parts: list[str] = field(default_factory=list, repr=False)

    @property
    def text(self) -> str:
        """The answer so far (``replace`` and ``reset`` applied)."""
        parts = self._parts
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    @text.setter
    def text(self, value: str) -> None:
        self._parts[:] = [value] if value else []

    @property
    def finished(self) -> bool:
        return self.status in _FINAL

    @property
    def stopped(self) -> bool:
        return self.status is RequestStatus.STOPPED

    async def stop(self) -> None:
        """Stop this answer (at Dify too); an ``end`` with ``stopped`` follows."""
        await self.connection.stop(self.id)

    @property
    def form(self) -> dict[str, Any] | None:
        """The human-input form the run waits on (Dify's ``human_input_required`` data:
        ``form_id``, ``node_title``, ``form_content``, ``inputs``, ``actions``, …; never its
        token), or None."""
        waiting: dict[str, Any] | None = None
        for event in self.events:
            if event.event == "human_input_required":
                data = event.data.get("data")
                waiting = data if isinstance(data, dict) else None
            elif event.event in ("human_input_form_filled", "human_input_form_timeout"):
                waiting = None
        return None if self.finished else waiting

    async def answer(self, action: str, inputs: Mapping[str, Any] | None = None) -> None:
        """Answer the form the run waits on with one of its ``actions`` (by id); the run then
        continues on this request. A refusal lands in :attr:`refusals`."""
        form = self.form
        if form is None:
            raise ValueError("this request waits for no form")
        await self.connection.answer(self.id, str(form.get("form_id")), action, inputs)

    async def wait_for_form(self) -> dict[str, Any] | None:
        """Wait until the run waits on a form (its data) or the request ended (None)."""
        while self.form is None and not self.finished:
            await self._wait_change()
        return self.form

    async def wait(self) -> ChatStream:
        """Wait until the request ended or failed."""
        while not self.finished:
            await self._wait_change()
        return self

    async def _wait_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    def __aiter__(self) -> AsyncIterator[RequestFrame]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestFrame]:
        index = 0
        while True:
            while index < len(self.frames):
                index += 1
                yield self.frames[index - 1]
            if self.finished:
                return
            await self._wait_change()

    def _apply(self, frame: RequestFrame) -> bool:
        """Apply a frame; False (nothing changes) for one already applied or after the end."""
        if self.finished or frame.seq is None or frame.seq <= self.last_seq:
            return False
        self.last_seq = frame.seq
        match frame:
            case Accepted():
                if self.status is RequestStatus.SENDING:
                    self.status = RequestStatus.ACCEPTED
            case Queued():
                self.status = RequestStatus.QUEUED
                self.queued = frame
            case Start():
                self.status = RequestStatus.ANSWERING
                self.queued = None
                self.start = frame
                if frame.conversation_id:
                    self.conversation_id = frame.conversation_id
            case Delta():
                self.status = RequestStatus.ANSWERING
                self._parts.append(frame.text)
            case Replace():
                self.text = frame.text
            case Reset():
                self.text = ""
                self.events.clear()
                self.status = RequestStatus.ACCEPTED
            case Event():
                self.events.append(frame)
            case End():
                self.end = frame
                self.status = RequestStatus.STOPPED if frame.stopped else RequestStatus.DONE
                if frame.conversation_id:
                    self.conversation_id = frame.conversation_id
            case ErrorFrame():
                self.error = frame
                self.status = RequestStatus.ERROR
        self.frames.append(frame)
        self._changed.set()
        return True

    def _fail(self, code: str, message: str, *, retryable: bool = True) -> None:
        if self.finished:
            return
        self.error = ErrorFrame(code=code, message=message, retryable=retryable, id=self.id)
        self.status = RequestStatus.ERROR
        self._changed.set()

    def _chat_frame(self) -> dict[str, Any]:
        if self.kind == "run":
            run: dict[str, Any] = {"type": "run", "id": self.id, "inputs": self.inputs}
            if self.query:
                run["query"] = self.query
            if self.files:
                run["files"] = self.files
            if self.app:
                run["app"] = self.app
            return run
        frame: dict[str, Any] = {"type": "chat", "id": self.id, "query": self.query}
        if self._asked_in:
            frame["conversation_id"] = self._asked_in
        if self.inputs:
            frame["inputs"] = self.inputs
        if self.files:
            frame["files"] = self.files
        if self.app:
            frame["app"] = self.app
        return frame


@dataclass(eq=False)
class _PendingCall:
    frame: dict[str, Any]
    future: asyncio.Future[dict[str, Any]]
    sent_on: int = 0


class Connection(ServiceApi):
    """One logical connection to a gateway that survives socket drops. Use as
    ``async with Connection(url) as conn:`` or call :meth:`connect` and :meth:`close`."""

    def __init__(
        self,
        url: str,
        token_provider: TokenProvider | None = None,
        *,
        user: str | None = None,
        backoff: Backoff | None = None,
        ping_interval_s: float = 20.0,
        pong_timeout_s: float = 10.0,
        connect_timeout_s: float = 10.0,
        stable_after_s: float = 10.0,
        rand: Callable[[], float] = random.random,
        urls: Sequence[str] = (),
    ) -> None:
        for each in (url, *urls):
            if urlsplit(each).scheme not in ("ws", "wss"):
                raise ValueError(f"not a WebSocket URL (ws:// or wss://): {each!r}")
        self.url = url
        #: Every gateway to try, ``url`` first: each reconnect moves to the next one.
        self.urls: tuple[str, ...] = (url, *(u for u in urls if u != url))
        self._url_index = 0
        self.user = user
        self.token_provider = token_provider
        self.backoff = backoff or Backoff()
        self.ping_interval_s = ping_interval_s
        self.pong_timeout_s = pong_timeout_s
        self.connect_timeout_s = connect_timeout_s
        #: A socket open this long resets the backoff even if no request made progress.
        self.stable_after_s = stable_after_s
        self._rand = rand
        self.state = ConnectionState.IDLE
        self.attempt = 0
        self.hello: Hello | None = None
        self.last_close: tuple[int | None, str] | None = None
        self.requests: dict[str, ChatStream] = {}
        self.calls: dict[str, _PendingCall] = {}
        #: Called on every state change (from the connection's task; keep it quick).
        self.on_state: list[Callable[[StateChange], None]] = []
        #: Called with connection-level ``error`` frames (a client frame was refused).
        self.on_error: list[Callable[[ErrorFrame], None]] = []
        self._ws: ClientConnection | None = None
        self._generation = 0
        self._task: asyncio.Task[None] | None = None
        self._opened = asyncio.Event()
        self._closing = False
        self._wake = asyncio.Event()
        self._session_open = False
        self._last_rx = 0.0
        # Set when a request frame is applied on the current socket (progress).
        self._progressed = False
        # The retry hint of the last connection-level error on the current socket.
        self._retry_after_s = 0.0
        self._refresh_tries = 0
        self._opened_at = 0.0
        self._retries: set[asyncio.Task[None]] = set()  # resumes waiting out a too_busy hint

    async def __aenter__(self) -> Connection:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def session(self) -> str | None:
        return self.hello.session if self.hello else None

    # --- public API ------------------------------------------------------------------------

    async def connect(self) -> None:
        """Start (idempotent) and wait until the gateway said ``hello``.

        Raises :class:`ConnectionError` if the gateway refuses the connection for good.
        """
        self._closing = False
        self._ensure_running()
        opened = asyncio.ensure_future(self._opened.wait())
        assert self._task is not None
        done, _ = await asyncio.wait({opened, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if opened not in done:
            opened.cancel()
            if not self._task.cancelled() and (exc := self._task.exception()) is not None:
                raise exc
            code, reason = self.last_close or (None, "")
            raise ConnectionError(f"the gateway closed the connection ({code} {reason})".strip())

    async def chat(
        self,
        query: str,
        *,
        conversation_id: str | None = None,
        inputs: Mapping[str, Any] | None = None,
        files: Sequence[Mapping[str, Any]] | None = None,
        app: str | None = None,
        id: str | None = None,
    ) -> ChatStream:
        """Ask a question; returns at once with the stream (sent when the socket is open)."""
        if not query:
            raise ValueError("query must not be empty")
        stream = ChatStream(
            connection=self,
            id=id or str(uuid.uuid4()),
            query=query,
            conversation_id=conversation_id,
            inputs=dict(inputs or {}),
            files=[dict(f) for f in files or ()],
            app=app,
            _asked_in=conversation_id,
        )
        if self._refuse_oversize(stream):
            return stream  # known too large for this gateway: failed, never sent
        self.requests[stream.id] = stream
        self._closing = False
        self._ensure_running()
        if self.state is ConnectionState.OPEN:
            await self._send_request(stream)
        return stream

    async def run(
        self,
        inputs: Mapping[str, Any] | None = None,
        *,
        query: str = "",
        files: Sequence[Mapping[str, Any]] | None = None,
        app: str | None = None,
        id: str | None = None,
    ) -> ChatStream:
        """Run a workflow or completion app (``query``: a completion's); returns at once with
        the stream. A workflow's ``end`` carries ``outputs``, ``status`` and
        ``workflow_run_id``; a run waiting for a person has a :attr:`ChatStream.form`."""
        stream = ChatStream(
            connection=self,
            id=id or str(uuid.uuid4()),
            query=query,
            inputs=dict(inputs or {}),
            files=[dict(f) for f in files or ()],
            app=app,
            kind="run",
        )
        if self._refuse_oversize(stream):
            return stream
        self.requests[stream.id] = stream
        self._closing = False
        self._ensure_running()
        if self.state is ConnectionState.OPEN:
            await self._send_request(stream)
        return stream

    async def answer(
        self, id: str, form_id: str, action: str, inputs: Mapping[str, Any] | None = None
    ) -> None:
        """Answer the form request ``id`` waits on (from any connection of the same user;
        resume the request first to see the rest of the run)."""
        frame = {
            "type": "input",
            "id": id,
            "form_id": form_id,
            "action": action,
            "inputs": dict(inputs or {}),
        }
        if not await self._send(frame):
            raise ConnectionError("not connected: answer again once the connection is open")

    async def resume(self, id: str, after: int = 0) -> ChatStream:
        """Follow request ``id`` that another connection asked (the same user): its frames
        after ``after``, then live (e.g. a run waiting for a person, answered from here)."""
        stream = self.requests.get(id)
        if stream is not None:
            return stream
        stream = ChatStream(connection=self, id=id, query="", last_seq=after, _follow_only=True)
        stream.status = RequestStatus.ACCEPTED
        self.requests[id] = stream
        self._closing = False
        self._ensure_running()
        if self.state is ConnectionState.OPEN:
            await self._send_request(stream)
        return stream

    async def call(
        self, method: str, params: Mapping[str, Any] | None = None, *, timeout_s: float = 60.0
    ) -> dict[str, Any]:
        """One ``call`` to Dify's Service API as this connection's user: Dify's body, or raise
        :class:`~tokenwire.client.calls.CallError` (``not_found``, ``bad_params``, …)."""
        call_id = f"call-{uuid.uuid4()}"
        frame = {"type": "call", "id": call_id, "method": method, "params": dict(params or {})}
        pending = _PendingCall(frame, asyncio.get_running_loop().create_future())
        self.calls[call_id] = pending
        self._closing = False
        self._ensure_running()
        try:
            if self.state is ConnectionState.OPEN:
                await self._send_call(pending)
            async with asyncio.timeout(timeout_s):
                return await pending.future
        finally:
            self.calls.pop(call_id, None)

    async def _bearer(self) -> str | None:
        if self.token_provider is None:
            return None
        token = self.token_provider()
        if inspect.isawaitable(token):
            token = await token
        return token or None

    async def _send_call(self, pending: _PendingCall) -> None:
        if pending.future.done():
            return
        pending.sent_on = self._generation
        await self._send(pending.frame)

    async def stop(self, id: str) -> None:
        """Stop a request (sent now, or right after the next reconnect)."""
        stream = self.requests.get(id)
        if stream is not None:
            stream.stop_wanted = True
        if self.state is ConnectionState.OPEN:
            await self._send({"type": "stop", "id": id})

    async def ping(self) -> None:
        await self._send({"type": "ping"})

    async def close(self) -> None:
        """Close for good; unfinished requests fail with ``connection_closed``."""
        self._closing = True
        self._wake.set()
        for retry in list(self._retries):
            retry.cancel()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_all("the connection was closed")
        self._set_state(ConnectionState.CLOSED)

    def drop_for_testing(self) -> None:
        """Cut the socket as a network failure would; the connection reconnects and resumes."""
        ws = self._ws
        if ws is not None:
            ws.transport.abort()

    # --- the connection's task ---------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._opened.clear()
            self.attempt = 0
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._closing:
            first = self.hello is None and self.attempt == 0
            self._set_state(
                ConnectionState.CONNECTING if first else ConnectionState.RECONNECTING,
                attempt=self.attempt,
            )
            self._progressed = False
            self._retry_after_s = 0.0
            opened, code, reason = await self._session()
            self.last_close = (code, reason)
            self._opened.clear()
            if self._closing:
                return
            if opened and (
                self._progressed or time.monotonic() - self._opened_at >= self.stable_after_s
            ):
                self.attempt = 0  # this socket was good: start the backoff over
                self._refresh_tries = 0
            if code == CloseCode.MESSAGE_TOO_BIG:
                self._fail_oversize_suspect()
            policy = close_policy(code)
            if policy is ClosePolicy.REFRESH_TOKEN:
                self._refresh_tries += 1
                if self.token_provider is None or self._refresh_tries > MAX_REFRESH_TRIES:
                    policy = ClosePolicy.GIVE_UP  # nothing fresh to ask for
            if policy is ClosePolicy.GIVE_UP:
                self._fail_all(f"the gateway closed the connection ({code} {reason})".strip())
                self._set_state(ConnectionState.CLOSED, code=code, reason=reason)
                return
            if policy is ClosePolicy.WAIT_FOR_USER and not self.requests:
                self._set_state(ConnectionState.IDLE, code=code, reason=reason)
                return  # reconnect lazily, on the next chat()
            delay = self.backoff.delay(self.attempt, self._rand)
            if self._retry_after_s > 0:
                delay = max(delay, self.backoff.after_hint(self._retry_after_s, self._rand))
            self.attempt += 1
            self._url_index = (self._url_index + 1) % len(self.urls)
            self._set_state(
                ConnectionState.RECONNECTING,
                attempt=self.attempt,
                delay_s=delay,
                code=code,
                reason=reason,
            )
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _session(self) -> tuple[bool, int | None, str]:
        """One socket, from connect to close: (whether it got ``hello``, close code, reason)."""
        headers: dict[str, str] = {}
        if self.token_provider is not None:
            try:
                token = self.token_provider()
                if inspect.isawaitable(token):
                    token = await token
            except Exception as exc:  # the caller's code: any failure is "retry later"
                return False, None, f"token provider failed: {exc!r}"
            if token:
                headers["Authorization"] = f"Bearer {token}"
        url = self._socket_url()
        try:
            ws = await websockets.connect(
                url,
                subprotocols=[Subprotocol(PROTOCOL)],
                additional_headers=headers,
                open_timeout=self.connect_timeout_s,
                max_size=None,
                proxy=None if _is_loopback(url) else True,
            )
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            return False, None, f"connect failed: {exc}"
        self._ws = ws
        self._generation += 1
        self._session_open = False
        heartbeat: asyncio.Task[None] | None = None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                while not self._session_open:
                    self._handle(await ws.recv())
            await self._resend()
            heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(ws))
            async for message in ws:
                self._handle(message)
        except (ConnectionClosed, TimeoutError, OSError):
            pass
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
            self._ws = None
            if ws.close_code is None:
                ws.transport.abort()
        return self._session_open, ws.close_code, ws.close_reason or ""

    def _socket_url(self) -> str:
        url = self.urls[self._url_index]
        if not self.user:
            return url
        sep = "&" if "?" in url else "?"
        return f"{url}{sep}user={quote(self.user, safe='')}"

    async def _heartbeat(self, ws: ClientConnection) -> None:
        if self.ping_interval_s <= 0:
            return
        while True:
            await asyncio.sleep(self.ping_interval_s)
            sent_at = time.monotonic()
            with contextlib.suppress(ConnectionClosed):
                await ws.send('{"type":"ping"}')
            await asyncio.sleep(self.pong_timeout_s)
            if self._last_rx < sent_at:
                ws.transport.abort()  # silent for too long: replace the socket
                return

    def _handle(self, message: str | bytes) -> None:
        self._last_rx = time.monotonic()
        try:
            frame = decode_server_frame(message)
        except Exception:
            return  # a frame type from a newer gateway, or not JSON: ignore
        if isinstance(frame, Hello):
            self._on_hello(frame)
        elif isinstance(frame, Pong):
            return
        elif isinstance(frame, Result):
            pending = self.calls.pop(frame.id, None)
            if pending is not None and not pending.future.done():
                pending.future.set_result(frame.data)
        elif isinstance(frame, ErrorFrame) and frame.id in self.calls:
            pending = self.calls.pop(frame.id)
            if not pending.future.done():
                pending.future.set_exception(
                    CallError(
                        frame.code,
                        frame.message,
                        retryable=frame.retryable,
                        retry_after_ms=frame.retry_after_ms,
                    )
                )
        elif (
            isinstance(frame, ErrorFrame)
            and frame.seq is None
            and frame.code == _TOO_BUSY
            and frame.id in self.requests
        ):
            # The gateway had no room for this request's resume: the same resume, later.
            hint_s = (frame.retry_after_ms or 1000) / 1000
            delay_s = self.backoff.after_hint(hint_s, self._rand)
            self._retry_later(self.requests[frame.id], delay_s)
        elif isinstance(frame, ErrorFrame) and frame.seq is None and frame.id in self.requests:
            refused = self.requests[frame.id]  # an answer to its form was refused
            refused.refusals.append(frame)
            refused._changed.set()
        elif frame.id is not None and frame.seq is not None:
            stream = self.requests.get(frame.id)
            if stream is not None and stream._apply(frame):
                self._progressed = True
                if stream.finished:
                    del self.requests[stream.id]
        elif isinstance(frame, ErrorFrame):
            if frame.retry_after_ms is not None:
                self._retry_after_s = frame.retry_after_ms / 1000
            if frame.code == FRAME_TOO_LARGE:
                self._fail_oversize_suspect()
            for callback in list(self.on_error):
                callback(frame)

    def _on_hello(self, frame: Hello) -> None:
        # No backoff reset here: a hello followed at once by the same close must not make the
        # next reconnect immediate (see _run).
        self.hello = frame
        self._opened_at = time.monotonic()
        self._session_open = True
        self._set_state(ConnectionState.OPEN)
        self._opened.set()

    async def _resend(self) -> None:
        """After ``hello``: every request not yet sent on this socket, as chat or resume."""
        generation = self._generation
        for stream in list(self.requests.values()):
            if stream._sent_on != generation:
                await self._send_request(stream)
        for pending in list(self.calls.values()):
            if pending.sent_on != generation:
                await self._send_call(pending)  # its answer was lost with the old socket

    def _retry_later(self, stream: ChatStream, delay_s: float) -> None:
        """Send ``stream``'s ``resume`` again in ``delay_s``, if this socket still lives then
        (a new socket resumes every unfinished request anyway)."""
        generation = self._generation

        async def retry() -> None:
            await asyncio.sleep(delay_s)
            if generation == self._generation and self.requests.get(stream.id) is stream:
                await self._send_request(stream)

        task = asyncio.get_running_loop().create_task(retry())
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _send_request(self, stream: ChatStream) -> None:
        if stream.finished or self._refuse_oversize(stream):
            return
        stream._sent_on = self._generation
        if stream.last_seq == 0 and not stream._follow_only:
            # Never acknowledged: the same chat again. The gateway knows the id, so a chat that
            # did arrive before the drop is replayed, not asked twice.
            await self._send(stream._chat_frame())
        else:
            await self._send({"type": "resume", "id": stream.id, "after": stream.last_seq})
        if stream.stop_wanted:
            await self._send({"type": "stop", "id": stream.id})

    async def _send(self, frame: dict[str, Any]) -> bool:
        ws = self._ws
        if ws is None or self.state is not ConnectionState.OPEN:
            return False
        try:
            await ws.send(orjson.dumps(frame).decode())
        except ConnectionClosed:
            return False  # the task reconnects and sends it again
        return True

    def _max_frame_bytes(self) -> int | None:
        limit = self.hello.limits.get("max_frame_bytes") if self.hello else None
        return limit if isinstance(limit, int) and limit > 0 else None

    def _refuse_oversize(self, stream: ChatStream) -> bool:
        """Fail a chat the gateway announced it would refuse; True if it was failed."""
        limit = self._max_frame_bytes()
        if limit is None or stream.last_seq > 0:
            return False  # unknown limit, or acknowledged (a resume is tiny)
        size = len(orjson.dumps(stream._chat_frame()))
        if size <= limit:
            return False
        stream._fail(
            FRAME_TOO_LARGE,
            f"the chat frame is {size} bytes, over the gateway's limit of {limit}",
            retryable=False,
        )
        self.requests.pop(stream.id, None)
        return True

    def _fail_oversize_suspect(self) -> None:
        """The gateway refused a frame as too large without naming it (a limit this client
        did not know): fail the largest chat on this socket that it never acknowledged, so
        that it is not sent again after the reconnect."""
        if self._max_frame_bytes() is not None:
            return  # nothing over the announced limit was sent: the cause is elsewhere
        suspects = [
            s for s in self.requests.values() if s.last_seq == 0 and s._sent_on == self._generation
        ]
        if not suspects:
            return
        stream = max(suspects, key=lambda s: len(orjson.dumps(s._chat_frame())))
        stream._fail(FRAME_TOO_LARGE, "the gateway refused the chat as too large", retryable=False)
        self.requests.pop(stream.id, None)

    def _fail_all(self, message: str) -> None:
        for stream in list(self.requests.values()):
            stream._fail(CONNECTION_CLOSED, message)
        self.requests.clear()
        for pending in list(self.calls.values()):
            if not pending.future.done():
                pending.future.set_exception(CallError(CONNECTION_CLOSED, message))
        self.calls.clear()

    def _set_state(
        self,
        state: ConnectionState,
        *,
        attempt: int = 0,
        delay_s: float = 0.0,
        code: int | None = None,
        reason: str = "",
    ) -> None:
        self.state = state
        change = StateChange(state, attempt, delay_s, code, reason)
        for callback in list(self.on_state):
            callback(change)


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")
