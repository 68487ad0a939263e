"""Publishing one delivery's frames, and making sure the frames stream kept every one.

Every frame of a delivery passes through its :class:`~shared.coalesce.Coalescer`, which says
what leaves now and stamps ``seq`` on the way out (tokens that come faster than
``TOKENWIRE_COALESCE_MS`` are merged into one ``delta``); when text waits, the publisher arms
one timer for the coalescer's deadline. Frames leave in the order the coalescer released them,
one publisher at a time: a frame a cancelled publish may not have sent is sent again first
(readers drop a seq they hold), so no ``seq`` is ever skipped.

Frames travel on core NATS (no per-token ack round trip) and the frames stream captures the
subject; a stream leader change can drop a few. :class:`Publisher` remembers every frame this
delivery published, by seq, so that :meth:`Publisher.ensure_kept` can publish again (with
JetStream acks) whatever the stream lost before the job is acked. It also counts frames in the
metrics and follows the delivery's :class:`~shared.delivery.Outcome` from what it published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from typing import Final

from shared.coalesce import Coalescer
from shared.delivery import Outcome, outcome_after
from shared.exceptions import InternalError
from shared.frames import End, ServerFrame, encode, with_gen
from worker import metrics
from worker.types import FrameStore

__all__ = ["Publisher"]

log = logging.getLogger("tokenwire.worker")

# Retry through a NATS leader change (about a minute at most) rather than hand the job back:
# this delivery still holds every frame it published, a later one would not.
_KEPT_RETRIES_S: Final = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


class Publisher:
    def __init__(
        self,
        store: FrameStore,
        subject: str,
        coalescer: Coalescer | None = None,
    ) -> None:
        self.store = store
        self.subject = subject
        #: Set by the runner once it knows the request's last kept seq (the default: seq 1,
        #: the gateway's ``accepted``, no coalescing).
        self.coalescer = coalescer or Coalescer(1, interval_s=0.0)
        #: The delivery's generation (worker/lease.py), stamped on every frame after the first
        #: delivery's; set by the runner once its fence is kept.
        self.gen = 0
        self.published: dict[int, bytes] = {}
        self.outcome = Outcome.COMPLETED
        self._unsent: deque[ServerFrame] = deque()
        self._sending = asyncio.Lock()
        self._timer: asyncio.Handle | None = None
        self._timer_at: float | None = None  # its deadline (uvloop's handles do not say)
        self._late: asyncio.Task[None] | None = None  # sending what a timer released
        self._closed = False

    async def publish(self, frames: Sequence[ServerFrame]) -> None:
        """Hand frames to the coalescer; publish what it releases now."""
        loop = asyncio.get_running_loop()
        out = self.coalescer.feed(frames, loop.time())
        if out:
            await self._send(out)
        self._arm(loop)

    async def flush(self) -> None:
        """Publish whatever text waits, now."""
        self._disarm()
        out = self.coalescer.flush(asyncio.get_running_loop().time())
        await self._send(out)

    def close(self) -> None:
        """Not one more frame from this delivery (lease lost, handed back): drop the timer."""
        self._closed = True
        self._disarm()
        if self._late is not None:
            self._late.cancel()

    async def ensure_kept(self) -> None:
        """Return once the frames stream holds every frame this delivery published."""
        await self.flush()
        for wait in _KEPT_RETRIES_S:
            try:
                await self.store.ensure_kept(self.subject, self.published, gen=self.gen)
                return
            except InternalError as exc:
                log.warning("frames not confirmed kept yet", extra={"error": str(exc)})
                await asyncio.sleep(wait)
        await self.store.ensure_kept(self.subject, self.published, gen=self.gen)

    # --- the timer -------------------------------------------------------------------------

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = self.coalescer.deadline
        if deadline is None or self._closed:
            self._disarm()
        elif self._timer is None or self._timer_at != deadline:
            self._disarm()
            self._timer = loop.call_at(deadline, self._due)
            self._timer_at = deadline

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None

    def _due(self) -> None:
        self._timer = self._timer_at = None
        loop = asyncio.get_running_loop()
        out = self.coalescer.due(loop.time())
        if out and not self._closed:
            self._unsent.extend(out)  # in line now, before anything released after it
            self._late = loop.create_task(self._drain_quietly())
        self._arm(loop)

    async def _drain_quietly(self) -> None:
        # A NATS failure here surfaces at the next publish or at ensure_kept, which resend.
        with contextlib.suppress(InternalError):
            await self._drain()

    # --- sending ---------------------------------------------------------------------------

    async def _send(self, frames: list[ServerFrame]) -> None:
        if self._closed:
            return
        self._unsent.extend(frames)
        await self._drain()

    async def _drain(self) -> None:
        """Publish what is in line, in order, one drainer at a time."""
        async with self._sending:
            unsent = self._unsent
            while unsent and not self._closed:
                frame = unsent[0]
                data = encode(frame) if not self.gen else with_gen(encode(frame), self.gen)
                await self.store.publish(self.subject, data)
                unsent.popleft()
                self._count(frame, data)

    def _count(self, frame: ServerFrame, data: bytes) -> None:
        metrics.frame_published(frame.type)
        seq = getattr(frame, "seq", None)
        if isinstance(seq, int):
            self.published[seq] = data
        self.outcome = outcome_after(self.outcome, frame)
        if isinstance(frame, End):
            tokens = (frame.usage or {}).get("completion_tokens")
            if isinstance(tokens, int):
                metrics.answer_tokens(tokens)
        elif frame.type == "reset":
            metrics.reset_sent()
