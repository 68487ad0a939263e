"""The ``call`` methods: which Dify endpoint each one is, what its params may hold, and what
Dify's answers mean to the client. Pure code: no I/O, so every rule is unit-tested alone.

How this works: :data:`METHODS` describes each method as data (HTTP method, path template,
params with their place — path, query or body — and their checks, where Dify wants ``user``,
which app kinds serve it, whether tokenwire must check ownership, how long its answer may be
cached). :func:`build_request` turns a client's ``params`` and the connection's user into the
:class:`DifyRequest` a worker sends; it refuses unknown methods (``unknown_method``) and bad
params (``bad_params``) before anything reaches Dify. The ``user`` is always the connection's:
a ``user`` in params is refused, never forwarded. Path ids are checked against a strict id
pattern so a client cannot walk Dify's URL space (``../``). :func:`call_error` maps Dify's
non-2xx answers to the protocol's codes (404 ``not_found``, a feature that is off
``feature_disabled``, 429 and 5xx retryable with ``retry_after_ms``); :func:`call_result`
turns a 2xx answer into the ``result`` frame's ``data`` (an empty 204 is
``{"result": "success"}``; ``text.to_audio``'s audio bytes become ``{"mime_type", "audio"}``
in base64), bounded so one answer fits one NATS message and one WebSocket frame.

On the bus a call is a NATS request (:func:`encode_call` / :func:`decode_call`) answered by
one worker of the queue group with :func:`encode_reply` or :func:`encode_reply_error`; the
gateway reads it back with :func:`decode_reply`, which gives the data or raises the error
the worker sent (its code, message, retryability and retry hint, unchanged).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson

from shared.exceptions import (
    BadParams,
    DifyRejected,
    DifyUnavailable,
    ErrorCode,
    FeatureDisabled,
    InternalError,
    NotFound,
    TokenwireError,
    UnknownMethod,
    WrongAppKind,
    error_from_wire,
    error_to_wire,
)

__all__ = [
    "APP_METADATA_TTL_S",
    "CONVERSATIONAL",
    "MAX_AUDIO_BYTES",
    "MAX_RESULT_BYTES",
    "METHODS",
    "CallRequest",
    "DifyRequest",
    "Method",
    "Param",
    "build_request",
    "call_error",
    "call_result",
    "decode_call",
    "decode_reply",
    "dify_error_fields",
    "encode_call",
    "encode_reply",
    "encode_reply_error",
]

Where = Literal["path", "query", "body"]
#: Dify's app modes, as ``/info`` names them.
CHAT: Final = frozenset({"chat", "agent-chat", "advanced-chat", "agent"})
CONVERSATIONAL: Final = CHAT
ALL_KINDS: Final = frozenset({*CHAT, "completion", "workflow"})
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_MAX_TEXT = 10_000
#: How long app metadata may be served from a worker's cache.
APP_METADATA_TTL_S: Final = 60.0
#: The largest Dify body a ``result`` carries: one NATS message (1 MiB by default) and one
#: WebSocket frame must hold it with room to spare.
MAX_RESULT_BYTES: Final = 512 * 1024
#: The largest audio ``text.to_audio`` returns (base64 makes it 4/3 larger).
MAX_AUDIO_BYTES: Final = 384 * 1024


def _id(value: object) -> str | None:
    if isinstance(value, str) and _ID.match(value):
        return None
    return "must be an id (letters, digits, - and _, at most 128)"


def _text(limit: int = _MAX_TEXT) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        if isinstance(value, str) and len(value) <= limit:
            return None
        return f"must be a string of at most {limit} characters"

    return check


def _int_in(low: int, high: int) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return None
        return f"must be an integer from {low} to {high}"

    return check


def _one_of(*choices: object) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        return None if value in choices else f"must be one of {list(choices)}"

    return check


def _bool(value: object) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _json_value(value: object) -> str | None:
    # A conversation variable's value: any JSON, bounded by the frame size already.
    return None


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    where: Where
    check: Callable[[object], str | None]
    required: bool = False


@dataclass(frozen=True, slots=True)
class Method:
    """One ``call`` method and the Dify endpoint behind it."""

    name: str
    http: str  # GET, POST, PUT, DELETE
    path: str  # "/conversations/{conversation_id}/name"
    params: tuple[Param, ...] = ()
    #: Where Dify reads ``user`` (None: the endpoint is not scoped to a user).
    user_in: Where | None = None
    kinds: frozenset[str] = ALL_KINDS
    #: Dify does not scope it: tokenwire must have recorded this user as the owner of the
    #: id in this path param first (``runs.get``), else ``not_found``.
    owned: str | None = None
    #: Dify refuses it (400/403) when a feature of the app is off: ``feature_disabled``.
    feature: str | None = None
    cache_s: float = 0.0
    #: At least one of these params must be given.
    one_of: tuple[str, ...] = ()
    #: Dify answers 204 (or 200 with a body): both are success.
    empty_ok: bool = False

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


@dataclass(frozen=True, slots=True)
class DifyRequest:
    """What a worker sends to Dify for one call."""

    method: Method
    http: str
    path: str
    query: dict[str, Any] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    app: str = "default"


def _conv(*params: Param) -> tuple[Param, ...]:
    return (Param("conversation_id", "path", _id, required=True), *params)


METHODS: Final[Mapping[str, Method]] = {
    m.name: m
    for m in (
        # apps.list is answered by the worker from its configuration (+ /info per app).
        Method("apps.list", "GET", "", cache_s=APP_METADATA_TTL_S),
        Method("app.info", "GET", "/info", cache_s=APP_METADATA_TTL_S),
        Method("app.parameters", "GET", "/parameters", cache_s=APP_METADATA_TTL_S),
        Method("app.meta", "GET", "/meta", cache_s=APP_METADATA_TTL_S),
        Method("app.site", "GET", "/site", cache_s=APP_METADATA_TTL_S),
        Method(
            "conversations.list",
            "GET",
            "/conversations",
            (
                Param("last_id", "query", _id),
                Param("limit", "query", _int_in(1, 100)),
                Param(
                    "sort_by",
                    "query",
                    _one_of("created_at", "-created_at", "updated_at", "-updated_at"),
                ),
            ),
            user_in="query",
            kinds=CHAT,
        ),
        Method(
            "conversations.rename",
            "POST",
            "/conversations/{conversation_id}/name",
            _conv(Param("name", "body", _text(200)), Param("auto_generate", "body", _bool)),
            user_in="body",
            kinds=CHAT,
            one_of=("name", "auto_generate"),
        ),
        Method(
            "conversations.delete",
            "DELETE",
            "/conversations/{conversation_id}",
            _conv(),
            user_in="body",
            kinds=CHAT,
            empty_ok=True,
        ),
        Method(
            "conversations.variables",
            "GET",
            "/conversations/{conversation_id}/variables",
            _conv(
                Param("last_id", "query", _id),
                Param("limit", "query", _int_in(1, 100)),
                Param("variable_name", "query", _text(200)),
            ),
            user_in="query",
            kinds=frozenset({"chat", "agent-chat", "advanced-chat"}),
        ),
        Method(
            "conversations.set_variable",
            "PUT",
            "/conversations/{conversation_id}/variables/{variable_id}",
            _conv(
                Param("variable_id", "path", _id, required=True),
                Param("value", "body", _json_value, required=True),
            ),
            user_in="body",
            kinds=frozenset({"chat", "agent-chat", "advanced-chat"}),
        ),
        Method(
            "messages.list",
            "GET",
            "/messages",
            (
                Param("conversation_id", "query", _id, required=True),
                Param("first_id", "query", _id),
                Param("limit", "query", _int_in(1, 100)),
            ),
            user_in="query",
            kinds=CHAT,
        ),
        Method(
            "messages.feedback",
            "POST",
            "/messages/{message_id}/feedbacks",
            (
                Param("message_id", "path", _id, required=True),
                Param("rating", "body", _one_of("like", "dislike", None), required=True),
                Param("content", "body", _text(2000)),
            ),
            user_in="body",
            kinds=frozenset({*CHAT, "completion"}),
        ),
        Method(
            "messages.suggested",
            "GET",
            "/messages/{message_id}/suggested",
            (Param("message_id", "path", _id, required=True),),
            user_in="query",
            kinds=CHAT,
            feature="suggested_questions_after_answer",
        ),
        Method(
            "text.to_audio",
            "POST",
            "/text-to-audio",
            (
                Param("message_id", "body", _id),
                Param("text", "body", _text(4000)),
                Param("voice", "body", _text(100)),
            ),
            user_in="body",
            feature="text_to_speech",
            one_of=("message_id", "text"),
        ),
        Method(
            "runs.get",
            "GET",
            "/workflows/run/{workflow_run_id}",
            (Param("workflow_run_id", "path", _id, required=True),),
            kinds=frozenset({"workflow", "advanced-chat"}),
            owned="workflow_run_id",
        ),
    )
}


def build_request(name: str, params: Mapping[str, Any], user: str) -> DifyRequest:
    """The Dify request for ``call``; raises :class:`UnknownMethod` or :class:`BadParams`."""
    method = METHODS.get(name)
    if method is None:
        raise UnknownMethod(f"no call method {name!r}")
    problems: list[str] = []
    app = params.get("app", "default")
    if not isinstance(app, str) or not app:
        problems.append("app: must be an app name")
    if "user" in params:
        problems.append("user: is the connection's user and cannot be given")
    known = {p.name for p in method.params} | {"app", "user"}
    problems += [f"{key}: unknown param" for key in sorted(set(params) - known)]
    for param in method.params:
        if param.name not in params:
            if param.required:
                problems.append(f"{param.name}: is required")
            continue
        why = param.check(params[param.name])
        if why is not None:
            problems.append(f"{param.name}: {why}")
    if method.one_of and not any(params.get(n) not in (None, False) for n in method.one_of):
        problems.append(f"give {' or '.join(method.one_of)}")
    if problems:
        raise BadParams(f"{name}: " + "; ".join(problems))

    path = method.path
    query: dict[str, Any] = {}
    body: dict[str, Any] = {}
    for param in method.params:
        if param.name not in params:
            continue
        value = params[param.name]
        if param.where == "path":
            path = path.replace("{" + param.name + "}", value)
        elif param.where == "query":
            query[param.name] = value
        else:
            body[param.name] = value
    if method.user_in == "query":
        query["user"] = user
    elif method.user_in == "body":
        body["user"] = user
    sends_body = method.http in ("POST", "PUT", "DELETE") and method.user_in == "body"
    return DifyRequest(
        method, method.http, path, query, body if sends_body or body else None, app=app
    )


#: Dify's codes that say "this feature is off for the app".
_FEATURE_OFF: Final = frozenset(
    {
        "forbidden",
        "app_unavailable",
        "provider_not_support_speech_to_text",
        "provider_not_support_text_to_speech",
        "suggested_questions_after_answer_disabled",
        "bad_request",  # "Suggested Questions Is Disabled." is a plain BadRequest in Dify
    }
)


def call_error(
    method: Method,
    status: int,
    upstream_code: str | None,
    message: str,
    *,
    retry_after_s: float | None = None,
) -> TokenwireError:
    """The protocol's error for Dify's non-2xx answer to ``method``."""
    text = f"Dify {status} {upstream_code or ''}: {message}".replace("  ", " ")
    if status == 404:
        return NotFound(f"{method.name}: not found")
    if status == 429 or status >= 500:
        code = ErrorCode.DIFY_RATE_LIMITED if status == 429 else ErrorCode.DIFY_SERVER_ERROR
        error = DifyUnavailable(text, code=code, status=status, upstream_code=upstream_code)
        error.retry_after_s = retry_after_s if retry_after_s is not None else 1.0
        return error
    feature_off = (
        not upstream_code or upstream_code in _FEATURE_OFF or upstream_code.endswith("_disabled")
    )
    if method.feature and status in (400, 403) and feature_off:
        return FeatureDisabled(f"{method.name}: {method.feature} is off for this app")
    if status in (401, 403):
        return DifyRejected(
            text, code=ErrorCode.DIFY_UNAUTHORIZED, status=status, upstream_code=upstream_code
        )
    if status == 400 and upstream_code == "invalid_param":
        return BadParams(f"{method.name}: {message}")
    if status == 400 and upstream_code in ("not_chat_app", "not_workflow_app"):
        return WrongAppKind(f"{method.name}: this app's kind does not serve it ({message})")
    return DifyRejected(text, status=status, upstream_code=upstream_code)


def dify_error_fields(body: bytes) -> tuple[str | None, str]:
    """Dify's ``code`` and first line of ``message`` from an error body (JSON or not)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, ""
    if not isinstance(obj, dict):
        return None, ""
    code, message = obj.get("code"), obj.get("message")
    text = message.strip().splitlines() if isinstance(message, str) else []
    return (code if isinstance(code, str) else None), (text or [""])[0][:500]


