"""uvicorn for the gateway, with a drain on SIGTERM before uvicorn's own shutdown, and the
supervisor of ``tokenwire gateway --workers N``."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn

from shared.settings import Settings
from tokenwire.supervisor import Supervisor, listen, metrics_dir

__all__ = ["DrainingServer", "run_gateway_pod"]


class DrainingServer(uvicorn.Server):
    """SIGTERM first runs the app's ``state.drain`` (readiness 503, wait for load balancers,
    close every client with 4100 so it resumes elsewhere); then uvicorn shuts down as usual,
    waiting for the closing connections, and the process exits 0: uvicorn re-raises the
    signals it caught once it has shut down, and a drain that went as planned is not a death
    by SIGTERM (a supervisor reads -15 as one). SIGINT, or a second signal, stops at once."""

    def __init__(self, config: uvicorn.Config, asgi_app: Any) -> None:
        super().__init__(config)
        self.asgi_app = asgi_app
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        drain = getattr(self.asgi_app.state, "drain", None)
        if sig != signal.SIGTERM or self.draining or drain is None:
            super().handle_exit(sig, frame)
            return
        self.draining = True
        task = asyncio.get_running_loop().create_task(drain())
        # Not handle_exit: that would record SIGTERM for uvicorn to re-raise at the end.
        task.add_done_callback(lambda _: setattr(self, "should_exit", True))


def run_gateway_pod(
    settings: Settings, host: str, port: int, count: int, child_args: Sequence[str]
) -> int:
    """``tokenwire gateway --workers N``: N gateway processes on one listening socket.

    The socket is bound here, once, and inherited by every child (``--fd``), rather than
    each child binding its own with SO_REUSEPORT: the port is taken (or refused) once, before
    any child starts; a child that dies loses only the connections it had accepted, while
    those waiting in the backlog go to the others; nobody else can bind the port beside us;
    and a busy child, slower to call ``accept``, leaves new connections to idler ones. Each
    child is a fresh process with its own gateway identity (NATS connection, connection ids,
    connection-slot owner); ``child_args`` are the options it shares (TLS files).
    """
    try:
        listener = listen(host, port, send_buffer_bytes=settings.send_buffer_bytes)
    except OSError as exc:
        print(f"refusing to start: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 3
    fd = listener.fileno()
    with listener, metrics_dir() as mdir:
        supervisor = Supervisor(
            "gateway",
            count,
            lambda slot: [
                sys.executable,
                "-m",
                "tokenwire",
                "gateway",
                "--workers",
                "1",
                "--fd",
                str(fd),
                "--host",
                host,
                "--port",
                str(port),
                *child_args,
            ],
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mdir)},
            pass_fds=[fd],
            # The drain's delay, its wait for the closes (5 s), uvicorn's graceful shutdown
            # (10 s), and a margin.
            stop_grace_s=settings.drain_delay_s + 20,
            metrics=mdir,
        )
        return asyncio.run(supervisor.run())
