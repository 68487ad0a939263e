"""The worker's side of an upload: staged chunks in NATS → Dify, as the user.

How this works. A gateway staged the file in ``TW_UPLOADS`` and checked it (gateway/uploads.py);
it asks one worker of the queue group, on ``tw.uploads``, to send it. :meth:`Uploads.handle`
checks the limits again against the app's cached ``/parameters`` (a worker trusts no one with
its keys), then streams Dify a multipart body — the ``user`` field (the connection's user),
the file's part headers, each chunk read from the stream one at a time, the closing — with
its exact ``Content-Length``, so the file is never whole in memory here either. A file Dify
accepted is recorded as the user's (``worker/ownership.py``): a later ``chat`` or ``run`` of
another user naming it is ``not_found``. The chunks are deleted whatever happened.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any, Protocol

from nats.js.client import JetStreamContext

from shared import natsedge
from shared.calls import dify_error_fields, encode_reply, encode_reply_error
from shared.exceptions import DifyRejected, InternalError, TokenwireError
from shared.logs import trace_id_var
from shared.settings import Settings
from shared.subjects import UPLOADS_STREAM, upload_chunks
from shared.uploads import (
    StagedUpload,
    multipart_parts,
    upload_error,
    upload_limit,
    upload_result,
)
from worker.calls import Calls, DifyAnswerLike
from worker.ownership import Ownership

__all__ = ["Uploads", "UploadsDify"]

log = logging.getLogger("tokenwire.worker")

_PATHS = {"files": "/files/upload", "audio": "/audio-to-text"}


class UploadsDify(Protocol):
    async def upload(
        self,
        path: str,
        *,
        app: str,
        content_type: str,
        length: int,
        body: AsyncIterator[bytes],
        trace_id: str,
    ) -> DifyAnswerLike: ...


class Uploads:
    """Sends staged uploads to Dify; see the module docstring."""

    def __init__(
        self,
        js: JetStreamContext,
        dify: UploadsDify,
        owners: Ownership,
        calls: Calls,
        settings: Settings,
    ) -> None:
        self.js = js
        self.dify = dify
        self.owners = owners
        self.calls = calls
        self.max_upload_bytes = settings.max_upload_bytes

    async def handle(self, data: bytes) -> bytes:
        """One NATS request's bytes in, its reply's bytes out. Never raises."""
        try:
            staged = StagedUpload.from_bytes(data)
        except TokenwireError as exc:
            return encode_reply_error(exc)
        token = trace_id_var.set(staged.trace or None)
        try:
            return encode_reply(await self.send(staged))
        except TokenwireError as exc:
            return encode_reply_error(exc)
        except Exception:
            log.exception("an upload failed inside tokenwire")
            return encode_reply_error(InternalError("the upload failed inside tokenwire"))
        finally:
            with contextlib.suppress(TokenwireError):
                await natsedge.purge_subject(
                    self.js, UPLOADS_STREAM, upload_chunks(staged.upload_id)
                )
            trace_id_var.reset(token)

    async def send(self, staged: StagedUpload) -> dict[str, Any]:
        parameters = await self.calls.parameters(staged.app, staged.trace)
        limit = upload_limit(
            staged.filename,
            staged.mime_type,
            parameters,
            self.max_upload_bytes,
            target=staged.target,
        )
        limit.check(staged.size)
        boundary = "tokenwire-" + secrets.token_hex(12)
        head, tail = multipart_parts(boundary, staged)
        answer = await self.dify.upload(
            _PATHS[staged.target],
            app=staged.app,
            content_type=f"multipart/form-data; boundary={boundary}",
            length=len(head) + staged.size + len(tail),
            body=self._body(staged, head, tail),
            trace_id=staged.trace,
        )
        if not 200 <= answer.status < 300:
            code, message = dify_error_fields(answer.body)
            raise upload_error(staged.target, answer.status, code, message)
        data = upload_result(staged.target, answer.status, answer.content_type, answer.body)
        if staged.target == "files":
            file_id = data.get("id")
            if not isinstance(file_id, str):
                raise DifyRejected("Dify's upload answer names no file id", status=answer.status)
            await self.owners.record("file", file_id, staged.user)
        return data

    async def _body(self, staged: StagedUpload, head: bytes, tail: bytes) -> AsyncIterator[bytes]:
        yield head
        subject = upload_chunks(staged.upload_id)
        for seq in staged.seqs:
            msg = await natsedge.get_message(self.js, UPLOADS_STREAM, seq)
            if msg is None or msg.subject != subject:
                raise InternalError("a staged chunk is gone (expired or purged)")
            yield msg.data or b""
        yield tail
