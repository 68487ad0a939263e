"""A replay reads one request's frames from their literal subject when it can.

A resuming gateway knows the request's key, not the gateway and connection that asked it, so
its frames are found with a wildcard (``tw.frames.<p>.*.*.<key>``). A consumer filtered on that
wildcard costs nats-server ~2.7x a literal one at a replay (``bench/replay_cost.py``), so the
gateway looks the literal subject and its first sequence up first
(:func:`shared.natsedge.kept_span`, at the resume's look-up). These run against a real nats-server and the product's
own frame stream: the lookup must never hide a frame (two subjects keep the wildcard), and a
replay must give exactly the request's frames, in order, whichever way it filtered.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from gateway.bus import GatewayBus
from shared import natsedge
from shared.exceptions import BadParams
from shared.replay_proxy import ConsumerAsk, decode_ask, error_reply
from shared.settings import Settings
from shared.subjects import (
    FRAMES_STREAM,
    REPLAY_SUBJECT,
    request_frames,
    request_frames_any_connection,
)
from tokenwire.natsserver import NatsServer
from worker.replay_proxy import ReplayProxy

pytestmark = pytest.mark.integration

KEY = "ab" * 16
OTHER = "cd" * 16


async def test_kept_span_finds_the_literal_subject_and_its_first_frame(
    nats: NatsServer,
) -> None:
    settings = Settings(nats_url=nats.url)
    nc = await natsedge.connect(settings, name="test")
    try:
        await natsedge.ensure_topology(nc.jetstream(), settings)
        js = nc.jetstream()
        wild = request_frames_any_connection(KEY, partitions=1)
        assert await natsedge.kept_span(js, FRAMES_STREAM, wild) is None  # nothing kept yet

        mine = request_frames("gw1", "conn1", KEY, partitions=1)
        other = request_frames("gw1", "conn1", OTHER, partitions=1)
        await js.publish(other, b"other 1")
        first = await js.publish(mine, b"mine 1")
        await js.publish(other, b"other 2")
        await js.publish(mine, b"mine 2")
        assert await natsedge.kept_span(js, FRAMES_STREAM, wild) == (mine, first.seq)

        # The same key asked again on another connection: two subjects, so no single one.
        await js.publish(request_frames("gw2", "conn2", KEY, partitions=1), b"mine again")
        assert await natsedge.kept_span(js, FRAMES_STREAM, wild) == (None, first.seq)
    finally:
        await nc.close()


@pytest.mark.parametrize("two_subjects", [False, True], ids=["one subject", "two subjects"])
async def test_a_replay_gets_exactly_the_requests_frames_in_order(
    nats: NatsServer, two_subjects: bool
) -> None:
    settings = Settings(nats_url=nats.url)
    bus = GatewayBus(settings)
    await bus.start()
    publisher = await natsedge.connect(settings, name="publisher")
    try:
        js = publisher.jetstream()
        mine = request_frames("gw1", "conn1", KEY, partitions=1)
        second = request_frames("gw2", "conn2", KEY, partitions=1)
        expected = []
        for n in range(1, 41):
            await js.publish(request_frames("gw1", "c9", OTHER, partitions=1), b"noise %d" % n)
            subject = second if two_subjects and n > 30 else mine
            await js.publish(subject, b"frame %d" % n)
            expected.append(b"frame %d" % n)

        got: list[bytes] = []
        done = asyncio.Event()

        async def on_frame(msg: Msg) -> None:
            got.append(msg.data)
            if len(got) >= len(expected) + 2:
                done.set()

        replay = await bus.replay(KEY, on_frame)
        # Live frames after the replay started come too.
        await js.publish(mine, b"live 1")
        await js.publish(request_frames("gw1", "c9", OTHER, partitions=1), b"noise live")
        await js.publish(mine, b"live 2")
        await asyncio.wait_for(done.wait(), 15)
        await asyncio.sleep(0.3)  # nothing else may follow
        assert got == [*expected, b"live 1", b"live 2"]
        # And it filtered the cheap way when it could.
        config = (await replay.consumer_info()).config
        if two_subjects:
            assert config.filter_subject == request_frames_any_connection(KEY, partitions=1)
        else:
            assert config.filter_subject == mine and config.deliver_policy in (
                DeliverPolicy.BY_START_SEQUENCE,
                "by_start_sequence",
            )
        await replay.unsubscribe()
    finally:
        await publisher.close()
        await bus.close()


async def resume_and_read(bus: GatewayBus, key: str, count: int) -> tuple[list[bytes], Any]:
    """What a resume does on the bus: look the request up, replay it; its first ``count``
    frames and the replay."""
    got: list[bytes] = []
    done = asyncio.Event()

    async def on_frame(msg: Msg) -> None:
        got.append(msg.data)
        if len(got) == count:
            done.set()

    assert await bus.has_frames(key)
    replay = await bus.replay(key, on_frame)
    await asyncio.wait_for(done.wait(), 15)
    return got, replay


async def test_a_resume_asks_nats_where_the_frames_are_once(nats: NatsServer) -> None:
    """The look-up finds the span and the replay uses it: two message gets for a resume (one
    for a request with nothing kept), counted where nats-server receives them."""
    settings = Settings(nats_url=nats.url)
    bus = GatewayBus(settings)
    await bus.start()
    publisher = await natsedge.connect(settings, name="publisher")
    watcher = await natsedge.connect(settings, name="watcher")
    try:
        gets: list[str] = []

        async def on_get(msg: Msg) -> None:
            gets.append(msg.subject)

        for api in ("$JS.API.STREAM.MSG.GET.>", "$JS.API.DIRECT.GET.>"):
            await watcher.subscribe(api, cb=on_get)
        await watcher.flush()
        js = publisher.jetstream()
        mine = request_frames("gw1", "conn1", KEY, partitions=1)
        for n in range(1, 6):
            await js.publish(mine, b"frame %d" % n)

        assert not await bus.has_frames(OTHER)
        await watcher.flush()
        await asyncio.sleep(0.2)
        assert len(gets) == 1, gets

        gets.clear()
        got, replay = await resume_and_read(bus, KEY, 5)
        await watcher.flush()
        await asyncio.sleep(0.2)
        assert got == [b"frame %d" % n for n in range(1, 6)]
        assert len(gets) == 2, gets
        assert (await replay.consumer_info()).config.filter_subject == mine
        await replay.unsubscribe()
    finally:
        await watcher.close()
        await publisher.close()
        await bus.close()


async def test_a_restricted_replay_takes_the_wildcard_when_a_worker_refuses_the_literal(
    nats: NatsServer,
) -> None:
    """A rolling upgrade: the worker that answered the look-up said where the frames are, the
    one asked for the consumer is older and allows only the wildcard. The replay still gets
    every frame."""
    settings = Settings(nats_url=nats.url)
    declarer = GatewayBus(settings)  # declares the streams and buckets, as a worker would
    await declarer.start()
    worker = await natsedge.connect(settings, name="worker")
    proxy = ReplayProxy(worker, worker.jetstream(), partitions=1)
    refused: list[str] = []

    async def answer(msg: Msg) -> None:
        ask = decode_ask(msg.data)
        if isinstance(ask, ConsumerAsk) and "*" not in ask.config.get("filter_subject", "*"):
            refused.append(ask.config["filter_subject"])
            old_rule = BadParams("a replay consumer may only read one request's frames")
            await msg.respond(error_reply(old_rule))
            return
        await msg.respond(await proxy.handle(msg.data))

    await worker.subscribe(REPLAY_SUBJECT, cb=answer)
    bus = GatewayBus(Settings(nats_url=nats.url, nats_restricted=True))
    await bus.start()
    try:
        js = worker.jetstream()
        mine = request_frames("gw1", "conn1", KEY, partitions=1)
        for n in range(1, 6):
            await js.publish(mine, b"frame %d" % n)
        got, replay = await resume_and_read(bus, KEY, 5)
        assert got == [b"frame %d" % n for n in range(1, 6)]
        assert refused == [mine]  # the literal was asked first, and refused
        await replay.unsubscribe()
    finally:
        await bus.close()
        await worker.close()
        await declarer.close()
