"""``GET /readyz`` of a worker: can this worker answer a question now?

Three facts, each named in the answer's body so a person (or ``tokenwire dev``) can tell what
is missing: NATS is connected, the job consumer is subscribed (FastStream started it), and Dify
answered ``GET /info`` with the configured URL and key. Dify's answer is remembered for a few
seconds (a failure for less), so a probe polled often does not call Dify each time.

Kubernetes keeps probing ``/healthz`` for readiness: a Dify outage must not take every worker
out of a rollout, since jobs simply wait in JetStream until Dify returns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from shared.exceptions import DifyRejected, TokenwireError

__all__ = ["READY_FACTS", "DifyCheck", "Readiness"]

#: The facts of a worker that is ready, as ``/readyz`` words them.
READY_FACTS: dict[str, str] = {"nats": "connected", "jobs": "subscribed", "dify": "ok"}

#: How long a successful Dify check stands, and how soon a failed one is tried again.
OK_FOR_S = 10.0
FAILED_FOR_S = 1.0


@dataclass(frozen=True, slots=True)
class DifyCheck:
    """The outcome of one ``GET /info``: ``ok``, ``unreachable: …`` or ``rejected: …``."""

    state: str
    at: float

    @property
    def ok(self) -> bool:
        return self.state == "ok"


class Readiness:
    """Collects the three facts behind ``/readyz``."""

    def __init__(
        self,
        probe_dify: Callable[[], Awaitable[object]],
        nats_connected: Callable[[], bool],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe_dify
        self._nats_connected = nats_connected
        self._clock = clock
        self._last: DifyCheck | None = None
        self._lock = asyncio.Lock()
        self.subscribed = False

    async def dify(self) -> DifyCheck:
        async with self._lock:  # one probe at a time; the others take its answer
            last, now = self._last, self._clock()
            if last is not None and now - last.at < (OK_FOR_S if last.ok else FAILED_FOR_S):
                return last
            try:
                await self._probe()
            except DifyRejected as exc:
                state = f"rejected: {exc.message}"
            except TokenwireError as exc:
                state = f"unreachable: {exc.message}"
            else:
                state = "ok"
            self._last = DifyCheck(state, self._clock())
            return self._last

    async def report(self) -> tuple[bool, dict[str, str]]:
        """Whether the worker is ready, and each fact in words."""
        facts = {
            "nats": "connected" if self._nats_connected() else "disconnected",
            "jobs": "subscribed" if self.subscribed else "starting",
        }
        facts["dify"] = (await self.dify()).state if self.subscribed else "not checked yet"
        ready = facts == READY_FACTS
        return ready, facts
