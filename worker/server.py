"""uvicorn for the worker: its FastStream app's lifespan shutdown is the drain."""

from __future__ import annotations

import signal
from types import FrameType

import uvicorn

__all__ = ["WorkerServer"]


class WorkerServer(uvicorn.Server):
    """SIGTERM starts uvicorn's graceful shutdown, whose lifespan shutdown drains the worker
    (running answers finish or are handed back), and the process then exits 0: uvicorn would
    re-raise the SIGTERM it caught, and a supervisor (``tokenwire worker --processes N``)
    reads a death by SIGTERM as a crash. SIGINT, or a second signal, behaves as uvicorn's."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.should_exit:
            self.should_exit = True
            return
        super().handle_exit(sig, frame)
