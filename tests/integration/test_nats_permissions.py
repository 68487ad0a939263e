"""Gateways on NATS users with the restricted gateway permissions (tokenwire/natsperms.py).

A nats-server with authorization on: one user per gateway (``gw-a``, ``gw-b``, each allowed only
its own frames and inbox), one for the workers. The stack answers and resumes across gateways
through it (kept frames read through a worker). With gateway A's credentials, a client can read
A's frames (the control: the test would see a leak) but not B's, nor the job queue, other
inboxes, the request bucket, or kept frames other than one request's through a worker.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import nats
import nats.errors
import nats.js.errors
import orjson
import pytest
from nats.aio.msg import Msg

from gateway.replay_client import WorkerMadeConsumers
from shared.subjects import (
    FRAMES_STREAM,
    JOBS_ALL,
    REQUESTS_BUCKET,
    gateway_frames,
    partition_frames,
    request_key,
)
from tests.integration.conftest import FAST
from tests.integration.stack import Stack
from tests.integration.wsclient import Client, answer_of, assert_seq_complete
from tokenwire.natsperms import gateway_permissions, worker_permissions
from tokenwire.natsserver import NatsServer
from tokenwire.simulator import expected_final_answer

pytestmark = pytest.mark.integration

GATEWAYS = ("gw-a", "gw-b")
PASSWORDS = {name: f"pw-{name}-{'x' * 16}" for name in (*GATEWAYS, "worker")}


def _server_config() -> str:
    users = [
        {"user": name, "password": PASSWORDS[name], "permissions": gateway_permissions(name)}
        for name in GATEWAYS
    ]
    users.append(
        {"user": "worker", "password": PASSWORDS["worker"], "permissions": worker_permissions()}
    )
    return "authorization: " + orjson.dumps({"users": users}).decode() + "\n"


def _creds(name: str) -> dict[str, str]:
    return {"TOKENWIRE_NATS_USER": name, "TOKENWIRE_NATS_PASSWORD": PASSWORDS[name]}


@pytest.fixture(scope="module")
def restricted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, NatsServer]]:
    tmp_path = tmp_path_factory.mktemp("restricted")
    server = NatsServer(tmp_path / "nats", extra_config=_server_config(), stop_grace=5.0)
    server.start()
    stack = Stack(nats_url=server.url, workdir=tmp_path, env_extra=dict(FAST))
    try:
        stack.simulator()
        stack.worker(**_creds("worker"))
        for name in GATEWAYS:
            stack.gateway(
                name,
                TOKENWIRE_GATEWAY_ID=name,
                TOKENWIRE_NATS_RESTRICTED="1",
                **_creds(name),
            )
        yield stack, server
    except BaseException:
        print(stack.logs())
        print(server.last_log_lines(30))
        raise
    finally:
        stack.close()
        server.stop()


async def _as(server: NatsServer, name: str, errors: list[str]) -> nats.NATS:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(
        server.url,
        user=name,
        password=PASSWORDS[name],
        error_cb=on_error,
        allow_reconnect=False,
        inbox_prefix=f"_INBOX.{name}",
    )


@pytest.mark.timeout(120)
async def test_restricted_gateways_answer_and_resume_each_others_requests(
    restricted: tuple[Stack, NatsServer],
) -> None:
    stack, server = restricted
    port_a, port_b = stack.gateway_ports
    controls = {"delay_ms": 20, "tokens": 60}
    query = f"permissions {uuid.uuid4().hex[:6]}"
    async with Client(stack.ws_url(port_a, user="rita")) as client:
        rid = await client.chat(query, inputs={"tw_sim": controls})
        await client.wait_for(rid, "delta")
        held = client.frames[rid][-1]["seq"]
    # The connection dropped mid-answer; the user resumes on the other gateway, which reads
    # the kept frames through a worker and then follows the answer live.
    async with Client(stack.ws_url(port_b, user="rita")) as client:
        await client.send({"type": "resume", "id": rid, "after": held})
        rest = await client.finish(rid, timeout=60)
    async with Client(stack.ws_url(port_a, user="rita")) as client:
        await client.send({"type": "resume", "id": rid, "after": 0})
        whole = await client.finish(rid, timeout=30)
    assert rest[0]["seq"] == held + 1, rest[:2]
    assert_seq_complete(rest, first=held + 1)
    assert_seq_complete(whole)
    assert answer_of(whole) == expected_final_answer(query, controls)
    assert [f["seq"] for f in whole[held:]] == [f["seq"] for f in rest]
    # Both replays' consumers (made by the worker, alive until their inactivity threshold)
    # filtered on the request's literal subject, the one gateway A's connection answered on:
    # the worker said where the frames are at the look-up.
    nc = await _as(server, "worker", [])
    try:
        consumers = await nc.jetstream().consumers_info(FRAMES_STREAM)
    finally:
        await nc.close()
    key = request_key("rita", rid)
    filters = {
        c.config.deliver_subject.split(".")[1]: c.config.filter_subject
        for c in consumers
        if c.config.deliver_subject and (c.config.filter_subject or "").endswith(key)
    }
    assert set(filters) == {"gw-a", "gw-b"}, filters
    for filter_subject in filters.values():
        assert filter_subject is not None and filter_subject.startswith("tw.frames.0.gw-a.")
        assert "*" not in filter_subject and ">" not in filter_subject


@pytest.mark.timeout(120)
async def test_a_gateways_credentials_read_its_own_frames_and_nothing_else(
    restricted: tuple[Stack, NatsServer],
) -> None:
    stack, server = restricted
    errors: list[str] = []
    nc = await _as(server, "gw-a", errors)
    heard: dict[str, list[Msg]] = {}

    async def listen(subject: str) -> None:
        heard[subject] = []

        async def got(msg: Msg) -> None:
            heard[subject].append(msg)

        await nc.subscribe(subject, cb=got)

    try:
        own = gateway_frames("gw-a")
        denied = [
            gateway_frames("gw-b"),
            "tw.live.>",
            "tw.frames.>",
            JOBS_ALL,
            "_INBOX.>",
            "tw.calls",
        ]
        for subject in (own, *denied):
            await listen(subject)
        await nc.flush()
        queries = {
            port: f"who reads this {port} {uuid.uuid4().hex[:4]}" for port in stack.gateway_ports
        }
        for port, query in queries.items():
            async with Client(stack.ws_url(port, user="sam")) as client:
                rid = await client.chat(query)
                frames = await client.finish(rid, timeout=30)
                assert answer_of(frames) == expected_final_answer(query, tokens=40)
        await nc.flush()
        await asyncio.sleep(0.3)  # anything in flight to the subscriptions arrives
        # The control: the same credentials do read gateway A's frames.
        assert heard[own], "gateway A's own frames were not heard: the test could not see a leak"
        assert all(".gw-a." in msg.subject for msg in heard[own])
        key_a = _key_of(heard[own])
        for subject in denied:
            assert heard[subject] == [], f"{subject} leaked {len(heard[subject])} messages"
            assert any(
                f'violation for subscription to "{subject.lower()}"' in e.lower() for e in errors
            ), (
                subject,
                errors,
            )

        js = nc.jetstream(timeout=2)
        # JetStream's own API: no consumer on the frames or the jobs, no message by sequence,
        # no read of the request bucket (Dify's ids, form tokens).
        with pytest.raises((nats.errors.Error, asyncio.TimeoutError)):
            await js.subscribe(partition_frames(0), stream=FRAMES_STREAM, ordered_consumer=True)
        with pytest.raises((nats.errors.Error, asyncio.TimeoutError)):
            await js.get_msg(FRAMES_STREAM, seq=1)
        with pytest.raises((nats.errors.Error, asyncio.TimeoutError)):
            kv = await js.key_value(REQUESTS_BUCKET)
            await kv.get(f"{key_a}.dify")
        # Through a worker: one request's frames, never a wildcard.
        proxied = WorkerMadeConsumers(nc)
        with pytest.raises(nats.js.errors.APIError, match="one request's frames"):
            await proxied.subscribe(
                "tw.frames.0.*.*.*", stream=FRAMES_STREAM, ordered_consumer=True
            )
    finally:
        await nc.close()


def _key_of(msgs: list[Msg]) -> str:
    """The request key of the frames heard (the last token of their subject)."""
    keys = {msg.subject.rsplit(".", 1)[-1] for msg in msgs}
    assert keys, msgs
    return sorted(keys)[0]
