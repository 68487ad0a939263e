"""The worker's side of ``call``: one NATS request in, one Dify call, one reply out.

How this works. Every worker subscribes to ``tw.calls`` in the queue group ``tw-calls``
(``worker/app.py``), so NATS hands each call to one of them. :meth:`Calls.handle` decodes it,
lets :func:`shared.calls.build_request` check it again (the gateway already did: a worker
trusts no one with its keys) with the connection's user as Dify's ``user``, and then:

* app metadata (``app.info``, ``app.parameters``, ``app.meta``, ``app.site``) is served from a
  per-app cache for :data:`~shared.calls.APP_METADATA_TTL_S`, so opening a page does not hit
  Dify every time; ``apps.list`` is the configured app names, each with its cached ``/info``;
* a method Dify does not scope to its user (``runs.get``) is checked against the owners
  bucket first (``worker/ownership.py``): another user's id is ``not_found`` before Dify;
* the app's circuit breaker (the same one its chats use) must let the call through; Dify
  being unavailable counts against it, any answer for it;
* Dify's answer becomes the reply's data (:func:`~shared.calls.call_result`) or the protocol's
  error (:func:`~shared.calls.call_error`).

Every failure is a reply too (``encode_reply_error``): the gateway always hears exactly one
answer, and the client exactly one ``result`` or ``error``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from shared.breaker import CircuitBreaker
from shared.calls import (
    CallRequest,
    DifyRequest,
    build_request,
    call_error,
    call_result,
    decode_call,
    dify_error_fields,
    encode_reply,
    encode_reply_error,
)
from shared.exceptions import CircuitOpen, DifyUnavailable, InternalError, TokenwireError
from shared.logs import trace_id_var
from worker.ownership import Ownership

__all__ = ["Calls", "CallsDify", "DifyAnswerLike"]

log = logging.getLogger("tokenwire.worker")

#: The ``/info`` fields ``apps.list`` shows (never a key or a URL).
_INFO_FIELDS = ("name", "description", "mode", "tags", "author_name")


class DifyAnswerLike(Protocol):
    status: int
    content_type: str
    body: bytes
    retry_after_s: float | None


class CallsDify(Protocol):
    """What calls need of Dify (``worker/dify.py``'s :class:`~worker.dify.DifyClient`)."""

    async def send(self, request: DifyRequest, *, trace_id: str) -> DifyAnswerLike: ...


class Calls:
    """Answers the calls NATS hands this worker; see the module docstring."""

    def __init__(
        self,
        dify: CallsDify,
        owners: Ownership,
        apps: Sequence[str],
        breaker_for: Callable[[str], CircuitBreaker],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dify = dify
        self.owners = owners
        self.apps = list(apps)
        self.breaker_for = breaker_for
        self.clock = clock
        self._cache: dict[tuple[str, str], tuple[float, Any]] = {}

    async def handle(self, data: bytes) -> bytes:
        """One NATS request's bytes in, its reply's bytes out. Never raises."""
        try:
            call = decode_call(data)
        except TokenwireError as exc:
            return encode_reply_error(exc)
        token = trace_id_var.set(call.trace_id or None)
        try:
            return encode_reply(await self.answer(call))
        except TokenwireError as exc:
            return encode_reply_error(exc)
        except Exception:
            log.exception("a call failed inside tokenwire")
            return encode_reply_error(InternalError("the call failed inside tokenwire"))
        finally:
            trace_id_var.reset(token)

    async def answer(self, call: CallRequest) -> Any:
        """The ``result`` data for ``call``, or raise the protocol's error."""
        request = build_request(call.method, call.params, call.user)
        method = request.method
        if method.name == "apps.list":
            return {"data": [await self._app_entry(app, call.trace_id) for app in self.apps]}
        if method.owned is not None:
            owned_id = str(call.params[method.owned])
            await self.owners.check("run", owned_id, call.user)
        if method.cache_s > 0:
            return await self._cached(request, call.trace_id)
        return await self._send(request, call.trace_id)

    async def parameters(self, app: str, trace_id: str = "") -> dict[str, Any]:
        """The app's ``/parameters`` (cached): what uploads check their limits against."""
        request = build_request("app.parameters", {"app": app}, "tokenwire")
        data = await self._cached(request, trace_id)
        return data if isinstance(data, dict) else {}

    async def _app_entry(self, app: str, trace_id: str) -> dict[str, Any]:
        try:
            info = await self._cached(build_request("app.info", {"app": app}, "-"), trace_id)
        except TokenwireError as exc:
            return {"app": app, "available": False, "error": exc.code.value}
        fields = {k: info[k] for k in _INFO_FIELDS if isinstance(info, dict) and k in info}
        return {"app": app, "available": True, **fields}

    async def _cached(self, request: DifyRequest, trace_id: str) -> Any:
        key = (request.app, request.method.name)
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        data = await self._send(request, trace_id)
        self._cache[key] = (now + request.method.cache_s, data)
        return data

    async def _send(self, request: DifyRequest, trace_id: str) -> Any:
        breaker = self.breaker_for(request.app)
        now = self.clock()
        if not breaker.allow(now):
            exc = CircuitOpen("Dify is unavailable (circuit open)")
            exc.retry_after_s = max(breaker.retry_in(now), 0.1)
            raise exc
        try:
            answer = await self.dify.send(request, trace_id=trace_id)
        except DifyUnavailable:
            breaker.failure(self.clock())
            raise
        except BaseException:
            breaker.release()  # not a verdict on Dify (an unknown app, a cancellation)
            raise
        if answer.status == 429 or answer.status >= 500:
            breaker.failure(self.clock())
        else:
            breaker.success()
        if 200 <= answer.status < 300:
            return call_result(request.method, answer.status, answer.content_type, answer.body)
        code, message = dify_error_fields(answer.body)
        raise call_error(
            request.method,
            answer.status,
            code,
            message or f"HTTP {answer.status}",
            retry_after_s=answer.retry_after_s,
        )
