"""Dify stream events → protocol frames, for one request. No I/O.

How this works: the worker feeds every SSE event of Dify's stream into a
:class:`DifyStreamMapper` and publishes the frames it returns. The mapper

* drops keep-alives (``event: ping`` with no data);
* announces ``start`` with the ids from the first event that carries them (Dify puts
  ``conversation_id``/``message_id``/``task_id`` in every event from the first on);
* turns ``message``/``agent_message``/``text_chunk`` into ``delta`` and
  ``message_replace``/``text_replace`` into ``replace``, and an in-band ``error`` into ``error``;
* passes every other event on as ``event`` with its fields, including ones Dify adds later;
* remembers ``message_end``'s usage and resources but sends ``end`` only from :meth:`finish`,
  at EOF, because TTS events may follow ``message_end``.

A :class:`~shared.state.RequestMachine` guards the output: nothing follows ``end``/``error``.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from shared.exceptions import DifyStreamCut, DifyStreamError, TokenwireError
from shared.frames import Delta, End, ErrorFrame, Event, Replace, ServerFrame, Start, error_frame
from shared.sequencing import SeqCounter
from shared.sse import SSEEvent
from shared.state import RequestMachine, RequestState

__all__ = ["DELTA_EVENTS", "REPLACE_EVENTS", "DifyStreamMapper"]

DELTA_EVENTS: Final = frozenset({"message", "agent_message"})
REPLACE_EVENTS: Final = frozenset({"message_replace"})
# Events after which the answer is complete (chat apps / workflow apps).
COMPLETING_EVENTS: Final = frozenset({"message_end", "workflow_finished"})
_ENVELOPE: Final = ("event",)


class DifyStreamMapper:
    """Maps one Dify stream to frames of request ``request_id``."""

    def __init__(
        self,
        request_id: str,
        seq: SeqCounter,
        machine: RequestMachine | None = None,
    ) -> None:
        self.request_id = request_id
        self.seq = seq
        self.machine = machine or RequestMachine(RequestState.ACCEPTED)
        self.conversation_id: str | None = None
        self.message_id: str | None = None
        self.task_id: str | None = None
        self.usage: dict[str, Any] | None = None
        self.retriever_resources: list[Any] = []
        self.completed = False
        self._parts: list[str] = []

    # --- what a caller may ask ----------------------------------------------------------

    @property
    def started(self) -> bool:
        """Whether Dify began answering (a ``start`` was emitted)."""
        return self.task_id is not None or self.machine.state is RequestState.STARTED

    @property
    def answer(self) -> str:
        """The answer so far, with replacements applied."""
        return "".join(self._parts)

    # --- input ---------------------------------------------------------------------------

    def feed(self, sse: SSEEvent) -> list[ServerFrame]:
        """Map one SSE event; keep-alives and anything after the end map to nothing."""
        if not sse.data or self.machine.done:
            return []
        try:
            obj = orjson.loads(sse.data)
        except orjson.JSONDecodeError:
            raise DifyStreamError("Dify sent an event that is not JSON") from None
        if not isinstance(obj, dict):
            raise DifyStreamError("Dify sent an event that is not a JSON object")
        return self.feed_event(obj)

    def feed_event(self, obj: dict[str, Any]) -> list[ServerFrame]:
        """Map one decoded Dify event."""
        if self.machine.done:
            return []
        name = obj.get("event")
        if not isinstance(name, str) or name == "ping":
            return []
        if name == "error":
            return [self._error(obj)]
        out: list[ServerFrame] = []
        self._learn_ids(obj)
        if self.machine.state is not RequestState.STARTED:
            out.append(self._stamp_start())
        if name in DELTA_EVENTS:
            text = obj.get("answer")
            if isinstance(text, str) and text:
                out.append(self._delta(text))
        elif name == "text_chunk":
            text = _data(obj).get("text")
            if isinstance(text, str) and text:
                out.append(self._delta(text))
        elif name in REPLACE_EVENTS or name == "text_replace":
            text = obj.get("answer") if name in REPLACE_EVENTS else _data(obj).get("text")
            out.append(self._replace(text if isinstance(text, str) else ""))
        elif name == "message_end":
            metadata = obj.get("metadata")
            if isinstance(metadata, dict):
                usage = metadata.get("usage")
                self.usage = usage if isinstance(usage, dict) else None
                resources = metadata.get("retriever_resources")
                self.retriever_resources = resources if isinstance(resources, list) else []
            self.completed = True
        else:
            if name in COMPLETING_EVENTS:
                self.completed = True
            out.append(self._event(name, obj))
        return out

    # --- endings -------------------------------------------------------------------------

    def finish(self) -> list[ServerFrame]:
        """Dify's stream reached EOF: ``end`` if the answer completed, else raise DifyStreamCut."""
        if self.machine.done:
            return []
        if not self.completed:
            raise DifyStreamCut("Dify's stream ended before the answer was complete")
        return [self._end(stopped=False)]

    def stopped(self) -> list[ServerFrame]:
        """The client stopped the request: close it with ``end`` (``stopped: true``)."""
        if self.machine.done:
            return []
        return [self._end(stopped=True)]

    def fail(self, exc: TokenwireError) -> list[ServerFrame]:
        """Close the request with an ``error`` frame for ``exc``."""
        if self.machine.done:
            return []
        self.machine.emit("error")
        return [error_frame(exc, id=self.request_id, seq=self.seq.next())]

    # --- helpers -------------------------------------------------------------------------

    def _learn_ids(self, obj: dict[str, Any]) -> None:
        for attr in ("conversation_id", "message_id", "task_id"):
            value = obj.get(attr)
            if isinstance(value, str) and value and getattr(self, attr) is None:
                setattr(self, attr, value)

    def _stamp_start(self) -> Start:
        self.machine.emit("start")
        return Start(
            id=self.request_id,
            seq=self.seq.next(),
            conversation_id=self.conversation_id,
            message_id=self.message_id,
            task_id=self.task_id,
        )

    def _delta(self, text: str) -> Delta:
        self._parts.append(text)
        return Delta(id=self.request_id, seq=self.seq.next(), text=text)

    def _replace(self, text: str) -> Replace:
        self._parts = [text]
        return Replace(id=self.request_id, seq=self.seq.next(), text=text)

    def _event(self, name: str, obj: dict[str, Any]) -> Event:
        data = {k: v for k, v in obj.items() if k not in _ENVELOPE}
        return Event(id=self.request_id, seq=self.seq.next(), event=name, data=data)

    def _end(self, *, stopped: bool) -> End:
        self.machine.emit("end")
        return End(
            id=self.request_id,
            seq=self.seq.next(),
            conversation_id=self.conversation_id,
            message_id=self.message_id,
            usage=self.usage,
            retriever_resources=self.retriever_resources,
            stopped=stopped,
        )

    def _error(self, obj: dict[str, Any]) -> ErrorFrame:
        self._learn_ids(obj)
        status = obj.get("status")
        code = obj.get("code")
        message = obj.get("message")
        exc = DifyStreamError(
            f"Dify: {code or 'error'}: {message or 'no message'}",
            retryable=isinstance(status, int) and status >= 500,
            status=status if isinstance(status, int) else None,
            upstream_code=code if isinstance(code, str) else None,
        )
        self.machine.emit("error")
        return error_frame(exc, id=self.request_id, seq=self.seq.next())


def _data(obj: dict[str, Any]) -> dict[str, Any]:
    data = obj.get("data")
    return data if isinstance(data, dict) else {}
