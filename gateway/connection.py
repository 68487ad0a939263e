"""One browser connection: client frames in, each request's frames out, in ``seq`` order.

How this works: the reader loop decodes client frames (:func:`~shared.frames.decode_client_frame`)
and acts: a ``chat`` becomes a job stored in JetStream, then ``accepted`` (seq 1) is sent; a
``stop`` is announced on NATS; a ``resume`` replays the request's kept frames. Frames for this
connection arrive on one NATS subscription; each request's :class:`~shared.sequencing.Reorderer`
releases them exactly once, in order, into a bounded send queue that one writer task drains. A
client that cannot keep up fills the queue and is closed with ``SLOW_CONSUMER`` (4101): it can
reconnect and ``resume`` without losing anything, while a full queue never blocks NATS.

A bad frame gets an ``error`` frame and nothing else changes: other requests keep streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway.bus import GatewayBus
from shared.exceptions import (
    ClientError,
    CloseCode,
    DuplicateRequest,
    ErrorCode,
    LimitExceeded,
    TokenwireError,
    UnknownRequest,
)
from shared.frames import (
    Accepted,
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

__all__ = ["Connection"]

log = logging.getLogger("tokenwire.gateway")

SERVER_NAME = "tokenwire/0.1"


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


class Connection:
    """Pumps one WebSocket; see the module docstring."""

    def __init__(self, ws: WebSocket, bus: GatewayBus, settings: Settings, user: str) -> None:
        self.ws = ws
        self.bus = bus
        self.settings = settings
        self.user = user
        self.conn_id = secrets.token_hex(10)
        self.limits = ClientLimits(
            max_frame_bytes=settings.max_frame_bytes,
            max_query_chars=settings.max_query_chars,
            max_inputs_bytes=settings.max_inputs_bytes,
            max_inputs_depth=settings.max_inputs_depth,
            max_files=settings.max_files,
        )
        self.requests: dict[str, RequestView] = {}
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(settings.send_queue_frames)
        self.close_code: CloseCode | None = None

    # --- lifecycle ------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run until the client leaves or the connection must close."""
        sub = await self.bus.subscribe_connection(self.conn_id, self._on_frame)
        writer = asyncio.create_task(self._writer())
        self._send(Hello(session=self.conn_id, user=self.user, server=SERVER_NAME))
        try:
            await self._reader()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            for view in self.requests.values():
                await self._stop_replay(view)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            if self.close_code is not None:
                with contextlib.suppress(Exception):
                    await self.ws.close(code=self.close_code)

    async def _reader(self) -> None:
        while self.close_code is None:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            data: str | bytes | None = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            await self._handle(data)

    async def _writer(self) -> None:
        while True:
            data = await self.queue.get()
            if data is None:
                return
            await self.ws.send_text(data.decode())

    # --- client frames --------------------------------------------------------------------

    async def _handle(self, data: str | bytes) -> None:
        try:
            frame = decode_client_frame(data, self.limits)
        except ClientError as exc:
            rid = exc.request_id
            if rid is not None and rid not in self.requests and exc.code is ErrorCode.INVALID_FRAME:
                # A chat we refuse is a request that ends at once: tie the error to its id.
                self._send(error_frame(exc, id=rid, seq=1))
            else:
                self._send(error_frame(exc))
            return
        try:
            if isinstance(frame, ChatFrame):
                await self._chat(frame)
            elif isinstance(frame, StopFrame):
                await self.bus.request_stop(request_key(self.user, frame.id))
            elif isinstance(frame, ResumeFrame):
                await self._resume(frame)
            elif isinstance(frame, PingFrame):
                self._send(Pong())
        except TokenwireError as exc:
            self._send(error_frame(exc))

    async def _chat(self, frame: ChatFrame) -> None:
        if frame.id in self.requests:
            raise DuplicateRequest(f"request {frame.id!r} is already running on this connection")
        if len(self.requests) >= self.settings.max_inflight_per_connection:
            exc = LimitExceeded(
                f"at most {self.settings.max_inflight_per_connection} requests may run at once"
            )
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
            view.replay = await self.bus.replay(key, self._on_frame)
            trace_id_var.reset(token)
            return
        accepted = encode(Accepted(id=frame.id, seq=1))
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
            exc = UnknownRequest(f"request {frame.id!r} is unknown or has expired")
            self._send(error_frame(exc, id=frame.id, seq=frame.after + 1))
            return
        view = RequestView(
            id=frame.id, key=key, reorderer=self._reorderer(frame.after + 1), awaiting_first=True
        )
        self.requests[frame.id] = view
        view.replay = await self.bus.replay(key, self._on_frame)

    # --- frames from workers ----------------------------------------------------------------

    async def _on_frame(self, msg: Msg) -> None:
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
            asyncio.get_running_loop().create_task(self._fail_view(view, exc))
            return
        for item, item_kind in ready:
            self._enqueue(item)
            if FRAME_TO_STATE.get(item_kind) in TERMINAL:
                view.done = True
                self.requests.pop(view.id, None)
                if view.replay is not None:
                    asyncio.get_running_loop().create_task(self._stop_replay(view))
                return

    async def _fail_view(self, view: RequestView, exc: TokenwireError) -> None:
        view.done = True
        self.requests.pop(view.id, None)
        await self._stop_replay(view)
        self._send(error_frame(exc, id=view.id, seq=view.reorderer.next_seq))

    async def _stop_replay(self, view: RequestView) -> None:
        if view.replay is not None:
            replay, view.replay = view.replay, None
            with contextlib.suppress(Exception):
                await replay.unsubscribe()

    # --- output -------------------------------------------------------------------------

    def _send(self, frame: ServerFrame | ErrorFrame) -> None:
        self._enqueue(encode(frame))

    def _enqueue(self, data: bytes) -> None:
        if self.close_code is not None:
            return
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            log.warning("slow consumer: closing", extra={"conn": self.conn_id})
            self.close_code = CloseCode.SLOW_CONSUMER
            # Wake the reader so the connection closes now.
            asyncio.get_running_loop().create_task(self._close_slow())

    async def _close_slow(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(code=CloseCode.SLOW_CONSUMER)
