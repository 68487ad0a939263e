"""Integration fixtures: a whole tokenwire (NATS, simulator, worker, gateway) as processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.stack import Stack, running_stack
from tokenwire.natsserver import NatsServer


@pytest.fixture(scope="module")
def spine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One gateway and one worker over a real nats-server and the Dify simulator over HTTP."""
    with running_stack(tmp_path_factory.mktemp("spine")) as stack:
        stack.gateway()
        yield stack


# Timings short enough for tests; a module may add its own with STACK_ENV = {...}.
FAST = {
    "TOKENWIRE_RETRY_BASE_S": "0.5",
    "TOKENWIRE_RETRY_MAX_S": "4",
    "TOKENWIRE_BREAKER_COOLDOWN_S": "1",
    "TOKENWIRE_JOB_ACK_WAIT_S": "3",
    "TOKENWIRE_RECOVERY_POLL_S": "0.3",
    "TOKENWIRE_LEASE_CHECK_S": "0.5",
}


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test's own, for tests that restart or kill it."""
    server = NatsServer(tmp_path / "nats", stop_grace=5.0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def stack(nats: NatsServer, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The simulator over this test's own NATS; the test starts gateways and workers."""
    env = FAST | getattr(request.module, "STACK_ENV", {})
    s = Stack(nats_url=nats.url, workdir=tmp_path, env_extra=env)
    s.simulator()
    try:
        yield s
    except BaseException:
        print(s.logs())
        raise
    finally:
        s.close()
