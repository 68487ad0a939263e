"""Typed methods for every ``call`` of protocol v1's second part, and the two uploads.

How this works: :class:`ServiceApi` is mixed into :class:`~tokenwire.client.Connection`; each
method is one ``call`` frame (docs/protocol.md has the table) through
:meth:`Connection.call`, which sends it when the socket is open, re-sends it after a reconnect
if its answer was lost, and returns the ``result``'s ``data`` (Dify's body) or raises
:class:`CallError` with the protocol's code. ``upload`` and ``audio_to_text`` are HTTP
(``POST /v1/files``, ``POST /v1/audio-to-text``) on the same gateway, authenticated as the
socket is: the token provider's bearer token, or the ``user`` query parameter.
"""

from __future__ import annotations

import mimetypes
from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx

__all__ = ["CallError", "ServiceApi", "http_base"]

Rating = Literal["like", "dislike"] | None


class CallError(Exception):
    """A ``call`` (or an upload) answered with an ``error``: ``code`` is the protocol's."""

    def __init__(
        self, code: str, message: str, *, retryable: bool = False, retry_after_ms: int | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms


def http_base(ws_url: str) -> str:
    """The gateway's HTTP base URL (``…/v1``) for its WebSocket URL (``ws…/v1/ws``)."""
    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.removesuffix("/ws") if parts.path.endswith("/ws") else "/v1"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def _params(**params: Any) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


class ServiceApi:
    """The calls as methods; ``app`` picks a configured app (None: ``default``)."""

    url: str
    user: str | None

    @abstractmethod
    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One ``call``: Dify's body, or raise :class:`CallError`."""

    @abstractmethod
    async def _bearer(self) -> str | None:
        """The token the socket would use now (None: no token provider)."""

    # --- app metadata -------------------------------------------------------------------

    async def apps(self) -> list[dict[str, Any]]:
        """The configured apps, each with Dify's ``/info`` (never a key or URL)."""
        data = await self.call("apps.list")
        apps: list[dict[str, Any]] = data.get("data", [])
        return apps

    async def info(self, *, app: str | None = None) -> dict[str, Any]:
        return await self.call("app.info", _params(app=app))

    async def parameters(self, *, app: str | None = None) -> dict[str, Any]:
        """The app's opening statement, input form, features and upload limits."""
        return await self.call("app.parameters", _params(app=app))

    async def meta(self, *, app: str | None = None) -> dict[str, Any]:
        return await self.call("app.meta", _params(app=app))

    async def site(self, *, app: str | None = None) -> dict[str, Any]:
        return await self.call("app.site", _params(app=app))

    # --- conversations and history ------------------------------------------------------

    async def conversations(
        self,
        *,
        last_id: str | None = None,
        limit: int | None = None,
        sort_by: str | None = None,
        app: str | None = None,
    ) -> dict[str, Any]:
        """This user's conversations: ``{data, has_more, limit}`` (page on with ``last_id``)."""
        return await self.call(
            "conversations.list", _params(last_id=last_id, limit=limit, sort_by=sort_by, app=app)
        )

    async def rename(
        self,
        conversation_id: str,
        name: str | None = None,
        *,
        auto_generate: bool | None = None,
        app: str | None = None,
    ) -> dict[str, Any]:
        return await self.call(
            "conversations.rename",
            _params(
                conversation_id=conversation_id, name=name, auto_generate=auto_generate, app=app
            ),
        )

    async def delete_conversation(
        self, conversation_id: str, *, app: str | None = None
    ) -> dict[str, Any]:
        return await self.call(
            "conversations.delete", _params(conversation_id=conversation_id, app=app)
        )

    async def variables(
        self,
        conversation_id: str,
        *,
        last_id: str | None = None,
        limit: int | None = None,
        variable_name: str | None = None,
        app: str | None = None,
    ) -> dict[str, Any]:
        return await self.call(
            "conversations.variables",
            _params(
                conversation_id=conversation_id,
                last_id=last_id,
                limit=limit,
                variable_name=variable_name,
                app=app,
            ),
        )

    async def set_variable(
        self, conversation_id: str, variable_id: str, value: Any, *, app: str | None = None
    ) -> dict[str, Any]:
        params = _params(conversation_id=conversation_id, variable_id=variable_id, app=app)
        return await self.call("conversations.set_variable", {**params, "value": value})

    async def messages(
        self,
        conversation_id: str,
        *,
        first_id: str | None = None,
        limit: int | None = None,
        app: str | None = None,
    ) -> dict[str, Any]:
        """A page of history, newest page first; page back with ``first_id`` = the oldest held."""
        return await self.call(
            "messages.list",
            _params(conversation_id=conversation_id, first_id=first_id, limit=limit, app=app),
        )

    async def feedback(
        self,
        message_id: str,
        rating: Rating,
        *,
        content: str | None = None,
        app: str | None = None,
    ) -> dict[str, Any]:
        """Thumbs up (``like``), down (``dislike``) or withdrawn (None)."""
        params = _params(message_id=message_id, content=content, app=app)
        return await self.call("messages.feedback", {**params, "rating": rating})

    async def suggested(self, message_id: str, *, app: str | None = None) -> list[str]:
        """Suggested follow-up questions (``feature_disabled`` when the app has them off)."""
        data = await self.call("messages.suggested", _params(message_id=message_id, app=app))
        questions: list[str] = data.get("data", [])
        return questions

    async def text_to_audio(
        self,
        *,
        message_id: str | None = None,
        text: str | None = None,
        voice: str | None = None,
        app: str | None = None,
    ) -> dict[str, Any]:
        """``{"mime_type", "audio"}``, the audio in base64."""
        return await self.call(
            "text.to_audio", _params(message_id=message_id, text=text, voice=voice, app=app)
        )

    async def run_details(self, workflow_run_id: str, *, app: str | None = None) -> dict[str, Any]:
        """A workflow run this user started through tokenwire (another's is ``not_found``)."""
        return await self.call("runs.get", _params(workflow_run_id=workflow_run_id, app=app))

    # --- uploads (HTTP) -------------------------------------------------------------------

    async def upload(
        self, file: str | Path, *, mime_type: str | None = None, app: str | None = None
    ) -> dict[str, Any]:
        """``POST /v1/files``: Dify's file object (``id`` goes in ``chat(files=[…])``)."""
        return await self._post_file("/files", file, mime_type, app, expect=201)

    async def audio_to_text(
        self, file: str | Path, *, mime_type: str | None = None, app: str | None = None
    ) -> str:
        """``POST /v1/audio-to-text``: the transcript."""
        data = await self._post_file("/audio-to-text", file, mime_type, app, expect=200)
        return str(data.get("text", ""))

    async def _post_file(
        self, path: str, file: str | Path, mime_type: str | None, app: str | None, *, expect: int
    ) -> dict[str, Any]:
        file = Path(file)
        mime = mime_type or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        headers: dict[str, str] = {}
        token = await self._bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        query = {"user": self.user} if self.user and not token else {}
        data = {"app": app} if app else {}
        async with httpx.AsyncClient(timeout=120.0) as http:
            # httpx reads the file in chunks while it sends: never whole in memory.
            with file.open("rb") as handle:  # noqa: ASYNC230
                response = await http.post(
                    http_base(self.url) + path,
                    params=query,
                    headers=headers,
                    data=data,
                    files={"file": (file.name, handle, mime)},
                )
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != expect or not isinstance(body, dict):
            body = body if isinstance(body, dict) else {}
            raise CallError(
                str(body.get("code", f"http_{response.status_code}")),
                str(body.get("message", response.reason_phrase)),
                retryable=bool(body.get("retryable", response.status_code >= 500)),
                retry_after_ms=body.get("retry_after_ms"),
            )
        return body
