"""Integration fixtures: a whole tokenwire (NATS, simulator, worker, gateway) as processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.stack import Stack
from tokenwire.natsserver import NatsServer


@pytest.fixture(scope="module")
def spine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One gateway and one worker over a real nats-server and the Dify simulator over HTTP."""
    workdir: Path = tmp_path_factory.mktemp("spine")
    server = NatsServer(workdir / "nats", stop_grace=5.0)
    server.start()
    stack = Stack(nats_url=server.url, workdir=workdir)
    try:
        stack.simulator()
        stack.worker()
        stack.gateway()
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.close()
        server.stop()
