"""One browser connection: client frames in, each request's frames out, in ``seq`` order.

How this works: the reader loop decodes client frames (:func:`~shared.frames.decode_client_frame`)
and acts: a ``chat`` becomes a job stored in JetStream, then ``accepted`` (seq 1) is sent; a
``stop`` is announced on NATS; a ``resume`` replays the request's kept frames. Frames for this
connection arrive on one NATS subscription; each request's :class:`~shared.sequencing.Reorderer`
releases them exactly once, in order, into a bounded send queue that one writer task drains. A
client that cannot keep up fills the queue and is closed with ``SLOW_CONSUMER`` (4101): it can
reconnect and ``resume`` without losing anything, while a full queue never blocks NATS.

A bad frame gets an ``error`` frame and nothing else changes: other requests keep streaming.

Core NATS may lose frames while the connection to NATS fails over (a node died): after a
reconnect, and whenever frames wait behind a missing one for ``GAP_WAIT_S``, the request is
read back from the frames stream (an ordered consumer) and the reorderer drops what was
already sent. Replays wait while the send queue is more than half full, unlike live frames.

The edge's limits act here too (gateway/limits.py): every client frame takes a token from the
connection's frame bucket; a ``chat`` must fit the per-connection and per-user in-flight caps
and take a token from the user's cluster-wide rate bucket before anything is stored, so a
refused chat never reaches JetStream or Dify. A watchdog closes the connection when its token
expires (4002, unless an ``auth`` frame brought a fresh one) or when it has been idle (4103).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.msg import Msg
from opentelemetry import trace
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway import metrics
from gateway.auth import Authenticator, Identity
from gateway.bus import GatewayBus
from gateway.limits import FrameRate, LocalConnections, RequestRate
from shared.exceptions import (
    ClientError,
    CloseCode,
    DuplicateRequest,
    ErrorCode,
    Forbidden,
    IdleTimeout,
    LimitExceeded,
    RateLimited,
    TokenExpired,
    TokenwireError,
    Unauthorized,
    UnknownRequest,
)
from shared.frames import (
    Accepted,
    AuthFrame,
    ChatFrame,
    ClientLimits,
    ErrorFrame,
    Hello,
    PingFrame,
    Pong,
    ResumeFrame,
    ServerFrame,
    StopFrame,
    decode_client_frame,
    encode,
    error_frame,
    peek_id_seq,
)
from shared.jobs import Job
from shared.logs import trace_id_var
from shared.sequencing import Reorderer, SequenceGap
from shared.settings import Settings
from shared.state import FRAME_TO_STATE, TERMINAL
from shared.subjects import request_frames, request_key

__all__ = ["Connection", "Edge", "error_bytes"]

log = logging.getLogger("tokenwire.gateway")
tracer = trace.get_tracer("tokenwire.gateway")

SERVER_NAME = "tokenwire/0.1"
# How long the final close may wait for a client that does not read (then the socket just ends).
CLOSE_TIMEOUT_S = 10.0
# How long queued frames (e.g. the error that explains a close) may take to flush before it.
FLUSH_TIMEOUT_S = 5.0
# How long frames may wait behind a missing one before the request is read from the stream.
GAP_WAIT_S = 1.0

_CLOSE_FOR: dict[ErrorCode, CloseCode] = {
    ErrorCode.UNAUTHORIZED: CloseCode.UNAUTHORIZED,
    ErrorCode.TOKEN_EXPIRED: CloseCode.TOKEN_EXPIRED,
    ErrorCode.FORBIDDEN: CloseCode.FORBIDDEN,
}


def error_bytes(exc: TokenwireError, *, id: str | None = None, seq: int | None = None) -> bytes:
    """The ``error`` frame for ``exc``, with ``retry_after_ms`` when the error carries a hint."""
    data = encode(error_frame(exc, id=id, seq=seq))
    retry_after_s: float | None = getattr(exc, "retry_after_s", None)
    if retry_after_s is None or not math.isfinite(retry_after_s):
        return data
    obj = orjson.loads(data)
    obj["retry_after_ms"] = max(1, math.ceil(retry_after_s * 1000))
    return orjson.dumps(obj)


@dataclass(frozen=True, slots=True)
class Edge:
    """What every connection of a gateway shares: token checks and the limits."""

    auth: Authenticator
    rates: RequestRate
    local: LocalConnections


@dataclass(slots=True)
class RequestView:
    """What this connection knows of one of its requests."""

    id: str
    key: str
    reorderer: Reorderer[tuple[bytes, str]]
    replay: Any = None  # the ordered consumer of a resumed request
    # True until the first replayed frame arrives: it tells whether the kept frames still
    # reach back to what the client holds.
    awaiting_first: bool = False
    done: bool = False
    # A catch-up from the stream is scheduled or running (frames were lost on the way).
    catching_up: bool = False
    # When `accepted` went out, until the first `delta` (time to first token); 0: not timed.
    accepted_at: float = 0.0


class Connection:
    """Pumps one WebSocket; see the module docstring."""

    def __init__(
        self,
        ws: WebSocket,
        bus: GatewayBus,
        settings: Settings,
        identity: Identity,
        edge: Edge,
        conn_id: str | None = None,
    ) -> None:
        self.ws = ws
        self.bus = bus
        self.settings = settings
        self.user = identity.user
        self.expires_at = identity.expires_at
        self.edge = edge
        self.conn_id = conn_id or secrets.token_hex(10)
        self.frame_rate = FrameRate(settings)
        self.last_activity = time.monotonic()
        self._closing = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.limits = ClientLimits(
            max_frame_bytes=settings.max_frame_bytes,
            max_query_chars=settings.max_query_chars,
            max_inputs_bytes=settings.max_inputs_bytes,
            max_inputs_depth=settings.max_inputs_depth,
            max_files=settings.max_files,
        )
        self.requests: dict[str, RequestView] = {}
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(settings.send_queue_frames)
        # Set while the send queue is at most half full: replays wait for it (see below).
        self._room = asyncio.Event()
        self._room.set()
        self.close_code: CloseCode | None = None
        self.client_close_code = 1005  # "no status": what the client sent, if it closed

    @property
    def inflight(self) -> int:
        """Requests in flight on this connection (for the per-user cap)."""
        return len(self.requests)

    # --- lifecycle ------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run until the client leaves or the connection must close."""
        try:
            sub = await self.bus.subscribe_connection(self.conn_id, self._on_frame)
        except TokenwireError as exc:
            with contextlib.suppress(Exception):
                await self.ws.send_text(error_bytes(exc).decode())
                await self.ws.close(code=CloseCode.BUS_UNAVAILABLE)
            return
        self.edge.local.add(self.user, self)
        self.bus.reconnect_hooks.add(self.on_bus_reconnected)
        metrics.connection_opened()
        writer = asyncio.create_task(self._writer())
        limits = self.limits.announced()
        self._send(Hello(session=self.conn_id, user=self.user, server=SERVER_NAME, limits=limits))
        reader = asyncio.create_task(self._reader())
        watchdog = asyncio.create_task(self._watchdog())
        closing = asyncio.create_task(self._closing.wait())
        try:
            await asyncio.wait({reader, closing}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                log.error("connection failed", exc_info=reader.exception())
                self.close_code = self.close_code or CloseCode.INTERNAL_ERROR
        finally:
            self._room.set()  # no replay waits for a connection that is closing
            for task in (reader, watchdog, closing, *self._background):
                task.cancel()
            self.edge.local.remove(self.user, self)
            self.bus.reconnect_hooks.discard(self.on_bus_reconnected)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            for view in list(self.requests.values()):
                await self._stop_replay(view)
            await self._stop_writer(writer)
            for _ in self.requests:
                metrics.request_finished("detached")  # still answered; resumable elsewhere
            if self.close_code is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.ws.close(code=self.close_code), CLOSE_TIMEOUT_S)
            metrics.connection_closed(int(self.close_code or self.client_close_code))

    def close(self, code: CloseCode, exc: TokenwireError | None = None) -> None:
        """Close the connection with ``code``, after sending ``exc``'s error frame if given."""
        if self.close_code is not None:
            return
        if exc is not None:
            self._enqueue(error_bytes(exc))
        # A full queue has already made this a slow-consumer close.
        if self.close_code is None:
            self.close_code = code
        self._closing.set()
        self._room.set()

    async def _stop_writer(self, writer: asyncio.Task[None]) -> None:
        """Let queued frames out first (they explain the close), unless the client is stuck."""
        if self.close_code not in (None, CloseCode.SLOW_CONSUMER):
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)
                with contextlib.suppress(TimeoutError, Exception):
                    await asyncio.wait_for(asyncio.shield(writer), FLUSH_TIMEOUT_S)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer

    async def _watchdog(self) -> None:
        """Close at the token's expiry (4002) or after ``idle_timeout_s`` of idleness (4103)."""
        idle = self.settings.idle_timeout_s
        while True:
            now = time.monotonic()
            if self.expires_at is not None and time.time() >= self.expires_at:
                self.close(
                    CloseCode.TOKEN_EXPIRED,
                    TokenExpired("the token expired: send a fresh one in an auth frame before exp"),
                )
                return
            if self.requests:
                # Not idle while an answer streams; its end counts as activity.
                wake = idle
            elif now - self.last_activity >= idle:
                self.close(
                    CloseCode.IDLE_TIMEOUT,
                    IdleTimeout(f"no activity for {idle:g} s: reconnect when needed"),
                )
                return
            else:
                wake = self.last_activity + idle - now
            if self.expires_at is not None:
                wake = min(wake, self.expires_at - time.time())
            await asyncio.sleep(min(max(wake, 0.05), idle))

    async def _reader(self) -> None:
        while self.close_code is None:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                self.client_close_code = int(message.get("code") or 1005)
                return
            self.last_activity = time.monotonic()
            data: str | bytes | None = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            await self._handle(data)

    async def _writer(self) -> None:
        while True:
            data = await self.queue.get()
            if self.queue.qsize() <= self.queue.maxsize // 2:
                self._room.set()
            if data is None:
                return
            text = data.decode()
            del data  # an idle connection must not hold its last frame's 4 KiB buffer
            await self.ws.send_text(text)

    # --- client frames --------------------------------------------------------------------

    async def _handle(self, data: str | bytes) -> None:
        wait = self.frame_rate.take()
        if wait is not None:
            self._refuse_flood(data, wait)
            return
        try:
            frame = decode_client_frame(data, self.limits)
        except ClientError as exc:
            metrics.frame_in("invalid")
            metrics.refusal("frame")
            rid = exc.request_id
            if rid is not None and rid not in self.requests and exc.code is ErrorCode.INVALID_FRAME:
                # A chat we refuse is a request that ends at once: tie the error to its id.
                self._send(error_frame(exc, id=rid, seq=1))
            else:
                self._send(error_frame(exc))
            return
        metrics.frame_in(frame.type)
        try:
            if isinstance(frame, ChatFrame):
                await self._chat(frame)
            elif isinstance(frame, StopFrame):
                await self.bus.request_stop(request_key(self.user, frame.id))
            elif isinstance(frame, ResumeFrame):
                await self._resume(frame)
            elif isinstance(frame, PingFrame):
                self._send(Pong())
            elif isinstance(frame, AuthFrame):
                await self._reauth(frame)
        except TokenwireError as exc:
            self._enqueue(error_bytes(exc))

    def _refuse_flood(self, data: str | bytes, wait: float) -> None:
        """Over the frame rate: refuse the frame (tied to its id when it is a chat)."""
        metrics.refusal("rate_limit")
        exc = RateLimited(
            f"more than {self.settings.frame_rate} frames on this connection", retry_after_s=wait
        )
        try:
            frame = decode_client_frame(data, self.limits)
        except ClientError:
            frame = None
        if isinstance(frame, ChatFrame) and frame.id not in self.requests:
            self._enqueue(error_bytes(exc, id=frame.id, seq=1))
        else:
            self._enqueue(error_bytes(exc))

    async def _reauth(self, frame: AuthFrame) -> None:
        """A fresh token extends the connection's life; it must name the same user."""
        if not self.edge.auth.requires_token:
            return  # nothing to refresh without authentication
        try:
            identity = await self.edge.auth.verify(frame.token)
            if identity.user != self.user:
                raise Forbidden("the new token is for another user")
        except (Unauthorized, Forbidden) as exc:
            metrics.refusal("auth")
            self.close(_CLOSE_FOR.get(exc.code, CloseCode.UNAUTHORIZED), exc)
            return
        self.expires_at = identity.expires_at
        log.info("token refreshed", extra={"conn": self.conn_id})

    async def _chat(self, frame: ChatFrame) -> None:
        if frame.id in self.requests:
            raise DuplicateRequest(f"request {frame.id!r} is already running on this connection")
        if len(self.requests) >= self.settings.max_inflight_per_connection:
            metrics.refusal("inflight_limit")
            exc = LimitExceeded(
                f"at most {self.settings.max_inflight_per_connection} requests may run at once"
            )
            self._send(error_frame(exc, id=frame.id, seq=1))
            return
        if self.edge.local.inflight(self.user) >= self.settings.max_inflight_per_user:
            metrics.refusal("inflight_limit")
            exc = LimitExceeded(
                f"at most {self.settings.max_inflight_per_user} requests of one user may run "
                "at once"
            )
            self._send(error_frame(exc, id=frame.id, seq=1))
            return
        try:
            await self.edge.rates.take(self.user, frame.id)
        except RateLimited as exc:
            metrics.refusal("rate_limit")
            self._enqueue(error_bytes(exc, id=frame.id, seq=1))
            return
        except TokenwireError as exc:
            self._send(error_frame(exc, id=frame.id, seq=1))
            return
        key = request_key(self.user, frame.id)
        trace_id = secrets.token_hex(8)
        token = trace_id_var.set(trace_id)
        view = RequestView(id=frame.id, key=key, reorderer=self._reorderer(1))
        # Registered before the job is stored: the worker may answer before the ack returns.
        self.requests[frame.id] = view
        job = Job(
            key=key,
            id=frame.id,
            user=self.user,
            conn=self.conn_id,
            reply=request_frames(self.conn_id, key),
            query=frame.query,
            conversation_id=frame.conversation_id or None,
            inputs=frame.inputs,
            files=[f.model_dump(exclude_none=True) for f in frame.files],
            app=frame.app,
            trace_id=trace_id,
            created_ms=int(time.time() * 1000),
        )
        try:
            with tracer.start_as_current_span(
                "chat accept", attributes={"tokenwire.request_id": trace_id}
            ):
                duplicate = await self.bus.publish_job(job)
        except TokenwireError as exc:
            del self.requests[frame.id]
            self._send(error_frame(exc, id=frame.id, seq=1))
            trace_id_var.reset(token)
            return
        if duplicate:
            # The same chat was stored before (a client re-sending after a reconnect): it is
            # one request, so answer it from its kept frames instead of asking twice.
            log.info("chat re-sent; replaying the stored request")
            view.awaiting_first = True
            view.replay = await self.bus.replay(key, self._on_replayed_frame)
            trace_id_var.reset(token)
            return
        accepted = encode(Accepted(id=frame.id, seq=1))
        metrics.request_accepted()
        view.accepted_at = time.monotonic()
        self._release(view, 1, accepted, "accepted")
        log.info("chat accepted", extra={"conn": self.conn_id})
        with contextlib.suppress(TokenwireError):
            await self.bus.publish_frame(job.reply, accepted)
        trace_id_var.reset(token)

    async def _resume(self, frame: ResumeFrame) -> None:
        key = request_key(self.user, frame.id)
        existing = self.requests.get(frame.id)
        if existing is not None:
            # Already live on this connection: frames after `after` will come anyway.
            return
        if not await self.bus.has_frames(key):
            metrics.resume("unknown")
            exc = UnknownRequest(f"request {frame.id!r} is unknown or has expired")
            self._send(error_frame(exc, id=frame.id, seq=frame.after + 1))
            return
        metrics.resume("replayed")
        view = RequestView(
            id=frame.id, key=key, reorderer=self._reorderer(frame.after + 1), awaiting_first=True
        )
        self.requests[frame.id] = view
        view.replay = await self.bus.replay(key, self._on_replayed_frame)

    # --- frames from workers ----------------------------------------------------------------

    async def _on_replayed_frame(self, msg: Msg) -> None:
        """A kept frame being replayed: unlike live frames, a replay can wait for the client.

        Live frames come as fast as Dify answers and a client that cannot keep up is closed;
        a replay (a ``resume`` of a long answer) would fill the queue at NATS speed, so it
        waits while the send queue is more than half full.
        """
        while self.queue.qsize() > self.queue.maxsize // 2 and self.close_code is None:
            self._room.clear()
            await self._room.wait()
        if self.close_code is None:
            await self._on_frame(msg)

    async def _on_frame(self, msg: Msg) -> None:
        if self.queue.qsize() >= self.queue.maxsize // 2:
            # NATS hands over whole bursts without yielding; let the writer drain into the
            # socket first, so that only a client that does not read overflows the queue.
            await asyncio.sleep(0)
        try:
            request_id, seq, kind = peek_id_seq(msg.data)
        except (ValueError, KeyError, TypeError):
            log.warning("dropping a malformed frame from NATS")
            return
        view = self.requests.get(request_id)
        if view is None or view.done:
            return
        if view.awaiting_first:
            view.awaiting_first = False
            if seq > view.reorderer.next_seq:
                # The oldest kept frame is past what the client holds: never replay a partial
                # answer as if it were whole.
                gone = UnknownRequest(f"request {request_id!r} has expired")
                await self._fail_view(view, gone)
                return
        self._release(view, seq, msg.data, kind)

    def _reorderer(self, next_seq: int) -> Reorderer[tuple[bytes, str]]:
        return Reorderer(next_seq, window=self.settings.reorder_window)

    def _release(self, view: RequestView, seq: int, data: bytes, kind: str) -> None:
        try:
            ready = view.reorderer.push(seq, (data, kind))
        except SequenceGap as exc:
            log.error("sequence gap", extra={"error": str(exc)})
            self._spawn(self._fail_view(view, exc))
            return
        if view.reorderer.waiting and view.replay is None and not view.catching_up:
            # A frame is missing: core NATS lost it (e.g. while a node failed over). Give it
            # a moment, then read the request's kept frames from the stream.
            view.catching_up = True
            asyncio.get_running_loop().call_later(
                GAP_WAIT_S, lambda: self._spawn(self._catch_up(view))
            )
        for item, item_kind in ready:
            self._enqueue(item, item_kind)
            if item_kind == "delta" and view.accepted_at:
                metrics.observe_ttft(time.monotonic() - view.accepted_at)
                view.accepted_at = 0.0
            if FRAME_TO_STATE.get(item_kind) in TERMINAL:
                metrics.request_finished(_outcome(item, item_kind))
                view.done = True
                self.requests.pop(view.id, None)
                self.last_activity = time.monotonic()
                if view.replay is not None:
                    self._spawn(self._stop_replay(view))
                return

    def on_bus_reconnected(self) -> None:
        """NATS came back: frames published meanwhile never reached us; read them back."""
        for view in list(self.requests.values()):
            if view.replay is None and not view.catching_up:
                view.catching_up = True
                self._spawn(self._catch_up(view, always=True))

    async def _catch_up(self, view: RequestView, *, always: bool = False) -> None:
        """Replay the request's kept frames; the reorderer drops those already sent."""
        if view.done or view.replay is not None or self.close_code is not None:
            view.catching_up = False
            return
        if not always and not view.reorderer.waiting:
            view.catching_up = False  # the late frame came after all
            return
        log.warning("frames missing: reading the request back from the stream")
        delay = GAP_WAIT_S
        while True:
            try:
                replay = await self.bus.replay(view.key, self._on_replayed_frame)
                break
            except TokenwireError as exc:
                # JetStream may be electing a leader: keep trying while the request lives.
                log.warning("cannot catch up yet", extra={"error": str(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            if view.done or self.close_code is not None:
                view.catching_up = False
                return
        view.replay = replay
        if view.done:
            await self._stop_replay(view)

    async def _fail_view(self, view: RequestView, exc: TokenwireError) -> None:
        view.done = True
        self.requests.pop(view.id, None)
        self.last_activity = time.monotonic()
        await self._stop_replay(view)
        self._send(error_frame(exc, id=view.id, seq=view.reorderer.next_seq))

    async def _stop_replay(self, view: RequestView) -> None:
        if view.replay is not None:
            replay, view.replay = view.replay, None
            with contextlib.suppress(Exception):
                await replay.unsubscribe()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background, holding a reference until it is done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- output -------------------------------------------------------------------------

    def _send(self, frame: ServerFrame | ErrorFrame) -> None:
        self._enqueue(encode(frame), frame.type)

    def _enqueue(self, data: bytes, kind: str = "error") -> None:
        if self.close_code is not None:
            return
        try:
            self.queue.put_nowait(data)
            metrics.frame_out(kind)
        except asyncio.QueueFull:
            log.warning("slow consumer: closing", extra={"conn": self.conn_id})
            self.close_code = CloseCode.SLOW_CONSUMER
            self._closing.set()
            self._room.set()


def _outcome(data: bytes, kind: str) -> str:
    """How a request ended, for the requests_total metric (a byte search, no JSON parse)."""
    if kind == "error":
        return "error"
    return "stopped" if b'"stopped":true' in data else "completed"
