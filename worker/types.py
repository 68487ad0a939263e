"""The worker's seams: what its modules need of NATS, of Dify and of a job's message.

Each is a :class:`typing.Protocol`; ``worker/bus.py`` (:class:`~worker.bus.NatsBus`) and
``worker/dify.py`` (:class:`~worker.dify.DifyClient`) implement them for real, and the unit
tests replace them with in-memory fakes (``tests/unit/fakes.py``). The bus contract suite
(``tests/unit/test_bus_contract.py``, ``tests/integration/test_bus_contract.py``) runs the same
checks against both implementations of :class:`Bus`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from shared.apps import Route
from shared.dify_api import DifyIds, HistoryMessage
from shared.exceptions import TokenwireError
from shared.jobs import Job
from shared.sse import SSEEvent

__all__ = [
    "Bus",
    "DeadLetters",
    "DifyApi",
    "FrameStore",
    "JobMessage",
    "LeaseStore",
    "PausedRuns",
    "RequestRecords",
    "RunEventsApi",
]


class JobMessage(Protocol):
    """The job's JetStream message, as the runner needs it (FastStream's NatsMessage fits)."""

    async def ack(self) -> None: ...
    async def nack(self, delay: float | None = None) -> None: ...
    async def in_progress(self) -> None: ...


class FrameStore(Protocol):
    """Where a request's frames go (the frames stream keeps them for ``resume``)."""

    async def publish(self, subject: str, data: bytes) -> None: ...

    async def kept_frames(self, subject: str) -> list[dict[str, Any]]:
        """Every frame kept for ``subject``, oldest first (what the client may already hold)."""
        ...

    async def read_kept(self, subject: str) -> tuple[list[dict[str, Any]], int]:
        """Every frame kept for ``subject`` in the stream's order, and the stream sequence of
        the last one (0: none), which a fence must follow (``publish_fence``)."""
        ...

    async def publish_fence(self, subject: str, data: bytes, after_stream_seq: int) -> bool:
        """Store a fence right after stream message ``after_stream_seq`` of ``subject``;
        False when another frame was kept in between (read again, then retry)."""
        ...

    async def ensure_kept(self, subject: str, published: dict[int, bytes], *, gen: int = 0) -> None:
        """Publish again, acknowledged, any of ``published`` (by seq, of generation ``gen``)
        that is not kept."""
        ...


class RequestRecords(Protocol):
    """Per-request facts in the request bucket."""

    async def stop_recorded(self, key: str) -> bool: ...
    async def save_ids(self, key: str, ids: DifyIds) -> None: ...
    async def load_ids(self, key: str) -> DifyIds | None: ...
    async def save_status(self, key: str, status: dict[str, Any]) -> None: ...


class LeaseStore(Protocol):
    """Who owns a request (the lease that a redelivery takes)."""

    async def take_lease(self, key: str, lease: str) -> int:
        """Write the lease; its KV revision, the new delivery's generation (monotonic)."""
        ...

    async def lease_holder(self, key: str) -> str | None: ...


class DeadLetters(Protocol):
    async def dead_letter(self, job: Job, error: TokenwireError, attempts: int) -> None: ...


class PausedRuns(Protocol):
    """Runs waiting for a human (``shared/human_input.py``): their records in the request
    bucket, and putting a job back on the job stream to follow its run."""

    async def load_pause(self, key: str) -> tuple[bytes, int] | None:
        """The pause record's bytes and revision, or None."""
        ...

    async def save_pause(self, key: str, data: bytes) -> None: ...

    async def update_pause(self, key: str, data: bytes, revision: int) -> bool:
        """Compare-and-set: False when the record changed since ``revision``."""
        ...

    async def put_back(self, job: Job, msg_id: str) -> None:
        """Store ``job`` again (``msg_id``: JetStream keeps one copy of it)."""
        ...


class Bus(FrameStore, RequestRecords, LeaseStore, DeadLetters, Protocol):
    """All the runner needs of NATS."""


class DifyApi(Protocol):
    """What the runner needs of Dify (``worker/dify.py``'s client)."""

    def stream_chat(
        self,
        body: dict[str, Any],
        *,
        trace_id: str,
        app: str | None = None,
        route: Route | None = None,
    ) -> AbstractAsyncContextManager[AsyncIterator[list[SSEEvent]]]:
        """Dify's stream: its events, one list per read (what arrived together)."""
        ...

    async def stop(
        self,
        task_id: str,
        user: str,
        *,
        trace_id: str,
        app: str | None = None,
        route: Route | None = None,
    ) -> None: ...

    async def history_message(
        self,
        conversation_id: str,
        message_id: str,
        user: str,
        *,
        trace_id: str,
        app: str | None = None,
    ) -> HistoryMessage | None: ...


class RunEventsApi(Protocol):
    """What following a workflow run needs of Dify (``worker/dify.py``'s client)."""

    def stream_run_events(
        self, workflow_run_id: str, user: str, *, trace_id: str, app: str | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[list[SSEEvent]]]: ...

    async def submit_form(
        self, form_token: str, body: dict[str, Any], *, trace_id: str, app: str | None = None
    ) -> None: ...

    async def check_form(
        self, form_token: str, *, trace_id: str, app: str | None = None
    ) -> None: ...

    async def info(self, *, app: str | None = None) -> dict[str, Any]: ...

    def has_app(self, app: str | None) -> bool: ...
