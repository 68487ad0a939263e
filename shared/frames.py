"""WebSocket protocol v1: the frames, and the codec between them and bytes.

Server frames are frozen, slotted dataclasses: they are built once per token on the worker's
hot path, and orjson serialises dataclasses natively, in field order, with no dict in between.
Client frames are untrusted input, so they are validated by pydantic models with the limits
from :class:`ClientLimits`; every refusal is a :class:`~shared.exceptions.ClientError` whose
code is the protocol's error code.

A server frame on the wire is exactly ``orjson.dumps(frame)``: the worker publishes those bytes
to NATS and the gateway forwards them unchanged, so nothing re-encodes a token on its way.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from shared.exceptions import ErrorCode, FrameError, FrameTooLarge, TokenwireError

__all__ = [
    "PROTOCOL_VERSION",
    "Accepted",
    "AuthFrame",
    "CallFrame",
    "ChatFrame",
    "ClientFrame",
    "ClientLimits",
    "Delta",
    "End",
    "ErrorFrame",
    "Event",
    "Fence",
    "FileRef",
    "Hello",
    "InputFrame",
    "PingFrame",
    "Pong",
    "Queued",
    "Replace",
    "Reset",
    "Result",
    "ResumeFrame",
    "RunFrame",
    "ServerFrame",
    "Start",
    "StopFrame",
    "decode_client_frame",
    "decode_server_frame",
    "encode",
    "error_frame",
    "peek_frame",
    "peek_id_seq",
    "with_gen",
]

PROTOCOL_VERSION: Final = 1

# --- server -> client ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """``limits`` are the gateway's input limits a client checks before sending (today
    ``max_frame_bytes``): a frame over them is refused, so a client fails it locally.
    ``features`` names the parts of protocol v1's second part this gateway serves
    (``call``, ``files``, ``run``, ``input``)."""

    session: str
    user: str
    server: str
    protocol: int = PROTOCOL_VERSION
    limits: dict[str, int] = field(default_factory=dict)
    features: list[str] = field(default_factory=list)
    type: Literal["hello"] = "hello"


@dataclass(frozen=True, slots=True, kw_only=True)
class Accepted:
    id: str
    seq: int
    type: Literal["accepted"] = "accepted"


@dataclass(frozen=True, slots=True, kw_only=True)
class Queued:
    id: str
    seq: int
    reason: str
    attempt: int
    retry_in_ms: int
    position: int | None = None
    type: Literal["queued"] = "queued"


@dataclass(frozen=True, slots=True, kw_only=True)
class Start:
    id: str
    seq: int
    conversation_id: str | None
    message_id: str | None
    task_id: str | None
    type: Literal["start"] = "start"


@dataclass(frozen=True, slots=True, kw_only=True)
class Delta:
    id: str
    seq: int
    text: str
    type: Literal["delta"] = "delta"


@dataclass(frozen=True, slots=True, kw_only=True)
class Replace:
    id: str
    seq: int
    text: str
    type: Literal["replace"] = "replace"


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    id: str
    seq: int
    event: str
    data: dict[str, Any]
    type: Literal["event"] = "event"


@dataclass(frozen=True, slots=True, kw_only=True)
class Reset:
    id: str
    seq: int
    reason: str
    type: Literal["reset"] = "reset"


@dataclass(frozen=True, slots=True, kw_only=True)
class End:
    id: str
    seq: int
    conversation_id: str | None
    message_id: str | None
    usage: dict[str, Any] | None = None
    retriever_resources: list[Any] = field(default_factory=list)
    stopped: bool = False
    # A workflow run's end (``run``): Dify's workflow_finished outputs, status and run id.
    outputs: dict[str, Any] | None = None
    status: str | None = None
    workflow_run_id: str | None = None
    type: Literal["end"] = "end"


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorFrame:
    """``id``/``seq`` are None for connection-level errors, ``retry_after_ms`` when the error
    carries no retry hint; each is then left off the wire."""

    code: str
    message: str
    retryable: bool
    id: str | None = None
    seq: int | None = None
    retry_after_ms: int | None = None
    type: Literal["error"] = "error"


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    type: Literal["pong"] = "pong"


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """The answer to a ``call``: Dify's response body as Dify returns it (no ``seq``)."""

    id: str
    data: dict[str, Any]
    type: Literal["result"] = "result"


@dataclass(frozen=True, slots=True, kw_only=True)
class Fence:
    """A later delivery's first frame: from here on (in the frames stream's order) only frames
    of generation ``gen`` count for request ``id``, and they continue after seq ``after``.
    Stored in the frames stream, never sent to a client, so not a :data:`ServerFrame`
    (shared/sequencing.py ``Generations`` has the rule)."""

    id: str
    gen: int
    after: int
    type: Literal["fence"] = "fence"


ServerFrame = (
    Hello
    | Accepted
    | Queued
    | Start
    | Delta
    | Replace
    | Event
    | Reset
    | End
    | ErrorFrame
    | Pong
    | Result
)

