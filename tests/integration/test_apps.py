"""Every Dify app kind through the socket, over real processes (issue 14's "Must show").

NATS, the Dify simulator with its demo apps (``--apps demo``: a workflow, a human-input
workflow, a chat app and a completion app, each with its own key), workers configured with
``TOKENWIRE_DIFY_APPS``, and two gateways whose environment holds no Dify key at all.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.integration.stack import Proc, Stack
from tests.integration.wsclient import Client, answer_of, assert_seq_complete
from tokenwire.natsserver import NatsServer, free_port
from tokenwire.simulator.scenarios import expected_final_answer
from tokenwire.simulator.workflows import expected_workflow_answer, expected_workflow_outputs

pytestmark = pytest.mark.integration

#: The simulator's demo keys (tokenwire/simulator/apps.py DEMO_APPS): each app its own.
KEYS = {
    "wf": "app-workflow",
    "human": "app-human",
    "chat": "app-chat",
    "completion": "app-completion",
    "agent": "app-agent",
    "chatflow-human": "app-chatflow-human",
}
APPS = {
    **KEYS,
    # The completion app again, behind a cluster-wide cap of one stream at a time.
    "capped": {"key": "app-completion", "max_active": 1},
}
WORKER_ENV = {
    "DIFY_API_KEY": "app-simulator",
    "TOKENWIRE_DIFY_APPS": orjson.dumps(APPS).decode(),
    "TOKENWIRE_LOG_LEVEL": "DEBUG",
    "TOKENWIRE_JOB_ACK_WAIT_S": "3",
    "TOKENWIRE_LEASE_CHECK_S": "0.5",
    "TOKENWIRE_RETRY_BASE_S": "0.5",
    "TOKENWIRE_RETRY_MAX_S": "4",
    "TOKENWIRE_APP_SLOT_POLL_S": "0.05",
}


def gateway_without_keys(stack: Stack, name: str) -> Proc:
    """A gateway whose environment names no Dify key, URL or app table."""
    port = free_port()
    stack.gateway_ports.append(port)
    env = {
        k: v
        for k, v in stack._env(TOKENWIRE_LOG_LEVEL="DEBUG").items()
        if not k.startswith("DIFY_") and not k.startswith("TOKENWIRE_DIFY_")
    }
    proc = Proc(
        name=name,
        argv=[
            sys.executable,
            "-m",
            "tokenwire",
            "gateway",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        log_path=stack.workdir / f"{name}.log",
        health_url=f"http://127.0.0.1:{port}/readyz",
    )
    proc.port = port  # type: ignore[attr-defined]
    stack.procs.append(proc)
    return proc.start()


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("apps")
    server = NatsServer(workdir / "nats", stop_grace=5.0)
    server.start()
    stack = Stack(nats_url=server.url, workdir=workdir)
    stack.nats_server = server  # type: ignore[attr-defined]
    try:
        stack.simulator("--apps", "demo")
        stack.worker("worker", **WORKER_ENV)
        gateway_without_keys(stack, "gateway-a")
        gateway_without_keys(stack, "gateway-b")
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.close()
        server.stop()


def sim(stack: Stack, path: str) -> Any:
    base = stack.sim_url.removesuffix("/v1")
    return httpx.get(f"{base}/_sim/{path}", timeout=5).json()


def url(stack: Stack, user: str, gateway: int = 0) -> str:
    return stack.ws_url(stack.gateway_ports[gateway], user=user)


def rid() -> str:
    return f"r-{uuid.uuid4().hex[:10]}"


def only(frames: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == kind]


# --------------------------------------------------------------------------- workflow runs


async def test_a_workflow_run_streams_its_text_and_outputs(apps: Stack) -> None:
    inputs = {"query": "Summarise ticket 4711: the printer is on fire"}
    async with Client(url(apps, "wf-user")) as client:
        assert {"run", "input"} <= set(client.hello.get("features", []))
        request = rid()
        await client.send({"type": "run", "id": request, "app": "wf", "inputs": inputs})
        frames = await client.finish(request, timeout=60)
    assert_seq_complete(frames)
    end = frames[-1]
    assert end["type"] == "end", frames[-3:]
    assert answer_of(frames) == expected_workflow_answer(inputs)
    assert end["outputs"] == expected_workflow_outputs(inputs, {"scenario": "iteration"})
    assert end["status"] == "succeeded" and end["workflow_run_id"]
    assert not end["stopped"]
    events = [f["event"] for f in only(frames, "event")]
    assert events[0] == "workflow_started" and "workflow_finished" not in events
    assert {"node_started", "node_finished", "iteration_started", "iteration_completed"} <= set(
        events
    )
    sent = [r for r in sim(apps, "requests") if r["path"] == "/v1/workflows/run"]
    assert any(r["user"] == "wf-user" and r["inputs"] == inputs for r in sent)
    # The run is recorded as this user's: runs.get reads it for them, for nobody else.
    params = {"workflow_run_id": end["workflow_run_id"], "app": "wf"}
    for user, expected in (("wf-user", "result"), ("someone-else", "error")):
        async with Client(url(apps, user)) as caller:
            await caller.send({"type": "call", "id": "c1", "method": "runs.get", "params": params})
            answer = await caller.next_other(timeout=30)
        assert answer["type"] == expected, answer
        if expected == "result":
            assert answer["data"]["outputs"] == end["outputs"]
        else:
            assert answer["code"] == "not_found"


async def test_stop_reaches_the_workflow_stop_endpoint_with_the_same_user(apps: Stack) -> None:
    inputs = {"query": "a long one", "tw_sim": {"delay_ms": 150, "tokens": 60}}
    async with Client(url(apps, "wf-stopper")) as client:
        request = rid()
        await client.send({"type": "run", "id": request, "app": "wf", "inputs": inputs})
        await client.wait_for(request, "delta", timeout=30)
        await client.send({"type": "stop", "id": request})
        frames = await client.finish(request, timeout=30)
    end = frames[-1]
    assert end["type"] == "end" and end["stopped"], frames[-3:]
    start = only(frames, "start")[0]
    stops = [s for s in sim(apps, "stops") if s["task_id"] == start["task_id"]]
    # `matched`: the workflow stop route of a workflow app, and the run's own task and user.
    assert stops and all(s["user"] == "wf-stopper" and s["matched"] for s in stops), stops


async def test_stop_reaches_the_completion_stop_endpoint(apps: Stack) -> None:
    slow = {"tw_sim": {"delay_ms": 150, "tokens": 60}}
    async with Client(url(apps, "completion-stopper")) as client:
        request = rid()
        await client.send(
            {"type": "run", "id": request, "app": "completion", "query": "long", "inputs": slow}
        )
        await client.wait_for(request, "delta", timeout=30)
        await client.send({"type": "stop", "id": request})
        frames = await client.finish(request, timeout=30)
    assert frames[-1]["type"] == "end" and frames[-1]["stopped"], frames[-3:]
    task = only(frames, "start")[0]["task_id"]
    stops = [s for s in sim(apps, "stops") if s["task_id"] == task]
    assert stops and all(s["user"] == "completion-stopper" and s["matched"] for s in stops)


# --------------------------------------------------------------------------- app kinds


async def test_a_chat_to_a_workflow_a_run_to_a_chat_and_an_unknown_app(apps: Stack) -> None:
    async with Client(url(apps, "kinds")) as client:
        chat_to_wf = await client.chat("hello", app="wf")
        run_to_chat = rid()
        await client.send({"type": "run", "id": run_to_chat, "app": "chat", "inputs": {}})
        unknown = await client.chat("hello", app="nope")
        unknown_run = rid()
        await client.send({"type": "run", "id": unknown_run, "app": "nope"})
        results = {r: (await client.finish(r))[-1] for r in (chat_to_wf, run_to_chat, unknown)}
        results[unknown_run] = (await client.finish(unknown_run))[-1]
    assert results[chat_to_wf]["code"] == "wrong_app_kind"
    assert results[run_to_chat]["code"] == "wrong_app_kind"
    assert results[unknown]["code"] == "unknown_app"
    assert results[unknown_run]["code"] == "unknown_app"
    assert all(not f["retryable"] for f in results.values())


async def test_two_apps_with_their_own_keys_each_get_their_own_requests(apps: Stack) -> None:
    async with Client(url(apps, "two-apps")) as client:
        chat = await client.chat("to the chat app", app="chat")
        completion = rid()
        await client.send(
            {"type": "run", "id": completion, "app": "completion", "query": "to the completion"}
        )
        chat_frames = await client.finish(chat)
        completion_frames = await client.finish(completion)
    assert answer_of(chat_frames) == expected_final_answer("to the chat app", None)
    assert answer_of(completion_frames) == expected_final_answer("to the completion", None)
    sent = {(r["path"], r["query"]): r["app"] for r in sim(apps, "requests")}
    assert sent[("/v1/chat-messages", "to the chat app")] == "Demo chat"
    assert sent[("/v1/completion-messages", "to the completion")] == "Demo completion"


async def test_max_active_one_streams_one_at_a_time_and_answers_all(apps: Stack) -> None:
    httpx.post(apps.sim_url.removesuffix("/v1") + "/_sim/clear", timeout=5)
    queries = [f"capped question {i}" for i in range(3)]
    slow = {"tw_sim": {"delay_ms": 40, "tokens": 12}}
    async with Client(url(apps, "capped-user")) as client:
        ids = []
        for query in queries:
            request = rid()
            ids.append(request)
            await client.send(
                {"type": "run", "id": request, "app": "capped", "query": query, "inputs": slow}
            )
        results = [await client.finish(r, timeout=90) for r in ids]
    for query, frames in zip(queries, results, strict=True):
        assert frames[-1]["type"] == "end", frames[-2:]
        assert answer_of(frames) == expected_final_answer(query, slow["tw_sim"])
    peaks = {a["name"]: a["peak_active"] for a in sim(apps, "apps")}
    assert peaks["Demo completion"] == 1, peaks
    waited = [f for frames in results for f in only(frames, "queued")]
    assert waited and all(f["reason"] == "busy" for f in waited)


async def test_the_newer_agent_mode_answer_is_not_doubled(apps: Stack) -> None:
    async with Client(url(apps, "agent-user")) as client:
        request = await client.chat("plan my trip", app="agent")
        frames = await client.finish(request, timeout=60)
    assert frames[-1]["type"] == "end", frames[-2:]
    expected = expected_final_answer("plan my trip", {"scenario": "new_agent"})
    assert answer_of(frames) == expected
    assert any(f.get("event") == "agent_thought" for f in only(frames, "event"))


async def test_a_worker_killed_mid_run_is_followed_not_run_twice(apps: Stack) -> None:
    inputs = {"query": "a run whose worker dies", "tw_sim": {"delay_ms": 150, "tokens": 60}}
    request = rid()
    async with Client(url(apps, "survivor")) as client:
        await client.send({"type": "run", "id": request, "app": "wf", "inputs": inputs})
        for _ in range(400):
            if len(only(client.frames[request], "delta")) >= 5:
                break
            await asyncio.sleep(0.02)
        victim = next(p for p in apps.procs if p.name.startswith("worker") and p.alive)
        victim.kill()
        apps.worker(f"worker-after-{victim.name}", **WORKER_ENV)
        frames = await client.finish(request, timeout=90)
    assert_seq_complete(frames)
    assert frames[-1]["type"] == "end", frames[-3:]
    controls = inputs["tw_sim"]
    assert answer_of(frames) == expected_workflow_answer(inputs, controls)
    assert frames[-1]["outputs"] == expected_workflow_outputs(
        inputs, {"scenario": "iteration", **controls}
    )
    assert not only(frames, "reset")
    runs = [r for r in sim(apps, "requests") if r["path"] == "/v1/workflows/run"]
    assert len([r for r in runs if r["inputs"] == inputs]) == 1  # never run twice
    # This run's events only: the simulator serves the whole module's tests.
    events = f"/v1/workflow/{frames[-1]['workflow_run_id']}/events"
    followed = [c for c in sim(apps, "calls") if c["path"] == events]
    assert followed and all(c["user"] == "survivor" for c in followed)


# --------------------------------------------------------------------------- human input


def _form_event(frames: list[dict[str, Any]]) -> dict[str, Any]:
    forms = [f for f in only(frames, "event") if f["event"] == "human_input_required"]
    assert len(forms) == 1, frames
    return forms[0]


async def test_a_human_answers_on_another_gateway_after_the_worker_died(apps: Stack) -> None:
    inputs = {"query": "Draft a reply to the angry customer"}
    request = rid()
    async with Client(url(apps, "approver", 0)) as first:
        await first.send({"type": "run", "id": request, "app": "human", "inputs": inputs})
        await first.wait_for(request, "event", timeout=30)
        for _ in range(100):
            if any(f.get("event") == "workflow_paused" for f in first.frames[request]):
                break
            await asyncio.sleep(0.05)
        held = list(first.frames[request])
    form = _form_event(held)
    raw = orjson.dumps(held)
    assert b"form_token" not in raw
    form_id = form["data"]["data"]["form_id"]
    assert form["data"]["data"]["actions"]

    # The worker that paused the run is killed while the run waits: nothing changes.
    worker = next(p for p in apps.procs if p.name.startswith("worker") and p.alive)
    worker.kill()
    apps.worker(f"worker-after-{worker.name}", **WORKER_ENV)

    # Another user cannot answer it: not_found, and nothing reaches Dify.
    async with Client(url(apps, "intruder", 1)) as intruder:
        await intruder.send(
            {
                "type": "input",
                "id": request,
                "form_id": form_id,
                "action": "approve",
                "inputs": {"comment": "mine now"},
            }
        )
        refused = await intruder.next_other(timeout=30)
    assert refused["type"] == "error" and refused["code"] == "not_found", refused
    assert refused["id"] == request and "seq" not in refused
    assert not [c for c in sim(apps, "calls") if c["path"].startswith("/v1/form/")]

    # The owner comes back on the other gateway, resumes, answers; the run finishes once.
    async with Client(url(apps, "approver", 1)) as back:
        await back.send({"type": "resume", "id": request, "after": held[-1]["seq"]})
        await back.send(
            {
                "type": "input",
                "id": request,
                "form_id": form_id,
                "action": "approve",
                "inputs": {"comment": "looks good"},
            }
        )
        rest = await back.finish(request, timeout=60)
        await back.send(
            {
                "type": "input",
                "id": request,
                "form_id": form_id,
                "action": "approve",
                "inputs": {"comment": "again"},
            }
        )
        again = await back.next_other(timeout=30)
    frames = held + rest
    assert_seq_complete(frames)
    ends = [f for f in frames if f["type"] in ("end", "error")]
    assert len(ends) == 1 and ends[0]["type"] == "end", ends
    assert ends[0]["status"] == "succeeded"
    assert ends[0]["outputs"] == expected_workflow_outputs(
        inputs, {"scenario": "human"}, action="approve"
    )
    assert answer_of(frames) == expected_workflow_answer(inputs, action="approve")
    assert any(f.get("event") == "human_input_form_filled" for f in rest)
    assert again["code"] == "form_submitted" and again["id"] == request
    runs = [r for r in sim(apps, "requests") if r["path"] == "/v1/workflows/run"]
    assert len([r for r in runs if r["inputs"] == inputs]) == 1  # never run twice


async def test_a_run_waiting_for_a_human_survives_a_nats_restart(apps: Stack) -> None:
    inputs = {"query": "Wait across a NATS restart"}
    request = rid()
    async with Client(url(apps, "patient", 0)) as client:
        await client.send({"type": "run", "id": request, "app": "human", "inputs": inputs})
        for _ in range(300):
            if any(f.get("event") == "workflow_paused" for f in client.frames[request]):
                break
            await asyncio.sleep(0.05)
        held = list(client.frames[request])
    form_id = _form_event(held)["data"]["data"]["form_id"]
    apps.nats_server.restart(grace=5.0)  # type: ignore[attr-defined]
    answer = {
        "type": "input",
        "id": request,
        "form_id": form_id,
        "action": "approve",
        "inputs": {"comment": "still here"},
    }
    rest: list[dict[str, Any]] = []
    for _ in range(60):  # the processes reconnect to NATS within a few seconds
        async with Client(url(apps, "patient", 1)) as back:
            await back.send({"type": "resume", "id": request, "after": held[-1]["seq"]})
            await back.send(answer)
            try:
                refused = await back.next_other(timeout=2)
            except TimeoutError:
                rest = await back.finish(request, timeout=60)
                break
            assert refused["retryable"], refused  # NATS not back yet: try again
        await asyncio.sleep(0.5)
    frames = held + rest
    assert_seq_complete(frames)
    assert frames[-1]["type"] == "end" and frames[-1]["status"] == "succeeded", frames[-2:]
    assert answer_of(frames) == expected_workflow_answer(inputs, action="approve")


async def test_a_form_left_to_expire_lets_the_run_go_on_without_it(apps: Stack) -> None:
    controls = {"form_expiry_s": 8}
    inputs = {"query": "Nobody will answer this", "tw_sim": controls}
    request = rid()
    async with Client(url(apps, "absent")) as client:
        await client.send({"type": "run", "id": request, "app": "human", "inputs": inputs})
        frames = await client.finish(request, timeout=60)
        form_id = _form_event(frames)["data"]["data"]["form_id"]
        await client.send(
            {
                "type": "input",
                "id": request,
                "form_id": form_id,
                "action": "approve",
                "inputs": {"comment": "too late"},
            }
        )
        late = await client.next_other(timeout=30)
    assert_seq_complete(frames)
    assert frames[-1]["type"] == "end" and frames[-1]["status"] == "succeeded", frames[-2:]
    assert any(f.get("event") == "human_input_form_timeout" for f in frames)
    assert frames[-1]["outputs"] == expected_workflow_outputs(
        inputs, {"scenario": "human", **controls}, action="timeout"
    )
    assert answer_of(frames) == expected_workflow_answer(inputs, controls, action="timeout")
    assert late["code"] == "form_expired" and late["id"] == request


async def test_a_chatflow_waits_for_a_human_too(apps: Stack) -> None:
    query = "May I send this refund?"
    async with Client(url(apps, "chatflow-user")) as client:
        request = await client.chat(query, app="chatflow-human")
        for _ in range(300):
            if any(f.get("event") == "workflow_paused" for f in client.frames[request]):
                break
            await asyncio.sleep(0.05)
        form = _form_event(client.frames[request])
        assert b"form_token" not in orjson.dumps(client.frames[request])
        await client.send(
            {
                "type": "input",
                "id": request,
                "form_id": form["data"]["data"]["form_id"],
                "action": "approve",
                "inputs": {"comment": "yes"},
            }
        )
        frames = await client.finish(request, timeout=60)
    assert_seq_complete(frames)
    assert frames[-1]["type"] == "end", frames[-2:]
    assert answer_of(frames) == expected_workflow_answer({}, action="approve", query=query)
    assert frames[-1]["conversation_id"]


async def test_stop_while_the_run_waits_for_a_human(apps: Stack) -> None:
    inputs = {"query": "Wait for me, then stop"}
    request = rid()
    async with Client(url(apps, "stopper", 0)) as client:
        await client.send({"type": "run", "id": request, "app": "human", "inputs": inputs})
        for _ in range(300):
            if any(f.get("event") == "workflow_paused" for f in client.frames[request]):
                break
            await asyncio.sleep(0.05)
        await client.send({"type": "stop", "id": request})
        frames = await client.finish(request, timeout=30)
    assert frames[-1]["type"] == "end" and frames[-1]["stopped"], frames[-3:]
    assert_seq_complete(frames)


# --------------------------------------------------------------------------- the Python client


async def test_the_python_client_runs_a_workflow_and_answers_its_form(apps: Stack) -> None:
    from tokenwire.client import Connection

    inputs = {"query": "The client asks for approval"}
    port = apps.gateway_ports[0]
    async with Connection(f"ws://127.0.0.1:{port}/v1/ws", user="py-client") as conn:
        done = await (await conn.run({"query": "plain run"}, app="wf")).wait()
        assert done.end is not None and done.end.status == "succeeded"
        assert done.end.outputs == expected_workflow_outputs(
            {"query": "plain run"}, {"scenario": "iteration"}
        )
        stream = await conn.run(inputs, app="human")
        form = await asyncio.wait_for(stream.wait_for_form(), 30)
        assert form is not None and "form_token" not in form
        request_id = stream.id
    # Answered later, from another connection on the other gateway.
    other = apps.gateway_ports[1]
    async with Connection(f"ws://127.0.0.1:{other}/v1/ws", user="py-client") as conn:
        stream = await conn.resume(request_id)
        assert await asyncio.wait_for(stream.wait_for_form(), 30) is not None
        await stream.answer("reject", {"comment": "shorter, please"})
        await asyncio.wait_for(stream.wait(), 60)
    assert stream.end is not None and stream.end.status == "succeeded"
    assert stream.end.outputs == expected_workflow_outputs(
        inputs, {"scenario": "human"}, action="reject"
    )
    assert stream.text == expected_workflow_answer(inputs, action="reject")


# --------------------------------------------------------------------------- secrets


async def test_keys_never_reach_a_frame_a_log_or_the_gateways_environment(apps: Stack) -> None:
    """Runs last in this module: every frame above went through these gateways."""
    secrets = [key.encode() for key in {*KEYS.values(), "app-simulator"}]
    seen: list[bytes] = []
    async with Client(url(apps, "key-hunter")) as client:
        ids = [await client.chat("any key?", app=name) for name in ("chat", "agent", "wf")]
        for name in ("wf", "completion", "chat", "nope"):
            request = rid()
            ids.append(request)
            await client.send({"type": "run", "id": request, "app": name, "query": "key?"})
        for request in ids:
            seen.append(orjson.dumps(await client.finish(request, timeout=60)))
        seen.append(orjson.dumps([client.hello, *client.other]))
    assert not [s for s in secrets if any(s in raw for raw in seen)]
    _no_key_in_logs_or_gateway_environment(apps, secrets)


def _no_key_in_logs_or_gateway_environment(apps: Stack, secrets: list[bytes]) -> None:
    for proc in apps.procs:
        if proc.name.startswith("gateway"):
            assert proc.popen is not None
            environ = Path(f"/proc/{proc.popen.pid}/environ").read_bytes()
            assert not any(s in environ for s in secrets), proc.name
            assert b"DIFY_API_KEY" not in environ and b"TOKENWIRE_DIFY_APPS" not in environ
        if proc.name.startswith(("gateway", "worker")):
            text = proc.log_text().encode()
            leaked = [s for s in secrets if s in text]
            assert not leaked, (proc.name, leaked)
    assert os.environ.get("TOKENWIRE_DIFY_APPS") is None
