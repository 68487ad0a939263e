"""The gateway process: a Starlette app serving the WebSocket protocol, the uploads
(``POST /v1/files``, ``POST /v1/audio-to-text``: gateway/uploads.py), the page and probes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from pathlib import Path

from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from gateway import metrics
from gateway.admission import SUBPROTOCOL, Admission
from gateway.auth import authenticator_for
from gateway.bus import GatewayBus
from gateway.connection import Connection, Edge
from gateway.limits import ConnectionSlots, Gate, LocalConnections, RequestRate
from gateway.uploads import Uploads
from shared.exceptions import CloseCode
from shared.settings import Settings
from shared.subjects import slot_owner

__all__ = ["SUBPROTOCOL", "create_app", "default_web_dir"]

log = logging.getLogger("tokenwire.gateway")
#: How long a drain waits for its 4100 closes to go out before uvicorn's shutdown (bounded:
#: uvicorn's own graceful shutdown is 10 s, and a client that never reads must not hold it).
_DRAIN_CLOSE_WAIT_S = 5.0


def default_web_dir() -> Path:
    """Where the installed package keeps the page and the SDK (package data of
    ``tokenwire.web``): site-packages for a wheel, the clone's ``web/`` for ``pip install -e``."""
    root = resources.files("tokenwire.web")
    if not isinstance(root, Path):  # a zipped install: Starlette serves only real files
        raise OSError(f"the web page is not on the file system ({root}); set TOKENWIRE_WEB_DIR")
    return root


def create_app(settings: Settings) -> Starlette:
    bus = GatewayBus(settings)
    edge = Edge(
        auth=authenticator_for(settings),
        rates=RequestRate(bus, settings),
        local=LocalConnections(settings),
        call_rates=RequestRate.for_calls(bus, settings),
        resumes=Gate(
            "resumes", settings.max_resumes, settings.busy_retry_s, metrics.in_progress("resume")
        ),
    )
    slots = ConnectionSlots(bus, settings, owner=slot_owner(bus.gateway_id))
    admission = Admission(bus, settings, edge, slots)
    uploads = Uploads(bus, settings, edge.auth, edge.call_rates or edge.rates)
    state = {"draining": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tasks_gauge = asyncio.create_task(metrics.watch_tasks())
        await _connect_with_retry(bus)
        refresher = asyncio.create_task(slots.run())
        gc.freeze()  # the startup heap never dies: full collections need not walk it
        log.info("gateway ready", extra={"nats": _redact(settings.nats_url)})
        yield
        state["draining"] = True
        refresher.cancel()
        edge.sweep.stop()
        tasks_gauge.cancel()
        await edge.auth.close()
        await bus.close()
        _flush_traces()

    async def drain() -> None:
        """SIGTERM: not ready (503) at once, wait for load balancers to notice, then close every
        client with 4100 DRAINING so it reconnects elsewhere and resumes (docs/operations.md)."""
        state["draining"] = True
        metrics.set_draining(True)
        connections = [c for conns in edge.local.by_user.values() for c in conns]
        log.info("draining", extra={"connections": len(connections)})
        await asyncio.sleep(settings.drain_delay_s)
        for conn in [c for conns in edge.local.by_user.values() for c in conns]:
            if isinstance(conn, Connection):
                conn.close(CloseCode.DRAINING)
        # Each close is sent by a task of its connection's. Wait until they have gone out
        # (their connections leave edge.local) before uvicorn's shutdown starts: it closes
        # what is still open with 1012, and a loaded loop let it overtake a 4100 that way.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(edge.local.wait_empty(), _DRAIN_CLOSE_WAIT_S)
        # uvicorn's own shutdown then waits for those connections to finish closing.

    async def websocket(ws: WebSocket) -> None:
        if state["draining"]:
            metrics.refusal("draining")
            await ws.close(code=CloseCode.TRY_AGAIN_LATER)
            return
        await admission.handle(ws)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        if state["draining"]:
            return PlainTextResponse("draining", status_code=503)
        if not bus.connected:
            return PlainTextResponse("nats disconnected", status_code=503)
        return PlainTextResponse("ready")

    async def prometheus(request: Request) -> Response:
        metrics.count_tasks()  # this process's count as of now, not of the last second
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    web_dir = settings.web_dir or default_web_dir()
    if not (web_dir / "index.html").is_file() or not (web_dir / "sdk").is_dir():
        raise OSError(f"no web page in {web_dir} (index.html and sdk/ are needed)")
    app = Starlette(
        routes=[
            WebSocketRoute("/v1/ws", websocket),
            Route("/v1/files", uploads.files, methods=["POST"]),
            Route("/v1/audio-to-text", uploads.audio_to_text, methods=["POST"]),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", prometheus),
            # Only what the page needs: never web/'s node_modules, tests or package files.
            Route("/", _file(web_dir / "index.html")),
            Route("/index.html", _file(web_dir / "index.html")),
            Route("/app.js", _file(web_dir / "app.js")),
            Route("/app.css", _file(web_dir / "app.css")),
            # The embeddable widget (docs/widget.md): a classic script any site may load.
            Route("/widget.js", _file(web_dir / "widget.js")),
            Mount("/sdk", StaticFiles(directory=web_dir / "sdk"), name="sdk"),
        ],
        lifespan=lifespan,
    )
    app.state.drain = drain
    return app


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


def _flush_traces() -> None:
    """Export buffered spans now: uvicorn re-raises SIGINT (or a second signal) on exit, so
    atexit may never run."""
    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if flush is not None:
        flush()


def _file(path: Path) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint serving one file of the web page."""

    async def endpoint(request: Request) -> Response:
        return FileResponse(path)

    return endpoint
