"""The edge's limits: connection caps, request rates, in-flight counts.

How this works:

* **Per-user connections, across all gateways** (``TOKENWIRE_MAX_CONNECTIONS_PER_USER``): a
  user has that many *slots*, KV keys ``<user hash>.<n>`` in the ``tw_connections`` bucket,
  each naming the gateway that holds it. A connection claims the first free slot with a KV
  *create* (atomic: two gateways cannot take the same slot), and deletes it when it ends.
  Each gateway process keeps one *liveness* entry (``gw.<owner>``, the owner being its gateway
  id with a fresh suffix per start: :func:`shared.subjects.slot_owner`) whose own TTL is
  ``TOKENWIRE_CONNECTION_TTL_S``, re-written every ttl/3: one write per gateway, not one per
  connection. A slot whose gateway's liveness entry expired is free (taken over with a
  compare-and-set), so the slots of a gateway that was killed (no clean-up ran) all stop
  counting together, at most ttl after its last write.
* **Per-user request rate, across all gateways** (``TOKENWIRE_RATE_PER_USER``,
  ``TOKENWIRE_RATE_BURST``): a token bucket (:mod:`shared.ratelimit`) kept in the
  ``tw_rates`` bucket, updated with compare-and-set. A user whose chats come through this
  gateway alone is decided from a copy in memory, the write going alongside the store
  (:class:`RequestRate` has the rule and its bounded slack).
* **Per-connection frame rate** (``TOKENWIRE_FRAME_RATE``): a bucket in memory, kept by the
  connection's session (:mod:`shared.session`); every client frame takes a token, so floods
  of ``resume``/``stop``/``ping`` are refused cheaply.
* **Per-gateway**: the connection count (``TOKENWIRE_MAX_CONNECTIONS``) and the requests in
  flight of each user on this gateway (``TOKENWIRE_MAX_INFLIGHT_PER_USER``).
* **Admission control, per gateway** (:class:`Gate`): handshakes in progress
  (``TOKENWIRE_MAX_HANDSHAKES``) and resumes in progress (``TOKENWIRE_MAX_RESUMES``); over
  the cap, ``too_busy`` with the hint ``TOKENWIRE_BUSY_RETRY_S``.

When NATS cannot answer (an outage, a JetStream leader election after a node died), the two
shared limits fail open: the connection is admitted without a slot, the chat passes the rate
check, and a warning is logged. Storing the chat still needs JetStream, so nothing is
accepted that could not be stored; a short outage just does not turn into refusals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from gateway.bus import GatewayBus, KvEntry
from shared.exceptions import (
    InternalError,
    RateLimited,
    TokenwireError,
    TooBusy,
    TooManyConnections,
)
from shared.ratelimit import BucketState, Rate, decode_state, encode_state, spend, take
from shared.settings import Settings
from shared.subjects import (
    CONNECTIONS_BUCKET,
    RATES_BUCKET,
    call_rate_key,
    connection_slot_key,
    gateway_liveness_key,
    rate_key,
)
from shared.topology import SLOT_LIFETIME_S

__all__ = [
    "ConnectionSlots",
    "Gate",
    "HasInflight",
    "LocalConnections",
    "RequestRate",
    "Slot",
    "slot_holder",
    "slot_taken",
]

log = logging.getLogger("tokenwire.gateway")

# Compare-and-set rounds before a contended rate bucket gives up (and refuses, retryable).
_CAS_ATTEMPTS = 8
_REFRESH_BATCH = 64


@dataclass(slots=True, eq=False)
class Slot:
    """One connection's claim on one of its user's slots."""

    user: str
    conn_id: str
    key: str
    revision: int
    value: bytes
    #: time.monotonic() of the last write (re-written after a quarter of SLOT_LIFETIME_S).
    written: float = 0.0
    released: bool = False


def slot_holder(value: bytes) -> str:
    """The gateway a slot's value names (``"<gateway> <connection>"``; "" if unreadable)."""
    holder, _, _ = value.partition(b" ")
    return holder.decode(errors="replace")


def slot_taken(value: bytes, owner: str, alive: Callable[[str], bool]) -> bool:
    """Whether a slot that holds ``value`` counts against the user's cap: it does while the
    gateway it names is ``owner`` (this one) or ``alive`` (its liveness entry is there). A
    slot of a gateway whose liveness entry expired is free, and so are all of its slots."""
    holder = slot_holder(value)
    return holder == owner or (bool(holder) and alive(holder))


