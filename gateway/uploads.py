"""``POST /v1/files`` and ``POST /v1/audio-to-text``: a file streamed through NATS to Dify.

How this works, cheapest refusal first:

1. **Origin** as for the socket (``TOKENWIRE_ALLOWED_ORIGINS``): 403.
2. **Credentials** as for the socket: a bearer token (``Authorization``), or with
   ``TOKENWIRE_AUTH=none`` the ``user`` query parameter: 401.
3. **The user's call rate** (``TOKENWIRE_CALL_RATE_PER_USER``): 429.
4. A declared ``Content-Length`` far over ``TOKENWIRE_MAX_UPLOAD_BYTES``: 413 at once.
5. The body is read as it arrives (``request.stream()``) into the push parser of
   ``shared/uploads.py``. When the file part begins, the app's ``/parameters`` (a call to a
   worker, cached there) say which types and sizes it takes: 415 before a byte is kept. Each
   256 KiB of the file is then stored in the ``TW_UPLOADS`` stream, with an acknowledgement
   (so a slow NATS slows the client down, never fills memory); past the limit, 413 and the
   chunks are deleted.
6. A worker of the queue group is asked to send the staged chunks to Dify as this user
   (``worker/uploads.py``); it records the file's owner and answers with Dify's body: 201
   with the file object (``/files``), 200 ``{"text"}`` (``/audio-to-text``).

Every refusal is the protocol's error object (``{"type": "error", "code", "message",
"retryable"}``, with ``retry_after_ms`` and a ``Retry-After`` header when retrying helps).
The form's optional ``app`` field must come before the file (or be the ``app`` query
parameter): the limits depend on it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import secrets

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway import metrics
from gateway.auth import Authenticator, Identity, handshake_token, origin_allowed
from gateway.bus import GatewayBus
from gateway.limits import RequestRate
from shared.calls import CallRequest, decode_reply, encode_call
from shared.exceptions import BadParams, Forbidden, TokenwireError
from shared.settings import Settings
from shared.subjects import UPLOADS_SUBJECT, upload_chunks
from shared.uploads import (
    CHUNK_BYTES,
    FormEvent,
    FormReader,
    StagedUpload,
    Target,
    UploadLimit,
    error_body,
    http_status,
    upload_limit,
)

__all__ = ["Uploads"]

log = logging.getLogger("tokenwire.gateway")

_APP = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Multipart framing around the file: a declared length over the limit plus this is refused.
_FORM_OVERHEAD = 64 * 1024
# How long a worker may take to send a staged upload to Dify and answer.
UPLOAD_TIMEOUT_S = 120.0


class Uploads:
    """The two upload endpoints of one gateway (routed in ``gateway/app.py``)."""

    def __init__(
        self, bus: GatewayBus, settings: Settings, auth: Authenticator, rates: RequestRate
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.auth = auth
        self.rates = rates

    async def files(self, request: Request) -> Response:
        return await self._serve(request, "files")

    async def audio_to_text(self, request: Request) -> Response:
        return await self._serve(request, "audio")

    async def _serve(self, request: Request, target: Target) -> Response:
        try:
            return await self._upload(request, target)
        except TokenwireError as exc:
            metrics.refusal("upload")
            return refusal(exc)

    async def _upload(self, request: Request, target: Target) -> Response:
        settings = self.settings
        if not origin_allowed(
            request.headers.get("origin"), request.headers.get("host"), settings.allowed_origins
        ):
            raise Forbidden("this origin may not upload here")
        identity = await self._identify(request)
        await self.rates.take(identity.user, "upload")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > settings.max_upload_bytes + _FORM_OVERHEAD:
            limit = UploadLimit("any", settings.max_upload_bytes)
            limit.check(int(declared))  # raises file_too_large
        reader = FormReader(request.headers.get("content-type", ""))
        app = request.query_params.get("app") or "default"
        staging = _Staging(self.bus, secrets.token_hex(12))
        try:
            async for chunk in request.stream():
                for event in reader.feed(chunk):
                    app = await self._on_event(event, staging, identity, app, target)
            for event in reader.feed_eof():
                app = await self._on_event(event, staging, identity, app, target)
            if staging.limit is None:
                raise BadParams("no file: send it in the form field 'file'")
            await staging.flush()
            staged = StagedUpload(
                upload_id=staging.upload_id,
                seqs=staging.seqs,
                size=staging.size,
                filename=staging.filename,
                mime_type=staging.mime_type,
                user=identity.user,
                app=app,
                target=target,
                trace=secrets.token_hex(8),
            )
            reply = await self.bus.request(
                UPLOADS_SUBJECT, staged.to_bytes(), UPLOAD_TIMEOUT_S, "send the upload"
            )
            data = decode_reply(reply)
        except BaseException:
            await staging.discard()
            raise
        return JSONResponse(data, status_code=201 if target == "files" else 200)

    async def _identify(self, request: Request) -> Identity:
        if not self.auth.requires_token:
            return self.auth.anonymous(request)
        token = handshake_token(request, allow_query=self.settings.allow_query_token)
        if token is None:
            token = ""
        return await self.auth.verify(token)

    async def _on_event(
        self,
        event: FormEvent,
        staging: _Staging,
        identity: Identity,
        app: str,
        target: Target,
    ) -> str:
        if event.kind == "field" and event.name == "app":
            if staging.limit is not None:
                raise BadParams("send the form field 'app' before the file")
            if not _APP.match(event.text):
                raise BadParams("app: must be an app name")
            return event.text
        if event.kind == "file":
            if event.name != "file":
                raise BadParams(f"unexpected file field {event.name!r}: send it as 'file'")
            if staging.limit is not None:
                raise BadParams("one file per upload")
            parameters = await self._parameters(app, identity.user)
            staging.limit = upload_limit(
                event.filename,
                event.mime_type,
                parameters,
                self.settings.max_upload_bytes,
                target=target,
            )
            staging.filename, staging.mime_type = event.filename, event.mime_type
        elif event.kind == "data" and staging.limit is not None:
            staging.limit.check(len(event.data))  # file_too_large: nothing reaches Dify
            await staging.add(event.data)
        return app

    async def _parameters(self, app: str, user: str) -> dict[str, object]:
        """The app's ``/parameters``, through a worker (which caches them)."""
        call = CallRequest("app.parameters", {"app": app}, user, secrets.token_hex(8))
        reply = await self.bus.call(encode_call(call), self.settings.call_timeout_s)
        return decode_reply(reply)


