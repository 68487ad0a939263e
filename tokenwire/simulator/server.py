"""Serve the simulator over real HTTP with uvicorn: blocking for a CLI, or in a thread for tests.

A real socket matters: the faults "refuse" and "cut" close the TCP connection under the
ASGI server, which an in-process transport (``httpx.ASGITransport``) cannot show.
Both entry points bind to loopback by default; the simulator has no access control of its own
beyond the app key and its ``/_sim`` controls are open, so it should not face a network.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import uvicorn
from starlette.applications import Starlette

from tokenwire.simulator.app import abort_streams, create_app
from tokenwire.simulator.scenarios import SimConfig

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "RunningSimulator", "run", "running", "start_in_thread"]

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 5001
"""Dify's API port, so the default ``DIFY_API_URL`` (http://127.0.0.1:5001/v1) finds it."""
_GRACEFUL_SHUTDOWN_S: Final = 2
"""A safety net only: :class:`_Server` cuts the simulator's own streams before waiting."""


class _Server(uvicorn.Server):
    """uvicorn.Server that cuts the simulator's open streams before waiting for connections."""

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        abort_streams(self._app)
        await super().shutdown(sockets)


def _server(
    config: SimConfig, host: str, port: int, log_level: str, *, own_logging: bool
) -> _Server:
    app = create_app(config)
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        # Embedded (thread) use must not replace the host program's logging configuration.
        log_config=uvicorn.config.LOGGING_CONFIG if own_logging else None,
        access_log=own_logging,
        ws="none",
        lifespan="on",
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
    )
    return _Server(uv_config, app)


def run(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    config: SimConfig | None = None,
    *,
    log_level: str = "info",
) -> None:
    """Serve until interrupted (Ctrl-C). Blocks the calling thread."""
    _server(config or SimConfig(), host, port, log_level, own_logging=True).run()


class RunningSimulator:
    """A simulator serving from a background thread; ``stop()`` shuts it down and joins."""

    def __init__(
        self, server: uvicorn.Server, thread: threading.Thread, sock: socket.socket
    ) -> None:
        self._server, self._thread, self._sock = server, thread, sock
        host, port = sock.getsockname()[:2]
        self.host: str = host
        self.port: int = port

    @property
    def base_url(self) -> str:
        """``http://host:port``: the ``/_sim`` controls live here."""
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        """``http://host:port/v1``: what ``DIFY_API_URL`` should be set to."""
        return f"{self.base_url}/v1"

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()


def start_in_thread(
    config: SimConfig | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = 0,
    log_level: str = "warning",
    startup_timeout: float = 10.0,
) -> RunningSimulator:
    """Start serving in a daemon thread and return once it accepts connections.

    ``port=0`` picks a free port; the socket is bound here, before the thread starts, so the
    port is known and cannot be taken by someone else in between.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = _server(
        config or SimConfig(), host, sock.getsockname()[1], log_level, own_logging=False
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="tw-dify-simulator", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the Dify simulator did not start")
        time.sleep(0.01)
    return RunningSimulator(server, thread, sock)


@contextmanager
def running(
    config: SimConfig | None = None, *, host: str = DEFAULT_HOST, port: int = 0
) -> Iterator[RunningSimulator]:
    """``with running(SimConfig(token_delay_ms=2)) as sim: ... sim.api_url ...``"""
    sim = start_in_thread(config, host=host, port=port)
    try:
        yield sim
    finally:
        sim.stop()
