"""The shared limits (gateway/limits.py) over an in-memory KV with NATS' compare-and-set rules."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.bus import KvEntry
from gateway.limits import ConnectionSlots, Gate, LocalConnections, RequestRate, slot_taken
from shared.exceptions import ErrorCode, InternalError, RateLimited, TooManyConnections
from shared.settings import Settings


class MemoryKv:
    """kv_get/kv_create/kv_update/kv_delete as GatewayBus has them, one revision counter."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], KvEntry] = {}
        self.revision = 0
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise InternalError("NATS is unavailable", code=ErrorCode.BUS_UNAVAILABLE)

    async def kv_get(self, bucket: str, key: str) -> KvEntry | None:
        self._check()
        await asyncio.sleep(0)  # let concurrent callers interleave, as real round trips do
        return self.entries.get((bucket, key))

    async def kv_create(self, bucket: str, key: str, value: bytes) -> int | None:
        self._check()
        await asyncio.sleep(0)
        if (bucket, key) in self.entries:
            return None
        return self._put(bucket, key, value)

    async def kv_update(self, bucket: str, key: str, value: bytes, last: int) -> int | None:
        self._check()
        await asyncio.sleep(0)
        entry = self.entries.get((bucket, key))
        if entry is None or entry.revision != last:
            return None
        return self._put(bucket, key, value)

    async def kv_delete(self, bucket: str, key: str, last: int) -> None:
        self._check()
        entry = self.entries.get((bucket, key))
        if entry is not None and entry.revision == last:
            del self.entries[(bucket, key)]

    async def kv_beat(self, bucket: str, key: str, value: bytes, ttl_s: float) -> None:
        self._check()
        self._put(bucket, key, value)

    def expire(self, key: str) -> None:
        """What an entry's own TTL does to it when nobody re-writes it."""
        self.entries.pop(("tw_connections", key), None)

    def expire_all(self) -> None:
        """What the bucket's TTL does to the entries of a gateway that died."""
        self.entries.clear()

    def _put(self, bucket: str, key: str, value: bytes) -> int:
        self.revision += 1
        self.entries[(bucket, key)] = KvEntry(value, self.revision)
        return self.revision


def settings(**values: Any) -> Settings:
    return Settings(**values)


async def test_slots_cap_a_user_across_gateways_and_come_back_on_release() -> None:
    kv = MemoryKv()
    config = settings(max_connections_per_user=2)
    a = ConnectionSlots(kv, config, owner="gw-a")  # type: ignore[arg-type]
    b = ConnectionSlots(kv, config, owner="gw-b")  # type: ignore[arg-type]
    first = await a.claim("alice", "c1")
    await b.claim("alice", "c2")
    with pytest.raises(TooManyConnections) as refused:
        await b.claim("alice", "c3")
    assert refused.value.retry_after_s == config.connection_ttl_s
    await b.claim("bob", "c4")  # another user is not affected
    await a.release(first)
    assert (await b.claim("alice", "c5")).key == first.key


def test_a_slot_counts_while_its_gateway_is_this_one_or_alive() -> None:
    alive = {"gw-b"}.__contains__
    assert slot_taken(b"gw-a c1", "gw-a", alive)  # this gateway's own: no look-up
    assert slot_taken(b"gw-b c2", "gw-a", alive)  # another live gateway's
    assert not slot_taken(b"gw-dead c3", "gw-a", alive)  # its liveness entry expired
    assert not slot_taken(b"", "gw-a", alive)  # unreadable: nobody's


async def test_a_dead_gateways_slots_all_go_together_and_a_live_ones_stay() -> None:
    kv = MemoryKv()
    config = settings(max_connections_per_user=3)
    a = ConnectionSlots(kv, config, owner="gw-a")  # type: ignore[arg-type]
    b = ConnectionSlots(kv, config, owner="gw-b")  # type: ignore[arg-type]
    c = ConnectionSlots(kv, config, owner="gw-c")  # type: ignore[arg-type]
    doomed = [await a.claim("ivan", "c1"), await a.claim("ivan", "c2")]
    kept = await c.claim("ivan", "c3")
    with pytest.raises(TooManyConnections):
        await b.claim("ivan", "c4")
    kv.expire("gw.gw-a")  # gw-a was killed: its liveness entry is not re-written
    taken = [await b.claim("ivan", "c5"), await b.claim("ivan", "c6")]
    assert {s.key for s in taken} == {s.key for s in doomed}
    assert kv.entries[("tw_connections", kept.key)].value == kept.value  # gw-c's stays
    with pytest.raises(TooManyConnections):
        await b.claim("ivan", "c7")