def call_result(method: Method, status: int, content_type: str, body: bytes) -> dict[str, Any]:
    """The ``result`` data for Dify's 2xx answer ``body``; raises when it cannot be one."""
    if method.name == "text.to_audio":
        if len(body) > MAX_AUDIO_BYTES:
            raise DifyRejected(
                f"text.to_audio: the audio is over {MAX_AUDIO_BYTES} bytes; ask for less text",
                code=ErrorCode.DIFY_PAYLOAD_TOO_LARGE,
                status=status,
            )
        mime = content_type.split(";", maxsplit=1)[0].strip() or "audio/mpeg"
        return {"mime_type": mime, "audio": base64.b64encode(body).decode("ascii")}
    if len(body) > MAX_RESULT_BYTES:
        raise DifyRejected(
            f"{method.name}: Dify's answer is over {MAX_RESULT_BYTES} bytes; ask for less",
            code=ErrorCode.DIFY_PAYLOAD_TOO_LARGE,
            status=status,
        )
    if not body.strip():
        return {"result": "success"}  # 204: Dify's newer "no content"
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise DifyRejected(
            f"{method.name}: Dify answered {status} with a body that is not JSON", status=status
        ) from None
    return data if isinstance(data, dict) else {"data": data}


# --- on the bus ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallRequest:
    """A call as a gateway sends it to the workers: the user is the connection's."""

    method: str
    params: dict[str, Any]
    user: str
    trace_id: str = ""


