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
  at EOF, because TTS events may follow ``message_end``;
* for a workflow app (``workflow=True``), keeps ``workflow_finished``'s ``outputs``, ``status``
  and ``workflow_run_id`` for that ``end`` instead of passing the event on;
* strips every ``form_token`` from what it passes on (``human_input_required``, the
  ``reasons`` of ``workflow_paused``) and keeps the forms in :attr:`forms` for the worker, which
  stores them server-side; after ``workflow_paused`` the stream's end is no cut: the request
  stays open (:attr:`paused`) until a human answers;
* does not double the newer Agent mode's answer: after ``agent_message`` deltas, a closing
  ``message`` carrying the whole answer sends only what is missing (or a ``replace``);
* when following a run whose current part the client already partly holds (``skip_events``
  events and ``skip_text`` characters of text, counted from the kept frames), drops that much
  of the replayed part first; following a run that paused (``skip_pause``), drops the replayed
  announcement of the pause, through its ``workflow_paused`` (or until the run resumes).
  Dify replays only a running run: a run that finished meanwhile gives its
  ``workflow_finished`` alone, and the text the client lacks is then taken from an output that
  continues what it holds (``held``), when one does.

A :class:`~shared.state.RequestMachine` guards the output: nothing follows ``end``/``error``.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from shared.dify_api import DifyIds
from shared.exceptions import DifyStreamCut, DifyStreamError, TokenwireError
from shared.frames import Delta, End, ErrorFrame, Event, Replace, ServerFrame, Start, error_frame
from shared.sequencing import SeqCounter
from shared.sse import SSEEvent
from shared.state import RequestMachine, RequestState

__all__ = ["DELTA_EVENTS", "REPLACE_EVENTS", "DifyStreamMapper", "PendingForm", "scrub_tokens"]

DELTA_EVENTS: Final = frozenset({"message", "agent_message"})
REPLACE_EVENTS: Final = frozenset({"message_replace"})
# Events after which the answer is complete (chat apps / workflow apps).
COMPLETING_EVENTS: Final = frozenset({"message_end", "workflow_finished"})
_ENVELOPE: Final = ("event",)
_SECRET_FIELDS: Final = frozenset({"form_token"})


def scrub_tokens(value: Any) -> Any:
    """``value`` without any ``form_token``, however deep: a form's token never leaves the
    worker (whoever holds it can answer the form at Dify)."""
    if isinstance(value, dict):
        return {k: scrub_tokens(v) for k, v in value.items() if k not in _SECRET_FIELDS}
    if isinstance(value, list):
        return [scrub_tokens(v) for v in value]
    return value


class PendingForm:
    """A human-input form Dify is waiting on: what the worker keeps server-side."""

    __slots__ = ("expiration_time", "form_id", "form_token", "node_id")

    def __init__(
        self, form_id: str, form_token: str, node_id: str | None, expiration_time: int | None
    ) -> None:
        self.form_id = form_id
        self.form_token = form_token
        self.node_id = node_id
        self.expiration_time = expiration_time

    def to_record(self) -> dict[str, Any]:
        return {
            "form_id": self.form_id,
            "form_token": self.form_token,
            "node_id": self.node_id,
            "expiration_time": self.expiration_time,
        }


