"""Deterministic answers and Dify event scripts for the simulator (pure: no I/O, no clock).

How this works
--------------
``build_script`` turns one chat request (its ids, query, inputs and controls) into a list of
steps. An :class:`Emit` is one Dify event, the delay before it, and what it does to the stored
answer; :class:`Drop` and :class:`Stall` are the in-stream faults. The app walks that list,
sleeping, checking the stop flag and writing frames. Everything a test may want to predict (the
answer text, the event order, the usage block) is decided here, so a test can predict it
without a server: ``expected_final_answer(query, tw_sim)`` is what a client must end up with.

Answers are derived from a SHA-256 of the query (never ``hash()``, which is salted per
process), so two processes, or a test and the server it talks to, agree on every byte.

Event shapes follow /work/shared/dify/NOTES.md §2-§3: every non-error event carries the
envelope ``event, conversation_id, message_id, created_at, task_id``; an error frame carries
``event, conversation_id, message_id, created_at, code, message, status`` and no ``task_id``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, get_args

import orjson

if TYPE_CHECKING:
    from tokenwire.simulator.apps import AppSpec

__all__ = [
    "DEFAULT_CUT_AFTER",
    "DEFAULT_TOKENS",
    "FAULTS",
    "HOSTILE_TOKENS",
    "PING_FRAME",
    "PRE_STREAM_FAULTS",
    "QUERY_PREFIXES",
    "REPLACEMENT_TEXT",
    "SCENARIOS",
    "ControlsError",
    "Drop",
    "Emit",
    "Event",
    "Fault",
    "JsonStyle",
    "Scenario",
    "SimConfig",
    "SimControls",
    "Stall",
    "Step",
    "StreamIds",
    "answer_tokens",
    "app_mode",
    "build_script",
    "encode_event",
    "expected_answer",
    "expected_final_answer",
    "message_end_event",
    "parse_controls",
    "prompt_tokens",
    "retriever_resources",
    "stopped_events",
    "streamed_tokens",
    "usage",
]

Scenario = Literal[
    "chat",
    "agent",
    "chatflow",
    "replace",
    "tts",
    "hostile",
    "new_agent",
    "chatflow_human",
    "workflow",
    "iteration",
    "loop",
    "human",
]
Fault = Literal["refuse", "500", "429", "400", "413", "error_event", "cut", "stall"]
JsonStyle = Literal["orjson", "ascii"]
Event = dict[str, Any]
"""One Dify stream event as a JSON object (what follows ``data: `` on the wire)."""

SCENARIOS: Final[tuple[Scenario, ...]] = get_args(Scenario)
CHAT_SCENARIOS: Final[frozenset[Scenario]] = frozenset(
    {"chat", "agent", "chatflow", "replace", "tts", "hostile", "new_agent", "chatflow_human"}
)
"""What ``POST /chat-messages`` can play (``new_agent``: Dify's newer Agent mode)."""
COMPLETION_SCENARIOS: Final[frozenset[Scenario]] = frozenset({"chat", "replace", "tts", "hostile"})
"""What ``POST /completion-messages`` can play."""
WORKFLOW_SCENARIOS: Final[frozenset[Scenario]] = frozenset(
    {"workflow", "iteration", "loop", "human"}
)
"""What ``POST /workflows/run`` can play (``human`` pauses at a Human Input node)."""
FAULTS: Final[tuple[Fault, ...]] = get_args(Fault)
PRE_STREAM_FAULTS: Final[frozenset[Fault]] = frozenset({"refuse", "500", "429", "400", "413"})
"""Faults that fail the request before any byte of a stream (HTTP status, or no response)."""

DEFAULT_TOKENS: Final = 40
DEFAULT_CUT_AFTER: Final = 5
PING_FRAME: Final = b"event: ping\n\n"
"""Dify's keep-alive: an ``event:`` line and no ``data:`` line (NOTES §2)."""

REPLACEMENT_TEXT: Final = "⚠️ This answer was replaced by output moderation. 抱歉。"
"""The ``message_replace`` answer of the "replace" scenario: the whole final answer."""

HOSTILE_TOKENS: Final[tuple[str, ...]] = (
    " <scr",
    "ipt>alert(1)</script>",
    " <img src=x ",
    "onerror=alert(1)>",
)
"""Split across deltas on purpose: a sanitiser that only looks at single deltas misses them."""

QUERY_PREFIXES: Final[Mapping[str, Mapping[str, Any]]] = {
    "/agent": {"scenario": "agent"},
    "/chatflow": {"scenario": "chatflow"},
    "/replace": {"scenario": "replace"},
    "/tts": {"scenario": "tts"},
    "/hostile": {"scenario": "hostile"},
    "/slow": {"delay_ms": 150.0, "first_token_delay_ms": 1500.0},
}
"""Query prefixes a human can type on a demo page instead of sending ``inputs.tw_sim``."""

FAULT_ERROR_MESSAGE: Final = (
    "[tw_sim] Server Unavailable Error, the model provider failed mid-stream."
)
_PREFIX_RE: Final = re.compile(r"^(/[a-z]+)(?:\s|$)")
_MAX_TOKENS: Final = 100_000
WORKFLOW_ID: Final = "5f8e2a34-0c1d-4b6e-9a7f-3d2c1b0a9e8f"
_NAMESPACE: Final = uuid.UUID("0b7c6d1e-2f3a-4b5c-8d9e-0f1a2b3c4d5e")


class ControlsError(ValueError):
    """``inputs.tw_sim`` is malformed; the app answers 400 ``invalid_param`` like Dify would."""


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Server-wide defaults; a request's ``inputs.tw_sim`` overrides the per-request ones."""

    token_delay_ms: float = 20
    tokens: int = DEFAULT_TOKENS
    ping_interval_s: float = 10.0
    api_key: str | None = None
    """None accepts any ``Bearer app-...`` key; otherwise the key must match exactly."""
    json_style: JsonStyle = "orjson"
    """``orjson``: compact raw UTF-8 (recent Dify); ``ascii``: ``json.dumps`` (older Dify)."""
    apps: Mapping[str, AppSpec] | None = None
    """key → app (``tokenwire.simulator.apps``); None: one app, any key (or ``api_key``)."""

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError("tokens must be >= 1")
        if self.token_delay_ms < 0:
            raise ValueError("token_delay_ms must be >= 0")
        if self.ping_interval_s <= 0:
            raise ValueError("ping_interval_s must be > 0")
        if self.json_style not in get_args(JsonStyle):
            raise ValueError(f"json_style must be one of {get_args(JsonStyle)}")


@dataclass(frozen=True, slots=True)
class SimControls:
    """Per-request behaviour, read from ``inputs["tw_sim"]`` and the query prefix.

    ``None`` means "use the server's :class:`SimConfig`". ``fault_times`` limits the fault to
    the first N requests carrying the same query, so a test can watch a retry succeed.
    """

    scenario: Scenario = "chat"
    delay_ms: float | None = None
    tokens: int | None = None
    first_token_delay_ms: float | None = None
    ping_interval_s: float | None = None
    fault: Fault | None = None
    cut_after: int = DEFAULT_CUT_AFTER
    fault_times: int | None = None
    iterations: int | None = None
    """Items of the "iteration" and "loop" workflow scenarios (default 3)."""
    form_expiry_s: float | None = None
    """Seconds a human-input form stays open (default one day, as Dify's example)."""


@dataclass(frozen=True, slots=True)
class StreamIds:
    """The ids every frame of one generation carries, fixed before the first event."""

    task_id: str
    message_id: str
    conversation_id: str
    created_at: int

    def derive(self, name: str) -> str:
        """A stable secondary id (thought, node run, file) so a script is reproducible."""
        return str(uuid.uuid5(uuid.UUID(self.message_id), name))


@dataclass(frozen=True, slots=True)
class Emit:
    """Send ``event`` after sleeping ``delay_s``; ``append``/``replace`` update the answer."""

    event: Event
    delay_s: float = 0.0
    append: str = ""
    replace: str | None = None

    @property
    def name(self) -> str:
        """The Dify event type (the JSON ``event`` field)."""
        return str(self.event["event"])

    @property
    def is_token(self) -> bool:
        """A text delta: what ``cut_after`` counts (a closing whole-answer ``message`` of the
        newer Agent mode replaces, so it is not one)."""
        return self.replace is None and self.name in ("message", "agent_message", "text_chunk")

    def apply_to(self, answer: str) -> str:
        """The stored answer after this event: deltas append, ``message_replace`` replaces."""
        return self.replace if self.replace is not None else answer + self.append


@dataclass(frozen=True, slots=True)
class Drop:
    """Fault "cut": close the client connection mid-body; the generation goes on unseen."""


@dataclass(frozen=True, slots=True)
class Stall:
    """Fault "stall": the generation hangs silently (no frames, no pings) until stopped."""


Step = Emit | Drop | Stall

# --------------------------------------------------------------------------- answers

_WORDS: Final = (
    "stream", "token", "gateway", "socket", "latency", "queue", "answer", "model",
    "frame", "buffer", "retry", "signal", "cache", "delta", "relay", "worker",
    "café", "naïve", "resume", "backoff",
)  # fmt: skip
_PUNCT: Final = (",", ";", ":", "!", "?")
_CJK: Final = ("你好", "世界", "日本語", "한국어", "流式传输")
# All outside the BMP: 4 UTF-8 bytes each, and surrogate pairs in JavaScript strings.
_EMOJI: Final = ("🚀", "🎉", "🌏", "👋🏽", "🧪")
_FEATURE_MIN_TOKENS: Final = 8
_MASK64: Final = (1 << 64) - 1
_T = TypeVar("_T")


class _SplitMix64:
    """Tiny PRNG with a fixed algorithm, so answers never change with the Python version."""

    def __init__(self, seed: int) -> None:
        self._state = seed & _MASK64

    def next(self) -> int:
        self._state = (self._state + 0x9E3779B97F4A7C15) & _MASK64
        z = self._state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def pick(self, items: Sequence[_T]) -> _T:
        return items[self.next() % len(items)]


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def answer_tokens(query: str, tokens: int) -> list[str]:
    """The plain answer to ``query`` as ``tokens`` deltas, identical in every process.

    With at least 8 tokens the text always holds a ``**bold**`` word, a Markdown list item,
    a paragraph break, CJK text and an emoji (one with a skin-tone modifier possible), so
    multi-byte UTF-8 and newlines cross the whole pipeline in every test.
    """
    if not 1 <= tokens <= _MAX_TOKENS:
        raise ValueError(f"tokens must be between 1 and {_MAX_TOKENS}")
    rng = _SplitMix64(_seed(query))
    out = [rng.pick(_WORDS).capitalize()]
    for _ in range(1, tokens):
        if out[-1] not in _PUNCT and rng.next() % 6 == 0:
            out.append(rng.pick(_PUNCT))
        else:
            out.append(" " + rng.pick(_WORDS))
    if tokens >= _FEATURE_MIN_TOKENS:
        out[tokens // 5] = f" **{rng.pick(_WORDS)}**"
        out[2 * tokens // 5] = "\n- " + rng.pick(_WORDS)
        out[3 * tokens // 5] = "\n\n" + rng.pick(_CJK)
        out[4 * tokens // 5] = " " + rng.pick(_EMOJI)
        if out[-2] in _PUNCT:
            out[-2] = " " + rng.pick(_WORDS)
        out[-1] = "."
    return out


def expected_answer(query: str, tokens: int) -> str:
    """The plain ("chat") answer: the concatenation of :func:`answer_tokens`."""
    return "".join(answer_tokens(query, tokens))


def streamed_tokens(query: str, controls: SimControls, default_tokens: int) -> list[str]:
    """The text deltas a scenario streams ("hostile" inserts :data:`HOSTILE_TOKENS`)."""
    tokens = answer_tokens(
        query, controls.tokens if controls.tokens is not None else default_tokens
    )
    if controls.scenario == "hostile":
        middle = len(tokens) // 2
        tokens[middle:middle] = HOSTILE_TOKENS
    return tokens


def expected_final_answer(
    query: str,
    controls: SimControls | Mapping[str, Any] | None = None,
    *,
    tokens: int = DEFAULT_TOKENS,
) -> str:
    """What a client must end up with for a complete, unstopped generation.

    ``controls`` is a :class:`SimControls` or the ``tw_sim`` dict as sent (the query prefix is
    honoured then); ``tokens`` is the server's default length (``SimConfig.tokens``).
    It is also what the conversation history holds afterwards, including after fault "cut".
    For "replace" it is :data:`REPLACEMENT_TEXT`, not the streamed deltas.
    """
    if not isinstance(controls, SimControls):
        controls = parse_controls(query, {"tw_sim": dict(controls or {})})
    if controls.scenario == "replace":
        return REPLACEMENT_TEXT
    return "".join(streamed_tokens(query, controls, tokens))


# --------------------------------------------------------------------------- controls

_NUMBER_KEYS: Final = ("delay_ms", "first_token_delay_ms", "ping_interval_s", "form_expiry_s")
_INT_KEYS: Final = ("tokens", "cut_after", "fault_times", "iterations")
_MAX_ITERATIONS: Final = 50


def _as_number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ControlsError(f"tw_sim.{key} must be a number")
    if value < 0 or (key == "ping_interval_s" and value == 0):
        raise ControlsError(f"tw_sim.{key} must be positive")
    return float(value)


def _as_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlsError(f"tw_sim.{key} must be an integer")
    low = 1 if key in ("tokens", "iterations") else 0
    high = _MAX_ITERATIONS if key == "iterations" else _MAX_TOKENS
    if not low <= value <= high:
        raise ControlsError(f"tw_sim.{key} must be between {low} and {high}")
    return value


def parse_controls(
    query: str, inputs: Mapping[str, Any], *, default_scenario: Scenario = "chat"
) -> SimControls:
    """Read the simulator controls of one request: query prefix first, then ``tw_sim`` wins.

    ``default_scenario`` is the app's own (an agent app plays "agent" unless told otherwise).

    Unknown keys and bad values raise :class:`ControlsError`, so a typo in a test shows up as
    a 400 instead of silently running the default scenario.
    """
    settings: dict[str, Any] = {"scenario": default_scenario}
    match = _PREFIX_RE.match(query)
    if match and match.group(1) in QUERY_PREFIXES:
        settings.update(QUERY_PREFIXES[match.group(1)])
    raw = inputs.get("tw_sim")
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ControlsError("tw_sim must be an object")
    settings.update(raw)

    values: dict[str, Any] = {}
    for key, value in settings.items():
        if value is None and key != "scenario":
            continue  # an explicit null means "the default", as if absent
        if key == "scenario":
            if value not in SCENARIOS:
                raise ControlsError(f"tw_sim.scenario must be one of {', '.join(SCENARIOS)}")
            values[key] = value
        elif key == "fault":
            fault = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
            if fault not in FAULTS:
                raise ControlsError(f"tw_sim.fault must be one of {', '.join(FAULTS)}")
            values[key] = fault
        elif key in _NUMBER_KEYS:
            values[key] = _as_number(key, value)
        elif key in _INT_KEYS:
            values[key] = _as_int(key, value)
        else:
            raise ControlsError(f"tw_sim has an unknown key: {key!r}")
    return SimControls(**values)


# --------------------------------------------------------------------------- events


def envelope(ids: StreamIds, event: str, **fields: Any) -> Event:
    """Dify's chat converter order: envelope first, then the event's own fields (NOTES §3a)."""
    return {
        "event": event,
        "conversation_id": ids.conversation_id,
        "message_id": ids.message_id,
        "created_at": ids.created_at,
        "task_id": ids.task_id,
        **fields,
    }


def _price(tokens: int, unit_price: Decimal, price_unit: Decimal) -> Decimal:
    return (tokens * unit_price * price_unit).quantize(Decimal("0.0000001"))


def prompt_tokens(query: str) -> int:
    """A plausible prompt size: a fixed system prompt plus about 4 bytes per token."""
    return 17 + len(query.encode("utf-8")) // 4


def usage(prompt: int, completion: int, latency_s: float) -> dict[str, Any]:
    """``metadata.usage`` with every field of NOTES §3b; prices are decimal strings as in Dify."""
    unit = Decimal("0.001")
    prompt_unit_price, completion_unit_price = Decimal("0.001"), Decimal("0.002")
    prompt_price = _price(prompt, prompt_unit_price, unit)
    completion_price = _price(completion, completion_unit_price, unit)
    return {
        "prompt_tokens": prompt,
        "prompt_unit_price": str(prompt_unit_price),
        "prompt_price_unit": str(unit),
        "prompt_price": format(prompt_price, "f"),
        "completion_tokens": completion,
        "completion_unit_price": str(completion_unit_price),
        "completion_price_unit": str(unit),
        "completion_price": format(completion_price, "f"),
        "total_tokens": prompt + completion,
        "total_price": format(prompt_price + completion_price, "f"),
        "currency": "USD",
        "latency": round(latency_s, 6),
    }


def retriever_resources(query: str, message_id: str = "") -> list[dict[str, Any]]:
    """Two knowledge-base citations, stable per query, in Dify's ``retriever_resources`` shape
    (``message_id``: the message that cites them)."""
    dataset_id = str(uuid.uuid5(_NAMESPACE, "dataset:tokenwire-docs"))
    docs = (("gateway.md", 0.8731), ("dify-notes.md", 0.7412))
    return [
        {
            "id": str(uuid.uuid5(_NAMESPACE, f"resource:{name}:{query}")),
            "message_id": message_id,
            "position": position,
            "dataset_id": dataset_id,
            "dataset_name": "tokenwire docs",
            "document_id": str(uuid.uuid5(_NAMESPACE, f"document:{name}")),
            "document_name": name,
            "data_source_type": "upload_file",
            "segment_id": str(uuid.uuid5(_NAMESPACE, f"segment:{name}:{query}")),
            "score": score,
            "hit_count": position,
            "word_count": 120 + position,
            "segment_position": position,
            "index_node_hash": hashlib.sha256(f"{name}:{query}".encode()).hexdigest()[:16],
            "content": f"Excerpt {position} of {name} about the question.",
            "summary": None,
            "created_at": 1_700_000_000,
        }
        for position, (name, score) in enumerate(docs, start=1)
    ]


def message_end_event(
    ids: StreamIds, query: str, completion_tokens: int, latency_s: float
) -> Event:
    """The ``message_end`` frame: the only place a Dify chat stream reports usage."""
    metadata = {
        "usage": usage(prompt_tokens(query), completion_tokens, latency_s),
        "retriever_resources": retriever_resources(query, ids.message_id),
    }
    return envelope(ids, "message_end", id=ids.message_id, metadata=metadata)


def workflow_finished_event(
    ids: StreamIds, status: str, answer: str, completion_tokens: int, query: str
) -> Event:
    run_id = ids.derive("workflow_run")
    return envelope(
        ids,
        "workflow_finished",
        workflow_run_id=run_id,
        data={
            "id": run_id,
            "workflow_id": WORKFLOW_ID,
            "sequence_number": 1,
            "status": status,
            "outputs": {"answer": answer},
            "error": None,
            "elapsed_time": 0.0,
            "total_tokens": prompt_tokens(query) + completion_tokens,
            "total_steps": 2,
            "created_by": {"id": ids.derive("end_user"), "user": "end_user"},
            "created_at": ids.created_at,
            "finished_at": ids.created_at,
            "exceptions_count": 0,
            "files": [],
        },
    )


def stopped_events(
    ids: StreamIds,
    *,
    query: str,
    scenario: Scenario,
    answer: str,
    completion_tokens: int,
    latency_s: float,
) -> list[Event]:
    """What Dify sends after a stop: the stream still ends normally, with ``message_end``."""
    events: list[Event] = []
    if scenario == "chatflow":
        events.append(workflow_finished_event(ids, "stopped", answer, completion_tokens, query))
    events.append(message_end_event(ids, query, completion_tokens, latency_s))
    return events


def app_mode(scenario: Scenario) -> str:
    """The ``mode`` field of a blocking response: which kind of Dify app this pretends to be."""
    return {"agent": "agent-chat", "chatflow": "advanced-chat"}.get(scenario, "chat")


def encode_event(event: Event, style: JsonStyle) -> bytes:
    """One SSE frame exactly as Dify writes it: ``data: {json}\\n\\n``, no ``event:`` line."""
    payload = json.dumps(event).encode("ascii") if style == "ascii" else orjson.dumps(event)
    return b"data: " + payload + b"\n\n"


# --------------------------------------------------------------------------- scripts


class Script:
    """Collects steps and the planned elapsed time, which becomes ``usage.latency``."""

    def __init__(self, ids: StreamIds, delay_s: float, first_token_delay_s: float) -> None:
        self.ids = ids
        self.steps: list[Step] = []
        self.delay_s = delay_s
        self.first_token_delay_s = first_token_delay_s
        self.elapsed_s = 0.0
        self._tokens = 0

    def emit(
        self, event: Event, *, delay_s: float | None = None, replace: str | None = None
    ) -> None:
        delay = self.delay_s if delay_s is None else delay_s
        self.elapsed_s += delay
        self.steps.append(Emit(event, delay, replace=replace))

    def token(self, event: str, text: str) -> None:
        self.chunk(envelope(self.ids, event, id=self.ids.message_id, answer=text), text)

    def chunk(self, event: Event, text: str) -> None:
        """A text delta (the first one waits ``first_token_delay_s``)."""
        delay = self.first_token_delay_s if self._tokens == 0 else self.delay_s
        self._tokens += 1
        self.elapsed_s += delay
        self.steps.append(Emit(event, delay, text))

    def end(self, query: str, completion_tokens: int) -> None:
        self.emit(
            message_end_event(self.ids, query, completion_tokens, self.elapsed_s), delay_s=0.0
        )


def _thought(
    ids: StreamIds,
    thought_id: str,
    position: int,
    *,
    thought: str = "",
    tool: str = "",
    tool_input: str = "",
    observation: str = "",
    message_files: Sequence[str] = (),
) -> Event:
    labels = {tool: {"en_US": "Web Search", "zh_Hans": "网页搜索"}} if tool else {}
    return envelope(
        ids,
        "agent_thought",
        id=thought_id,
        position=position,
        thought=thought,
        observation=observation,
        tool=tool,
        tool_labels=labels,
        tool_input=tool_input,
        message_files=list(message_files),
    )


def _agent(script: Script, query: str, tokens: list[str]) -> None:
    ids = script.ids
    first, final, file_id = ids.derive("thought:1"), ids.derive("thought:2"), ids.derive("file:1")
    tool_input = orjson.dumps({"web_search": {"query": query}}).decode()
    plan = "I should look this up first."
    script.emit(_thought(ids, first, 1))
    script.emit(_thought(ids, first, 1, thought=plan, tool="web_search", tool_input=tool_input))
    script.emit(
        _thought(
            ids, first, 1, thought=plan, tool="web_search", tool_input=tool_input,
            observation='{"web_search": "3 results found."}',
        )
    )  # fmt: skip
    script.emit(_thought(ids, final, 2))
    for text in tokens:
        script.token("agent_message", text)
    script.emit(
        envelope(
            ids,
            "message_file",
            id=file_id,
            type="image",
            belongs_to="assistant",
            url=f"http://127.0.0.1/files/tools/{file_id}.png?timestamp=0&nonce=sim&sign=sim",
        )
    )
    script.emit(_thought(ids, final, 2, thought="".join(tokens), message_files=[file_id]))
    script.end(query, len(tokens))


def _new_agent(script: Script, query: str, tokens: list[str]) -> None:
    """Dify's newer Agent mode: ``agent_message`` deltas, then one ``message`` holding the
    whole answer again (NOTES §8): a client that appends it doubles the answer."""
    ids = script.ids
    thought_id = ids.derive("thought:1")
    script.emit(_thought(ids, thought_id, 1, thought="Planning the answer."))
    for text in tokens:
        script.token("agent_message", text)
    answer = "".join(tokens)
    script.emit(_thought(ids, thought_id, 1, thought=answer))
    script.emit(envelope(ids, "message", id=ids.message_id, answer=answer), replace=answer)
    script.end(query, len(tokens))


def node_event(
    ids: StreamIds, event: str, index: int, node: tuple[str, str, str], **extra: Any
) -> Event:
    """A chatflow ``node_*`` frame: the chat envelope, ``workflow_run_id`` and the node data."""
    data = node_data(ids, index, node, **extra)
    return envelope(ids, event, workflow_run_id=ids.derive("workflow_run"), data=data)


def node_data(
    ids: StreamIds, index: int, node: tuple[str, str, str], **extra: Any
) -> dict[str, Any]:
    """``data`` of ``node_started`` (plus ``extra``, e.g. :func:`node_finished_fields`)."""
    node_id, node_type, title = node
    data: dict[str, Any] = {
        "id": ids.derive(f"node:{node_id}"),
        "node_id": node_id,
        "node_type": node_type,
        "title": title,
        "index": index,
        "predecessor_node_id": "start" if index > 1 else None,
        "inputs": None,
        "inputs_truncated": False,
        "created_at": ids.created_at,
        "extras": {},
        "iteration_id": None,
        "loop_id": None,
    }
    data.update(extra)
    return data


def node_finished_fields(outputs: dict[str, Any], tokens: int = 0) -> dict[str, Any]:
    """What ``node_finished`` adds to :func:`node_data`."""
    return {
        "process_data": None,
        "process_data_truncated": False,
        "outputs": outputs,
        "outputs_truncated": False,
        "status": "succeeded",
        "error": None,
        "elapsed_time": 0.01,
        "execution_metadata": {"total_tokens": tokens, "total_price": 0.0, "currency": "USD"},
        "finished_at": 0,
        "files": [],
    }


def _chatflow(script: Script, query: str, inputs: Mapping[str, Any], tokens: list[str]) -> None:
    ids = script.ids
    run_id = ids.derive("workflow_run")
    start, llm = ("start", "start", "Start"), ("llm", "llm", "LLM")
    answer = "".join(tokens)
    script.emit(
        envelope(
            ids,
            "workflow_started",
            workflow_run_id=run_id,
            data={
                "id": run_id,
                "workflow_id": WORKFLOW_ID,
                "sequence_number": 1,
                "inputs": {**inputs, "sys.query": query},
                "created_at": ids.created_at,
                "reason": "initial",
            },
        )
    )
    script.emit(node_event(ids, "node_started", 1, start))
    script.emit(
        node_event(ids, "node_finished", 1, start, **node_finished_fields({"sys.query": query}))
    )
    script.emit(node_event(ids, "node_started", 2, llm))
    for text in tokens:
        script.token("message", text)
    finished = node_finished_fields({"text": answer}, len(tokens))
    script.emit(node_event(ids, "node_finished", 2, llm, **finished))
    script.emit(workflow_finished_event(ids, "succeeded", answer, len(tokens), query))
    script.end(query, len(tokens))


def tts_chunks(ids: StreamIds) -> list[str]:
    """Base64 "MP3" chunks: an ID3 header and filler bytes, enough to look like Dify's."""
    raw = b"ID3\x04\x00\x00\x00\x00\x00\x00" + hashlib.sha256(ids.message_id.encode()).digest()
    return [base64.b64encode(raw[i : i + 14]).decode("ascii") for i in range(0, len(raw), 14)]


def chat_error_event(ids: StreamIds) -> Event:
    """The in-band error of fault "error_event" for chat and chatflow streams (no ``task_id``)."""
    return {
        "event": "error",
        "conversation_id": ids.conversation_id,
        "message_id": ids.message_id,
        "created_at": ids.created_at,
        "code": "completion_request_error",
        "message": FAULT_ERROR_MESSAGE,
        "status": 400,
    }


def apply_fault(
    steps: list[Step], controls: SimControls, delay_s: float, error: Event
) -> list[Step]:
    """Splice an in-stream fault in after the ``cut_after``-th text delta; ``error`` is the
    frame fault "error_event" sends (its envelope differs per app kind)."""
    if controls.fault not in ("error_event", "cut", "stall"):
        return steps
    token_positions = [i for i, s in enumerate(steps) if isinstance(s, Emit) and s.is_token]
    if controls.cut_after == 0:
        cut = token_positions[0] if token_positions else len(steps) - 1
    else:
        taken = token_positions[: controls.cut_after]
        cut = taken[-1] + 1 if taken else len(steps) - 1
    if controls.fault == "cut":
        return [*steps[:cut], Drop(), *steps[cut:]]
    if controls.fault == "stall":
        return [*steps[:cut], Stall()]
    return [*steps[:cut], Emit(error, delay_s)]


def build_script(
    ids: StreamIds,
    query: str,
    inputs: Mapping[str, Any],
    controls: SimControls,
    config: SimConfig,
) -> list[Step]:
    """Every step of one generation, in order, faults included (pre-stream faults excluded:
    they never reach a script, the app answers them itself)."""
    delay_ms = controls.delay_ms if controls.delay_ms is not None else config.token_delay_ms
    first_ms = controls.first_token_delay_ms
    script = Script(ids, delay_ms / 1000, (delay_ms if first_ms is None else first_ms) / 1000)
    tokens = streamed_tokens(query, controls, config.tokens)
    if controls.scenario == "agent":
        _agent(script, query, tokens)
    elif controls.scenario == "new_agent":
        _new_agent(script, query, tokens)
    elif controls.scenario == "chatflow":
        _chatflow(script, query, inputs, tokens)
    elif controls.scenario == "replace":
        for text in tokens[: max(1, len(tokens) // 2)]:
            script.token("message", text)
        script.emit(
            envelope(ids, "message_replace", answer=REPLACEMENT_TEXT, reason="output_moderation"),
            replace=REPLACEMENT_TEXT,
        )
        script.end(query, len(tokens))
    else:  # chat, tts, hostile
        for text in tokens:
            script.token("message", text)
        script.end(query, len(tokens))
        if controls.scenario == "tts":
            for chunk in tts_chunks(ids):
                script.emit(envelope(ids, "tts_message", audio=chunk))
            script.emit(envelope(ids, "tts_message_end", audio=""))
    return apply_fault(script.steps, controls, script.delay_s, chat_error_event(ids))