async def test_one_liveness_write_per_gateway_keeps_all_its_slots() -> None:
    kv = MemoryKv()
    slots = ConnectionSlots(kv, settings(max_connections_per_user=50), owner="gw")  # type: ignore[arg-type]
    for n in range(40):
        await slots.claim(f"user-{n % 4}", f"c{n}")
    before = kv.revision
    runner = asyncio.create_task(slots.run())
    await asyncio.sleep(0.05)
    runner.cancel()
    assert kv.revision == before + 1  # the liveness entry only, not 40 slots


async def test_concurrent_claims_never_share_a_slot() -> None:
    kv = MemoryKv()
    slots = ConnectionSlots(kv, settings(max_connections_per_user=3), owner="gw")  # type: ignore[arg-type]
    results = await asyncio.gather(
        *(slots.claim("carol", f"c{n}") for n in range(8)), return_exceptions=True
    )
    claimed = [r for r in results if not isinstance(r, BaseException)]
    assert len(claimed) == 3 and len({s.key for s in claimed}) == 3
    assert all(isinstance(r, TooManyConnections) for r in results if r not in claimed)


async def test_a_slot_lost_to_expiry_is_taken_back_elsewhere() -> None:
    kv = MemoryKv()
    slots = ConnectionSlots(kv, settings(max_connections_per_user=2), owner="gw")  # type: ignore[arg-type]
    mine = await slots.claim("dave", "c1")
    kv.expire_all()  # NATS was out of reach for a whole TTL...
    other = ConnectionSlots(kv, settings(max_connections_per_user=2), owner="gw-2")  # type: ignore[arg-type]
    taken = await other.claim("dave", "c2")  # ...and someone took our slot meanwhile
    assert taken.key == mine.key
    await slots._refresh(mine)
    assert mine.key != taken.key and kv.entries[("tw_connections", mine.key)].value == mine.value


async def test_slots_fail_open_when_nats_is_down() -> None:
    kv = MemoryKv()
    slots = ConnectionSlots(kv, settings(), owner="gw")  # type: ignore[arg-type]
    kv.down = True
    slot = await slots.claim("erin", "c1")
    assert slot.key == ""
    await slots.release(slot)  # nothing to give back, and no error


async def test_the_rate_is_shared_and_refusals_spend_nothing() -> None:
    kv = MemoryKv()
    config = settings(rate_per_user="1/hour", rate_burst=5)
    on_a, on_b = RequestRate(kv, config), RequestRate(kv, config)  # type: ignore[arg-type]
    outcomes = await asyncio.gather(
        *((on_a if n % 2 else on_b).take("frank", f"r{n}") for n in range(12)),
        return_exceptions=True,
    )
    refused = [o for o in outcomes if isinstance(o, RateLimited)]
    assert len(refused) == 7 and sum(o is None for o in outcomes) == 5
    assert all((r.retry_after_s or 0) > 60 and r.request_id for r in refused)
    # Refused requests took nothing: the bucket is as empty as the 5 passes left it.
    with pytest.raises(RateLimited):
        await on_a.take("frank", "again")
    await on_a.take("grace", "r1")  # another user has a full bucket


async def test_the_rate_fails_open_when_nats_is_down() -> None:
    kv = MemoryKv()
    rate = RequestRate(kv, settings(rate_per_user="1/hour", rate_burst=1))  # type: ignore[arg-type]
    await rate.take("heidi", "r1")
    kv.down = True
    await rate.take("heidi", "r2")  # would be refused; NATS cannot say, so it passes


def test_local_counts() -> None:
    class Conn:
        def __init__(self, inflight: int) -> None:
            self.inflight = inflight

    local = LocalConnections(settings(max_connections=1))
    one, two = Conn(2), Conn(3)
    local.add("ivan", one)
    local.add("ivan", two)
    assert local.inflight("ivan") == 5 and local.inflight("judy") == 0
    local.remove("ivan", one)
    assert local.inflight("ivan") == 3
    with local.admitted(), pytest.raises(TooManyConnections), local.admitted():
        pass
    with local.admitted():
        assert local.count == 1


