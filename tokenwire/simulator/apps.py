"""The simulated Dify apps: their keys, kinds and the bodies of ``/info``, ``/parameters``,
``/meta`` and ``/site`` (pure: no I/O, no clock).

How this works
--------------
Dify identifies an app by its API key alone, so the simulator keeps a table key → :class:`AppSpec`.
With no table (the default) there is one app, :data:`DEFAULT_APP`, that accepts any ``app-…``
key (or exactly ``SimConfig.api_key``) and behaves as the simulator always did: mode
``advanced-chat`` in ``/info``, the "chat" scenario unless ``tw_sim`` says otherwise.
:func:`parse_apps` reads the JSON of ``tokenwire simulate-dify --apps`` (key → fields of
:class:`AppSpec`); ``--apps demo`` is :data:`DEMO_APPS`.

An app's ``mode`` decides which routes it answers (Dify's own checks: ``not_chat_app``,
``not_workflow_app``, ``app_unavailable`` for the completion route) and its default scenario.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal, get_args

import orjson

from tokenwire.simulator.scenarios import (
    CHAT_SCENARIOS,
    COMPLETION_SCENARIOS,
    WORKFLOW_SCENARIOS,
    Scenario,
)

__all__ = [
    "CHAT_MODES",
    "DEFAULT_APP",
    "DEMO_APPS",
    "MODES",
    "AppSpec",
    "AppsError",
    "Mode",
    "app_info",
    "app_meta",
    "app_parameters",
    "app_site",
    "parse_apps",
]

Mode = Literal["chat", "agent-chat", "advanced-chat", "agent", "completion", "workflow"]
"""Dify's app modes; ``agent`` is the newer Agent mode (NOTES §8 "NA")."""
MODES: Final[tuple[Mode, ...]] = get_args(Mode)
CHAT_MODES: Final[frozenset[Mode]] = frozenset({"chat", "agent-chat", "advanced-chat", "agent"})
"""The modes ``/chat-messages``, ``/conversations`` and ``/messages`` serve."""

_MODE_SCENARIO: Final[Mapping[Mode, Scenario]] = {
    "chat": "chat",
    "agent-chat": "agent",
    "advanced-chat": "chatflow",
    "agent": "new_agent",
    "completion": "chat",
    "workflow": "workflow",
}
_MODE_SCENARIOS: Final[Mapping[Mode, frozenset[Scenario]]] = {
    "chat": CHAT_SCENARIOS,
    "agent-chat": CHAT_SCENARIOS,
    "advanced-chat": CHAT_SCENARIOS,
    "agent": CHAT_SCENARIOS,
    "completion": COMPLETION_SCENARIOS,
    "workflow": WORKFLOW_SCENARIOS,
}
_NAMESPACE: Final = uuid.UUID("3c1f5e0a-7b2d-4e8f-9a6c-1d2e3f4a5b6c")


class AppsError(ValueError):
    """The ``--apps`` table is malformed."""


