"""Every core of a pod: ``tokenwire gateway --workers N`` and ``tokenwire worker --processes N``
as real processes (set through TOKENWIRE_GATEWAY_WORKERS / TOKENWIRE_WORKER_PROCESSES, the
same setting as the flags): distinct processes answer, a killed child comes back, SIGTERM
drains every child and the command exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import nats
import orjson
import pytest

from shared.exceptions import CloseCode
from shared.subjects import REQUESTS_BUCKET, request_key, status_key
from tests.integration.promtext import samples, value
from tests.integration.stack import Proc, Stack
from tests.integration.wsclient import Client, answer_of, assert_seq_complete
from tokenwire.simulator import expected_final_answer

pytestmark = pytest.mark.integration

STACK_ENV = {"TOKENWIRE_DRAIN_DELAY_S": "0.5"}
T = TypeVar("T")


async def until(read: Callable[[], T], ok: Callable[[T], bool], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while not ok(got := read()):
        assert time.monotonic() < deadline, f"not yet after {timeout} s: {got!r}"
        await asyncio.sleep(0.05)
    return got


def children_of(parent: Proc) -> set[int]:
    """The pids of the supervisor's live children (from /proc)."""
    assert parent.popen is not None
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == parent.popen.pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def serving_pid(client: Client, server_port: int, pids: set[int]) -> int:
    """Which of ``pids`` holds the server side of ``client``'s TCP connection."""
    assert client.ws is not None
    client_port = client.ws.local_address[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote = parts[1], parts[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == (
            client_port
        ):
            inode = parts[9]
    assert inode is not None, "the server side of the connection is not in /proc/net/tcp"
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        for fd in fds.iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no child of the gateway holds socket {inode}")


async def test_gateway_workers_answer_from_two_processes_survive_a_kill_and_drain(
    stack: Stack,
) -> None:
    stack.worker()
    gateway = stack.gateway(TOKENWIRE_GATEWAY_WORKERS="2")
    port: int = gateway.port  # type: ignore[attr-defined]
    pids = await until(lambda: children_of(gateway), lambda p: len(p) == 2)
    # Both children accept only once each says it is ready: on a loaded machine the second
    # was still starting while 30 connections all went to the first.
    await until(lambda: gateway.log_text().count('"gateway ready"'), lambda n: n == 2, 60)
    # Keep connecting until each of the two processes holds a connection (bounded).
    by_pid: dict[int, Client] = {}
    spare: list[Client] = []
    for i in range(30):
        client = Client(stack.ws_url(user=f"pod-{i}"))
        await client.connect()
        pid = serving_pid(client, port, pids)
        if pid in by_pid:
            spare.append(client)
        else:
            by_pid[pid] = client
        if len(by_pid) == 2:
            break
        await asyncio.sleep(0.05)  # let the other process's loop come round to its accept
    assert len(by_pid) == 2, "30 connections and all on one gateway process"
    opened = len(by_pid) + len(spare)
    try:
        for pid, client in by_pid.items():
            query = f"from process {pid}"
            frames = await client.finish(await client.chat(query), timeout=30)
            assert frames[-1]["type"] == "end" and answer_of(frames) == (
                expected_final_answer(query)
            )
        # Whichever process answers the scrape, it counts every process's connections.
        await until(
            lambda: samples(f"http://127.0.0.1:{port}/metrics"),
            lambda m: value(m, "tokenwire_gateway_requests_total", outcome="completed") == 2,
        )
        for _ in range(4):
            m = samples(f"http://127.0.0.1:{port}/metrics")
            assert value(m, "tokenwire_gateway_connections_opened_total") == opened
            assert value(m, "tokenwire_gateway_connections") == opened
            assert value(m, "tokenwire_gateway_requests_total", outcome="completed") == 2
    finally:
        for client in spare:
            await client.close()

    # SIGKILL one child: it is restarted, its clients are cut, the gateway keeps serving.
    victim, survivor = list(by_pid)
    os.kill(victim, signal.SIGKILL)
    await asyncio.wait_for(by_pid[victim].closed.wait(), 10)
    await until(lambda: children_of(gateway), lambda p: len(p) == 2 and victim not in p)
    assert f"(pid {victim}) died: killed by SIGKILL; restarting" in gateway.log_text()
    # The new child is ready when it says so (a probe may be answered by the other one).
    await until(lambda: gateway.log_text().count('"gateway ready"'), lambda n: n == 3)
    async with Client(stack.ws_url(user="after-the-kill")) as again:
        frames = await again.finish(await again.chat("still here"), timeout=30)
        assert answer_of(frames) == expected_final_answer("still here")
    # The dead child's connections no longer count as open; its counters still do.
    m = await until(
        lambda: samples(f"http://127.0.0.1:{port}/metrics"),
        lambda m: value(m, "tokenwire_gateway_connections") == 1,
    )
    assert value(m, "tokenwire_gateway_connections_opened_total") == opened + 1

    # SIGTERM drains every child: readyz 503, clients closed to resume elsewhere, exit 0.
    gateway.signal(signal.SIGTERM)
    await until(
        lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").status_code, lambda s: s == 503
    )
    await asyncio.wait_for(by_pid[survivor].closed.wait(), 20)
    assert by_pid[survivor].close_code == CloseCode.DRAINING
    assert gateway.popen is not None and await asyncio.to_thread(gateway.popen.wait, 30) == 0
    assert gateway.log_text().count('"draining"') == 2
    # The children share the log; each of their lines names its process as the supervisor does.
    assert f'"pid":{survivor}' in gateway.log_text()
    assert "Traceback" not in gateway.log_text()


async def _worker_of(nats_url: str, user: str, rid: str) -> str:
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(REQUESTS_BUCKET)
        entry = await kv.get(status_key(request_key(user, rid)))
        assert entry.value is not None
        return str(orjson.loads(entry.value)["worker"])
    finally:
        await nc.close()


async def test_worker_processes_answer_at_once_and_drain_together(stack: Stack) -> None:
    # One answer at a time per process and nothing held in line: concurrent chats must go to
    # both processes.
    worker = stack.worker(
        TOKENWIRE_WORKER_PROCESSES="2",
        TOKENWIRE_WORKER_CONCURRENCY="1",
        TOKENWIRE_WORKER_PREFETCH="0",
        TOKENWIRE_WORKER_DRAIN_S="30",
    )
    stack.gateway()
    assert worker.health_url is not None
    readyz = worker.health_url.replace("/healthz", "/readyz")
    ready = await until(lambda: httpx.get(readyz), lambda r: r.status_code == 200)
    body = ready.json()
    assert body["ready"] is True and [p["process"] for p in body["processes"]] == [0, 1]
    pids = children_of(worker)
    assert len(pids) == 2

    controls = {"delay_ms": 30, "tokens": 50}
    user = "pod-worker"
    async with Client(stack.ws_url(user=user)) as client:
        queries = {f"at once {i} {uuid.uuid4().hex[:4]}": f"q{i}" for i in range(4)}
        for query, rid in queries.items():
            await client.chat(query, rid, inputs={"tw_sim": controls})
        for rid in queries.values():
            await client.wait_for(rid, "delta")
        # Both processes stream now (each holds at most a couple of the four).
        workers = {await _worker_of(stack.nats_url, user, rid) for rid in queries.values()}
        for query, rid in queries.items():
            frames = await client.finish(rid, timeout=60)
            assert_seq_complete(frames)
            assert answer_of(frames) == expected_final_answer(query, controls)
    assert len(workers) == 2, workers
    assert {int(w.rsplit(":", 1)[1]) for w in workers} == pids
    metrics_url = worker.health_url.replace("/healthz", "/metrics")
    # The pod's port sums both processes (a job is counted once acked, after its `end`).
    m = await until(
        lambda: samples(metrics_url),
        lambda m: value(m, "tokenwire_worker_jobs_total", outcome="completed") == 4,
    )
    assert value(m, "tokenwire_worker_answer_tokens_total") >= 4 * 50
    await until(
        lambda: value(samples(metrics_url), "tokenwire_worker_streams_running"), lambda v: v == 0
    )

    # SIGTERM with an answer in flight: it finishes, exact and gapless; every child drains.
    query = f"through the drain {uuid.uuid4().hex[:4]}"
    async with Client(stack.ws_url(user=user)) as client:
        rid = await client.chat(query, inputs={"tw_sim": controls})
        await client.wait_for(rid, "delta")
        worker.signal(signal.SIGTERM)
        await until(lambda: httpx.get(readyz).status_code, lambda s: s == 503)
        frames = await client.finish(rid, timeout=60)
    assert frames[-1]["type"] == "end"
    assert_seq_complete(frames)
    assert answer_of(frames) == expected_final_answer(query, controls)
    assert worker.popen is not None and await asyncio.to_thread(worker.popen.wait, 60) == 0
    log = worker.log_text()
    assert log.count('"draining"') == 2 and "Traceback" not in log
    assert "exited: exit code 0" in log
    assert all(f'"pid":{pid}' in log for pid in pids)  # each child's lines name it


async def test_a_killed_worker_process_is_restarted_and_its_answer_completes(
    stack: Stack,
) -> None:
    worker = stack.worker(TOKENWIRE_WORKER_PROCESSES="2")
    stack.gateway()
    assert worker.health_url is not None
    readyz = worker.health_url.replace("/healthz", "/readyz")
    await until(lambda: httpx.get(readyz).status_code, lambda s: s == 200)
    controls = {"delay_ms": 30, "tokens": 80}
    query = f"outlive a kill {uuid.uuid4().hex[:4]}"
    async with Client(stack.ws_url(user="pod-kill")) as client:
        rid = await client.chat(query, inputs={"tw_sim": controls})
        await client.wait_for(rid, "delta")
        streaming = await _worker_of(stack.nats_url, "pod-kill", rid)
        victim = int(streaming.rsplit(":", 1)[1])
        os.kill(victim, signal.SIGKILL)
        # Redelivered after the ack wait (3 s here) and finished from Dify's history.
        frames = await client.finish(rid, timeout=60)
    assert frames[-1]["type"] == "end"
    assert_seq_complete(frames)
    assert answer_of(frames) == expected_final_answer(query, controls)
    assert f"(pid {victim}) died: killed by SIGKILL; restarting" in worker.log_text()
    pids = await until(lambda: children_of(worker), lambda p: len(p) == 2 and victim not in p)
    assert len(pids) == 2
    await until(lambda: httpx.get(readyz).status_code, lambda s: s == 200)