class DifyStreamMapper:
    """Maps one Dify stream to frames of request ``request_id``."""

    def __init__(
        self,
        request_id: str,
        seq: SeqCounter,
        machine: RequestMachine | None = None,
        *,
        workflow: bool = False,
        ids: DifyIds | None = None,
        skip_events: int = 0,
        skip_text: int = 0,
        skip_pause: bool = False,
        held: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.seq = seq
        self.machine = machine or RequestMachine(RequestState.ACCEPTED)
        self.workflow = workflow
        self.conversation_id: str | None = ids.conversation_id if ids else None
        self.message_id: str | None = ids.message_id if ids else None
        self.task_id: str | None = ids.task_id if ids else None
        self.workflow_run_id: str | None = ids.workflow_run_id if ids else None
        self.usage: dict[str, Any] | None = None
        self.retriever_resources: list[Any] = []
        self.outputs: dict[str, Any] | None = None
        self.status: str | None = None
        self.completed = False
        self.paused = False
        #: Forms Dify sent since the caller last took them (:meth:`take_forms`).
        self.forms: list[PendingForm] = []
        self._parts: list[str] = []
        self._agent_text = False  # agent_message deltas came: a closing `message` is whole
        self._skip_events = skip_events
        self._skip_text = skip_text
        self._skip_pause = skip_pause
        self._held = held  # following: the text the client holds; None: not following
        self._fresh = held is not None  # following, and Dify replayed nothing yet

    # --- what a caller may ask ----------------------------------------------------------

    @property
    def started(self) -> bool:
        """Whether Dify began answering (a ``start`` was emitted)."""
        return self.task_id is not None or self.machine.state is RequestState.STARTED

    @property
    def answer(self) -> str:
        """The answer so far, with replacements applied."""
        return "".join(self._parts)

    @property
    def began(self) -> bool:
        """Dify named the answer (message or workflow run): record the ids before ``start``."""
        return self.message_id is not None or self.workflow_run_id is not None

    def ids(self) -> DifyIds:
        return DifyIds(self.task_id, self.message_id, self.conversation_id, self.workflow_run_id)

    def take_forms(self) -> list[PendingForm]:
        forms, self.forms = self.forms, []
        return forms

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
        if name != "workflow_finished":
            self._fresh = False
        if self._skip_pause:
            if name in ("human_input_required", "workflow_paused"):
                self._skip_pause = name != "workflow_paused"
                return out  # the client holds the pause's announcement already
            self._skip_pause = False  # the run went on (or ended) past it
        if self.machine.state is not RequestState.STARTED:
            out.append(self._stamp_start())
        if name == "message" and self._agent_text:
            out += self._whole_answer(obj.get("answer"))
        elif name in DELTA_EVENTS:
            text = obj.get("answer")
            if isinstance(text, str) and text:
                self._agent_text = self._agent_text or name == "agent_message"
                out += self._text(text)
        elif name == "text_chunk":
            text = _data(obj).get("text")
            if isinstance(text, str) and text:
                out += self._text(text)
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
        elif name == "workflow_finished" and self.workflow:
            data = _data(obj)
            outputs = data.get("outputs")
            self.outputs = outputs if isinstance(outputs, dict) else {}
            if self._fresh and self._held is not None:
                out += self._rest_from_outputs(self._held, self.outputs)
            status = data.get("status")
            self.status = status if isinstance(status, str) else None
            self.completed = True
        else:
            if name in COMPLETING_EVENTS:
                self.completed = True
            if self._skip_events > 0:
                self._skip_events -= 1  # the client holds it from before: replayed by Dify
                return out
            if name == "human_input_required":
                self._learn_form(_data(obj))
            elif name == "workflow_paused":
                self.paused = True
            elif name in ("human_input_form_filled", "human_input_form_timeout"):
                self.paused = False
            out.append(self._event(name, scrub_tokens(obj)))
        return out

    # --- endings -------------------------------------------------------------------------

    def finish(self) -> list[ServerFrame]:
        """Dify's stream reached EOF: ``end`` if the answer completed, else raise DifyStreamCut
        (nothing when the run paused for a human: the request stays open)."""
        if self.machine.done or (self.paused and not self.completed):
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
        for attr in ("conversation_id", "message_id", "task_id", "workflow_run_id"):
            value = obj.get(attr)
            if isinstance(value, str) and value and getattr(self, attr) is None:
                setattr(self, attr, value)

    def _rest_from_outputs(self, held: str, outputs: dict[str, Any]) -> list[ServerFrame]:
        """The run finished before it was followed: the text the client lacks, from the first
        output that continues what it holds (nothing when none does)."""
        for value in outputs.values():
            if isinstance(value, str) and len(value) > len(held) and value.startswith(held):
                return [self._delta(value[len(held) :])]
        return []

    def _learn_form(self, data: dict[str, Any]) -> None:
        form_id, token = data.get("form_id"), data.get("form_token")
        if isinstance(form_id, str) and isinstance(token, str) and token:
            node = data.get("node_id")
            expiry = data.get("expiration_time")
            self.forms.append(
                PendingForm(
                    form_id,
                    token,
                    node if isinstance(node, str) else None,
                    expiry if isinstance(expiry, int) and not isinstance(expiry, bool) else None,
                )
            )

    def _text(self, text: str) -> list[ServerFrame]:
        """A delta, less what the client already holds of a replayed part."""
        if self._skip_text:
            dropped = min(self._skip_text, len(text))
            self._skip_text -= dropped
            text = text[dropped:]
            if not text:
                return []
        return [self._delta(text)]

    def _whole_answer(self, answer: Any) -> list[ServerFrame]:
        """The newer Agent mode's closing ``message``: the whole answer, not a delta."""
        text = answer if isinstance(answer, str) else ""
        held = self.answer
        if text == held or not text:
            return []
        if text.startswith(held):
            return [self._delta(text[len(held) :])]
        return [self._replace(text)]

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
            stopped=stopped or self.status == "stopped",
            **self._run_fields(),
        )

    def _run_fields(self) -> dict[str, Any]:
        """A workflow run's ``end`` fields (none for a chat: its ``end`` keeps its shape)."""
        if not self.workflow:
            return {}
        return {
            "outputs": self.outputs or {},
            "status": self.status or ("stopped" if self.outputs is None else None),
            "workflow_run_id": self.workflow_run_id,
        }

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