_SERVER_TYPES: dict[str, type[Any]] = {
    "hello": Hello,
    "accepted": Accepted,
    "queued": Queued,
    "start": Start,
    "delta": Delta,
    "replace": Replace,
    "event": Event,
    "reset": Reset,
    "end": End,
    "error": ErrorFrame,
    "pong": Pong,
    "result": Result,
}


def encode(frame: ServerFrame | Fence) -> bytes:
    """The wire bytes of a server frame (one JSON object), or of a fence (bus only)."""
    if isinstance(frame, ErrorFrame):
        obj: dict[str, Any] = {
            "type": "error",
            "code": frame.code,
            "message": frame.message,
            "retryable": frame.retryable,
        }
        if frame.id is not None:
            obj["id"] = frame.id
            if frame.seq is not None:  # a call's error has an id and no seq
                obj["seq"] = frame.seq
        if frame.retry_after_ms is not None:
            obj["retry_after_ms"] = frame.retry_after_ms
        return orjson.dumps(obj)
    return orjson.dumps(frame)


def decode_server_frame(data: bytes | str) -> ServerFrame:
    """Parse a server frame (used by clients and tests); unknown fields are ignored."""
    obj = orjson.loads(data)
    if not isinstance(obj, dict) or obj.get("type") not in _SERVER_TYPES:
        raise FrameError(f"not a server frame: {str(obj)[:80]}", code=ErrorCode.UNKNOWN_TYPE)
    cls = _SERVER_TYPES[obj["type"]]
    names = cls.__dataclass_fields__
    frame: ServerFrame = cls(**{k: v for k, v in obj.items() if k in names})
    return frame


def peek_id_seq(data: bytes) -> tuple[str, int, str]:
    """``(id, seq, type)`` of a request frame, for the gateway's ordering; nothing else."""
    obj = orjson.loads(data)
    return obj["id"], obj["seq"], obj["type"]


def peek_frame(data: bytes) -> tuple[str, int, str, int]:
    """``(id, seq, type, gen)`` of a request frame (a ``fence``'s seq is its ``after``; a frame
    without ``gen`` is generation 0, the first delivery's)."""
    obj = orjson.loads(data)
    kind = obj["type"]
    seq = obj["after"] if kind == "fence" else obj["seq"]
    return obj["id"], seq, kind, obj.get("gen", 0)


def with_gen(data: bytes, gen: int) -> bytes:
    """A request frame's wire bytes stamped with its delivery's generation (``gen`` > 0 only:
    the first delivery's frames carry none, so the hot path encodes nothing more)."""
    return b'%s,"gen":%d}' % (data[:-1], gen)


def error_frame(
    exc: TokenwireError, *, id: str | None = None, seq: int | None = None
) -> ErrorFrame:
    """The ``error`` frame a client receives for ``exc``: its code, message, retryability
    and retry hint."""
    return ErrorFrame(
        id=id,
        seq=seq,
        code=exc.code.value,
        message=exc.message,
        retryable=exc.retryable,
        retry_after_ms=exc.retry_after_ms,
    )


# --- client -> server ------------------------------------------------------------------

_ID_RE: Final = r"^[\x21-\x7e]{1,128}$"  # printable ASCII, no spaces: safe in logs and URLs
_APP_RE: Final = r"^[A-Za-z0-9_-]{1,64}$"

RequestId = Annotated[str, StringConstraints(pattern=_ID_RE)]


class _Frame(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=False)


class FileRef(_Frame):
    """A file for Dify, as its ``files`` items: by URL or by an uploaded file's id."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["image", "document", "audio", "video", "custom"]
    transfer_method: Literal["remote_url", "local_file"]
    url: Annotated[str, StringConstraints(max_length=4096)] | None = None
    upload_file_id: Annotated[str, StringConstraints(max_length=128)] | None = None


class ChatFrame(_Frame):
    type: Literal["chat"]
    id: RequestId
    query: Annotated[str, StringConstraints(min_length=1)]
    conversation_id: str | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    files: list[FileRef] = Field(default_factory=list)
    app: Annotated[str, StringConstraints(pattern=_APP_RE)] | None = None


class RunFrame(_Frame):
    """A one-shot app (workflow, completion): answered by the same frames as a ``chat``."""

    type: Literal["run"]
    id: RequestId
    inputs: dict[str, Any] = Field(default_factory=dict)
    query: str = ""  # completion apps
    files: list[FileRef] = Field(default_factory=list)
    app: Annotated[str, StringConstraints(pattern=_APP_RE)] | None = None


class InputFrame(_Frame):
    """The answer to the human-input form that request ``id`` waits on."""

    type: Literal["input"]
    id: RequestId
    form_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    action: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    inputs: dict[str, Any] = Field(default_factory=dict)


class StopFrame(_Frame):
    type: Literal["stop"]
    id: RequestId


class ResumeFrame(_Frame):
    type: Literal["resume"]
    id: RequestId
    after: Annotated[int, Field(ge=0)] = 0


class PingFrame(_Frame):
    type: Literal["ping"]


class AuthFrame(_Frame):
    type: Literal["auth"]
    token: Annotated[str, StringConstraints(min_length=1, max_length=16384)]


class CallFrame(_Frame):
    """One request/response call to Dify's Service API (shared/calls.py has the methods)."""

    type: Literal["call"]
    id: RequestId
    method: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    params: dict[str, Any] = Field(default_factory=dict)


