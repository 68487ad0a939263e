"""uvicorn for the gateway, with a drain on SIGTERM before uvicorn's own shutdown."""

from __future__ import annotations

import asyncio
import signal
from types import FrameType
from typing import Any

import uvicorn

__all__ = ["DrainingServer"]


class DrainingServer(uvicorn.Server):
    """SIGTERM first runs the app's ``state.drain`` (readiness 503, wait for load balancers,
    close every client with 4100 so it resumes elsewhere); then uvicorn shuts down as usual,
    waiting for the closing connections. SIGINT, or a second signal, stops at once."""

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
        task.add_done_callback(lambda _: uvicorn.Server.handle_exit(self, sig, frame))
