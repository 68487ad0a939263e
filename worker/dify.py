"""The worker's HTTP shell around Dify's Service API: one pooled httpx client per process.

Everything httpx can raise is translated here, once, into tokenwire's errors
(:func:`map_httpx_errors`); the runner never sees an httpx type. Dify's two error paths are
kept apart as NOTES.md describes: before the stream, a non-200 JSON ``{code, message, status}``
(:func:`~shared.dify_api.rejection`); after it started, in-band ``error`` events (handled by
the mapper). What those bytes mean is decided in the core (``shared/dify_api.py``,
``shared/mapping.py``); this module only moves them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiohttp
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from shared.apps import DEFAULT_APP, Route, app_table, unknown_app
from shared.calls import MAX_RESULT_BYTES, DifyRequest
from shared.dify_api import HistoryMessage, find_history_message, form_rejection, rejection
from shared.exceptions import (
    DifyStreamCut,
    DifyStreamError,
    DifyUnavailable,
)
from shared.settings import Settings
from shared.sse import SSEEvent, SSEParser, SSEProtocolError
from worker import metrics

__all__ = ["DifyAnswer", "DifyClient", "map_httpx_errors"]

_MAX_ERROR_BODY = 16 * 1024

log = logging.getLogger("tokenwire.worker")


def closed_before_answering(exc: BaseException) -> bool:
    """Whether Dify's side closed the connection before any byte of an answer: what a kept-alive
    connection the server had just timed out looks like (uvicorn closes idle ones after 5 s,
    gunicorn after 2 s; the pool keeps them 5 s), and a server that died before it answered."""
    cause = exc.__cause__
    return isinstance(cause, aiohttp.ServerDisconnectedError) or (
        isinstance(exc, httpx.RemoteProtocolError) and "without sending a response" in str(exc)
    )


@contextmanager
def map_httpx_errors(*, started: bool) -> Iterator[None]:
    """Turn httpx's errors into tokenwire's: before the first byte Dify is *unavailable*
    (retry later); once a stream has started, a broken connection *cut* the answer."""
    try:
        yield
    except httpx.TimeoutException as exc:
        if started:
            raise DifyStreamCut(f"Dify stopped sending ({type(exc).__name__})") from exc
        raise DifyUnavailable(f"Dify did not answer in time ({type(exc).__name__})") from exc
    except (httpx.TransportError, httpx.StreamError) as exc:
        if started:
            raise DifyStreamCut(f"connection to Dify broke ({type(exc).__name__})") from exc
        raise DifyUnavailable(f"cannot reach Dify ({type(exc).__name__})") from exc


class DifyClient:
    """Talks to one Dify Service API base URL with one app key (and optional named apps)."""

    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None):
        key = settings.dify_api_key.get_secret_value() if settings.dify_api_key else ""
        # Every app by name (shared/apps.py): its URL and key; keys stay SecretStr until the
        # header is written.
        self._apps = app_table(settings)
        pool = settings.worker_concurrency
        # Room for every concurrent stream plus their stop calls; few idle keep-alives.
        limits = httpx.Limits(max_connections=pool * 2, max_keepalive_connections=min(pool, 32))
        self._http = httpx.AsyncClient(
            base_url=settings.dify_api_url,
            headers={"Authorization": f"Bearer {key}", "User-Agent": "tokenwire"},
            # No overall limit: answers may stream for many minutes. The read timeout bounds
            # the gap between bytes; Dify pings every ~10 s, so a minute of silence is death.
            timeout=httpx.Timeout(
                connect=settings.dify_connect_timeout_s,
                read=settings.dify_read_timeout_s,
                write=30.0,
                pool=settings.dify_read_timeout_s,
            ),
            limits=limits,
            # aiohttp's HTTP/1.1 client under httpx's API: about half the CPU per streamed
            # event of httpx's own transport, and sooner to the first byte (bench/transport.py).
            transport=transport or AiohttpTransport(limits=limits),
        )
        self._stop_timeout = settings.dify_stop_timeout_s

    async def aclose(self) -> None:
        await self._http.aclose()

    def _auth(self, app: str | None) -> dict[str, str]:
        """The Authorization header for ``app`` (None: the default app)."""
        spec = self._apps.get(app or DEFAULT_APP)
        if spec is None:
            if app is None:
                return {}  # no default app: the client's own header (none configured)
            raise unknown_app(app)
        return {"Authorization": f"Bearer {spec.key.get_secret_value()}"}

    def _url(self, app: str | None, path: str) -> str:
        """``path`` at ``app``'s own base URL (each app may live on its own Dify)."""
        spec = self._apps.get(app or DEFAULT_APP)
        return f"{spec.url}{path}" if spec is not None else path

    def has_app(self, app: str | None) -> bool:
        return app is None or app in self._apps

    @asynccontextmanager
    async def stream_chat(
        self,
        body: dict[str, Any],
        *,
        trace_id: str,
        app: str | None = None,
        route: Route | None = None,
    ) -> AsyncIterator[AsyncIterator[list[SSEEvent]]]:
        """POST /chat-messages (or ``route``'s endpoint: completion, workflow) in streaming
        mode; yields the stream's SSE events, one list per read of the response (everything
        that arrived together stays together).

        Raises an :class:`UpstreamError` before yielding if Dify refuses, and from the
        iterator if the stream breaks.
        """
        headers = {
            "X-Request-Id": trace_id,
            "X-Trace-Id": trace_id,
            "Accept": "text/event-stream",
            **self._auth(app),
        }
        payload = orjson.dumps(body)
        request = self._http.build_request(
            "POST",
            self._url(app, route.path if route is not None else "/chat-messages"),
            content=payload,
            headers=headers | {"Content-Type": "application/json"},
        )
        async with self._stream(request, route.endpoint if route else "chat") as events:
            yield events

    @asynccontextmanager
    async def stream_run_events(
        self, workflow_run_id: str, user: str, *, trace_id: str, app: str | None = None
    ) -> AsyncIterator[AsyncIterator[list[SSEEvent]]]:
        """``GET /workflow/{run_id}/events?continue_on_pause=true``: the events of a run Dify
        already started (after a human answered its form, or when its reader died)."""
        request = self._http.build_request(
            "GET",
            self._url(app, f"/workflow/{workflow_run_id}/events"),
            params={"user": user, "continue_on_pause": "true"},
            headers={
                "X-Request-Id": trace_id,
                "Accept": "text/event-stream",
                **self._auth(app),
            },
        )
        async with self._stream(request, "workflow_events") as events:
            yield events

    @asynccontextmanager
    async def _stream(
        self, request: httpx.Request, endpoint: str
    ) -> AsyncIterator[AsyncIterator[list[SSEEvent]]]:
        sent = time.monotonic()
        try:
            with map_httpx_errors(started=False):
                response = await self._send_once_more(request)
        except DifyUnavailable:
            metrics.dify_response(None, time.monotonic() - sent, endpoint)
            raise
        metrics.dify_response(response.status_code, time.monotonic() - sent, endpoint)
        try:
            if response.status_code != 200:
                with map_httpx_errors(started=False):
                    data = await _read_bounded(response)
                raise rejection(response.status_code, data)
            kind = response.headers.get("content-type", "")
            if not kind.startswith("text/event-stream"):
                raise DifyStreamError(f"Dify answered {kind or 'no content type'}, not a stream")
            yield _events(response)
        finally:
            await response.aclose()

    async def _send_once_more(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``; if Dify closed the connection before answering, send it once more
        on a fresh one. A request that fails so is sent again anyway (the job goes back with
        ``DifyUnavailable`` and comes back after a backoff), so sending it at once is no less
        safe; it spares the client a ``queued`` detour for a connection the pool kept a moment
        longer than Dify did."""
        try:
            return await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            if not closed_before_answering(exc):
                raise
            log.info("Dify closed the connection before answering; sending once more")
            return await self._http.send(request, stream=True)

    async def _call(self, endpoint: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One short Dify call (stop, history): timed, errors translated, non-200 raised."""
        sent = time.monotonic()
        try:
            with map_httpx_errors(started=False):
                request = self._http.build_request(
                    method, path, timeout=self._stop_timeout, **kwargs
                )
                response = await self._send_once_more(request)
                await response.aread()
        except DifyUnavailable:
            metrics.dify_response(None, time.monotonic() - sent, endpoint)
            raise
        metrics.dify_response(response.status_code, time.monotonic() - sent, endpoint)
        if response.status_code != 200:
            raise rejection(response.status_code, response.content[:_MAX_ERROR_BODY])
        return response

    async def stop(
        self,
        task_id: str,
        user: str,
        *,
        trace_id: str,
        app: str | None = None,
        route: Route | None = None,
    ) -> None:
        """POST /chat-messages/{task_id}/stop (or ``route``'s: the workflow or completion
        stop) with the same ``user`` (best effort at Dify)."""
        path = route.stop_path(task_id) if route is not None else f"/chat-messages/{task_id}/stop"
        await self._call(
            "stop",
            "POST",
            self._url(app, path),
            content=orjson.dumps({"user": user}),
            headers={
                "Content-Type": "application/json",
                "X-Request-Id": trace_id,
                **self._auth(app),
            },
        )

    async def info(self, *, app: str | None = None) -> dict[str, Any]:
        """``GET /info``: the app's name and mode. Cheap, and it checks the URL and the key,
        so readiness (``/readyz``) asks it before saying a question can be answered."""
        response = await self._call("info", "GET", self._url(app, "/info"), headers=self._auth(app))
        payload = orjson.loads(response.content)
        return payload if isinstance(payload, dict) else {}

    async def history_message(
        self,
        conversation_id: str,
        message_id: str,
        user: str,
        *,
        trace_id: str,
        app: str | None = None,
    ) -> HistoryMessage | None:
        """The message ``message_id`` from ``GET /messages`` (latest page), or None."""
        response = await self._call(
            "messages",
            "GET",
            self._url(app, "/messages"),
            params={"conversation_id": conversation_id, "user": user, "limit": 20},
            headers={"X-Request-Id": trace_id, **self._auth(app)},
        )
        return find_history_message(orjson.loads(response.content), message_id)

    # --- calls and uploads (shared/calls.py, worker/calls.py, worker/uploads.py) -------------

    async def send(self, request: DifyRequest, *, trace_id: str) -> DifyAnswer:
        """Send one ``call`` (a :class:`~shared.calls.DifyRequest`) with its app's key; any
        status comes back, judged by :func:`shared.calls.call_result` / ``call_error``."""
        app = None if request.app == "default" else request.app
        headers = {"X-Request-Id": trace_id, **self._auth(app)}
        content: bytes | None = None
        if request.body is not None:
            content = orjson.dumps(request.body)
            headers["Content-Type"] = "application/json"
        sent = time.monotonic()
        try:
            with map_httpx_errors(started=False):
                async with self._http.stream(
                    request.http,
                    self._url(app, request.path),
                    params=request.query or None,
                    content=content,
                    headers=headers,
                    timeout=self._stop_timeout,
                ) as response:
                    body = await _read_limited(response, MAX_RESULT_BYTES + 1)
        except DifyUnavailable:
            metrics.dify_response(None, time.monotonic() - sent, "call")
            raise
        metrics.dify_response(response.status_code, time.monotonic() - sent, "call")
        return DifyAnswer(response, body)

    async def upload(
        self,
        path: str,
        *,
        app: str,
        content_type: str,
        length: int,
        body: AsyncIterable[bytes],
        trace_id: str,
    ) -> DifyAnswer:
        """``POST /files/upload`` or ``/audio-to-text``: a multipart body streamed as it comes
        (``content_type`` names its boundary, ``length`` is exact), never whole in memory."""
        target = None if app == "default" else app
        headers = {
            "X-Request-Id": trace_id,
            "Content-Type": content_type,
            "Content-Length": str(length),
            **self._auth(target),
        }
        sent = time.monotonic()
        try:
            with map_httpx_errors(started=False):
                request = self._http.build_request(
                    "POST", self._url(target, path), content=body, headers=headers
                )
                response = await self._http.send(request, stream=True)
                try:
                    data = await _read_limited(response, MAX_RESULT_BYTES + 1)
                finally:
                    await response.aclose()
        except DifyUnavailable:
            metrics.dify_response(None, time.monotonic() - sent, "upload")
            raise
        metrics.dify_response(response.status_code, time.monotonic() - sent, "upload")
        return DifyAnswer(response, data)

    async def submit_form(
        self,
        form_token: str,
        body: dict[str, Any],
        *,
        trace_id: str,
        app: str | None = None,
    ) -> None:
        """``POST /form/human_input/{form_token}`` (``inputs``, ``action``, ``user``); a form
        that is closed raises :class:`~shared.exceptions.FormClosed`."""
        sent = time.monotonic()
        try:
            with map_httpx_errors(started=False):
                response = await self._http.post(
                    self._url(app, f"/form/human_input/{form_token}"),
                    content=orjson.dumps(body),
                    timeout=self._stop_timeout,
                    headers={
                        "Content-Type": "application/json",
                        "X-Request-Id": trace_id,
                        **self._auth(app),
                    },
                )
        except DifyUnavailable:
            metrics.dify_response(None, time.monotonic() - sent, "form")
            raise
        metrics.dify_response(response.status_code, time.monotonic() - sent, "form")
        if response.status_code not in (200, 201, 204):
            raise form_rejection(response.status_code, response.content[:_MAX_ERROR_BODY])

    async def check_form(self, form_token: str, *, trace_id: str, app: str | None = None) -> None:
        """``GET /form/human_input/{form_token}``: raises if the form is closed (expired,
        submitted: :class:`~shared.exceptions.FormClosed`; unknown: ``not_found``)."""
        sent = time.monotonic()
        try:
            with map_httpx_errors(started=False):
                response = await self._http.get(
                    self._url(app, f"/form/human_input/{form_token}"),
                    timeout=self._stop_timeout,
                    headers={"X-Request-Id": trace_id, **self._auth(app)},
                )
        except DifyUnavailable:
            metrics.dify_response(None, time.monotonic() - sent, "form")
            raise
        metrics.dify_response(response.status_code, time.monotonic() - sent, "form")
        if response.status_code != 200:
            raise form_rejection(response.status_code, response.content[:_MAX_ERROR_BODY])


class DifyAnswer:
    """A call's answer as Dify gave it: status, content type, body (bounded), Retry-After."""

    __slots__ = ("body", "content_type", "retry_after_s", "status")

    def __init__(self, response: httpx.Response, body: bytes) -> None:
        self.status = response.status_code
        self.content_type = response.headers.get("content-type", "")
        self.body = body
        retry = response.headers.get("retry-after", "")
        self.retry_after_s: float | None = float(retry) if retry.isdigit() else None


async def _read_limited(response: httpx.Response, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


async def _read_bounded(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if size >= _MAX_ERROR_BODY:
            break
    return b"".join(chunks)[:_MAX_ERROR_BODY]


async def _events(response: httpx.Response) -> AsyncIterator[list[SSEEvent]]:
    """The stream's events, one list per read (what one chunk of bytes completed)."""
    parser = SSEParser()
    try:
        with map_httpx_errors(started=True):
            async for chunk in response.aiter_bytes():
                events = parser.feed(chunk)
                if events:
                    yield events
        events = parser.feed_eof()
        if events:
            yield events
    except SSEProtocolError as exc:
        raise DifyStreamError(f"Dify's stream is malformed: {exc}") from exc