async def test_a_drain_waits_until_the_last_connection_has_left() -> None:
    """The drain closes every client with 4100, then waits for them to leave before uvicorn's
    shutdown would close what is left with 1012."""

    class Conn:
        inflight = 0

    local = LocalConnections(settings())
    await asyncio.wait_for(local.wait_empty(), 1)  # nobody: at once
    a, b, c = Conn(), Conn(), Conn()
    local.add("ivan", a)
    local.add("ivan", b)
    local.add("judy", c)
    waiting = asyncio.create_task(local.wait_empty())
    for leaving in (("ivan", a), ("judy", c)):
        local.remove(*leaving)
        await asyncio.sleep(0.01)
        assert not waiting.done(), "a connection is still serving"
    local.remove("ivan", b)
    await asyncio.wait_for(waiting, 1)


class CountingKv(MemoryKv):
    """MemoryKv that counts round trips."""

    def __init__(self) -> None:
        super().__init__()
        self.trips = 0

    async def kv_get(self, bucket: str, key: str) -> KvEntry | None:
        self.trips += 1
        return await super().kv_get(bucket, key)

    async def kv_update(self, bucket: str, key: str, value: bytes, last: int) -> int | None:
        self.trips += 1
        return await super().kv_update(bucket, key, value, last)

    async def kv_create(self, bucket: str, key: str, value: bytes) -> int | None:
        self.trips += 1
        return await super().kv_create(bucket, key, value)


def tokens_left(kv: MemoryKv, user: str) -> float:
    from shared.ratelimit import decode_state
    from shared.subjects import rate_key

    state = decode_state(kv.entries[("tw_rates", rate_key(user))].value)
    assert state is not None
    return state.tokens


async def test_a_user_on_one_gateway_is_decided_in_memory_and_still_limited_exactly() -> None:
    kv = CountingKv()
    rate = RequestRate(kv, settings(rate_per_user="1/hour", rate_burst=5))  # type: ignore[arg-type]
    await rate.take("judy", "r0")
    await rate.take("judy", "r1")  # two exact checks: nobody else writes this user's bucket
    before = kv.trips
    await rate.take("judy", "r2")  # decided from the copy: returns before any round trip
    assert kv.trips == before
    for n in range(3, 5):
        await rate.take("judy", f"r{n}")
    with pytest.raises(RateLimited) as refused:
        await rate.take("judy", "r5")
    assert (refused.value.retry_after_s or 0) > 60
    await asyncio.sleep(0.01)  # the writes that went alongside have landed
    assert tokens_left(kv, "judy") == pytest.approx(0, abs=0.01)


async def test_another_gateway_spending_costs_at_most_one_chat_and_it_is_paid_back() -> None:
    kv = MemoryKv()
    config = settings(rate_per_user="1/hour", rate_burst=4)
    on_a, on_b = RequestRate(kv, config), RequestRate(kv, config)  # type: ignore[arg-type]
    for n in range(2):
        await on_a.take("kim", f"a{n}")  # a decides alone from now on (2 left)
    for n in range(2):
        await on_b.take("kim", f"b{n}")  # b spends the rest, exactly
    await on_a.take("kim", "a2")  # a's copy did not know: the one chat of slack
    await asyncio.sleep(0.01)
    assert tokens_left(kv, "kim") == pytest.approx(-1, abs=0.01)  # recorded as debt
    with pytest.raises(RateLimited) as refused:
        await on_a.take("kim", "a-more")  # exact again, and the debt is waited off first
    assert (refused.value.retry_after_s or 0) > 7000  # two tokens' refill, not one
    with pytest.raises(RateLimited):
        await on_b.take("kim", "b-more")  # b's copy is empty: refused without a round trip


def test_a_gate_admits_up_to_its_cap_then_refuses_with_the_hint_until_a_place_frees() -> None:
    gate = Gate("handshakes", 2, retry_after_s=0.25)
    assert gate.enter() and gate.enter()
    assert not gate.enter(), "a third in progress is over the cap"
    refusal = gate.refusal()
    assert refusal.code is ErrorCode.TOO_BUSY and refusal.retryable
    assert refusal.retry_after_ms == 250 and refusal.close_code == 1013
    gate.leave()
    assert gate.in_progress == 1 and gate.enter()
