"""A small ``multipart/form-data`` reader for the upload endpoints (pure: bytes in, parts out).

The simulator only needs what Dify's ``/files/upload`` and ``/audio-to-text`` read: each part's
field name, file name, declared content type and bytes. The body is split on the boundary
from the ``Content-Type`` header (RFC 7578); a malformed body raises :class:`MultipartError`,
which the endpoints answer as 400 like Dify does.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message
from typing import Final

__all__ = ["MultipartError", "Part", "parse_form"]

_CRLF: Final = b"\r\n"


class MultipartError(ValueError):
    """The body is not the ``multipart/form-data`` its header says."""


@dataclass(frozen=True, slots=True)
class Part:
    """One form field: a file when ``filename`` is not None."""

    name: str
    filename: str | None
    content_type: str | None
    """None when the part declares no ``Content-Type``."""
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


def _params(header: str) -> Message:
    message = Message()
    message["content-disposition"] = header
    return message


def _boundary(content_type: str) -> bytes:
    message = Message()
    message["content-type"] = content_type
    if message.get_content_type() != "multipart/form-data":
        raise MultipartError("Content-Type must be multipart/form-data")
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise MultipartError("multipart/form-data without a boundary")
    return boundary.encode("latin-1")


def _part(chunk: bytes) -> Part:
    head, sep, data = chunk.partition(_CRLF + _CRLF)
    if not sep:
        raise MultipartError("a part has no header block")
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n"):
        key, colon, value = line.partition(":")
        if not colon:
            raise MultipartError(f"bad part header {line!r}")
        headers[key.strip().lower()] = value.strip()
    disposition = headers.get("content-disposition")
    if disposition is None:
        raise MultipartError("a part has no Content-Disposition")
    params = _params(disposition)
    name = params.get_param("name", header="content-disposition")
    filename = params.get_filename()
    if not isinstance(name, str):
        raise MultipartError("a part has no name")
    return Part(name, filename, headers.get("content-type") or None, data)


def parse_form(content_type: str, body: bytes) -> list[Part]:
    """Every part of a ``multipart/form-data`` body, in order."""
    delimiter = b"--" + _boundary(content_type)
    pieces = body.split(delimiter)
    if len(pieces) < 2 or not pieces[-1].startswith(b"--"):
        raise MultipartError("the body does not end with the closing boundary")
    parts: list[Part] = []
    for piece in pieces[1:-1]:
        if not piece.startswith(_CRLF) or not piece.endswith(_CRLF):
            raise MultipartError("a part is not framed by CRLF")
        parts.append(_part(piece[len(_CRLF) : -len(_CRLF)]))
    return parts