ClientFrame = (
    ChatFrame | StopFrame | ResumeFrame | PingFrame | AuthFrame | CallFrame | RunFrame | InputFrame
)
_CLIENT_TYPES: Final[
    dict[
        str,
        type[ChatFrame]
        | type[StopFrame]
        | type[ResumeFrame]
        | type[PingFrame]
        | type[AuthFrame]
        | type[CallFrame]
        | type[RunFrame]
        | type[InputFrame],
    ]
] = {
    "chat": ChatFrame,
    "stop": StopFrame,
    "resume": ResumeFrame,
    "ping": PingFrame,
    "auth": AuthFrame,
    "call": CallFrame,
    "run": RunFrame,
    "input": InputFrame,
}


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """Input limits, from settings; each refusal names the limit it hit."""

    max_frame_bytes: int = 64 * 1024
    max_query_chars: int = 32_000
    max_inputs_bytes: int = 32 * 1024
    max_inputs_depth: int = 8
    max_files: int = 10

    def announced(self) -> dict[str, int]:
        """What ``hello.limits`` tells a client, so that it can refuse a frame before sending."""
        return {"max_frame_bytes": self.max_frame_bytes}


def _depth(value: Any, limit: int, level: int = 1) -> int:
    if level > limit:
        return level
    if isinstance(value, dict):
        return max((_depth(v, limit, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, limit, level + 1) for v in value), default=level)
    return level - 1


def _describe(exc: ValidationError) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "frame"
    return f"{where}: {first['msg']}"


def decode_client_frame(data: bytes | str, limits: ClientLimits) -> ClientFrame:
    """Parse and validate one client frame, or raise a ClientError with a stable code.

    The exception's ``request_id`` names the offending request when one could be read.
    """
    size = len(data) if isinstance(data, bytes) else len(data.encode())
    if size > limits.max_frame_bytes:
        raise FrameTooLarge(f"frame of {size} bytes is over the limit of {limits.max_frame_bytes}")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise FrameError("frame is not valid JSON", code=ErrorCode.BAD_JSON) from None
    if not isinstance(obj, dict):
        raise FrameError("frame must be a JSON object", code=ErrorCode.BAD_JSON)
    kind = obj.get("type")
    request_id = obj.get("id") if isinstance(obj.get("id"), str) else None
    model = _CLIENT_TYPES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise FrameError(
            f"unknown frame type {str(kind)[:40]!r}",
            code=ErrorCode.UNKNOWN_TYPE,
            request_id=request_id,
        )
    try:
        frame: ClientFrame = model.model_validate(obj)
        if isinstance(frame, ChatFrame):
            _check_chat(frame, limits)
        elif isinstance(frame, RunFrame | InputFrame):
            _check_run(frame, limits)
        elif isinstance(frame, CallFrame) and (
            _depth(frame.params, limits.max_inputs_depth) > limits.max_inputs_depth
        ):
            raise FrameError(f"params: nested deeper than {limits.max_inputs_depth} levels")
    except ValidationError as exc:
        raise FrameError(_describe(exc), request_id=request_id) from None
    except FrameError as err:
        err.request_id = request_id
        raise
    return frame


def _check_chat(frame: ChatFrame, limits: ClientLimits) -> None:
    if len(frame.query) > limits.max_query_chars:
        raise FrameError(f"query: longer than {limits.max_query_chars} characters")
    if frame.conversation_id:
        try:
            uuid.UUID(frame.conversation_id)
        except ValueError:
            raise FrameError("conversation_id: must be a UUID") from None
    if frame.inputs:
        if len(orjson.dumps(frame.inputs)) > limits.max_inputs_bytes:
            raise FrameError(f"inputs: larger than {limits.max_inputs_bytes} bytes")
        if _depth(frame.inputs, limits.max_inputs_depth) > limits.max_inputs_depth:
            raise FrameError(f"inputs: nested deeper than {limits.max_inputs_depth} levels")
    if len(frame.files) > limits.max_files:
        raise FrameError(f"files: more than {limits.max_files} files")


def _check_run(frame: RunFrame | InputFrame, limits: ClientLimits) -> None:
    if isinstance(frame, RunFrame):
        if len(frame.query) > limits.max_query_chars:
            raise FrameError(f"query: longer than {limits.max_query_chars} characters")
        if len(frame.files) > limits.max_files:
            raise FrameError(f"files: more than {limits.max_files} files")
    if frame.inputs:
        if len(orjson.dumps(frame.inputs)) > limits.max_inputs_bytes:
            raise FrameError(f"inputs: larger than {limits.max_inputs_bytes} bytes")
        if _depth(frame.inputs, limits.max_inputs_depth) > limits.max_inputs_depth:
            raise FrameError(f"inputs: nested deeper than {limits.max_inputs_depth} levels")
