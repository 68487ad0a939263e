"""The Dify apps a worker serves, and what each app's kind means for a request. No I/O.

How this works. ``TOKENWIRE_DIFY_APPS`` (or the file ``TOKENWIRE_DIFY_APPS_FILE``, a mounted
Secret) maps an app name to either a key string (``"app-…"``, served from ``DIFY_API_URL``) or
``{"url": "…/v1", "key": "app-…", "max_active": N}``; ``DIFY_API_URL``/``DIFY_API_KEY`` are the
app named ``default``, used when a frame names none. :func:`app_table` folds both into one
table of :class:`DifyApp`; keys stay :class:`~pydantic.SecretStr` all the way to the one place
that writes the ``Authorization`` header (``worker/dify.py``).

An app's *kind* is Dify's ``mode`` (``GET /info``). :func:`route_for` picks the endpoint a
request goes to, and refuses a ``chat`` to a one-shot app or a ``run`` to a conversational one
(:class:`~shared.exceptions.WrongAppKind`)::

    mode            chat                     run
    chat            POST /chat-messages      wrong_app_kind
    agent-chat      POST /chat-messages      wrong_app_kind
    advanced-chat   POST /chat-messages      wrong_app_kind
    agent           POST /chat-messages      wrong_app_kind
    completion      wrong_app_kind           POST /completion-messages
    workflow        wrong_app_kind           POST /workflows/run
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from shared.exceptions import DifyRejected, ErrorCode, WrongAppKind

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = [
    "CONVERSATIONAL",
    "DEFAULT_APP",
    "AppKind",
    "AppSpec",
    "DifyApp",
    "Route",
    "app_table",
    "kind_of",
    "parse_apps_json",
    "route_for",
    "unknown_app",
]

DEFAULT_APP: Final = "default"


class AppSpec(BaseModel):
    """One app of ``TOKENWIRE_DIFY_APPS`` in its object form."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    key: SecretStr
    url: str | None = None
    max_active: int | None = Field(default=None, ge=0)


@dataclass(frozen=True, slots=True)
class DifyApp:
    """One app a worker can ask: its base URL, its key, and its cluster-wide stream cap
    (None or 0: no cap of tokenwire's own)."""

    name: str
    url: str
    key: SecretStr
    max_active: int | None = None

    def __repr__(self) -> str:  # never the key, even in a traceback
        return f"DifyApp({self.name!r}, {self.url!r}, max_active={self.max_active})"


def parse_apps_json(text: str | bytes) -> dict[str, Any]:
    """The JSON object of ``TOKENWIRE_DIFY_APPS_FILE``; a ValueError for anything else."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ValueError("TOKENWIRE_DIFY_APPS_FILE is not JSON") from None
    if not isinstance(value, dict):
        raise ValueError("TOKENWIRE_DIFY_APPS_FILE must hold a JSON object")
    return value


def app_table(settings: Settings) -> dict[str, DifyApp]:
    """Every app a worker serves, by name; ``default`` from ``DIFY_API_URL``/``DIFY_API_KEY``
    unless the table names its own."""
    base = settings.dify_api_url.rstrip("/")
    table: dict[str, DifyApp] = {}
    if settings.dify_api_key is not None:
        table[DEFAULT_APP] = DifyApp(DEFAULT_APP, base, settings.dify_api_key)
    for name, spec in settings.dify_apps.items():
        if isinstance(spec, AppSpec):
            url = (spec.url or base).rstrip("/")
            table[name] = DifyApp(name, url, spec.key, spec.max_active or None)
        else:
            table[name] = DifyApp(name, base, spec)
    return table


def unknown_app(name: str) -> DifyRejected:
    return DifyRejected(f"no Dify app named {name!r} is configured", code=ErrorCode.UNKNOWN_APP)


class AppKind(StrEnum):
    """Dify's app modes (``/info``'s ``mode``); ``agent`` is the newer Agent mode."""

    CHAT = "chat"
    AGENT_CHAT = "agent-chat"
    ADVANCED_CHAT = "advanced-chat"
    AGENT = "agent"
    COMPLETION = "completion"
    WORKFLOW = "workflow"


CONVERSATIONAL: Final = frozenset(
    {AppKind.CHAT, AppKind.AGENT_CHAT, AppKind.ADVANCED_CHAT, AppKind.AGENT}
)


def kind_of(info: Mapping[str, Any]) -> AppKind | None:
    """The kind ``GET /info`` names, or None (an older Dify that does not say)."""
    mode = info.get("mode")
    try:
        return AppKind(mode) if isinstance(mode, str) else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request of one kind goes at Dify, and how it is stopped there."""

    kind: AppKind
    path: str  # the streaming endpoint
    stop_template: str  # with ``{task_id}``
    endpoint: str  # the metrics label

    @property
    def one_shot(self) -> bool:
        return self.kind not in CONVERSATIONAL

    @property
    def workflow(self) -> bool:
        """Whether the run has a ``workflow_run_id`` (workflow apps and chatflows)."""
        return self.kind in (AppKind.WORKFLOW, AppKind.ADVANCED_CHAT)

    def stop_path(self, task_id: str) -> str:
        return self.stop_template.format(task_id=task_id)


_CHAT_ROUTE: Final = ("/chat-messages", "/chat-messages/{task_id}/stop", "chat")
_ROUTES: Final[Mapping[AppKind, tuple[str, str, str]]] = {
    AppKind.CHAT: _CHAT_ROUTE,
    AppKind.AGENT_CHAT: _CHAT_ROUTE,
    AppKind.ADVANCED_CHAT: _CHAT_ROUTE,
    AppKind.AGENT: _CHAT_ROUTE,
    AppKind.COMPLETION: (
        "/completion-messages",
        "/completion-messages/{task_id}/stop",
        "completion",
    ),
    AppKind.WORKFLOW: ("/workflows/run", "/workflows/tasks/{task_id}/stop", "workflow"),
}


def route_for(kind: AppKind | None, request: str, app: str) -> Route:
    """The route of a ``request`` ("chat" or "run") to ``app`` of ``kind``; a kind Dify did
    not name is taken to be what the request expects (chat: a chat app, run: a workflow)."""
    if kind is None:
        kind = AppKind.CHAT if request == "chat" else AppKind.WORKFLOW
    if (request == "chat") != (kind in CONVERSATIONAL):
        wanted = "a `run`" if request == "chat" else "a `chat`"
        raise WrongAppKind(f"app {app!r} is a {kind.value} app: send {wanted} to it")
    path, stop, endpoint = _ROUTES[kind]
    return Route(kind, path, stop, endpoint)
