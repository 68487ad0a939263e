"""Check a body or a stream frame against Dify's OpenAPI shapes (``openapi_table.SCHEMAS``).

``problems(value, "ConversationListItem")`` lists every documented property that is missing or
has another type; ``event_schema("workflow", "node_started")`` names the schema of a frame.
The simulator's tests use both; a gateway test may too, to check what it relays.

One documented deviation: Dify's converters build an ``error`` frame from ``{code, message,
status}`` only, so chat and completion error frames carry no ``task_id`` (NOTES.md §3a), even
though the OpenAPI bases list it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

from tokenwire.simulator.openapi_table import SCHEMAS

__all__ = ["EXEMPT", "StreamKind", "event_schema", "problems"]

StreamKind = Literal["chat", "workflow", "completion"]

EXEMPT: Final[frozenset[tuple[str, str]]] = frozenset(
    {("StreamEventChatError", "task_id"), ("CompletionStreamEventError", "task_id")}
)
"""(schema, property) pairs the simulator leaves out on purpose, as Dify does."""

_CHAT: Final = {
    "message": "StreamEventChatMessage",
    "agent_message": "StreamEventChatAgentMessage",
    "agent_thought": "StreamEventChatAgentThought",
    "message_file": "StreamEventChatMessageFile",
    "message_end": "StreamEventChatMessageEnd",
    "message_replace": "StreamEventChatMessageReplace",
    "tts_message": "StreamEventChatTtsMessage",
    "tts_message_end": "StreamEventChatTtsMessageEnd",
    "error": "StreamEventChatError",
    "workflow_started": "StreamEventWorkflowStarted",
    "workflow_finished": "StreamEventWorkflowFinished",
    "node_started": "StreamEventNodeStarted",
    "node_finished": "StreamEventNodeFinished",
    "human_input_required": "StreamEventHumanInputRequired",
    "workflow_paused": "StreamEventWorkflowPaused",
    "human_input_form_filled": "StreamEventHumanInputFormFilled",
    "human_input_form_timeout": "StreamEventHumanInputFormTimeout",
    "reasoning_chunk": "StreamEventChatReasoningChunk",
}
_WORKFLOW: Final = {
    "workflow_started": "WorkflowStreamEventWorkflowStarted",
    "workflow_finished": "WorkflowStreamEventWorkflowFinished",
    "node_started": "WorkflowStreamEventNodeStarted",
    "node_finished": "WorkflowStreamEventNodeFinished",
    "iteration_started": "WorkflowStreamEventIterationStarted",
    "iteration_next": "WorkflowStreamEventIterationNext",
    "iteration_completed": "WorkflowStreamEventIterationCompleted",
    "loop_started": "WorkflowStreamEventLoopStarted",
    "loop_next": "WorkflowStreamEventLoopNext",
    "loop_completed": "WorkflowStreamEventLoopCompleted",
    "human_input_required": "WorkflowStreamEventHumanInputRequired",
    "workflow_paused": "WorkflowStreamEventWorkflowPaused",
    "human_input_form_filled": "WorkflowStreamEventHumanInputFormFilled",
    "human_input_form_timeout": "WorkflowStreamEventHumanInputFormTimeout",
    "text_chunk": "StreamEventTextChunk",
    "reasoning_chunk": "StreamEventReasoningChunk",
    "error": "StreamEventError",
}
_COMPLETION: Final = {
    "message": "StreamEventMessage",
    "message_end": "StreamEventMessageEnd",
    "message_replace": "StreamEventMessageReplace",
    "tts_message": "CompletionStreamEventTtsMessage",
    "tts_message_end": "CompletionStreamEventTtsMessageEnd",
    "error": "CompletionStreamEventError",
}
_STREAMS: Final[Mapping[StreamKind, Mapping[str, str]]] = {
    "chat": _CHAT,
    "workflow": _WORKFLOW,
    "completion": _COMPLETION,
}
_MISSING: Final = object()
_UNDER_NULL: Final = object()


def event_schema(kind: StreamKind, event: str) -> str | None:
    """The schema of a ``kind`` stream's ``event`` frame; None when Dify documents none."""
    return _STREAMS[kind].get(event)


def _lookup(value: Mapping[str, Any], dotted: str) -> Any:
    """The value at ``a.b.c``; ``_UNDER_NULL`` below a null parent; ``_MISSING`` if absent."""
    current: Any = value
    for key in dotted.split("."):
        if current is None:
            return _UNDER_NULL
        if not isinstance(current, Mapping) or key not in current:
            return _MISSING
        current = current[key]
    return current


def _type_problems(value: Any, kind: str, where: str) -> list[str]:
    base, _, nullable = kind.partition("|")
    if value is None:
        return [] if nullable or base == "any" else [f"{where}: null, documented {kind}"]
    if base.startswith("array@"):
        if not isinstance(value, list):
            return [f"{where}: {type(value).__name__}, documented {kind}"]
        found: list[str] = []
        for index, item in enumerate(value):
            found += problems(item, base.removeprefix("array@"), f"{where}[{index}].")
        return found
    if base.startswith("@"):
        return problems(value, base[1:], f"{where}.")
    ok = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "any": True,
    }[base]
    return [] if ok else [f"{where}: {type(value).__name__}, documented {kind}"]


def problems(value: Any, schema: str, prefix: str = "") -> list[str]:
    """Every documented property of ``schema`` that ``value`` lacks or types otherwise."""
    if not isinstance(value, Mapping):
        return [f"{prefix or schema}: {type(value).__name__}, documented object {schema}"]
    found: list[str] = []
    for prop, kind in SCHEMAS[schema].items():
        if (schema, prop) in EXEMPT:
            continue
        item = _lookup(value, prop)
        where = f"{prefix}{prop}"
        if item is _MISSING:
            found.append(f"{where}: missing ({schema})")
        elif item is not _UNDER_NULL:
            found += _type_problems(item, kind, where)
    return found
