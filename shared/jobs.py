"""The job a gateway stores in JetStream for a worker: one ``chat`` or ``run`` plus who asked.

It carries everything the worker needs and nothing the client could forge: ``user`` comes
from the connection's identity, ``key`` from (user, id), ``reply`` is the connection's frame
subject. ``trace_id`` follows the request through every log line and Dify's ``X-Request-Id``.

``kind`` says which frame asked (a ``chat`` for a conversational app, a ``run`` for a one-shot
app: workflow, completion). ``continued`` counts how often a worker put the job back after a
human answered the run's form (or stopped it while it waited): such a copy continues the
request after its kept frames, following the run Dify already has.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["JOB_VERSION", "Job"]

JOB_VERSION = 1


class Job(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    v: int = JOB_VERSION
    kind: Literal["chat", "run"] = "chat"
    key: str
    id: str
    user: str
    conn: str
    reply: str
    query: str
    conversation_id: str | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    files: list[dict[str, Any]] = Field(default_factory=list)
    app: str | None = None
    trace_id: str
    created_ms: int
    # Set by `tokenwire jobs replay`: the request already has frames; continue after them.
    replay: int = 0
    # Set by a worker when a human answered the run's form: follow the run Dify continues.
    continued: int = 0

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="python"))

    @classmethod
    def from_bytes(cls, data: bytes) -> Job:
        return cls.model_validate(orjson.loads(data))
