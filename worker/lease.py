"""One delivery's hold on its job: in-progress acks, and the request's lease.

How this works. JetStream redelivers a job whose worker went quiet past the ack wait, but that
worker may still be alive (stalled, or cut off from NATS) and streaming. So a redelivery first
:meth:`Lease.take`\\ s the request's lease (a random token in the request bucket) and waits one
check; meanwhile every delivery :meth:`Lease.hold`\\ s its job: it sends in-progress acks and
checks the lease, and sets :attr:`Lease.lost` once another delivery's token is there. The
runner then stops publishing at once.

That check is what keeps a stale worker quiet most of the time; what makes its late frames
harmless always is the generation: :meth:`Lease.take` returns the lease's KV revision, a number
every later take exceeds, which the new delivery stamps on its fence and on every frame
(shared/sequencing.py ``Generations``: readers drop an older generation's frames after the
fence). The first delivery takes no lease (no round trip before its first token): generation 0.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import suppress

from shared.exceptions import TokenwireError
from worker.types import JobMessage, LeaseStore

__all__ = ["Lease"]


class Lease:
    def __init__(self, store: LeaseStore, key: str, *, check_s: float) -> None:
        self.store = store
        self.key = key
        self.check_s = check_s
        self.token = uuid.uuid4().hex
        self.lost = asyncio.Event()
        #: This delivery's generation (0 until :meth:`take`: the first delivery's).
        self.gen = 0

    async def take(self) -> int:
        """Claim the request, then give an older delivery one check to notice and stop;
        returns this delivery's generation."""
        self.gen = await self.store.take_lease(self.key, self.token)
        await asyncio.sleep(self.check_s * 1.5)
        return self.gen

    async def hold(self, msg: JobMessage, heartbeat_s: float) -> None:
        """Keep the job ours until cancelled, or until the lease is lost (then return)."""
        next_ack = time.monotonic() + heartbeat_s
        while True:
            await asyncio.sleep(min(self.check_s, heartbeat_s))
            if time.monotonic() >= next_ack:
                next_ack = time.monotonic() + heartbeat_s
                with suppress(Exception):
                    await msg.in_progress()
            try:
                holder = await self.store.lease_holder(self.key)
            except TokenwireError:
                continue  # cannot tell while NATS is away; nobody can take over then either
            if holder is not None and holder != self.token:
                self.lost.set()
                return
