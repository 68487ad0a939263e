"""Everything a simulated Dify keeps in memory, and the checks every endpoint shares.

How this works
--------------
One :class:`Store` holds the apps (key → :class:`AppSpec`) and every record they create:
conversations with their messages, generations (one running answer or run, by ``task_id``),
workflow runs (by ``workflow_run_id``), human-input forms (by ``form_token``) and uploaded
files. Ids are UUIDs, so the dicts are global and each record names its app; a lookup that
finds another app's record treats it as unknown, as Dify's per-app tables do.

User scoping is Dify's, not stricter: conversations, messages and files belong to
(app, user); runs, logs, previews, forms and workflow stops are app-wide (NOTES §8).
Everything lives in one event loop, so there are no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tokenwire.simulator.apps import DEFAULT_APP, AppSpec
from tokenwire.simulator.responses import AUTH_HEADERS, Signal, error
from tokenwire.simulator.scenarios import WORKFLOW_ID, Event, SimConfig, SimControls, StreamIds
from tokenwire.simulator.workflows import FlowKind, FormSpec, Outcome

__all__ = [
    "Conversation",
    "Form",
    "Generation",
    "Kind",
    "Listener",
    "Message",
    "MessageStatus",
    "Run",
    "Store",
    "UploadedFile",
]

MessageStatus = Literal["generating", "paused", "normal", "stopped", "error"]
RunStatus = Literal["running", "paused", "succeeded", "failed", "stopped"]
Kind = Literal["chat", "completion", "workflow"]
"""What a generation answers: ``/chat-messages``, ``/completion-messages``, ``/workflows/run``."""

_TERMINAL: Final = frozenset({"succeeded", "failed", "stopped"})


@dataclass(eq=False)
class Message:
    id: str
    task_id: str
    conversation_id: str
    query: str
    inputs: dict[str, Any]
    created_at: int
    status: MessageStatus = "generating"
    error: str | None = None
    message_files: list[dict[str, Any]] = field(default_factory=list)
    retriever_resources: list[dict[str, Any]] = field(default_factory=list)
    agent_thoughts: dict[str, dict[str, Any]] = field(default_factory=dict)
    feedback: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    parent_message_id: str | None = None
    _answer: list[str] = field(default_factory=list, init=False, repr=False)
    """The answer's pieces as generated; :attr:`answer` joins them when someone reads it."""

    @property
    def answer(self) -> str:
        """The answer so far. Kept as pieces, not re-concatenated on every token: a string
        grown by ``+=`` on an attribute is copied each time, quadratic in a 100,000-token
        answer (issue 17)."""
        if len(self._answer) > 1:
            self._answer[:] = ["".join(self._answer)]
        return self._answer[0] if self._answer else ""

    def append_answer(self, text: str) -> None:
        """One token's text (a delta)."""
        if text:
            self._answer.append(text)

    def replace_answer(self, text: str) -> None:
        """``message_replace``: the whole answer is now ``text``."""
        self._answer[:] = [text]

    def as_dict(self) -> dict[str, Any]:
        """Dify's ``GET /messages`` item; ``status`` adds "generating", "paused", "stopped"."""
        usage = self.usage or {}
        return {
            "id": self.id,
            "conversation_id": self.conversation_id,
            "parent_message_id": self.parent_message_id,
            "inputs": self.inputs,
            "query": self.query,
            "answer": self.answer,
            "message_files": self.message_files,
            "feedback": {"rating": self.feedback["rating"]} if self.feedback else None,
            "retriever_resources": self.retriever_resources,
            "agent_thoughts": list(self.agent_thoughts.values()),
            "created_at": self.created_at,
            "status": self.status,
            "error": self.error,
            "extra_contents": [],
            "message_tokens": int(usage.get("prompt_tokens", 0)),
            "answer_tokens": int(usage.get("completion_tokens", 0)),
            "total_tokens": int(usage.get("total_tokens", 0)),
            "provider_response_latency": float(usage.get("latency", 0.0)),
            "total_price": usage.get("total_price"),
            "currency": usage.get("currency"),
        }