def encode_call(call: CallRequest) -> bytes:
    return orjson.dumps(
        {"method": call.method, "params": call.params, "user": call.user, "trace": call.trace_id}
    )


def decode_call(data: bytes) -> CallRequest:
    """The call in a NATS request; a malformed one is an :class:`InternalError` (a bug)."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InternalError("a call on the bus is not JSON") from None
    ok = (
        isinstance(obj, dict)
        and isinstance(obj.get("method"), str)
        and isinstance(obj.get("params"), dict)
        and isinstance(obj.get("user"), str)
        and obj["user"]
    )
    if not ok:
        raise InternalError("a call on the bus lacks method, params or user")
    trace = obj.get("trace")
    return CallRequest(
        obj["method"], obj["params"], obj["user"], trace if isinstance(trace, str) else ""
    )


def encode_reply(data: dict[str, Any]) -> bytes:
    return orjson.dumps({"data": data})


def encode_reply_error(exc: TokenwireError) -> bytes:
    return orjson.dumps({"error": error_to_wire(exc)})


def decode_reply(data: bytes) -> dict[str, Any]:
    """The data a worker answered, or raise the error it sent (code and hint unchanged)."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InternalError("a worker's answer to a call is not JSON") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), dict):
        answer: dict[str, Any] = obj["data"]
        return answer
    error = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(error, dict):
        raise InternalError("a worker's answer to a call has neither data nor error")
    raise error_from_wire(error)
