"""Letting a WebSocket in: origin, this gateway's cap, credentials, the user's cap.

How this works, cheapest refusal first (docs/security.md has the table):

1. **Origin**, before the upgrade: a browser's ``Origin`` that is not allowed gets HTTP 403.
   A handshake without ``Origin`` (not a browser) passes.
2. **This gateway's cap** (``TOKENWIRE_MAX_CONNECTIONS``): ``too_many_connections``, close 1013.
   **Admission control** (``TOKENWIRE_MAX_HANDSHAKES``): at most that many handshakes in
   progress (steps 3 and 4: the token check and the slot's KV round-trips); one more gets
   ``too_busy`` with ``retry_after_ms`` (``TOKENWIRE_BUSY_RETRY_S``) and close 1013, which the
   clients obey with jitter. A reconnect storm (a gateway with thousands of clients died)
   then costs the survivors bounded work at a time instead of every handshake at once; the
   same holds for ``resume`` frames (``TOKENWIRE_MAX_RESUMES``, in the connection's pump).
3. **Credentials**: the token from the handshake (header, ``bearer.`` subprotocol, query when
   enabled) or, failing that, a first ``auth`` frame within ``TOKENWIRE_AUTH_TIMEOUT_S``.
   Refused: ``unauthorized`` and close 4001, or ``token_expired`` and close 4002.
4. **The user's cap across all gateways** (``TOKENWIRE_MAX_CONNECTIONS_PER_USER``):
   ``too_many_connections``, close 4004.
5. The :class:`~gateway.connection.Connection` runs (the pump around the connection's
   :class:`~shared.session.Session`); its slot is given back when it ends.

Every refusal after the upgrade is an ``error`` frame, then a close whose code tells the
client what to do; none of them reaches NATS beyond the slot lookup, nor Dify.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway import metrics
from gateway.auth import Identity, handshake_token, origin_allowed
from gateway.bus import GatewayBus
from gateway.connection import Connection, Edge
from gateway.limits import ConnectionSlots, Gate, Slot
from shared.exceptions import (
    ClientError,
    CloseCode,
    ErrorCode,
    InternalError,
    TokenwireError,
    TooManyConnections,
    Unauthorized,
)
from shared.frames import AuthFrame, ClientLimits, decode_client_frame
from shared.session import error_bytes
from shared.settings import Settings

__all__ = ["SUBPROTOCOL", "Admission"]

log = logging.getLogger("tokenwire.gateway")

SUBPROTOCOL = "tokenwire.v1"


class _ClientLeft(Exception):
    """The client closed the socket before it was admitted."""


class Admission:
    """Runs steps 1-5 of the module docstring for each WebSocket."""

    handshakes: Gate

    def __init__(
        self, bus: GatewayBus, settings: Settings, edge: Edge, slots: ConnectionSlots
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.edge = edge
        self.slots = slots
        self.limits = ClientLimits(max_frame_bytes=settings.max_frame_bytes)
        self.handshakes = Gate(
            "handshakes",
            settings.max_handshakes,
            settings.busy_retry_s,
            metrics.in_progress("handshake"),
        )

    async def handle(self, ws: WebSocket) -> None:
        if not origin_allowed(
            ws.headers.get("origin"), ws.headers.get("host"), self.settings.allowed_origins
        ):
            metrics.refusal("origin")
            log.info("origin refused", extra={"origin": ws.headers.get("origin", "")[:200]})
            await ws.close(code=CloseCode.POLICY_VIOLATION)  # before accept: HTTP 403
            return
        offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")]
        await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        try:
            with self.edge.local.admitted():
                await self._admitted(ws)
        except TooManyConnections as exc:
            metrics.refusal("connection_limit")
            await _refuse(ws, exc, CloseCode.TRY_AGAIN_LATER)

    async def _admitted(self, ws: WebSocket) -> None:
        if not self.handshakes.enter():
            metrics.refusal("handshake_limit")
            await _refuse(ws, self.handshakes.refusal(), CloseCode.TRY_AGAIN_LATER)
            return
        try:
            admitted = await self._handshake(ws)
        finally:
            self.handshakes.leave()
        if admitted is None:
            return
        identity, conn_id, slot = admitted
        try:
            await Connection(ws, self.bus, self.settings, identity, self.edge, conn_id).serve()
        finally:
            await self.slots.release(slot)

    async def _handshake(self, ws: WebSocket) -> tuple[Identity, str, Slot] | None:
        """Steps 3 and 4: who it is, and the user's slot (None: refused, already told)."""
        try:
            identity = await self._identify(ws)
        except _ClientLeft:
            return None
        except Unauthorized as exc:
            metrics.refusal("auth")
            code = (
                CloseCode.TOKEN_EXPIRED
                if exc.code is ErrorCode.TOKEN_EXPIRED
                else CloseCode.UNAUTHORIZED
            )
            await _refuse(ws, exc, code)
            return None
        except InternalError as exc:
            log.error("cannot check credentials", extra={"error": str(exc)})
            await _refuse(ws, exc, CloseCode.INTERNAL_ERROR)
            return None
        conn_id = secrets.token_hex(10)
        try:
            slot = await self.slots.claim(identity.user, conn_id)
        except TooManyConnections as exc:
            metrics.refusal("connection_limit")
            await _refuse(ws, exc, CloseCode.TOO_MANY_CONNECTIONS)
            return None
        except TokenwireError as exc:
            await _refuse(ws, exc, CloseCode.BUS_UNAVAILABLE)
            return None
        return identity, conn_id, slot

    async def _identify(self, ws: WebSocket) -> Identity:
        auth = self.edge.auth
        if not auth.requires_token:
            return auth.anonymous(ws)
        token = handshake_token(ws, allow_query=self.settings.allow_query_token)
        if token is None:
            token = await self._first_frame_token(ws)
        return await auth.verify(token)

    async def _first_frame_token(self, ws: WebSocket) -> str:
        timeout = self.settings.auth_timeout_s
        try:
            message = await asyncio.wait_for(ws.receive(), timeout)
        except TimeoutError:
            raise Unauthorized(
                f"no token: send it with the handshake or in an auth frame within {timeout:g} s"
            ) from None
        except (WebSocketDisconnect, RuntimeError):
            raise _ClientLeft from None
        if message["type"] == "websocket.disconnect":
            raise _ClientLeft
        data = message.get("text")
        if data is None:
            data = message.get("bytes") or b""
        try:
            frame = decode_client_frame(data, self.limits)
        except ClientError:
            frame = None
        if not isinstance(frame, AuthFrame):
            raise Unauthorized("no token: the first frame must be {type: auth, token}")
        return frame.token


async def _refuse(ws: WebSocket, exc: TokenwireError, code: CloseCode) -> None:
    """Tell the client why (an ``error`` frame), then close with ``code``."""
    with contextlib.suppress(Exception):
        await ws.send_text(error_bytes(exc).decode())
        await ws.close(code=code)