class ConnectionSlots:
    """The per-user connection cap, shared by every gateway through NATS KV."""

    def __init__(self, bus: GatewayBus, settings: Settings, owner: str) -> None:
        self.bus = bus
        self.cap = settings.max_connections_per_user
        self.ttl = settings.connection_ttl_s
        self.owner = owner
        self.held: dict[str, Slot] = {}
        self._beaten = False

    async def claim(self, user: str, conn_id: str) -> Slot:
        """Take a free slot of ``user`` or raise :class:`TooManyConnections`."""
        value = f"{self.owner} {conn_id}".encode()
        try:
            if not self._beaten:
                await self.beat()  # others must see this gateway alive before its slots
            slot = await self._first_free(user, value)
        except InternalError as exc:
            log.warning("connection cap unavailable: admitting", extra={"error": str(exc)})
            return Slot(user=user, conn_id=conn_id, key="", revision=0, value=value)
        if slot is None:
            raise TooManyConnections(
                f"this user already has {self.cap} connections open (all gateways)",
                retry_after_s=self.ttl,
            )
        slot.conn_id = conn_id
        self.held[conn_id] = slot
        return slot

    async def _first_free(self, user: str, value: bytes, skip: str | None = None) -> Slot | None:
        alive: dict[str, bool] = {}  # each other gateway's liveness, read once per claim
        for n in range(self.cap):
            key = connection_slot_key(user, n)
            if key == skip:
                continue
            revision = await self.bus.kv_create(CONNECTIONS_BUCKET, key, value)
            if revision is None:
                revision = await self._take_over(key, value, alive)
            if revision is not None:
                return Slot(
                    user=user,
                    conn_id="",
                    key=key,
                    revision=revision,
                    value=value,
                    written=time.monotonic(),
                )
        return None

    async def _take_over(self, key: str, value: bytes, alive: dict[str, bool]) -> int | None:
        """The slot ``key`` exists: take it (compare-and-set) if its gateway is dead."""
        entry = await self.bus.kv_get(CONNECTIONS_BUCKET, key)
        if entry is None:
            return await self.bus.kv_create(CONNECTIONS_BUCKET, key, value)  # freed meanwhile
        holder = slot_holder(entry.value)
        if holder and holder != self.owner and holder not in alive:
            beat = await self.bus.kv_get(CONNECTIONS_BUCKET, gateway_liveness_key(holder))
            alive[holder] = beat is not None
        if slot_taken(entry.value, self.owner, lambda gateway: alive.get(gateway, False)):
            return None
        return await self.bus.kv_update(CONNECTIONS_BUCKET, key, value, entry.revision)

    async def release(self, slot: Slot) -> None:
        """Give the slot back (it stops counting anyway once this gateway's liveness ends)."""
        self.held.pop(slot.conn_id, None)
        if not slot.key:
            return  # admitted while the cap was unavailable: nothing to give back
        slot.released = True
        try:
            await self.bus.kv_delete(CONNECTIONS_BUCKET, slot.key, slot.revision)
        except TokenwireError as exc:
            log.warning("cannot release a connection slot", extra={"error": str(exc)})

    async def beat(self) -> None:
        """Write this gateway's liveness entry: its slots count for ``ttl`` from now."""
        await self.bus.kv_beat(
            CONNECTIONS_BUCKET, gateway_liveness_key(self.owner), b"alive", self.ttl
        )
        self._beaten = True

    async def run(self) -> None:
        """Keep this gateway's slots counting (until cancelled): one liveness write every
        ttl/3, whatever the number of connections; a slot itself is re-written only after a
        quarter of its lifetime (a connection open for hours)."""
        while True:
            try:
                await self.beat()
            except TokenwireError as exc:
                log.warning("cannot refresh the gateway's liveness", extra={"error": str(exc)})
            old = time.monotonic() - SLOT_LIFETIME_S / 4
            slots = [s for s in self.held.values() if s.key and s.written < old]
            for start in range(0, len(slots), _REFRESH_BATCH):
                batch = slots[start : start + _REFRESH_BATCH]
                await asyncio.gather(*(self._refresh(s) for s in batch))
            await asyncio.sleep(self.ttl / 3)

    async def _refresh(self, slot: Slot) -> None:
        if slot.released:
            return
        try:
            revision = await self.bus.kv_update(
                CONNECTIONS_BUCKET, slot.key, slot.value, slot.revision
            )
            if revision is None:
                # Another gateway took the slot over (this one's liveness lapsed in a NATS
                # outage longer than the ttl): take another one if there is one.
                other = await self._first_free(slot.user, slot.value, skip=slot.key)
                if other is None:
                    log.warning("a user is over the connection cap after a NATS outage")
                    return
                slot.key, revision = other.key, other.revision
            slot.revision, slot.written = revision, time.monotonic()
            if slot.released:  # released while this write was on its way: delete it still
                await self.bus.kv_delete(CONNECTIONS_BUCKET, slot.key, revision)
        except TokenwireError as exc:
            log.warning("cannot refresh a connection slot", extra={"error": str(exc)})


