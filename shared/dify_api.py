"""What tokenwire sends to Dify's Service API and what it reads back, outside the stream. No I/O.

The stream itself is mapped in :mod:`shared.mapping`; this module holds the rest of the Dify
mapping, so that ``worker/dify.py`` only moves bytes:

* :func:`dify_body` — the JSON body of ``POST /chat-messages`` for a job, and
  :func:`request_body` the body for any app kind (completion, workflow);
* :func:`form_body` and :func:`form_rejection` — answering a human-input form;
* :func:`rejection` — the tokenwire error for a non-200 answer (Dify's first error path, before
  the stream: a JSON ``{code, message, status}``; NOTES.md describes both paths);
* :class:`HistoryMessage` and :func:`find_history_message` — one message of
  ``GET /messages``, what recovery reads when a stream broke after Dify began answering;
* :class:`DifyIds` — the ids Dify gave a request, recorded (as :meth:`DifyIds.to_record`)
  before ``start`` is sent, so whoever takes the job over knows Dify is answering it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from shared.apps import AppKind
from shared.exceptions import (
    DifyRejected,
    DifyUnavailable,
    ErrorCode,
    FormClosed,
    NotFound,
    TokenwireError,
    UpstreamError,
)
from shared.jobs import Job

__all__ = [
    "DifyIds",
    "HistoryMessage",
    "dify_body",
    "find_history_message",
    "form_body",
    "form_rejection",
    "rejection",
    "request_body",
]


def dify_body(job: Job) -> dict[str, Any]:
    """The JSON body of Dify's ``POST /chat-messages`` for ``job`` (streaming mode)."""
    body: dict[str, Any] = {
        "query": job.query,
        "inputs": job.inputs,
        "response_mode": "streaming",
        "user": job.user,
        "auto_generate_name": True,
    }
    if job.conversation_id:
        body["conversation_id"] = job.conversation_id
    if job.files:
        body["files"] = job.files
    return body


def request_body(job: Job, kind: AppKind) -> dict[str, Any]:
    """The body for ``job`` at the endpoint of an app of ``kind`` (streaming mode): a chat's
    as :func:`dify_body`; a completion's ``inputs``, ``query``, ``files``; a workflow's
    ``inputs`` and ``files`` (Dify's ``WorkflowRunPayload``)."""
    if kind not in (AppKind.COMPLETION, AppKind.WORKFLOW):
        return dify_body(job)
    body: dict[str, Any] = {"inputs": job.inputs, "response_mode": "streaming", "user": job.user}
    if kind is AppKind.COMPLETION:
        body["query"] = job.query
    if job.files:
        body["files"] = job.files
    return body


def form_body(inputs: dict[str, Any], action: str, user: str) -> dict[str, Any]:
    """The body of ``POST /form/human_input/{form_token}``, as the request's own user."""
    return {"inputs": inputs, "action": action, "user": user}


def form_rejection(status: int, body: bytes) -> TokenwireError:
    """A refused form: Dify's 412 ``human_input_form_submitted``/``_expired`` become
    ``form_submitted``/``form_expired``; a form Dify does not know is ``not_found``."""
    error = rejection(status, body)
    code = error.upstream_code if isinstance(error, UpstreamError) else None
    if code == "human_input_form_submitted":
        return FormClosed("the form was already answered", code=ErrorCode.FORM_SUBMITTED)
    if code == "human_input_form_expired":
        return FormClosed("the form has expired", code=ErrorCode.FORM_EXPIRED)
    if status == 404:
        return NotFound("no such form")
    return error


def rejection(status: int, body: bytes) -> UpstreamError:
    """The tokenwire error for a non-200 answer from Dify, keeping Dify's own code and text."""
    upstream_code: str | None = None
    message = f"HTTP {status}"
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        upstream_code = obj.get("code") if isinstance(obj.get("code"), str) else None
        if isinstance(obj.get("message"), str):
            message = (
                obj["message"].strip().splitlines()[0][:500] if obj["message"].strip() else message
            )
    text = f"Dify {status} {upstream_code or ''}: {message}".replace("  ", " ")
    kwargs: dict[str, Any] = {"status": status, "upstream_code": upstream_code}
    if status == 429:
        return DifyUnavailable(text, code=ErrorCode.DIFY_RATE_LIMITED, **kwargs)
    if status >= 500:
        return DifyUnavailable(text, code=ErrorCode.DIFY_SERVER_ERROR, **kwargs)
    if status in (401, 403):
        return DifyRejected(text, code=ErrorCode.DIFY_UNAUTHORIZED, **kwargs)
    if status == 404:
        return DifyRejected(text, code=ErrorCode.CONVERSATION_NOT_FOUND, **kwargs)
    if status == 413:
        return DifyRejected(text, code=ErrorCode.DIFY_PAYLOAD_TOO_LARGE, **kwargs)
    return DifyRejected(text, code=ErrorCode.DIFY_BAD_REQUEST, **kwargs)


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    """One message of Dify's conversation history, as recovery needs it."""

    answer: str
    status: str | None
    retriever_resources: list[Any]

    @property
    def finished(self) -> bool:
        """Dify has stopped writing this answer (recent Dify marks it; older ones fill
        ``answer`` only at the end, so a non-empty answer with no status counts as done)."""
        if self.status in ("generating", "running"):
            return False
        return bool(self.answer) or self.status in ("stopped", "error")

    @property
    def stopped(self) -> bool:
        return self.status == "stopped"

    @property
    def failed(self) -> bool:
        return self.status == "error"


def find_history_message(payload: Any, message_id: str) -> HistoryMessage | None:
    """The message ``message_id`` in a decoded ``GET /messages`` page, or None."""
    for item in payload.get("data", []) if isinstance(payload, dict) else []:
        if isinstance(item, dict) and item.get("id") == message_id:
            resources = item.get("retriever_resources")
            status = item.get("status")
            return HistoryMessage(
                answer=str(item.get("answer") or ""),
                status=status if isinstance(status, str) else None,
                retriever_resources=resources if isinstance(resources, list) else [],
            )
    return None


@dataclass(frozen=True, slots=True)
class DifyIds:
    """What Dify named a request when it began answering; recorded before ``start`` is sent."""

    task_id: str | None
    message_id: str | None
    conversation_id: str | None
    #: Workflow apps and chatflows: the run Dify started (its events can be read again).
    workflow_run_id: str | None = None

    @property
    def began(self) -> bool:
        """Dify named the answer (a message or a workflow run): it is generating it."""
        return bool(self.message_id or self.workflow_run_id)

    def to_record(self) -> dict[str, str | None]:
        return {
            "task_id": self.task_id,
            "message_id": self.message_id,
            "conversation_id": self.conversation_id,
            "workflow_run_id": self.workflow_run_id,
        }

    @classmethod
    def from_record(cls, value: Any) -> DifyIds | None:
        """The ids from a stored record; None for anything that is not one."""
        if not isinstance(value, dict):
            return None

        def text(name: str) -> str | None:
            item = value.get(name)
            return item if isinstance(item, str) and item else None

        return cls(
            text("task_id"), text("message_id"), text("conversation_id"), text("workflow_run_id")
        )
