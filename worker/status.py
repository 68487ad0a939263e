"""The job's state as operators see it (``tokenwire jobs``): best effort, never in the way."""

from __future__ import annotations

import time
from contextlib import suppress

from shared.delivery import JobStatus, status_record
from shared.jobs import Job
from worker.types import RequestRecords

__all__ = ["StatusBoard"]


class StatusBoard:
    def __init__(self, records: RequestRecords, worker_id: str) -> None:
        self.records = records
        self.worker_id = worker_id

    async def report(
        self, job: Job, state: JobStatus, attempt: int, *, error: str | None = None
    ) -> None:
        record = status_record(
            state,
            attempt=attempt,
            worker=self.worker_id,
            now_ms=int(time.time() * 1000),
            error=error,
        )
        with suppress(Exception):
            await self.records.save_status(job.key, record)
