"""Fixtures every test folder may use: an embedded nats-server on free ports.

Other folders add their own fixtures in their own conftest; keep this one about NATS.
``free_port`` is a plain function (``from tests.conftest import free_port`` or, better,
``from tokenwire.natsserver import free_port``), not a fixture: tests often need several.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tokenwire.natsserver import NatsServer, free_port

__all__ = ["free_port", "nats_server", "nats_url"]


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A started nats-server with JetStream, its data in this test's tmp dir.

    Started on the event loop's thread on purpose: the server's parent-death signal is tied
    to the thread that spawned it. Stopped (SIGTERM, then SIGKILL) after the test, even if
    the test killed or restarted it.
    """
    async with NatsServer(tmp_path / "nats", stop_grace=5.0) as server:
        yield server


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    """``nats://127.0.0.1:PORT`` of :func:`nats_server`."""
    return nats_server.url