@dataclass(eq=False)
class Conversation:
    id: str
    app: str
    user: str
    name: str
    inputs: dict[str, Any]
    created_at: int
    updated_at: int
    order: int
    """Tie-breaker for ``-updated_at``: timestamps are whole seconds."""
    introduction: str = ""
    listed: bool = True
    """False for a completion app's hidden conversations (Dify keeps one per message)."""
    messages: list[Message] = field(default_factory=list)
    variables: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "inputs": self.inputs,
            "status": "normal",
            "introduction": self.introduction,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(eq=False)
class Listener:
    """One open ``GET /workflow/{id}/events`` stream of a run."""

    queue: asyncio.Queue[bytes | Signal]
    continue_on_pause: bool


@dataclass(eq=False)
class Run:
    """A workflow run (or a chatflow message's run): what ``/workflows/run/{id}``, the logs
    and ``/workflow/{id}/events`` read."""

    id: str
    app: str
    user: str
    task_id: str
    kind: FlowKind
    inputs: dict[str, Any]
    created_at: int
    status: RunStatus = "running"
    outputs: dict[str, Any] | None = None
    error: str | None = None
    total_steps: int = 0
    total_tokens: int = 0
    elapsed_time: float = 0.0
    finished_at: int | None = None
    frames: list[bytes] = field(default_factory=list)
    replay_from: int = 0
    """Where ``/events`` replays from: the start, the current pause, or the resumed part."""
    final: bytes | None = None
    """The ``workflow_finished`` frame, all that ``/events`` gives once the run is over."""
    listeners: list[Listener] = field(default_factory=list)
    order: int = 0
    form_token: str | None = None
    """The token of the form the run waits on (or last waited on)."""
    form: Form | None = None

    @property
    def over(self) -> bool:
        return self.status in _TERMINAL

    def detail(self) -> dict[str, Any]:
        """``GET /workflows/run/{id}`` (WorkflowRunDetailResponse: ``inputs`` is a JSON string)."""
        return {
            "id": self.id,
            "workflow_id": WORKFLOW_ID,
            "status": self.status,
            "inputs": orjson.dumps(self.inputs).decode(),
            "outputs": self.outputs if self.outputs is not None else {},
            "error": self.error,
            "total_steps": self.total_steps,
            "total_tokens": self.total_tokens,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "elapsed_time": self.elapsed_time,
        }


@dataclass(eq=False)
class Form:
    """A human-input form a paused run waits on; the first submit (or the expiry) wins."""

    token: str
    app: str
    spec: FormSpec
    run: Run
    expires_at: float
    """Wall-clock seconds, as ``expiration_time`` but exact (tests expire forms in 0.2 s)."""
    expiration_time: int
    outcome: asyncio.Future[Outcome]
    submitted_by: str | None = None

    @property
    def expired(self) -> bool:
        return self.submitted_by is None and time.time() >= self.expires_at


@dataclass(eq=False)
class UploadedFile:
    id: str
    app: str
    user: str
    name: str
    extension: str | None
    mime_type: str | None
    data: bytes
    created_at: int

    def as_dict(self, base_url: str) -> dict[str, Any]:
        """``POST /files/upload`` (FileUploadResponse)."""
        return {
            "id": self.id,
            "reference": None,
            "name": self.name,
            "size": len(self.data),
            "extension": self.extension,
            "mime_type": self.mime_type,
            "created_by": self.user,
            "created_at": self.created_at,
            "preview_url": None,
            "source_url": f"{base_url}/files/{self.id}/preview",
            "original_url": None,
            "user_id": None,
            "tenant_id": "00000000-0000-4000-8000-000000000000",
            "conversation_id": None,
            "file_key": None,
        }


def _same(event: Event) -> Event:
    return event