@dataclass(slots=True, eq=False)
class _Copy:
    """This gateway's copy of one user's shared bucket (see :class:`RequestRate`)."""

    state: BucketState
    #: The revision of this gateway's last write of the shared entry.
    revision: int
    #: The shared entry held this gateway's own previous write when it last wrote: nobody
    #: else is spending, so the copy is the truth and may decide alone.
    exclusive: bool = False
    #: The write of a chat decided from the copy, while it is on its way.
    sync: asyncio.Task[None] | None = None
    used: float = 0.0


class RequestRate:
    """The per-user chat rate, shared by every gateway through NATS KV; :meth:`for_calls`
    is the same rule for ``call`` frames, with its own rate and its own key.

    A chat is decided before it is stored, and the round trips to KV stay out of its way
    when they can: after two chats of a user in a row whose writes found the shared entry as
    this gateway left it, the gateway decides from its copy of the bucket in memory and
    writes the spend alongside the store (:func:`shared.ratelimit.spend`). A refusal from the
    copy is exact (the copy never holds fewer tokens than the shared bucket: both refill
    alike, and the copy has only this gateway's spends). A pass can be one too many when
    another gateway spent meanwhile; the write that follows finds that out, the copy stops
    deciding alone, and the next chat of that user on this gateway waits for that write.
    Hence the slack: **at most one chat per gateway beyond the bucket each time another
    gateway's chats of the same user come in between**, and what was over is debt that the
    refill pays off first, so the rate over time holds exactly. A user on one gateway (the
    usual case) is limited exactly.
    """

    def __init__(
        self,
        bus: GatewayBus,
        settings: Settings,
        *,
        rate: Rate | None = None,
        key: Callable[[str], str] = rate_key,
    ) -> None:
        self.bus = bus
        self.rate = rate or Rate.parse(settings.rate_per_user, settings.rate_burst)
        self.key = key
        self._copies: dict[str, _Copy] = {}
        self._pruned = time.monotonic()

    @classmethod
    def for_calls(cls, bus: GatewayBus, settings: Settings) -> RequestRate:
        """``TOKENWIRE_CALL_RATE_PER_USER`` (``TOKENWIRE_CALL_RATE_BURST`` at once)."""
        rate = Rate.parse(settings.call_rate_per_user, settings.call_rate_burst)
        return cls(bus, settings, rate=rate, key=call_rate_key)

    async def take(self, user: str, request_id: str) -> None:
        """Spend one of ``user``'s tokens or raise :class:`RateLimited` (nothing is spent)."""
        self._prune()
        copy = self._copies.get(user)
        if copy is not None and copy.sync is not None:
            await asyncio.shield(copy.sync)  # the previous pass's write says who else spends
        copy = self._copies.get(user)
        if copy is not None and copy.exclusive:
            copy.used = time.monotonic()
            decision = take(self.rate, copy.state, time.time())
            if not decision.allowed:
                raise _limited(decision.retry_after_s, request_id)
            copy.state = decision.state
            copy.sync = asyncio.get_running_loop().create_task(self._sync(user, copy))
            return
        try:
            await self._take(user, request_id)
        except InternalError as exc:
            self._copies.pop(user, None)
            log.warning("request rate unavailable: allowing", extra={"error": str(exc)})

    async def _take(self, user: str, request_id: str) -> None:
        """The exact check: read, decide, compare-and-set, before the chat goes on."""
        key = self.key(user)
        if user not in self._copies:
            # Most users have no entry (it expired: a full bucket): one create decides.
            decision = take(self.rate, None, time.time())
            written = await self.bus.kv_create(RATES_BUCKET, key, encode_state(decision.state))
            if written is not None:
                self._copied(user, None, written, decision.state)
                return
        for _ in range(_CAS_ATTEMPTS):
            entry = await self.bus.kv_get(RATES_BUCKET, key)
            state = decode_state(entry.value) if entry is not None else None
            decision = take(self.rate, state, time.time())
            if not decision.allowed:
                raise _limited(decision.retry_after_s, request_id)
            data = encode_state(decision.state)
            if entry is None:
                written = await self.bus.kv_create(RATES_BUCKET, key, data)
            else:
                written = await self.bus.kv_update(RATES_BUCKET, key, data, entry.revision)
            if written is not None:
                self._copied(user, entry, written, decision.state)
                return
        raise RateLimited(
            "too many requests at once: retry shortly", retry_after_s=0.2, request_id=request_id
        )

    def _copied(self, user: str, entry: KvEntry | None, written: int, state: BucketState) -> None:
        """Keep what was written; the copy decides alone once two writes in a row of this
        gateway found the entry as it had left it."""
        copy = self._copies.get(user)
        if copy is not None and written < copy.revision:
            return  # a later write of this gateway is known already
        mine = copy is not None and entry is not None and entry.revision == copy.revision
        self._copies[user] = _Copy(state, written, exclusive=mine, used=time.monotonic())

    async def _sync(self, user: str, copy: _Copy) -> None:
        """Write the spend of a chat the copy let through (alongside its store)."""
        key = self.key(user)
        try:
            for _ in range(_CAS_ATTEMPTS):
                entry = await self.bus.kv_get(RATES_BUCKET, key)
                if entry is None or entry.revision != copy.revision:
                    copy.exclusive = False  # someone else spends too (or the entry expired)
                state = spend(self.rate, decode_state(entry.value) if entry else None, time.time())
                data = encode_state(state)
                if entry is None:
                    written = await self.bus.kv_create(RATES_BUCKET, key, data)
                else:
                    written = await self.bus.kv_update(RATES_BUCKET, key, data, entry.revision)
                if written is not None:
                    copy.state, copy.revision = state, written
                    return
            copy.exclusive = False
        except TokenwireError as exc:
            copy.exclusive = False
            log.warning("cannot write a request rate", extra={"error": str(exc)})
        finally:
            copy.sync = None

    def _prune(self) -> None:
        """Forget copies unused for a refill time (their next chat is checked exactly)."""
        now = time.monotonic()
        horizon = max(self.rate.refill_s, 1.0)
        if now - self._pruned < horizon:
            return
        self._pruned = now
        stale = [u for u, c in self._copies.items() if c.sync is None and now - c.used > horizon]
        for user in stale:
            del self._copies[user]


