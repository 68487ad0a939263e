"""Publishing one delivery's frames, and making sure the frames stream kept every one.

Frames travel on core NATS (no per-token ack round trip) and the frames stream captures the
subject; a stream leader change can drop a few. :class:`Publisher` remembers every frame this
delivery published, by seq, so that :meth:`Publisher.ensure_kept` can publish again (with
JetStream acks) whatever the stream lost before the job is acked. It also counts frames in the
metrics and follows the delivery's :class:`~shared.delivery.Outcome` from what it published.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Final

from shared.delivery import Outcome, outcome_after
from shared.exceptions import InternalError
from shared.frames import End, ServerFrame, encode
from worker import metrics
from worker.types import FrameStore

__all__ = ["Publisher"]

log = logging.getLogger("tokenwire.worker")

# Retry through a NATS leader change (about a minute at most) rather than hand the job back:
# this delivery still holds every frame it published, a later one would not.
_KEPT_RETRIES_S: Final = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


class Publisher:
    def __init__(self, store: FrameStore, subject: str) -> None:
        self.store = store
        self.subject = subject
        self.published: dict[int, bytes] = {}
        self.outcome = Outcome.COMPLETED

    async def publish(self, frames: Sequence[ServerFrame]) -> None:
        for frame in frames:
            data = encode(frame)
            await self.store.publish(self.subject, data)
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

    async def ensure_kept(self) -> None:
        """Return once the frames stream holds every frame this delivery published."""
        for wait in _KEPT_RETRIES_S:
            try:
                await self.store.ensure_kept(self.subject, self.published)
                return
            except InternalError as exc:
                log.warning("frames not confirmed kept yet", extra={"error": str(exc)})
                await asyncio.sleep(wait)
        await self.store.ensure_kept(self.subject, self.published)
