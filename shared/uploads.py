"""Uploads (``POST /v1/files``, ``POST /v1/audio-to-text``): the rules, with no I/O.

How this works. The gateway reads the request body as it arrives and feeds it to a
:class:`FormReader` (a push parser over python-multipart, the parser Starlette uses), which
gives back :class:`FormEvent` s: a text field, the start of the file part (its name and type,
before any of its bytes), a piece of the file, the end. At the start of the file part,
:func:`upload_limit` decides from the app's own ``/parameters`` (``file_upload``,
``system_parameters``) and ``TOKENWIRE_MAX_UPLOAD_BYTES`` whether the type may be sent at all
(else ``unsupported_file_type``, HTTP 415) and how many bytes it may have; every piece is
counted against that (:meth:`UploadLimit.check`, ``file_too_large``, HTTP 413), so an
oversize file is refused while it is still being staged in NATS, before Dify sees a byte.

A staged upload goes to a worker as a :class:`StagedUpload` (its chunks' sequences in the
``TW_UPLOADS`` stream); the worker sends Dify exactly the multipart body of
:func:`multipart_parts` around those chunks, with the connection's user as the ``user``
field, and maps Dify's refusals with :func:`upload_error`. :func:`http_status` is the HTTP
status of any error, and :func:`error_body` the protocol's error object the endpoints answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from shared.calls import Method, call_error, call_result
from shared.exceptions import (
    BadParams,
    ErrorCode,
    FileRefused,
    InternalError,
    TokenwireError,
)

__all__ = [
    "AUDIO_EXTENSIONS",
    "CHUNK_BYTES",
    "EXTENSIONS",
    "FormEvent",
    "FormReader",
    "StagedUpload",
    "Target",
    "UploadLimit",
    "error_body",
    "http_status",
    "multipart_parts",
    "upload_error",
    "upload_limit",
    "upload_result",
]

Target = Literal["files", "audio"]
Category = Literal["image", "document", "audio", "video"]

#: How a staged upload is cut into NATS messages (well under NATS's 1 MiB default).
CHUNK_BYTES: Final = 256 * 1024
_MB: Final = 1024 * 1024
#: Dify's file types by extension (``/files/upload``); the size limit follows the category.
EXTENSIONS: Final[Mapping[Category, frozenset[str]]] = {
    "image": frozenset({"jpg", "jpeg", "png", "webp", "gif", "svg"}),
    "video": frozenset({"mp4", "mov", "mpeg", "webm"}),
    "audio": frozenset({"mp3", "m4a", "wav", "amr", "mpga"}),
    "document": frozenset(
        {
            "txt", "md", "markdown", "mdx", "pdf", "html", "htm", "xlsx", "xls", "vtt",
            "properties", "doc", "docx", "csv", "eml", "msg", "pptx", "ppt", "xml", "epub",
            "json",
        }
    ),
}  # fmt: skip
#: What ``/audio-to-text`` takes, and its own limit (Dify: 30 MB).
AUDIO_EXTENSIONS: Final = frozenset({"mp3", "mp4", "mpeg", "mpga", "m4a", "wav", "webm", "amr"})
AUDIO_LIMIT_BYTES: Final = 30 * _MB
#: Dify's self-hosted defaults (MB), when ``/parameters`` does not say.
_DEFAULT_LIMITS_MB: Final[Mapping[Category, int]] = {
    "image": 10,
    "document": 15,
    "audio": 50,
    "video": 100,
}
_LIMIT_FIELD: Final[Mapping[Category, str]] = {
    "image": "image_file_size_limit",
    "document": "file_size_limit",
    "audio": "audio_file_size_limit",
    "video": "video_file_size_limit",
}
_MIME: Final = re.compile(r"^[\w.+-]+/[\w.+-]+$")


def _extension(filename: str) -> str | None:
    name = filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    return name.rsplit(".", 1)[1].lower() if "." in name.strip(".") else None


def _category(extension: str) -> Category | None:
    return next((c for c, exts in EXTENSIONS.items() if extension in exts), None)


@dataclass(slots=True)
class UploadLimit:
    """What one upload may be: its category and size limit; counts the bytes seen."""

    category: str
    max_bytes: int
    seen: int = 0

    def check(self, more: int) -> None:
        """``more`` bytes arrived: raise ``file_too_large`` once over the limit."""
        self.seen += more
        if self.seen > self.max_bytes:
            raise FileRefused(
                f"the file is over the limit of {self.max_bytes} bytes for {self.category} files"
            )


def upload_limit(
    filename: str,
    mime_type: str,
    parameters: Mapping[str, Any],
    max_upload_bytes: int,
    *,
    target: Target = "files",
) -> UploadLimit:
    """The limit of one upload, or raise ``unsupported_file_type`` (415) for a type the app
    (or Dify's endpoint) does not take. ``parameters`` is the app's ``/parameters``."""
    extension = _extension(filename)
    unsupported = FileRefused(
        f"files of type {extension or 'unknown'!r} are not accepted here",
        code=ErrorCode.UNSUPPORTED_FILE_TYPE,
    )
    if extension is None or not _MIME.match(mime_type):
        raise unsupported
    if target == "audio":
        if extension not in AUDIO_EXTENSIONS:
            raise unsupported
        return UploadLimit("audio", min(AUDIO_LIMIT_BYTES, max_upload_bytes))
    category = _category(extension)
    if category is None:
        raise unsupported
    config = parameters.get("file_upload")
    if isinstance(config, Mapping):
        types = config.get("allowed_file_types")
        exts = config.get("allowed_file_extensions")
        custom = isinstance(types, list) and "custom" in types
        if isinstance(types, list) and types and category not in types and not custom:
            raise unsupported
        if custom and isinstance(exts, list) and exts:
            allowed = {str(e).lower().lstrip(".") for e in exts}
            if extension not in allowed and category not in (types or []):
                raise unsupported
    system = parameters.get("system_parameters")
    limit_mb: object = None
    if isinstance(system, Mapping):
        limit_mb = system.get(_LIMIT_FIELD[category])
    if not isinstance(limit_mb, int | float) or isinstance(limit_mb, bool) or limit_mb <= 0:
        limit_mb = _DEFAULT_LIMITS_MB[category]
    return UploadLimit(category, min(int(limit_mb * _MB), max_upload_bytes))


# --- reading the form ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FormEvent:
    """``field`` (a text field: ``name``, ``text``), ``file`` (the file part begins:
    ``name``, ``filename``, ``mime_type``), ``data`` (file bytes), ``end`` (the form ended)."""

    kind: Literal["field", "file", "data", "end"]
    name: str = ""
    text: str = ""
    filename: str = ""
    mime_type: str = ""
    data: bytes = b""


_MAX_FIELD_BYTES: Final = 1024
_MAX_HEADER_BYTES: Final = 8 * 1024


@dataclass(slots=True)
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    is_file: bool = False
    text: bytearray = field(default_factory=bytearray)


class FormReader:
    """Push parser of a ``multipart/form-data`` body: :meth:`feed` each chunk, then
    :meth:`feed_eof`; each returns the events that chunk completed. Text fields are bounded;
    file bytes are handed on as they come (never kept). Raises :class:`BadParams`."""

    def __init__(self, content_type: str) -> None:
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise BadParams("the body must be multipart/form-data with a boundary")
        self._events: list[FormEvent] = []
        self._part = _Part()
        self._field = bytearray()
        self._value = bytearray()
        self._header_bytes = 0
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
            },
        )

    def feed(self, chunk: bytes) -> list[FormEvent]:
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise BadParams(f"the multipart body is malformed: {exc}") from None
        events, self._events = self._events, []
        return events

    def feed_eof(self) -> list[FormEvent]:
        try:
            self._parser.finalize()
        except MultipartParseError as exc:
            raise BadParams(f"the multipart body is malformed: {exc}") from None
        events, self._events = self._events, []
        return [*events, FormEvent("end")]

    # python-multipart's callbacks (called from inside write()):

    def _on_part_begin(self) -> None:
        self._part = _Part()
        self._header_bytes = 0

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._grow_header(end - start)
        self._field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._grow_header(end - start)
        self._value += data[start:end]

    def _grow_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > _MAX_HEADER_BYTES:
            raise BadParams("a part's headers are too long")

    def _on_header_end(self) -> None:
        self._part.headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _on_headers_finished(self) -> None:
        part = self._part
        disposition = part.headers.get(b"content-disposition", b"")
        _, options = parse_options_header(disposition)
        part.name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is not None:
            part.is_file = True
            mime = part.headers.get(b"content-type", b"application/octet-stream")
            self._events.append(
                FormEvent(
                    "file",
                    name=part.name,
                    filename=filename.decode("utf-8", "replace"),
                    mime_type=mime.decode("latin-1").split(";", 1)[0].strip().lower(),
                )
            )

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part.is_file:
            self._events.append(FormEvent("data", name=part.name, data=bytes(data[start:end])))
            return
        part.text += data[start:end]
        if len(part.text) > _MAX_FIELD_BYTES:
            raise BadParams(f"the form field {part.name!r} is too long")

    def _on_part_end(self) -> None:
        part = self._part
        if not part.is_file:
            self._events.append(
                FormEvent("field", name=part.name, text=part.text.decode("utf-8", "replace"))
            )


# --- the staged upload, the worker's side ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class StagedUpload:
    """An upload staged in ``TW_UPLOADS``, as a gateway hands it to a worker."""

    upload_id: str
    seqs: list[int]
    size: int
    filename: str
    mime_type: str
    user: str
    app: str
    target: Target
    trace: str = ""

    def to_bytes(self) -> bytes:
        return orjson.dumps(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> StagedUpload:
        try:
            obj = orjson.loads(data)
            staged = cls(**obj)
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise InternalError(f"a staged upload on the bus is malformed ({exc})") from None
        if staged.target not in ("files", "audio") or not staged.user:
            raise InternalError("a staged upload on the bus names no user or target")
        return staged


def _quoted(text: str) -> str:
    """A multipart header parameter: no quotes, no line breaks (they would end the header)."""
    return re.sub(r'["\r\n\\]', "_", text)


def multipart_parts(boundary: str, upload: StagedUpload) -> tuple[bytes, bytes]:
    """The bytes that go before and after the file's own bytes in the body sent to Dify: the
    ``user`` field (the connection's user), then the ``file`` part's headers; the closing."""
    name = _quoted(upload.filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]) or "upload"
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="user"\r\n\r\n'
        f"{upload.user}\r\n"
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: {upload.mime_type}\r\n\r\n"
    ).encode()
    return head, f"\r\n--{boundary}--\r\n".encode()


_UPLOAD: Final = Method("files.upload", "POST", "/files/upload")
_AUDIO: Final = Method("audio.to_text", "POST", "/audio-to-text", feature="speech_to_text")


def upload_error(
    target: Target, status: int, upstream_code: str | None, message: str
) -> TokenwireError:
    """The protocol's error for Dify's refusal of an upload."""
    if status == 413:
        return FileRefused(f"Dify refused the file as too large ({message or upstream_code})")
    if status == 415:
        return FileRefused(
            f"Dify does not take this type of file ({message or upstream_code})",
            code=ErrorCode.UNSUPPORTED_FILE_TYPE,
        )
    return call_error(_AUDIO if target == "audio" else _UPLOAD, status, upstream_code, message)


def upload_result(target: Target, status: int, content_type: str, body: bytes) -> dict[str, Any]:
    """Dify's 2xx answer to an upload, as the endpoint answers it (bounded JSON)."""
    return call_result(_AUDIO if target == "audio" else _UPLOAD, status, content_type, body)


_STATUS: Final[Mapping[ErrorCode, int]] = {
    ErrorCode.FILE_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_FILE_TYPE: 415,
    ErrorCode.BAD_PARAMS: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.TOKEN_EXPIRED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.FEATURE_DISABLED: 403,
    ErrorCode.UNKNOWN_APP: 404,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.DIFY_PAYLOAD_TOO_LARGE: 413,
    ErrorCode.DIFY_UNAUTHORIZED: 502,
}


def http_status(exc: TokenwireError) -> int:
    """The HTTP status an upload endpoint answers ``exc`` with."""
    if exc.code in _STATUS:
        return _STATUS[exc.code]
    if exc.retryable:
        return 503
    return 500 if isinstance(exc, InternalError) else 400


def error_body(exc: TokenwireError) -> dict[str, Any]:
    """The protocol's error object, as the ``error`` frame has it (no id, no seq)."""
    body: dict[str, Any] = {
        "type": "error",
        "code": exc.code.value,
        "message": exc.message,
        "retryable": exc.retryable,
    }
    if exc.retry_after_ms is not None:
        body["retry_after_ms"] = exc.retry_after_ms
    return body