class _Staging:
    """One upload's chunks on their way into ``TW_UPLOADS``."""

    def __init__(self, bus: GatewayBus, upload_id: str) -> None:
        self.bus = bus
        self.upload_id = upload_id
        self.subject = upload_chunks(upload_id)
        self.limit: UploadLimit | None = None
        self.filename = ""
        self.mime_type = ""
        self.seqs: list[int] = []
        self.size = 0
        self._buffer = bytearray()

    async def add(self, data: bytes) -> None:
        self._buffer += data
        self.size += len(data)
        while len(self._buffer) >= CHUNK_BYTES:
            piece = bytes(self._buffer[:CHUNK_BYTES])
            del self._buffer[:CHUNK_BYTES]
            self.seqs.append(await self.bus.stage_chunk(self.subject, piece))

    async def flush(self) -> None:
        if self._buffer or not self.seqs:
            self.seqs.append(await self.bus.stage_chunk(self.subject, bytes(self._buffer)))
            self._buffer.clear()

    async def discard(self) -> None:
        if self.seqs:
            with contextlib.suppress(Exception):
                await self.bus.discard_chunks(self.subject)


def refusal(exc: TokenwireError) -> Response:
    """The HTTP answer for ``exc``: its status and the protocol's error object."""
    headers = {}
    if exc.retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_ms / 1000)))
    return JSONResponse(error_body(exc), status_code=http_status(exc), headers=headers)
