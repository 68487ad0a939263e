"""The gateway process: a Starlette app serving the WebSocket protocol, the page and probes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from gateway.auth import authenticator_for
from gateway.bus import GatewayBus
from gateway.connection import Connection
from shared.exceptions import CloseCode, Unauthorized
from shared.frames import encode, error_frame
from shared.settings import Settings

__all__ = ["SUBPROTOCOL", "create_app", "default_web_dir"]

log = logging.getLogger("tokenwire.gateway")

SUBPROTOCOL = "tokenwire.v1"


def default_web_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "web"


def create_app(settings: Settings) -> Starlette:
    bus = GatewayBus(settings)
    auth = authenticator_for(settings)
    state = {"draining": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await _connect_with_retry(bus)
        log.info("gateway ready", extra={"nats": _redact(settings.nats_url)})
        yield
        state["draining"] = True
        await bus.close()

    async def websocket(ws: WebSocket) -> None:
        offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")]
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
        await ws.accept(subprotocol=subprotocol)
        try:
            user = auth.user_for(ws)
        except Unauthorized as exc:
            await ws.send_text(encode(error_frame(exc)).decode())
            await ws.close(code=CloseCode.UNAUTHORIZED)
            return
        await Connection(ws, bus, settings, user).serve()

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        if state["draining"]:
            return PlainTextResponse("draining", status_code=503)
        if not bus.connected:
            return PlainTextResponse("nats disconnected", status_code=503)
        return PlainTextResponse("ready")

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    web_dir = settings.web_dir or default_web_dir()
    return Starlette(
        routes=[
            WebSocketRoute("/v1/ws", websocket),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Mount("/", StaticFiles(directory=web_dir, html=True), name="web"),
        ],
        lifespan=lifespan,
    )


async def _connect_with_retry(bus: GatewayBus) -> None:
    """Wait for NATS (it may start after the gateway); readiness stays 503 meanwhile."""
    delay = 0.5
    while True:
        try:
            await bus.start()
            return
        except Exception as exc:
            log.warning(
                "cannot reach NATS yet", extra={"error": type(exc).__name__, "retry_s": delay}
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _redact(url: str) -> str:
    """A NATS URL without credentials, for logs."""
    return ",".join(part.split("@")[-1] for part in url.split(","))