def _limited(retry_after_s: float, request_id: str) -> RateLimited:
    return RateLimited(
        f"too many requests: retry in {retry_after_s:.1f} s",
        retry_after_s=retry_after_s,
        request_id=request_id,
    )


class HasInflight(Protocol):
    @property
    def inflight(self) -> int:
        """Requests in flight on this connection."""
        ...


class LocalConnections:
    """This gateway's connections by user: its connection cap and per-user in-flight count."""

    def __init__(self, settings: Settings) -> None:
        self.max_connections = settings.max_connections
        self.max_inflight_per_user = settings.max_inflight_per_user
        self.count = 0
        self.by_user: dict[str, set[HasInflight]] = {}
        self._emptied = asyncio.Event()  # set when the last serving connection left

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Count a connection for its whole life, or raise when this gateway is full."""
        if self.count >= self.max_connections:
            raise TooManyConnections(
                f"this gateway holds its maximum of {self.max_connections} connections",
                retry_after_s=1.0,
            )
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1

    def add(self, user: str, conn: HasInflight) -> None:
        self.by_user.setdefault(user, set()).add(conn)

    def remove(self, user: str, conn: HasInflight) -> None:
        conns = self.by_user.get(user)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.by_user[user]
                if not self.by_user:
                    self._emptied.set()

    async def wait_empty(self) -> None:
        """Until no connection is serving on this gateway (a drain's closes have gone out)."""
        while self.by_user:
            self._emptied.clear()
            await self._emptied.wait()

    def inflight(self, user: str) -> int:
        """Requests in flight of ``user`` on this gateway, over all its connections."""
        return sum(c.inflight for c in self.by_user.get(user, ()))


class Gate:
    """Admission control: at most ``cap`` pieces of one kind of work in progress at once.

    A gateway that takes every handshake and every ``resume`` of a reconnect storm at once
    queues unbounded work on one event loop (token checks, KV round-trips, consumers) and
    answers all of it late; refusing what is over the cap with a retry hint keeps the work in
    progress bounded and the clients, waiting the hint plus jitter, spread out by themselves.
    """

    def __init__(
        self,
        what: str,
        cap: int,
        retry_after_s: float,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.what = what
        self.cap = cap
        self.retry_after_s = retry_after_s
        self.in_progress = 0
        self._on_change = on_change  # a gauge's set

    def enter(self) -> bool:
        """Take a place (True), or False when ``cap`` are in progress."""
        if self.in_progress >= self.cap:
            return False
        self.in_progress += 1
        if self._on_change is not None:
            self._on_change(self.in_progress)
        return True

    def leave(self) -> None:
        self.in_progress = max(0, self.in_progress - 1)
        if self._on_change is not None:
            self._on_change(self.in_progress)

    def refusal(self, request_id: str | None = None) -> TooBusy:
        """The error of a refusal, with the retry hint."""
        return TooBusy(
            f"this gateway has {self.cap} {self.what} in progress: retry in "
            f"{self.retry_after_s:g} s",
            retry_after_s=self.retry_after_s,
            request_id=request_id,
        )
