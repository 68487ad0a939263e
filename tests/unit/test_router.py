"""gateway/router.py: one subscription's frames, each to the connection its subject names."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg
from nats.errors import SlowConsumerError

from gateway.bus import GatewayBus, frame_pending_limits
from gateway.router import Router
from shared.exceptions import BusUnavailable, InternalError
from shared.natsedge import dropped_subject
from shared.settings import Settings
from shared.subjects import request_frames, request_key

GATEWAY = "gw-a"


class Sink:
    """A connection as the router sees it: what it received, how often it read back."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.lost = 0

    async def receive_frame(self, msg: Msg) -> None:
        self.frames.append(msg.data)

    def frames_lost(self) -> None:
        self.lost += 1


def subject(conn: str, rid: str = "r1", partitions: int = 3) -> str:
    """A frame's subject as the gateway hears it: its stream's republish on ``tw.live.``."""
    published = request_frames(GATEWAY, conn, request_key("u", rid), partitions=partitions)
    return "tw.live." + published.removeprefix("tw.frames.")


def msg(subject: str, data: bytes) -> Msg:
    return Msg(_client=None, subject=subject, data=data)  # type: ignore[arg-type]


async def test_each_frame_reaches_the_connection_its_subject_names() -> None:
    router, a, b = Router(), Sink(), Sink()
    router.register("ca", a)
    router.register("cb", b)
    for i in range(5):
        await router.route(msg(subject("ca", f"r{i}"), b"a%d" % i))
        await router.route(msg(subject("cb", f"r{i}"), b"b%d" % i))
    assert a.frames == [b"a0", b"a1", b"a2", b"a3", b"a4"]
    assert b.frames == [b"b0", b"b1", b"b2", b"b3", b"b4"]
    assert len(router) == 2


async def test_frames_for_a_connection_that_left_are_dropped() -> None:
    router, a = Router(), Sink()
    router.register("ca", a)
    router.unregister("ca", a)
    await router.route(msg(subject("ca"), b"late"))
    await router.route(msg(subject("nobody"), b"stray"))
    await router.route(msg("tw.jobs.chat", b"not a frame subject"))
    assert a.frames == [] and len(router) == 0


async def test_only_the_registered_sink_can_unregister_its_connection() -> None:
    router, a, stale = Router(), Sink(), Sink()
    router.register("ca", a)
    router.unregister("ca", stale)  # e.g. a connection's late clean-up
    await router.route(msg(subject("ca"), b"f"))
    assert a.frames == [b"f"]


def test_a_connection_id_is_routed_to_one_connection() -> None:
    router, a = Router(), Sink()
    router.register("ca", a)
    router.register("ca", a)  # the same one again: harmless
    with pytest.raises(InternalError):
        router.register("ca", Sink())


def test_a_dropped_message_makes_only_its_connection_read_back() -> None:
    router, a, b = Router(), Sink(), Sink()
    router.register("ca", a)
    router.register("cb", b)
    router.lost(subject("ca"))
    router.lost(subject("gone"))
    assert (a.lost, b.lost) == (1, 0)


def test_a_reconnect_makes_every_connection_read_back() -> None:
    router, sinks = Router(), [Sink() for _ in range(3)]
    for i, sink in enumerate(sinks):
        router.register(f"c{i}", sink)
    router.reconnected()
    assert [s.lost for s in sinks] == [1, 1, 1]


def test_no_connection_is_heard_before_the_gateway_subscribed() -> None:
    bus = GatewayBus(Settings())
    with pytest.raises(BusUnavailable):
        bus.attach("ca", Sink())
    assert len(bus.router) == 0


def test_the_gateway_id_is_the_setting_or_fresh_per_process() -> None:
    assert GatewayBus(Settings(gateway_id="pod-1")).gateway_id == "pod-1"
    assert GatewayBus(Settings()).gateway_id != GatewayBus(Settings()).gateway_id


def test_the_subscription_may_queue_a_whole_gateway_s_worth() -> None:
    # At least what one connection's own subscription could queue (65,536 frames, 128 MiB).
    msgs, size = frame_pending_limits(Settings(max_connections=10))
    assert msgs >= 65_536 and size >= 128 * 1024**2
    msgs, size = frame_pending_limits(Settings(max_connections=10_000))
    assert msgs >= 64 * 10_000 and size >= 32 * 1024 * 10_000  # a share per connection


def test_only_a_drop_on_the_frame_subscription_names_a_connection_to_read_back() -> None:
    frames, other = object(), object()  # two subscriptions, as nats-py names them
    lost = SlowConsumerError(subject=subject("ca"), reply="", sid=1, sub=frames)  # type: ignore[arg-type]
    assert dropped_subject(lost, frames) == subject("ca")  # type: ignore[arg-type]
    assert dropped_subject(lost, other) is None  # type: ignore[arg-type]
    assert dropped_subject(TimeoutError(), frames) is None  # type: ignore[arg-type]
