"""Nothing lost: Dify outages, dead letters and replay, a worker killed mid-answer, NATS restarts.

Every test runs real processes (nats-server, simulator, workers, gateways) and checks what a
client receives: the simulator's exact answer, seq without gaps or repeats, and Dify asked once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid

import httpx
import orjson
import pytest

from tests.integration.stack import Proc, Stack
from tests.integration.wsclient import Client, answer_of, assert_seq_complete
from tokenwire.natsserver import NatsServer
from tokenwire.simulator import expected_final_answer

pytestmark = pytest.mark.integration


def jobs_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWIRE_")}
    env["TOKENWIRE_NATS_URL"] = stack.nats_url
    return subprocess.run(
        [sys.executable, "-m", "tokenwire", "jobs", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def sim_queries(stack: Stack, query: str) -> list[dict]:
    return [
        r
        for r in httpx.get(f"http://127.0.0.1:{stack.sim_port}/_sim/requests").json()
        if r["query"] == query
    ]


def outage(stack: Stack, mode: str, seconds: float) -> None:
    httpx.post(
        f"http://127.0.0.1:{stack.sim_port}/_sim/outage", json={"mode": mode, "seconds": seconds}
    ).raise_for_status()


@pytest.mark.timeout(240)
async def test_dify_down_for_60_s_jobs_wait_and_are_all_answered(stack: Stack) -> None:
    stack.worker()
    stack.gateway()
    outage(stack, "refuse", 60)
    started = time.monotonic()
    queries = {f"o{i}": f"during the outage {i} {uuid.uuid4().hex[:4]}" for i in range(6)}
    async with Client(stack.ws_url(user="patient")) as client:
        for rid, query in queries.items():
            await client.chat(query, rid=rid, inputs={"tw_sim": {"delay_ms": 2}})
        for rid in queries:
            await client.wait_for(rid, "queued", timeout=30)
        listing = jobs_cli(stack, "list", "--json")
        table = jobs_cli(stack, "list")
        results = {rid: await client.finish(rid, timeout=150) for rid in queries}
    waited = time.monotonic() - started
    assert listing.returncode == 0, listing.stderr
    rows = orjson.loads(listing.stdout)
    assert {r["id"] for r in rows if r["state"] in ("queued", "running")} == set(queries)
    assert all(r["user"] == "patient" for r in rows)
    assert table.returncode == 0 and "queued" in table.stdout and "patient" in table.stdout
    for rid, query in queries.items():
        frames = results[rid]
        kinds = [f["type"] for f in frames]
        assert kinds[0] == "accepted" and kinds[1] == "queued" and kinds[-1] == "end", kinds
        assert all(
            f["reason"] in ("upstream_unavailable", "circuit_open")
            for f in frames
            if f["type"] == "queued"
        )
        assert_seq_complete(frames)
        assert answer_of(frames) == expected_final_answer(query, {"delay_ms": 2})
    assert waited >= 55, "answers arrived while Dify was still down"
    print(f"outage: {len(queries)} requests, all answered {waited:.0f} s after Dify went down")


@pytest.mark.timeout(180)
async def test_exhausted_job_is_dead_lettered_listed_and_replay_answers_it(stack: Stack) -> None:
    stack.worker(TOKENWIRE_JOB_MAX_ATTEMPTS="2")
    stack.gateway()
    query = f"doomed {uuid.uuid4().hex[:4]}"
    controls = {"fault": "500", "fault_times": 2, "delay_ms": 2}
    async with Client(stack.ws_url(user="dora")) as client:
        rid = await client.chat(query, inputs={"tw_sim": controls})
        frames = await client.finish(rid, timeout=60)
    error = frames[-1]
    assert (
        error["type"] == "error"
        and error["code"] == "upstream_unavailable"
        and error["retryable"] is True
    )
    listed = orjson.loads(jobs_cli(stack, "list", "--json").stdout)
    (dead,) = [r for r in listed if r["id"] == rid]
    assert dead["state"] == "dead" and dead["attempts"] == 2 and "500" in (dead["last_error"] or "")
    shown = jobs_cli(stack, "show", dead["key"], "--json")
    assert shown.returncode == 0 and orjson.loads(shown.stdout)["job"]["query"] == query
    replayed = jobs_cli(stack, "replay", dead["key"])
    assert replayed.returncode == 0, replayed.stderr
    # The original client resumes the request after the error it holds and gets the answer.
    async with Client(stack.ws_url(user="dora")) as client:
        await client.send({"type": "resume", "id": rid, "after": error["seq"]})
        rest = await client.finish(rid, timeout=60)
    assert rest[0]["type"] == "reset" and rest[-1]["type"] == "end"
    assert_seq_complete(frames + rest)
    assert answer_of(rest) == expected_final_answer(query, controls)
    assert [
        r for r in orjson.loads(jobs_cli(stack, "list", "--json").stdout) if r["id"] == rid
    ] == []


@pytest.mark.timeout(180)
async def test_worker_killed_mid_answer_another_finishes_it_from_history(stack: Stack) -> None:
    workers = [stack.worker("worker-a"), stack.worker("worker-b")]
    stack.gateway()
    query = f"survive a crash {uuid.uuid4().hex[:4]}"
    controls = {"delay_ms": 40, "tokens": 150}
    async with Client(stack.ws_url(user="kate")) as client:
        rid = await client.chat(query, inputs={"tw_sim": controls})
        start = await client.wait_for(rid, "start")
        await _holding_deltas(client, rid, 10)  # well into the answer, far from its end
        owner = _owner_of(workers, rid, client)
        owner.kill()
        frames = await client.finish(rid, timeout=90)
    kinds = [f["type"] for f in frames]
    assert kinds[-1] == "end" and "reset" not in kinds, kinds
    assert_seq_complete(frames)
    assert answer_of(frames) == expected_final_answer(query, controls)
    assert frames[-1]["message_id"] == start["message_id"]
    assert len(sim_queries(stack, query)) == 1, "Dify was asked twice"


async def _holding_deltas(client: Client, rid: str, count: int, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while sum(f["id"] == rid and f["type"] == "delta" for f in client.arrivals) < count:
            await asyncio.sleep(0.01)


def _owner_of(workers: list[Proc], rid: str, client: Client) -> Proc:
    conn = client.hello["session"]
    owners = [w for w in workers if conn in w.log_text()]
    assert len(owners) == 1, [w.name for w in owners]
    return owners[0]


@pytest.mark.timeout(180)
async def test_nats_restart_keeps_queued_jobs_and_kept_frames(
    stack: Stack, nats: NatsServer
) -> None:
    stack.gateway()
    async with Client(stack.ws_url(user="nora")) as client:
        queued = {f"n{i}": f"queued across a restart {i} {uuid.uuid4().hex[:4]}" for i in range(3)}
        for rid, query in queued.items():
            await client.chat(query, rid=rid, inputs={"tw_sim": {"delay_ms": 2}})
            await client.wait_for(rid, "accepted")
    nats.restart()
    stack.worker()
    async with Client(stack.ws_url(user="nora")) as client:
        for rid in queued:
            await client.send({"type": "resume", "id": rid, "after": 0})
        results = {rid: await client.finish(rid, timeout=60) for rid in queued}
    for rid, query in queued.items():
        assert_seq_complete(results[rid])
        assert answer_of(results[rid]) == expected_final_answer(query, {"delay_ms": 2})
    # Kept frames survive a second restart: the whole answer can be resumed afterwards.
    nats.restart()
    async with Client(stack.ws_url(user="nora")) as client:
        await client.send({"type": "resume", "id": "n0", "after": 0})
        again = await client.finish("n0", timeout=60)
    assert again == results["n0"]


@pytest.mark.timeout(120)
async def test_burst_beyond_capacity_waits_in_line_and_is_answered_in_order(stack: Stack) -> None:
    stack.worker(TOKENWIRE_WORKER_CONCURRENCY="2")
    stack.gateway()
    queries = {f"b{i}": f"burst {i} {uuid.uuid4().hex[:4]}" for i in range(6)}
    controls = {"delay_ms": 20, "tokens": 40}
    async with Client(stack.ws_url(user="burst")) as client:
        for rid, query in queries.items():
            await client.chat(query, rid=rid, inputs={"tw_sim": controls})
        results = {rid: await client.finish(rid, timeout=90) for rid in queries}
    arrival = [(rid, kind) for rid, kind in _arrival_order(client) if kind in ("start", "end")]
    open_streams, most = set(), 0
    for rid, kind in arrival:
        (open_streams.add if kind == "start" else open_streams.discard)(rid)
        most = max(most, len(open_streams))
    assert most <= 2, f"{most} streams to Dify at once with a cap of 2"
    waited_in_line = [rid for rid in queries if any(f["type"] == "queued" for f in results[rid])]
    started = [rid for rid, kind in arrival if kind == "start"]
    assert [rid for rid in started if rid in waited_in_line] == waited_in_line, (
        "the line was not answered in order"
    )

    assert len(waited_in_line) >= 3
    for rid in waited_in_line:
        first = next(f for f in results[rid] if f["type"] == "queued")
        assert first["reason"] == "busy" and first["position"] >= 1
    for rid, query in queries.items():
        assert_seq_complete(results[rid])
        assert answer_of(results[rid]) == expected_final_answer(query, controls)


def _arrival_order(client: Client) -> list[tuple[str, str]]:
    return [(f["id"], f["type"]) for f in client.arrivals]
