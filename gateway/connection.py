"""One browser connection's pump: feeds a :class:`~shared.session.Session`, does what it says.

How this works: every decision (what a frame means, what to send, when to close and with
which code, what to count) is the session's; this module only moves bytes and awaits I/O.

* **The reader** reads one client frame at a time and feeds it to the session, in the ASGI
  endpoint's own task (an idle connection runs no task of its own). The I/O the session asks
  for while handling it (rate check, storing the job, a look-up, a replay, a token check) is
  awaited in order before the next frame is read, and each result is fed back.
* **NATS callbacks** feed request frames (live ones routed from the gateway's one frame
  subscription, ``gateway/router.py``, where the connection registers while its session
  listens; replayed ones from ordered consumers); the I/O they lead to runs in the background,
  so a callback never waits on NATS. A replay waits while the send queue is more than half full
  (it would fill it at NATS speed); live frames do not (a client that cannot keep up is closed).
* **The outbox** (``gateway/outbox.py``): a bounded send queue and its one writer. A full
  queue is reported to the session, which closes with ``SLOW_CONSUMER`` (4101): the client
  can reconnect and resume without losing anything, while a full queue never blocks NATS.
* **Calls** (``call`` frames): the session checks them and their rate; the pump sends each to
  a worker over NATS request/reply in the background (a slow call never holds the reader up)
  and feeds back its answer or its error.
* **The clock**: the gateway's one sweep task (``gateway/sweep.py``) calls :meth:`Connection.due`
  at the session's next deadline (token expiry, idleness, a request to read back from the
  stream); a connection holds no timer task of its own.
* **Closing** follows the session's states: while ``draining`` the outbox gets up to
  ``FLUSH_TIMEOUT_S`` to let queued frames out, then the close frame goes (at most
  :data:`CLOSE_TIMEOUT_S`), then the session hears it is ``closed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from opentelemetry import trace
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway import metrics
from gateway.auth import Authenticator, Identity
from gateway.bus import GatewayBus, live_position
from gateway.limits import Gate, LocalConnections, RequestRate
from gateway.outbox import Outbox
from gateway.sweep import Sweep
from shared.calls import CallRequest, decode_reply, encode_call
from shared.exceptions import BusRetryable, CloseCode, TokenwireError, TooBusy
from shared.human_input import InputRequest, decode_input_reply
from shared.logs import trace_id_var
from shared.session import (
    CallWorker,
    CheckCallRate,
    CheckRate,
    Close,
    Command,
    ConnectionState,
    Log,
    LookUp,
    PublishFrame,
    RequestStop,
    Send,
    Session,
    SessionConfig,
    StartReplay,
    StopReplay,
    StoreJob,
    StreamPosition,
    SubmitInput,
    SubscribeConnection,
    Tally,
    Unsubscribe,
    VerifyToken,
    error_bytes,
)
from shared.settings import Settings

__all__ = ["CLOSE_TIMEOUT_S", "Connection", "Edge", "error_bytes"]

log = logging.getLogger("tokenwire.gateway")
tracer = trace.get_tracer("tokenwire.gateway")

# How long the final close may wait for a client that does not read (then the socket just ends).
CLOSE_TIMEOUT_S = 10.0

_SYNC = (Send, Tally, Log, Close)
# How long an answer to a form may take a worker (one KV read and one Dify call).
_INPUT_TIMEOUT_S = 20.0


@dataclass(frozen=True, slots=True)
class Edge:
    """What every connection of a gateway shares: token checks, the limits, the clock."""

    auth: Authenticator
    rates: RequestRate
    local: LocalConnections
    #: The per-user rate of ``call`` frames (None: calls are not rate-limited).
    call_rates: RequestRate | None = None
    #: Feeds every connection's session the clock at its deadlines (one task per gateway).
    sweep: Sweep = field(default_factory=Sweep)
    #: Admission control of ``resume`` frames (None: not capped).
    resumes: Gate | None = None


def _now() -> float:
    return time.time()


class Connection:
    """Pumps one WebSocket; see the module docstring."""

    # Slotted: one per connection, mostly idle (no instance dict).
    __slots__ = (
        "_attached",
        "_background",
        "_client_code",
        "_close_asked",
        "_overflowed",
        "_replays",
        "bus",
        "call_timeout_s",
        "conn_id",
        "edge",
        "outbox",
        "serving",
        "session",
        "user",
        "ws",
    )

    def __init__(
        self,
        ws: WebSocket,
        bus: GatewayBus,
        settings: Settings,
        identity: Identity,
        edge: Edge,
        conn_id: str | None = None,
    ) -> None:
        conn_id = conn_id or secrets.token_hex(10)
        self.ws = ws
        self.bus = bus
        self.edge = edge
        self.user = identity.user
        self.conn_id = conn_id
        self.session = Session(
            SessionConfig.from_settings(
                settings, requires_token=edge.auth.requires_token, gateway_id=bus.gateway_id
            ),
            conn_id=conn_id,
            user=identity.user,
            expires_at=identity.expires_at,
            now=_now(),
        )
        self.outbox = Outbox(ws, settings.send_queue_frames)
        self.call_timeout_s = settings.call_timeout_s
        # The task serving the socket (the ASGI endpoint's own: it reads the client inline, so
        # a connection holds no task of its own), and whether the session asked it to close.
        self.serving: asyncio.Task[Any] | None = None
        self._close_asked = False
        self._overflowed = False
        self._background: set[asyncio.Task[None]] = set()
        self._attached = False
        self._replays: dict[int, Any] = {}
        self._client_code = 1005  # "no status": what the client sent, if it closed

    @property
    def inflight(self) -> int:
        """Requests in flight on this connection (for the per-user cap)."""
        return self.session.inflight

    def close(self, code: CloseCode) -> None:
        """Close the connection with ``code`` (the gateway is draining, for one)."""
        self._dispatch(self.session.close(code))

    def frames_lost(self) -> None:
        """NATS may have lost frames for us (it reconnected, or dropped one of ours as a slow
        consumer): the session reads back what may be missing."""
        self._dispatch(self.session.bus_reconnected())

    # --- lifecycle ------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run until the client leaves or the session closes the connection.

        The client is read in this very task (the ASGI endpoint's), not in a task of its own:
        an idle connection costs no task. When the session decides to close from elsewhere (a
        frame from NATS, the sweep, a background call), :meth:`_do` cancels the read; a close
        decided while handling a client frame ends the read loop by the session's state.
        """
        try:
            await self._carry_out(self.session.start())
            if self.session.state is ConnectionState.OPEN:
                self.edge.local.add(self.user, self)
                self.serving = asyncio.current_task()
                try:
                    await self._reader()
                except asyncio.CancelledError:
                    if not self._close_asked:
                        raise  # the server is going away, not the session's close
                    if self.serving is not None:
                        self.serving.uncancel()
                except Exception:
                    log.error("connection failed", exc_info=True, extra={"conn": self.conn_id})
                    self._dispatch(self.session.fail())
                finally:
                    self.serving = None
        finally:
            self.outbox.release()  # no replay waits for a connection that is closing
            for task in self._background:
                task.cancel()
            self.edge.local.remove(self.user, self)
            if self.session.state is ConnectionState.OPEN:
                # The reader ended: the client left.
                await self._carry_out(self.session.client_left(self._client_code))
            await self._let_go()
            draining = self.session.state is ConnectionState.DRAINING
            await self.outbox.stop(flush=draining)  # the queued frames explain the close
            if draining:
                self.session.flushed()
            if self.session.state is ConnectionState.CLOSING:
                code = self.session.close_code or CloseCode.INTERNAL_ERROR
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.ws.close(code=code), CLOSE_TIMEOUT_S)
                await self._carry_out(self.session.closed())
            self.edge.sweep.disarm(self)

    async def _let_go(self) -> None:
        """Unsubscribe whatever is still held (the session asked already; this is the net)."""
        self._detach()
        held = list(self._replays.values())
        self._replays.clear()
        for sub in held:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _reader(self) -> None:
        while self.session.state is ConnectionState.OPEN:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                self._client_code = int(message.get("code") or 1005)
                return
            data: str | bytes | None = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            inflight = self.edge.local.inflight(self.user)
            await self._carry_out(self.session.receive_client(data, _now(), user_inflight=inflight))

    def due(self, now: float) -> None:
        """The gateway's sweep: the session's deadline has come (``gateway/sweep.py``)."""
        try:
            self._dispatch(self.session.tick(now))
        except Exception:
            log.exception("connection failed", extra={"conn": self.conn_id})
            self._dispatch(self.session.fail())

    # --- frames from NATS -------------------------------------------------------------------

    async def receive_frame(self, msg: Msg) -> None:
        """A live frame, routed from the gateway's subscription (gateway/router.py): the
        frames stream's republish, with its place in the stream."""
        await self._feed(msg, live_position(msg))

    async def _on_replayed_frame(self, msg: Msg) -> None:
        """A kept frame being replayed: unlike live frames, a replay waits for the client."""
        await self.outbox.wait_for_room(lambda: self.session.state is ConnectionState.OPEN)
        await self._feed(msg, StreamPosition(msg.metadata.sequence.stream))

    async def _feed(self, msg: Msg, position: StreamPosition | None) -> None:
        if self.outbox.busy:
            # NATS hands over whole bursts without yielding; let the writer drain into the
            # socket first, so that only a client that does not read overflows the queue.
            await asyncio.sleep(0)
        self._dispatch(self.session.receive_bus(msg.data, _now(), position))

    # --- carrying out commands ------------------------------------------------------------

    def _dispatch(self, commands: list[Command]) -> None:
        """From a callback or the sweep: do the quick commands now, the I/O in the background."""
        io: list[Command] = []
        for command in commands:
            if isinstance(command, _SYNC):
                self._do(command)
            else:
                io.append(command)
        if io:
            self._spawn(self._carry_out(io))
        self._check_deadline()

    async def _carry_out(self, commands: list[Command]) -> None:
        """Do each command in order, awaiting its I/O and feeding the result back."""
        for command in commands:
            if isinstance(command, _SYNC):
                self._do(command)
            else:
                await self._io(command)
        self._check_deadline()

    def _do(self, command: Command) -> None:
        if isinstance(command, Send):
            self._enqueue(command)
        elif isinstance(command, Tally):
            metrics.record(command)
        elif isinstance(command, Log):
            log.log(
                command.level, command.message, extra={"conn": self.conn_id, **dict(command.fields)}
            )
        elif isinstance(command, Close):
            self._stop_reading()
            self.outbox.release()

    def _stop_reading(self) -> None:
        """The session closes: end the read of the client (see :meth:`serve`)."""
        if self._close_asked:
            return
        self._close_asked = True
        serving = self.serving
        # From the serving task itself (a client frame's handling) the read loop ends by the
        # session's state; cancelling there would also cancel the clean-up's first await.
        if serving is not None and serving is not asyncio.current_task():
            serving.cancel()

    def _enqueue(self, command: Send) -> None:
        if self._overflowed:
            return
        if not self.outbox.put(command.data):
            self._overflowed = True  # nothing more goes in: the client is being left
            self._dispatch(self.session.send_overflowed())
            return
        metrics.frame_out(command.kind)

    async def _io(self, command: Command) -> None:
        session = self.session
        if isinstance(command, SubscribeConnection):
            try:
                self.bus.attach(command.conn_id, self)
            except TokenwireError as exc:
                await self._carry_out(session.subscribe_failed(exc))
                return
            self._attached = True
            await self._carry_out(session.subscribed())
        elif isinstance(command, Unsubscribe):
            self._detach()
        elif isinstance(command, CheckRate):
            error: TokenwireError | None = None
            try:
                await self.edge.rates.take(self.user, command.request_id)
            except TokenwireError as exc:
                error = exc
            await self._carry_out(session.rate_checked(command.request_id, _now(), error))
        elif isinstance(command, CheckCallRate):
            refused: TokenwireError | None = None
            if self.edge.call_rates is not None:
                try:
                    await self.edge.call_rates.take(self.user, command.request_id)
                except TokenwireError as exc:
                    refused = exc
            await self._carry_out(session.call_rate_checked(command.request_id, refused))
        elif isinstance(command, CallWorker):
            self._spawn(self._call(command))
        elif isinstance(command, StoreJob):
            await self._store(command)
        elif isinstance(command, SubmitInput):
            self._spawn(self._submit_input(command))
        elif isinstance(command, PublishFrame):
            with contextlib.suppress(TokenwireError):
                await self.bus.publish_frame(command.subject, command.data)
        elif isinstance(command, RequestStop):
            try:
                await self.bus.request_stop(command.key)
            except TokenwireError as exc:
                await self._carry_out(session.stop_failed(exc))
        elif isinstance(command, LookUp):
            await self._look_up(command)
        elif isinstance(command, StartReplay):
            try:
                replay = await self.bus.replay(command.key, self._on_replayed_frame)
            except TokenwireError as exc:
                await self._carry_out(session.replay_failed(command.serial, exc, _now()))
                return
            self._replays[command.serial] = replay
            await self._carry_out(session.replay_started(command.serial))
        elif isinstance(command, StopReplay):
            replay = self._replays.pop(command.serial, None)
            if replay is not None:
                with contextlib.suppress(Exception):
                    await replay.unsubscribe()
        elif isinstance(command, VerifyToken):
            try:
                identity = await self.edge.auth.verify(command.token)
            except TokenwireError as exc:
                await self._carry_out(session.token_refused(exc))
                return
            await self._carry_out(session.token_verified(identity.user, identity.expires_at))

    def _detach(self) -> None:
        """Stop hearing this connection's live frames (a no-op once done)."""
        if self._attached:
            self._attached = False
            self.bus.detach(self.conn_id, self)

    async def _look_up(self, command: LookUp) -> None:
        """A ``resume``: look the request up and start its replay, holding one of the
        gateway's places for resumes in progress (none free: ``too_busy``, retry later)."""
        session, gate = self.session, self.edge.resumes
        if gate is not None and not gate.enter():
            metrics.refusal("resume_limit")
            refused = gate.refusal(command.request_id)
            await self._carry_out(session.resume_refused(command.request_id, refused))
            return
        try:
            try:
                found = await self.bus.has_frames(command.key)
            except BusRetryable:
                # NATS did not answer in time (a storm's load, a leader election): nothing was
                # done, so the request stays as it is and the client resumes again after the
                # hint, as over the cap, instead of the request failing for good.
                metrics.refusal("resume_limit")
                busy = TooBusy(
                    "NATS is too busy to look the request up: resume again shortly",
                    retry_after_s=gate.retry_after_s if gate is not None else 1.0,
                    request_id=command.request_id,
                )
                await self._carry_out(session.resume_refused(command.request_id, busy))
                return
            except TokenwireError as exc:
                await self._carry_out(session.lookup_failed(command.request_id, exc))
                return
            await self._carry_out(session.looked_up(command.request_id, found=found))
        finally:
            if gate is not None:
                gate.leave()

    async def _store(self, command: StoreJob) -> None:
        """Store the job under its trace id (logs, and the span the worker continues)."""
        job = command.job
        token = trace_id_var.set(job.trace_id)
        try:
            try:
                with tracer.start_as_current_span(
                    "chat accept", attributes={"tokenwire.request_id": job.trace_id}
                ):
                    duplicate = await self.bus.publish_job(job)
            except TokenwireError as exc:
                await self._carry_out(self.session.store_failed(job.id, exc, _now()))
                return
            await self._carry_out(self.session.job_stored(job.id, _now(), duplicate=duplicate))
        finally:
            trace_id_var.reset(token)

    async def _call(self, command: CallWorker) -> None:
        """One call to a worker; its answer (or why there is none) goes back to the session."""
        request = CallRequest(command.method, command.params, self.user, secrets.token_hex(8))
        try:
            reply = await self.bus.call(encode_call(request), self.call_timeout_s)
            data = decode_reply(reply)
        except TokenwireError as exc:
            self._dispatch(self.session.call_failed(command.request_id, exc, _now()))
            return
        self._dispatch(self.session.call_answered(command.request_id, data, _now()))

    async def _submit_input(self, command: SubmitInput) -> None:
        """An answer to a form, to one worker; what it said goes back to the session."""
        request = InputRequest(
            key=command.key,
            form_id=command.form_id,
            action=command.action,
            inputs=command.inputs,
            trace_id=secrets.token_hex(8),
        )
        error: TokenwireError | None
        try:
            error = decode_input_reply(
                await self.bus.submit_input(request.to_bytes(), _INPUT_TIMEOUT_S)
            )
        except TokenwireError as exc:
            error = exc
        self._dispatch(self.session.input_answered(command.request_id, _now(), error))

    def _check_deadline(self) -> None:
        """Tell the sweep the session's next deadline (it keeps it when it came earlier)."""
        if self.session.state is ConnectionState.OPEN:
            self.edge.sweep.arm(self, self.session.next_deadline())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background, holding a reference until it is done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
