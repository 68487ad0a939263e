"""Reading an answer from Dify's history instead of asking Dify again.

Dify keeps generating an answer after its client went away (the stream broke, or the worker
reading it died). Asking again would bill twice and put two answers in the conversation, so a
delivery that finds Dify's ids recorded polls ``GET /messages`` (:meth:`HistoryReader.wait`)
until that message is finished, for up to ``recovery_timeout_s``. What frames then finish the
client's answer is decided in the core (:meth:`shared.delivery.RequestFrames.from_history`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress

from shared.dify_api import DifyIds, HistoryMessage
from shared.exceptions import TokenwireError
from shared.jobs import Job
from worker.types import DifyApi

__all__ = ["HistoryReader"]

log = logging.getLogger("tokenwire.worker")


class HistoryReader:
    def __init__(self, dify: DifyApi, *, timeout_s: float, poll_s: float) -> None:
        self.dify = dify
        self.timeout_s = timeout_s
        self.poll_s = poll_s

    async def wait(self, job: Job, ids: DifyIds, stop: asyncio.Event) -> HistoryMessage | None:
        """Dify's finished message for ``ids``, or None if it is not there in time.

        A stop while waiting ends the wait and stops the generation at Dify too.
        """
        if not ids.conversation_id or not ids.message_id:
            return None
        deadline = time.monotonic() + self.timeout_s
        message: HistoryMessage | None = None
        while time.monotonic() < deadline and not stop.is_set():
            try:
                message = await self.dify.history_message(
                    ids.conversation_id,
                    ids.message_id,
                    job.user,
                    trace_id=job.trace_id,
                    app=job.app,
                )
            except TokenwireError as exc:
                log.info("history not reachable yet", extra={"error": str(exc)})
                message = None
            if message is not None and message.finished:
                break
            await asyncio.sleep(self.poll_s)
        if stop.is_set() and ids.task_id:
            with suppress(TokenwireError):
                await self.dify.stop(ids.task_id, job.user, trace_id=job.trace_id, app=job.app)
        if message is None or not message.finished:
            log.warning("could not recover the answer from Dify's history")
            return None
        return message