@dataclass(frozen=True, slots=True)
class AppSpec:
    """One simulated Dify app. Every field but ``mode`` has a default."""

    mode: Mode = "advanced-chat"
    name: str = "tokenwire Dify simulator"
    description: str = "Speaks Dify's Service API streaming format for tests and demos."
    key: str | None = None
    """None: any ``Bearer app-…`` key (the default app only)."""
    scenario: Scenario | None = None
    """What a request plays unless its ``tw_sim`` says otherwise; None: from ``mode``."""
    tags: tuple[str, ...] = ("simulator",)
    opening_statement: str = "Hi! I am the tokenwire Dify simulator."
    suggested_questions: tuple[str, ...] = (
        "/agent What is a gateway?",
        "/chatflow Hello",
        "/slow Hi",
    )
    suggested_questions_after_answer: bool = False
    speech_to_text: bool = False
    text_to_speech: bool = False
    file_upload: bool = False
    """Whether ``/parameters`` says image upload is on (uploads are accepted either way)."""
    file_size_limit: int = 15
    image_file_size_limit: int = 10
    audio_file_size_limit: int = 50
    video_file_size_limit: int = 100
    workflow_file_upload_limit: int = 10
    """Sizes in MB, as Dify's ``system_parameters``; an upload over its category's is 413."""
    max_active_requests: int = 0
    """Dify's per-app concurrency cap (0: none); beyond it a send is 429 ``too_many_requests``."""
    user_input_form: tuple[Mapping[str, Any], ...] = ()
    app_id: str = field(default="")
    """A stable UUID of the app (derived from its name unless given)."""
    classic: bool = False
    """Behave as the unconfigured simulator always did: a blocking answer's ``mode`` follows
    the scenario, agent scenarios may block, conversations have no introduction."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AppsError(f"mode must be one of {', '.join(MODES)}")
        if self.scenario is not None and self.scenario not in _MODE_SCENARIOS[self.mode]:
            allowed = ", ".join(sorted(_MODE_SCENARIOS[self.mode]))
            raise AppsError(
                f"scenario {self.scenario!r} does not fit mode {self.mode!r}: {allowed}"
            )
        if self.max_active_requests < 0:
            raise AppsError("max_active_requests must be >= 0")
        if not self.app_id:
            object.__setattr__(self, "app_id", str(uuid.uuid5(_NAMESPACE, self.name)))

    @property
    def default_scenario(self) -> Scenario:
        return self.scenario or _MODE_SCENARIO[self.mode]

    def allows(self, scenario: Scenario) -> bool:
        """Whether a request to this app may play ``scenario`` (a chatflow may not play a
        workflow scenario, and so on)."""
        return scenario in _MODE_SCENARIOS[self.mode]

    @property
    def is_chat(self) -> bool:
        return self.mode in CHAT_MODES

    @property
    def has_workflow(self) -> bool:
        """Workflow and chatflow apps: run details, logs, event streams, forms."""
        return self.mode in ("workflow", "advanced-chat")


DEFAULT_APP: Final = AppSpec(scenario="chat", classic=True)
"""The one app of an unconfigured simulator: exactly what it always served."""


def _demo(key: str, mode: Mode, name: str, description: str, **extra: Any) -> AppSpec:
    return AppSpec(
        key=key,
        mode=mode,
        name=name,
        description=description,
        tags=("simulator", "demo"),
        opening_statement=f"Hi! I am {name}, a simulated Dify {mode} app.",
        suggested_questions=("What can you do?", "Tell me about tokenwire."),
        suggested_questions_after_answer=True,
        speech_to_text=True,
        text_to_speech=True,
        file_upload=True,
        **extra,
    )


_WORKFLOW_FORM: Final = (
    {"paragraph": {"label": "Ticket", "variable": "query", "required": True, "default": ""}},
)
DEMO_APPS: Final[Mapping[str, AppSpec]] = {
    spec.key or "": spec
    for spec in (
        dataclasses.replace(DEFAULT_APP, key="app-simulator"),
        _demo("app-chat", "chat", "Demo chat", "A chat app that answers at once."),
        _demo("app-agent", "agent", "Demo agent", "Dify's newer Agent mode."),
        _demo("app-agent-chat", "agent-chat", "Demo agent chat", "An agent with a web tool."),
        _demo("app-chatflow", "advanced-chat", "Demo chatflow", "A chatflow with two nodes."),
        _demo(
            "app-chatflow-human",
            "advanced-chat",
            "Demo chatflow approval",
            "A chatflow that waits for a person at a Human Input node.",
            scenario="chatflow_human",
        ),
        _demo(
            "app-workflow",
            "workflow",
            "Demo workflow",
            "Summarises a ticket, item by item (an iteration).",
            scenario="iteration",
            user_input_form=_WORKFLOW_FORM,
        ),
        _demo(
            "app-completion",
            "completion",
            "Demo completion",
            "One-shot text generation.",
            user_input_form=(
                {
                    "text-input": {
                        "label": "Topic",
                        "variable": "topic",
                        "required": False,
                        "default": "",
                    }
                },
            ),
        ),
        _demo(
            "app-human",
            "workflow",
            "Demo approval workflow",
            "Drafts a reply and waits for a person to approve it.",
            scenario="human",
            user_input_form=_WORKFLOW_FORM,
        ),
    )
}
"""``--apps demo``: one app of every kind, for ``tokenwire dev`` and demos (see the package doc);
``app-simulator`` (``tokenwire dev``'s key) is the unconfigured simulator's app."""

_SPEC_FIELDS: Final = frozenset(f.name for f in fields(AppSpec)) - {"key"}


def _spec(key: str, raw: object) -> AppSpec:
    if not isinstance(raw, Mapping):
        raise AppsError(f"app {key!r}: must be an object with at least a mode")
    unknown = set(raw) - _SPEC_FIELDS
    if unknown:
        raise AppsError(f"app {key!r}: unknown field(s) {', '.join(sorted(unknown))}")
    values = dict(raw)
    for name in ("tags", "suggested_questions", "user_input_form"):
        if name in values:
            if not isinstance(values[name], list):
                raise AppsError(f"app {key!r}: {name} must be a list")
            values[name] = tuple(values[name])
    values.setdefault("name", key)
    values.setdefault("mode", "chat")
    try:
        return AppSpec(key=key, **values)
    except TypeError as exc:
        raise AppsError(f"app {key!r}: {exc}") from None


def parse_apps(text: str) -> dict[str, AppSpec]:
    """``demo``, or a JSON object key → {mode, name, …} (the fields of :class:`AppSpec`)."""
    if text.strip() == "demo":
        return dict(DEMO_APPS)
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise AppsError(f"--apps is not JSON: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise AppsError("--apps must be a non-empty JSON object: key → {mode, name, …}")
    apps: dict[str, AppSpec] = {}
    for key, value in raw.items():
        if not key.startswith("app-"):
            raise AppsError(f"app key {key!r} must start with 'app-' as Dify's do")
        apps[key] = _spec(key, value)
    names = [spec.name for spec in apps.values()]
    if len(set(names)) != len(names):
        raise AppsError("every app needs its own name")
    return apps


# --------------------------------------------------------------------------- bodies


def app_info(spec: AppSpec) -> dict[str, Any]:
    """``GET /info`` (AppInfoResponse)."""
    return {
        "name": spec.name,
        "description": spec.description,
        "tags": list(spec.tags),
        "mode": spec.mode,
        "author_name": "tokenwire",
    }


def app_parameters(spec: AppSpec) -> dict[str, Any]:
    """``GET /parameters`` (AppParametersResponse): what a frontend renders the app from."""

    def on(enabled: bool) -> dict[str, bool]:
        return {"enabled": enabled}

    return {
        "opening_statement": spec.opening_statement,
        "suggested_questions": list(spec.suggested_questions),
        "suggested_questions_after_answer": on(spec.suggested_questions_after_answer),
        "speech_to_text": on(spec.speech_to_text),
        "text_to_speech": {
            "enabled": spec.text_to_speech,
            "voice": "alloy" if spec.text_to_speech else "",
            "language": "en-US" if spec.text_to_speech else "",
            "autoPlay": "disabled",
        },
        "retriever_resource": on(True),
        "annotation_reply": on(False),
        "more_like_this": on(False),
        "sensitive_word_avoidance": on(False),
        "user_input_form": [dict(item) for item in spec.user_input_form],
        "file_upload": {
            "image": {
                "enabled": spec.file_upload,
                "number_limits": 3,
                "detail": "high",
                "transfer_methods": ["remote_url", "local_file"],
            }
        },
        "system_parameters": {
            "file_size_limit": spec.file_size_limit,
            "image_file_size_limit": spec.image_file_size_limit,
            "audio_file_size_limit": spec.audio_file_size_limit,
            "video_file_size_limit": spec.video_file_size_limit,
            "workflow_file_upload_limit": spec.workflow_file_upload_limit,
        },
    }


def app_meta(spec: AppSpec) -> dict[str, Any]:
    """``GET /meta`` (AppMetaResponse): icons of the tools an agent may call."""
    if spec.mode not in ("agent-chat", "agent") and not spec.classic:
        return {"tool_icons": {}}
    return {
        "tool_icons": {
            "web_search": "http://127.0.0.1/console/api/workspaces/current/tool-provider/"
            "builtin/web_search/icon",
            "calculator": {"background": "#4A90D9", "content": "🧮"},
        }
    }


def app_site(spec: AppSpec) -> dict[str, Any]:
    """``GET /site`` (WebAppSettingsResponse)."""
    return {
        "title": spec.name,
        "chat_color_theme": "#1C64F2",
        "chat_color_theme_inverted": False,
        "icon_type": "emoji",
        "icon": "🤖",
        "icon_background": "#FFEAD5",
        "icon_url": None,
        "description": spec.description,
        "copyright": "tokenwire",
        "privacy_policy": "",
        "input_placeholder": None,
        "custom_disclaimer": "",
        "default_language": "en-US",
        "show_workflow_steps": spec.mode in ("advanced-chat", "workflow"),
        "use_icon_as_answer_icon": False,
    }
