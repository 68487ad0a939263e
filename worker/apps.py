"""The worker's view of its Dify apps: each app's kind, and its cluster-wide stream slots.

* :class:`AppKinds` learns an app's kind from Dify's ``GET /info`` (its ``mode``), caches it,
  and forgets it when Dify says a route does not fit the app (the app was changed at Dify), so
  the next request asks again. :func:`shared.apps.route_for` turns the kind into the endpoint,
  or into ``wrong_app_kind``.
* :class:`AppSlots` is the ``max_active`` semaphore, shared by every worker: an app has that
  many slots, KV keys ``<app>.<n>`` in the ``tw_app_slots`` bucket (through the NATS edge). A
  stream claims a free slot with a KV *create* (atomic: two workers cannot take the same one),
  re-writes it every ttl/3 while it streams and deletes it after; the slots of a worker that was
  killed expire by themselves, at most ``TOKENWIRE_APP_SLOT_TTL_S`` later. Which request tries
  next is the waiting line's job (``worker/waiting_line.py`` :class:`AppLine`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from nats.js.kv import KeyValue

from shared import natsedge
from shared.apps import DEFAULT_APP, AppKind, Route, kind_of, route_for, unknown_app
from shared.exceptions import DifyRejected, TokenwireError
from shared.jobs import Job
from shared.subjects import app_slot_key
from worker.types import RunEventsApi

__all__ = ["MISMATCH_CODES", "AppKinds", "AppSlots", "HeldSlot"]

log = logging.getLogger("tokenwire.worker")

#: Dify's codes for "this route does not serve this app's mode": the cached kind is stale.
MISMATCH_CODES = frozenset(
    {"not_chat_app", "not_workflow_app", "not_completion_app", "app_unavailable"}
)


class AppKinds:
    def __init__(self, dify: RunEventsApi) -> None:
        self.dify = dify
        self._kinds: dict[str, AppKind | None] = {}
        self._lock = asyncio.Lock()

    async def route(self, job: Job) -> Route:
        """Where ``job`` goes at Dify; ``unknown_app``, ``wrong_app_kind``, or why Dify could
        not be asked (``/info`` failed: retried like any outage)."""
        name = job.app or DEFAULT_APP
        if not self.dify.has_app(job.app):
            raise unknown_app(name)
        if name not in self._kinds:
            async with self._lock:
                if name not in self._kinds:
                    info = await self.dify.info(app=job.app)
                    self._kinds[name] = kind_of(info)
                    log.info("app kind learned", extra={"app": name, "kind": self._kinds[name]})
        return route_for(self._kinds[name], job.kind, name)

    def cached(self, job: Job) -> Route | None:
        """The route from what is cached, if that says anything (no I/O, never raises)."""
        name = job.app or DEFAULT_APP
        if name not in self._kinds:
            return None
        try:
            return route_for(self._kinds[name], job.kind, name)
        except TokenwireError:
            return None

    def saw(self, job: Job, error: BaseException | None) -> None:
        """Dify answered ``job`` with ``error``: a mode mismatch makes the kind stale."""
        if isinstance(error, DifyRejected) and error.upstream_code in MISMATCH_CODES:
            self._kinds.pop(job.app or DEFAULT_APP, None)


@dataclass(slots=True)
class HeldSlot:
    key: str
    revision: int


class AppSlots:
    def __init__(self, kv: KeyValue, *, ttl_s: float, holder: str) -> None:
        self.kv = kv
        self.ttl_s = ttl_s
        self.holder = holder.encode()

    async def try_take(self, app: str, limit: int) -> HeldSlot | None:
        """One of ``app``'s ``limit`` slots, or None when all are held."""
        for slot in range(limit):
            key = app_slot_key(app, slot)
            revision = await natsedge.kv_create(self.kv, key, self.holder)
            if revision is not None:
                return HeldSlot(key, revision)
        return None

    async def keep(self, held: HeldSlot) -> None:
        """Re-write the slot every ttl/3 until cancelled (a holder that dies lets it expire)."""
        revision = held.revision
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                updated = await natsedge.kv_update(self.kv, held.key, self.holder, revision)
            except TokenwireError as exc:
                log.warning("cannot refresh an app slot", extra={"error": str(exc)})
                continue
            if updated is None:
                log.warning("an app slot expired while held", extra={"slot": held.key})
                return
            revision = held.revision = updated

    async def release(self, held: HeldSlot) -> None:
        with contextlib.suppress(TokenwireError):
            await natsedge.kv_delete(self.kv, held.key, held.revision)
