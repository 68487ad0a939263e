"""The edge's limits: connection caps, request rates, in-flight counts.

How this works:

* **Per-user connections, across all gateways** (``TOKENWIRE_MAX_CONNECTIONS_PER_USER``): a
  user has that many *slots*, KV keys ``<user hash>.<n>`` in the ``tw_connections`` bucket. A
  connection claims the first free slot with a KV *create* (atomic: two gateways cannot take
  the same slot), and deletes it when it ends. The bucket's TTL is
  ``TOKENWIRE_CONNECTION_TTL_S``; every gateway re-writes its slots every ttl/3, so the slots
  of a gateway that was killed (no clean-up ran) expire by themselves at most ttl later.
* **Per-user request rate, across all gateways** (``TOKENWIRE_RATE_PER_USER``,
  ``TOKENWIRE_RATE_BURST``): a token bucket (:mod:`shared.ratelimit`) kept in the
  ``tw_rates`` bucket, updated with compare-and-set so concurrent chats of one user on two
  gateways cannot both spend the last token.
* **Per-connection frame rate** (``TOKENWIRE_FRAME_RATE``): a bucket in memory, kept by the
  connection's session (:mod:`shared.session`); every client frame takes a token, so floods
  of ``resume``/``stop``/``ping`` are refused cheaply.
* **Per-gateway**: the connection count (``TOKENWIRE_MAX_CONNECTIONS``) and the requests in
  flight of each user on this gateway (``TOKENWIRE_MAX_INFLIGHT_PER_USER``).

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
from dataclasses import dataclass, field
from typing import Protocol

from gateway.bus import GatewayBus
from shared.exceptions import InternalError, RateLimited, TokenwireError, TooManyConnections
from shared.ratelimit import Rate, decode_state, encode_state, take
from shared.settings import Settings
from shared.subjects import (
    CONNECTIONS_BUCKET,
    RATES_BUCKET,
    call_rate_key,
    connection_slot_key,
    rate_key,
)

__all__ = [
    "ConnectionSlots",
    "HasInflight",
    "LocalConnections",
    "RequestRate",
    "Slot",
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
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    released: bool = False


class ConnectionSlots:
    """The per-user connection cap, shared by every gateway through NATS KV."""

    def __init__(self, bus: GatewayBus, settings: Settings, owner: str) -> None:
        self.bus = bus
        self.cap = settings.max_connections_per_user
        self.ttl = settings.connection_ttl_s
        self.owner = owner
        self.held: dict[str, Slot] = {}

    async def claim(self, user: str, conn_id: str) -> Slot:
        """Take a free slot of ``user`` or raise :class:`TooManyConnections`."""
        value = f"{self.owner} {conn_id}".encode()
        try:
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
        for n in range(self.cap):
            key = connection_slot_key(user, n)
            if key == skip:
                continue
            revision = await self.bus.kv_create(CONNECTIONS_BUCKET, key, value)
            if revision is not None:
                return Slot(user=user, conn_id="", key=key, revision=revision, value=value)
        return None

    async def release(self, slot: Slot) -> None:
        """Give the slot back (its entry would expire anyway if this fails)."""
        self.held.pop(slot.conn_id, None)
        if not slot.key:
            return  # admitted while the cap was unavailable: nothing to give back
        async with slot.lock:
            slot.released = True
            try:
                await self.bus.kv_delete(CONNECTIONS_BUCKET, slot.key, slot.revision)
            except TokenwireError as exc:
                log.warning("cannot release a connection slot", extra={"error": str(exc)})

    async def run(self) -> None:
        """Keep every held slot alive: re-write each one every ttl/3 (until cancelled)."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            slots = list(self.held.values())
            for start in range(0, len(slots), _REFRESH_BATCH):
                batch = slots[start : start + _REFRESH_BATCH]
                await asyncio.gather(*(self._refresh(s) for s in batch))

    async def _refresh(self, slot: Slot) -> None:
        async with slot.lock:
            if slot.released:
                return
            try:
                revision = await self.bus.kv_update(
                    CONNECTIONS_BUCKET, slot.key, slot.value, slot.revision
                )
                if revision is None:
                    # Our entry expired (NATS was out of reach for a whole ttl) and another
                    # connection took the slot: take another one if there is one.
                    other = await self._first_free(slot.user, slot.value, skip=slot.key)
                    if other is None:
                        log.warning("a user is over the connection cap after a NATS outage")
                        return
                    slot.key, revision = other.key, other.revision
                slot.revision = revision
            except TokenwireError as exc:
                log.warning("cannot refresh a connection slot", extra={"error": str(exc)})


class RequestRate:
    """The per-user chat rate, shared by every gateway through NATS KV; :meth:`for_calls`
    is the same rule for ``call`` frames, with its own rate and its own key."""

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

    @classmethod
    def for_calls(cls, bus: GatewayBus, settings: Settings) -> RequestRate:
        """``TOKENWIRE_CALL_RATE_PER_USER`` (``TOKENWIRE_CALL_RATE_BURST`` at once)."""
        rate = Rate.parse(settings.call_rate_per_user, settings.call_rate_burst)
        return cls(bus, settings, rate=rate, key=call_rate_key)

    async def take(self, user: str, request_id: str) -> None:
        """Spend one of ``user``'s tokens or raise :class:`RateLimited` (nothing is spent)."""
        try:
            await self._take(user, request_id)
        except InternalError as exc:
            log.warning("request rate unavailable: allowing", extra={"error": str(exc)})

    async def _take(self, user: str, request_id: str) -> None:
        key = self.key(user)
        for _ in range(_CAS_ATTEMPTS):
            entry = await self.bus.kv_get(RATES_BUCKET, key)
            state = decode_state(entry.value) if entry is not None else None
            decision = take(self.rate, state, time.time())
            if not decision.allowed:
                raise RateLimited(
                    f"too many requests: retry in {decision.retry_after_s:.1f} s",
                    retry_after_s=decision.retry_after_s,
                    request_id=request_id,
                )
            data = encode_state(decision.state)
            if entry is None:
                written = await self.bus.kv_create(RATES_BUCKET, key, data)
            else:
                written = await self.bus.kv_update(RATES_BUCKET, key, data, entry.revision)
            if written is not None:
                return
        raise RateLimited(
            "too many requests at once: retry shortly", retry_after_s=0.2, request_id=request_id
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

    def inflight(self, user: str) -> int:
        """Requests in flight of ``user`` on this gateway, over all its connections."""
        return sum(c.inflight for c in self.by_user.get(user, ()))
