"""HTTP pieces every simulator endpoint shares: Dify's JSON and error bodies, query parsing,
the SSE body pump, and dropping a connection without a response.

Dropping a connection with no HTTP response at all (fault "refuse", and "cut" mid-body) needs
the socket, which ASGI hides. uvicorn's ``send`` is a bound method of its per-request cycle,
whose ``transport`` attribute is that socket; the app keeps the server's own ``send`` in the
scope under :data:`RAW_SEND` so an endpoint can reach it. An httpx client sees
``httpx.RemoteProtocolError`` in both cases ("Server disconnected without sending a response",
or "peer closed connection without sending complete message body").
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tokenwire.simulator.scenarios import PING_FRAME

__all__ = [
    "AUTH_HEADERS",
    "DROP_GRACE_S",
    "RAW_SEND",
    "USER_REQUIRED",
    "ConnectionDropError",
    "DropConnection",
    "Signal",
    "bad_request",
    "close_transport",
    "error",
    "invalid",
    "is_uuid",
    "json_response",
    "loads_object",
    "not_found",
    "query_int",
    "sse_body",
]

RAW_SEND: Final = "tokenwire.simulator.raw_send"
DROP_GRACE_S: Final = 5.0
AUTH_HEADERS: Final = {"WWW-Authenticate": 'Bearer realm="api"'}
USER_REQUIRED: Final = "Arg user must be provided."


class Signal(enum.Enum):
    """Queue items that are not frames: what the HTTP side must do besides writing."""

    END = "end"
    DROP = "drop"
    STALL = "stall"


class ConnectionDropError(ConnectionError):
    """The server is not uvicorn, so a connection cannot be closed without a response."""


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    """Dify's error body for failures before the stream (NOTES §5)."""
    return json_response({"code": code, "message": message, "status": status}, status, headers)


def invalid(message: str) -> Response:
    return error(400, "invalid_param", message)


def bad_request(message: str) -> Response:
    return error(400, "bad_request", message)


def not_found(message: str) -> Response:
    return error(404, "not_found", message)


def loads_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter; ValueError (→ 400 ``invalid_param``) when out of range."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}")
    return value


def close_transport(scope: Scope) -> bool:
    """Close the client's TCP connection under the ASGI server; False if it cannot be reached."""
    owner = getattr(scope.get(RAW_SEND), "__self__", None)
    transport = getattr(owner, "transport", None)
    close = getattr(transport, "close", None)
    if not callable(close):
        return False
    close()
    return True


async def _wait_disconnect(receive: Receive) -> None:
    """Return once the server has noticed the close, so it does not try to answer after it."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DROP_GRACE_S):
            while (await receive())["type"] != "http.disconnect":
                pass


class DropConnection(Response):
    """A "response" that closes the connection without writing a single byte."""

    def __init__(self) -> None:
        super().__init__(status_code=500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not close_transport(scope):
            raise ConnectionDropError("cannot reach the transport to drop the connection")
        await _wait_disconnect(receive)


async def sse_body(
    queue: asyncio.Queue[bytes | Signal], ping_interval_s: float, started: float, scope: Scope
) -> AsyncIterator[bytes]:
    """A response body: frames from ``queue``, ``event: ping`` on Dify's cadence (counted from
    ``started``, loop time), and the queue's signals (end, cut, stall)."""
    loop = asyncio.get_running_loop()
    next_ping = started + ping_interval_s
    pinging = True
    yield PING_FRAME
    while True:
        try:
            async with asyncio.timeout(max(0.0, next_ping - loop.time()) if pinging else None):
                item = await queue.get()
        except TimeoutError:
            yield PING_FRAME
            while next_ping <= loop.time():
                next_ping += ping_interval_s
            continue
        if isinstance(item, bytes):
            yield item
        elif item is Signal.STALL:
            pinging = False  # a stalled upstream sends nothing at all (NOTES §7, #24675)
        elif item is Signal.DROP:
            if not close_transport(scope):
                raise ConnectionDropError("cannot reach the transport to cut the stream")
            # Starlette cancels this generator when the server reports the disconnect.
            await asyncio.sleep(DROP_GRACE_S)
            return
        else:
            return