@dataclass(eq=False)
class Generation:
    """One running answer or run: owned by a user, stoppable, drained by at most one HTTP
    response (``queue``), and for runs, by ``/events`` listeners too."""

    ids: StreamIds
    app: AppSpec
    kind: Kind
    user: str
    query: str
    controls: SimControls
    ping_interval_s: float
    started: float
    message: Message | None = None
    run: Run | None = None
    flow_now: float = 0.0
    """Wall clock when the run's script was built: forms expire ``expires_in_s`` after it."""
    shape: Callable[[Event], Event] = _same
    """How a frame leaves (a completion app drops ``conversation_id``)."""
    queue: asyncio.Queue[bytes | Signal] = field(default_factory=asyncio.Queue)
    primary_open: bool = True
    """False once the first response's stream ended at a pause; later frames go to listeners."""
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    completion_tokens: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None
    active: bool = False

    async def sleep_or_stop(self, seconds: float) -> bool:
        """Sleep, waking early on stop; True when the generation must stop now."""
        if seconds > 0 and not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self.stop.wait()
        return self.stop.is_set()


class Store:
    """The apps and every record; the auth and ownership checks endpoints share."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.apps: Mapping[str, AppSpec] = dict(config.apps) if config.apps else {}
        self.conversations: dict[str, Conversation] = {}
        self.generations: dict[str, Generation] = {}
        self.runs: dict[str, Run] = {}
        self.forms: dict[str, Form] = {}
        self.files: dict[str, UploadedFile] = {}
        self.requests: list[dict[str, Any]] = []
        self.calls: list[dict[str, Any]] = []
        self.stops: list[dict[str, Any]] = []
        self.active: dict[str, int] = {}
        self.peak_active: dict[str, int] = {}
        self.scripted_faults: list[dict[str, Any]] = []
        """``/_sim/faults``: {path, fault, times} for endpoints that have no ``tw_sim``."""
        self.order = itertools.count(1)

    def take_fault(self, path: str) -> str | None:
        """The scripted fault for a call to ``path`` (a prefix match), counting it down."""
        for entry in self.scripted_faults:
            if path.startswith(entry["path"]) and entry["times"] != 0:
                entry["times"] -= 1
                return str(entry["fault"])
        return None

    # ----------------------------------------------------------------------- apps

    def app_for(self, request: Request) -> AppSpec | Response:
        """The app the bearer key names, or Dify's 401 (NOTES §1)."""
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            message = "Authorization header must be provided and start with 'Bearer'"
            return error(401, "unauthorized", message, AUTH_HEADERS)
        if self.apps:
            spec = self.apps.get(key)
        else:
            expected = self.config.api_key
            ok = key == expected if expected is not None else key.startswith("app-")
            spec = DEFAULT_APP if ok else None
        if spec is None:
            return error(401, "unauthorized", "Access token is invalid", AUTH_HEADERS)
        return spec

    def app_named(self, name: str) -> AppSpec | None:
        if not self.apps:
            return DEFAULT_APP if name == DEFAULT_APP.name else None
        return next((spec for spec in self.apps.values() if spec.name == name), None)

    def begin_active(self, app: AppSpec) -> None:
        count = self.active[app.name] = self.active.get(app.name, 0) + 1
        self.peak_active[app.name] = max(self.peak_active.get(app.name, 0), count)

    def end_active(self, app: AppSpec) -> None:
        self.active[app.name] = max(0, self.active.get(app.name, 0) - 1)

    # ----------------------------------------------------------------------- ownership

    def conversation(self, app: AppSpec, conversation_id: str, user: str) -> Conversation | None:
        """Another user's (or app's) conversation is as invisible as an unknown one."""
        found = self.conversations.get(conversation_id)
        if found is None or found.app != app.name or found.user != user or not found.listed:
            return None
        return found

    def message(self, app: AppSpec, message_id: str, user: str) -> Message | None:
        """A message of one of ``user``'s conversations in ``app`` (hidden ones included)."""
        for conversation in self.conversations.values():
            if conversation.app != app.name or conversation.user != user:
                continue
            for message in conversation.messages:
                if message.id == message_id:
                    return message
        return None

    def run(self, app: AppSpec, run_id: str) -> Run | None:
        found = self.runs.get(run_id)
        return found if found is not None and found.app == app.name else None

    def file(self, app: AppSpec, file_id: str) -> UploadedFile | None:
        found = self.files.get(file_id)
        return found if found is not None and found.app == app.name else None
