"""tokenwire's errors, and the catalogue of codes a client can see.

Every error a client can receive is one of these classes; its ``code`` is the string in the
``error`` frame, so the protocol's codes and the code that raises them cannot drift apart::

    TokenwireError                      root; code, message, retryable
    ├── ClientError                     the client sent something we refuse (never retried)
    │   ├── FrameError                  bad_json, unknown_type, invalid_frame
    │   ├── FrameTooLarge               frame_too_large (the connection stays open)
    │   ├── DuplicateRequest            duplicate_id
    │   ├── UnknownRequest              unknown_request (resume of an id with no kept frames)
    │   ├── LimitExceeded               too_many_inflight (retry later)
    │   │   ├── RateLimited             rate_limited (with a retry hint)
    │   │   ├── TooManyConnections      too_many_connections (closes with 4004 or 1013)
    │   │   └── TooBusy                 too_busy: the gateway's handshakes (close 1013) or
    │   │                               resumes in progress are at their cap; retry after
    │   │                               the hint
    │   ├── Unauthorized                unauthorized (closes the socket with 4001)
    │   │   └── TokenExpired            token_expired (closes the socket with 4002)
    │   ├── Forbidden                   forbidden (closes the socket with 4003)
    │   ├── IdleTimeout                 idle_timeout (closes the socket with 4103)
    │   ├── WrongAppKind                wrong_app_kind (a chat to a one-shot app, a run to a chat)
    │   ├── UnknownMethod               unknown_method (a call of no such method)
    │   ├── BadParams                   bad_params (a call's params, refused before Dify)
    │   ├── NotFound                    not_found (no such id for this user, or not theirs)
    │   ├── FormClosed                  form_expired, form_submitted (a human-input form)
    │   └── FileRefused                 file_too_large, unsupported_file_type (an upload)
    ├── UpstreamError                   Dify failed or refused
    │   ├── DifyRejected                dify_bad_request, dify_unauthorized,
    │   │   │                           conversation_not_found, dify_payload_too_large,
    │   │   │                           unknown_app (fails at once)
    │   │   └── FeatureDisabled         feature_disabled: Dify says the feature is off
    │   ├── DifyUnavailable             upstream_unavailable, dify_rate_limited,
    │   │   │                           dify_server_error (retryable)
    │   │   └── CircuitOpen             upstream_unavailable: this worker does not ask Dify yet
    │   ├── DifyStreamError             upstream_error: an in-band ``error`` event
    │   └── DifyStreamCut               upstream_cut: the stream ended before the answer did
    └── InternalError                   internal_error, bus_unavailable: tokenwire failed
        └── BusUnavailable              bus_unavailable: NATS/JetStream cannot do it now
            ├── BusFull                 bus_unavailable: a stream or the disk is full
            └── BusRetryable            bus_unavailable: no answer yet (leader election);
                                        the same call soon may succeed

Close codes live here too (:class:`CloseCode`), each with the one thing a client does after
it (:class:`ClosePolicy`): reconnect and ``resume``, refresh the token first, wait for the
user, or give up. The policy is a pure mapping (:func:`close_policy`); both clients obey it,
the Python client by importing it and the browser SDK through ``web/sdk/close-codes.js``,
which ``python -m shared.exceptions`` generates from :func:`close_code_table` (a unit test
keeps the committed file equal to it). An error that closes the socket names its code
(``close_code``); one that carries a retry hint gives it as ``retry_after_ms``.
"""

from __future__ import annotations

import json
import math
import sys
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any, ClassVar, Final

__all__ = [
    "BadParams",
    "BusFull",
    "BusRetryable",
    "BusUnavailable",
    "CircuitOpen",
    "ClientError",
    "CloseCode",
    "DifyRejected",
    "DifyStreamCut",
    "DifyStreamError",
    "DifyUnavailable",
    "DuplicateRequest",
    "ErrorCode",
    "FeatureDisabled",
    "FileRefused",
    "Forbidden",
    "FormClosed",
    "FrameError",
    "FrameTooLarge",
    "IdleTimeout",
    "InternalError",
    "LimitExceeded",
    "NotFound",
    "RateLimited",
    "TokenExpired",
    "TokenwireError",
    "TooBusy",
    "TooManyConnections",
    "Unauthorized",
    "UnknownMethod",
    "UnknownRequest",
    "UpstreamError",
    "WrongAppKind",
    "close_code_table",
    "close_codes_module",
    "close_policy",
    "error_from_wire",
    "error_to_wire",
]


class ErrorCode(StrEnum):
    """The stable strings of ``error.code``; docs/protocol.md lists each with its meaning."""

    BAD_JSON = "bad_json"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FRAME = "invalid_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    DUPLICATE_ID = "duplicate_id"
    UNKNOWN_REQUEST = "unknown_request"
    TOO_MANY_INFLIGHT = "too_many_inflight"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    TOKEN_EXPIRED = "token_expired"
    FORBIDDEN = "forbidden"
    IDLE_TIMEOUT = "idle_timeout"
    DIFY_BAD_REQUEST = "dify_bad_request"
    DIFY_UNAUTHORIZED = "dify_unauthorized"
    CONVERSATION_NOT_FOUND = "conversation_not_found"
    DIFY_PAYLOAD_TOO_LARGE = "dify_payload_too_large"
    UNKNOWN_APP = "unknown_app"
    DIFY_RATE_LIMITED = "dify_rate_limited"
    DIFY_SERVER_ERROR = "dify_server_error"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_CUT = "upstream_cut"
    INTERNAL_ERROR = "internal_error"
    BUS_UNAVAILABLE = "bus_unavailable"
    # Protocol v1, second part: app kinds, human input, calls and files.
    WRONG_APP_KIND = "wrong_app_kind"
    UNKNOWN_METHOD = "unknown_method"
    BAD_PARAMS = "bad_params"
    NOT_FOUND = "not_found"
    FORM_EXPIRED = "form_expired"
    FORM_SUBMITTED = "form_submitted"
    FILE_TOO_LARGE = "file_too_large"
    UNSUPPORTED_FILE_TYPE = "unsupported_file_type"
    FEATURE_DISABLED = "feature_disabled"
    # Admission control (issue 17): a gateway at its cap of handshakes or resumes in progress.
    TOO_BUSY = "too_busy"


class ClosePolicy(StrEnum):
    """What a client does after the socket closed with a given code."""

    #: Reconnect with backoff (at least ``retry_after_ms`` when the close came with one), then
    #: ``resume`` every request in flight.
    RECONNECT = "reconnect"
    #: Ask the token provider for a fresh token, then reconnect and ``resume``. Without a
    #: provider there is nothing fresh to ask for: give up.
    REFRESH_TOKEN = "refresh_token"
    #: Stay closed until the application sends something (then reconnect and send it);
    #: requests still unfinished count as something to send.
    WAIT_FOR_USER = "wait_for_user"
    #: End the connection for good: requests in flight fail.
    GIVE_UP = "give_up"


class CloseCode(IntEnum):
    """WebSocket close codes a client of the gateway can see, each with its :attr:`policy`.

    Standard codes keep their RFC 6455 meaning; 4000–4199 are tokenwire's own.
    """

    NORMAL = 1000
    GOING_AWAY = 1001
    # A malformed WebSocket frame (the client's WebSocket implementation is broken).
    PROTOCOL_ERROR = 1002
    # Never sent on the wire: what a client sees when the socket ended without a close frame
    # (a network failure, a killed gateway, or an HTTP refusal of the upgrade).
    ABNORMAL_CLOSURE = 1006
    # A text frame that is not valid UTF-8.
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    # A frame far over TOKENWIRE_MAX_FRAME_BYTES (the server refuses to read it at all).
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    # The server restarted without draining.
    SERVICE_RESTART = 1012
    # This gateway is full (its TOKENWIRE_MAX_CONNECTIONS) or has too many handshakes in
    # progress (TOKENWIRE_MAX_HANDSHAKES): try again later, maybe elsewhere.
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4001
    # The token expired: get a fresh one, then reconnect (and resume).
    TOKEN_EXPIRED = 4002
    FORBIDDEN = 4003
    # The user already holds TOKENWIRE_MAX_CONNECTIONS_PER_USER connections (cluster-wide);
    # slots of connections that dropped expire after TOKENWIRE_CONNECTION_TTL_S.
    TOO_MANY_CONNECTIONS = 4004
    DRAINING = 4100
    SLOW_CONSUMER = 4101
    BUS_UNAVAILABLE = 4102
    # No client frame and no request in flight for TOKENWIRE_IDLE_TIMEOUT_S.
    IDLE_TIMEOUT = 4103

    @property
    def policy(self) -> ClosePolicy:
        """What a client does after this close."""
        return _CLOSE_POLICIES[self]


_CLOSE_POLICIES: Final[dict[CloseCode, ClosePolicy]] = {
    CloseCode.NORMAL: ClosePolicy.WAIT_FOR_USER,
    CloseCode.GOING_AWAY: ClosePolicy.RECONNECT,
    CloseCode.PROTOCOL_ERROR: ClosePolicy.GIVE_UP,
    CloseCode.ABNORMAL_CLOSURE: ClosePolicy.RECONNECT,
    CloseCode.INVALID_DATA: ClosePolicy.GIVE_UP,
    CloseCode.POLICY_VIOLATION: ClosePolicy.GIVE_UP,
    # The clients never send that frame again (they check hello's limit before sending, and
    # fail the request that was too large): the others reconnect and resume.
    CloseCode.MESSAGE_TOO_BIG: ClosePolicy.RECONNECT,
    CloseCode.INTERNAL_ERROR: ClosePolicy.RECONNECT,
    CloseCode.SERVICE_RESTART: ClosePolicy.RECONNECT,
    CloseCode.TRY_AGAIN_LATER: ClosePolicy.RECONNECT,
    CloseCode.UNAUTHORIZED: ClosePolicy.GIVE_UP,
    CloseCode.TOKEN_EXPIRED: ClosePolicy.REFRESH_TOKEN,
    CloseCode.FORBIDDEN: ClosePolicy.GIVE_UP,
    # With backoff: a dropped connection's slot lingers until its TTL, so a reconnect right
    # after a network failure can meet it; giving up would lose the answers in flight.
    CloseCode.TOO_MANY_CONNECTIONS: ClosePolicy.RECONNECT,
    CloseCode.DRAINING: ClosePolicy.RECONNECT,
    CloseCode.SLOW_CONSUMER: ClosePolicy.RECONNECT,
    CloseCode.BUS_UNAVAILABLE: ClosePolicy.RECONNECT,
    CloseCode.IDLE_TIMEOUT: ClosePolicy.WAIT_FOR_USER,
}

#: The policy of a code outside the catalogue (1005 "no status", a proxy's own code, …), and
#: of a socket that never opened (no close code at all).
DEFAULT_CLOSE_POLICY: Final = ClosePolicy.RECONNECT


def close_policy(code: int | None) -> ClosePolicy:
    """What a client does after a close with ``code`` (None: the socket never opened)."""
    if code is None:
        return DEFAULT_CLOSE_POLICY
    try:
        return CloseCode(code).policy
    except ValueError:
        return DEFAULT_CLOSE_POLICY


def close_code_table() -> dict[str, Any]:
    """The close-code policy as plain JSON data: what the browser SDK imports."""
    return {
        "default": DEFAULT_CLOSE_POLICY.value,
        "codes": {
            str(int(code)): {"name": code.name, "policy": code.policy.value} for code in CloseCode
        },
    }


_MODULE_HEADER: Final = """\
// GENERATED by `python -m shared.exceptions` from shared/exceptions.py: do not edit.
// What a client does after each close code (reconnect | refresh_token | wait_for_user |
// give_up); tests/unit/test_close_codes.py keeps this file equal to the catalogue.
// An ES module rather than a .json file: importing JSON needs import attributes, which
// bundlers and type checkers handle unevenly; this loads anywhere an ES module does.
"""


def close_codes_module() -> str:
    """The text of ``web/sdk/close-codes.js``: the table of :func:`close_code_table`."""
    table = json.dumps(close_code_table(), indent=2)
    return f"{_MODULE_HEADER}\nexport const CLOSE_CODES = Object.freeze({table});\n"


class TokenwireError(Exception):
    """Root of every tokenwire error. ``str()`` is ``"code: message"``.

    ``close_code`` is the code the gateway closes the socket with after sending this error
    (None: the connection stays open); ``retry_after_s`` is a hint of when the same frame may
    pass (None: no hint), on the wire as ``retry_after_ms``.
    """

    default_code: ClassVar[ErrorCode] = ErrorCode.INTERNAL_ERROR
    default_retryable: ClassVar[bool] = False
    close_code: ClassVar[CloseCode | None] = None
    retry_after_s: float | None = None

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code: ErrorCode = code or self.default_code
        self.retryable: bool = self.default_retryable if retryable is None else retryable

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"

    @property
    def retry_after_ms(self) -> int | None:
        """``retry_after_s`` in whole milliseconds (at least 1), or None without a finite hint."""
        if self.retry_after_s is None or not math.isfinite(self.retry_after_s):
            return None
        return max(1, math.ceil(self.retry_after_s * 1000))


# --- the client is at fault -------------------------------------------------------------


class ClientError(TokenwireError):
    """The client sent something tokenwire refuses; retrying the same frame cannot help.

    ``request_id`` is the id of the request the bad frame named, when one could be read, so
    the ``error`` frame is tied to it and the connection's other requests go on.
    """

    default_code = ErrorCode.INVALID_FRAME

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        retryable: bool | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, code=code, retryable=retryable)
        self.request_id = request_id


class FrameError(ClientError):
    """A frame that is not JSON, not an object, of unknown type or with bad fields."""


class FrameTooLarge(ClientError):
    """A frame over ``TOKENWIRE_MAX_FRAME_BYTES``: refused, the connection stays open.

    The frame is not parsed, so the error is connection-level unless the gateway can still
    read a chat's ``id`` from it (then it ends that request: ``id``, ``seq`` 1). The clients
    never send such a frame (``hello.limits.max_frame_bytes``): they fail the request locally
    with this code. A frame over four times the limit never reaches tokenwire: the WebSocket
    server closes the socket with 1009 (MESSAGE_TOO_BIG).
    """

    default_code = ErrorCode.FRAME_TOO_LARGE


class DuplicateRequest(ClientError):
    """A ``chat`` whose id is already running on this connection."""

    default_code = ErrorCode.DUPLICATE_ID


class UnknownRequest(ClientError):
    """``resume`` of an id this user has no kept frames for (never asked, another user's, or
    expired): the request ``id`` fails with it (an ``error`` with ``seq``). A ``stop`` of such
    an id is not refused: there is nothing to stop, and nothing answers it."""

    default_code = ErrorCode.UNKNOWN_REQUEST


class WrongAppKind(ClientError):
    """A ``chat`` to a one-shot app (workflow, completion), or a ``run`` to a chat app."""

    default_code = ErrorCode.WRONG_APP_KIND


class UnknownMethod(ClientError):
    """A ``call`` whose ``method`` is not in the catalogue (shared/calls.py)."""

    default_code = ErrorCode.UNKNOWN_METHOD


class BadParams(ClientError):
    """A ``call``'s params are missing, unknown or out of range: refused before Dify."""

    default_code = ErrorCode.BAD_PARAMS


class NotFound(ClientError):
    """No such id for this user: it never existed, expired, or belongs to another user (the
    three look the same on purpose, so ids cannot be probed)."""

    default_code = ErrorCode.NOT_FOUND


class FormClosed(ClientError):
    """A human-input form that can no longer be answered: ``form_expired`` or
    ``form_submitted`` (Dify's 412 ``human_input_form_expired`` / ``_submitted``)."""

    default_code = ErrorCode.FORM_EXPIRED


class FileRefused(ClientError):
    """An upload refused before it reached Dify: ``file_too_large`` (HTTP 413) or
    ``unsupported_file_type`` (HTTP 415); ``status`` is the HTTP status to answer with."""

    default_code = ErrorCode.FILE_TOO_LARGE

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message, code=code)
        self.status = 415 if self.code is ErrorCode.UNSUPPORTED_FILE_TYPE else 413


class LimitExceeded(ClientError):
    """Over a limit; the same frame may succeed later."""

    default_code = ErrorCode.TOO_MANY_INFLIGHT
    default_retryable = True


class RateLimited(LimitExceeded):
    """Over the per-user request rate; ``retry_after_s`` says when one more may pass."""

    default_code = ErrorCode.RATE_LIMITED

    def __init__(
        self, message: str, *, retry_after_s: float, request_id: str | None = None
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.retry_after_s: float | None = retry_after_s


class TooManyConnections(LimitExceeded):
    """Over the per-user (cluster-wide) cap, close 4004; over the per-gateway cap the gateway
    closes with 1013 (TRY_AGAIN_LATER) instead."""

    default_code = ErrorCode.TOO_MANY_CONNECTIONS
    close_code = CloseCode.TOO_MANY_CONNECTIONS

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s: float | None = retry_after_s


class TooBusy(LimitExceeded):
    """This gateway is at its cap of handshakes (``TOKENWIRE_MAX_HANDSHAKES``: the socket
    closes with 1013) or of resumes (``TOKENWIRE_MAX_RESUMES``: an ``error`` with the
    request's ``id`` and no ``seq``; the request is untouched) in progress. Nothing was done:
    the same handshake or ``resume`` passes later; clients wait ``retry_after_ms`` plus
    jitter, so that a storm of reconnects spreads out instead of coming back at once."""

    default_code = ErrorCode.TOO_BUSY
    close_code = CloseCode.TRY_AGAIN_LATER

    def __init__(
        self, message: str, *, retry_after_s: float, request_id: str | None = None
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.retry_after_s: float | None = retry_after_s


class Unauthorized(ClientError):
    """No valid credentials: a missing, forged, expired or wrong-audience token."""

    default_code = ErrorCode.UNAUTHORIZED
    close_code = CloseCode.UNAUTHORIZED


class TokenExpired(Unauthorized):
    """The token's ``exp`` has passed (at the handshake, or during the connection's life)."""

    default_code = ErrorCode.TOKEN_EXPIRED
    close_code = CloseCode.TOKEN_EXPIRED


class Forbidden(ClientError):
    """Valid credentials that may not do this (e.g. an ``auth`` frame for another user)."""

    default_code = ErrorCode.FORBIDDEN
    close_code = CloseCode.FORBIDDEN


class IdleTimeout(ClientError):
    """Nothing happened on the connection for ``TOKENWIRE_IDLE_TIMEOUT_S``."""

    default_code = ErrorCode.IDLE_TIMEOUT
    close_code = CloseCode.IDLE_TIMEOUT


# --- Dify is at fault -------------------------------------------------------------------


class UpstreamError(TokenwireError):
    """Dify failed, refused or could not be reached."""

    default_code = ErrorCode.UPSTREAM_ERROR

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        retryable: bool | None = None,
        status: int | None = None,
        upstream_code: str | None = None,
    ) -> None:
        super().__init__(message, code=code, retryable=retryable)
        self.status = status
        self.upstream_code = upstream_code


class DifyRejected(UpstreamError):
    """Dify refused the request itself (400, 401, 403, 404, 413): retrying cannot help."""

    default_code = ErrorCode.DIFY_BAD_REQUEST


class FeatureDisabled(DifyRejected):
    """Dify refused a call because the feature is off for that app (suggested questions,
    text to speech, speech to text)."""

    default_code = ErrorCode.FEATURE_DISABLED


class DifyUnavailable(UpstreamError):
    """Dify is down, overloaded or rate-limiting (refused, timeouts, 429, 5xx): retry later."""

    default_code = ErrorCode.UPSTREAM_UNAVAILABLE
    default_retryable = True


class CircuitOpen(DifyUnavailable):
    """This worker's circuit breaker is open: Dify is not asked until the next probe."""


class DifyStreamError(UpstreamError):
    """Dify sent an in-band ``error`` event after the stream had started."""

    default_code = ErrorCode.UPSTREAM_ERROR


class DifyStreamCut(UpstreamError):
    """Dify's stream ended (EOF, reset, read timeout) before the answer was complete."""

    default_code = ErrorCode.UPSTREAM_CUT
    default_retryable = True


# --- tokenwire itself failed ------------------------------------------------------------


class InternalError(TokenwireError):
    """A bug or an infrastructure failure inside tokenwire (e.g. NATS unreachable)."""

    default_code = ErrorCode.INTERNAL_ERROR
    default_retryable = True


class BusUnavailable(InternalError):
    """NATS or JetStream could not do what was asked (disconnected, refused, failed)."""

    default_code = ErrorCode.BUS_UNAVAILABLE


class BusFull(BusUnavailable):
    """JetStream refused to store: a stream reached its byte limit, or the server's disk is
    full. Nothing was stored; the same frame may pass once workers have drained the queue."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.retry_after_s: float | None = 5.0


class BusRetryable(BusUnavailable):
    """NATS gave no answer yet (no responders, no stream response, a timeout): typically a
    JetStream leader election, so the same call soon may succeed. ``maybe_done``: the call
    may have taken effect even so (it timed out waiting for the acknowledgement)."""

    def __init__(self, message: str, *, maybe_done: bool = False) -> None:
        super().__init__(message)
        self.maybe_done = maybe_done


def error_to_wire(exc: TokenwireError) -> dict[str, Any]:
    """An error as a worker replies with it over NATS: ``{code, message, retryable,
    retry_after_ms?}`` (the fields of an ``error`` frame, without id and seq)."""
    body: dict[str, Any] = {
        "code": exc.code.value,
        "message": exc.message,
        "retryable": exc.retryable,
    }
    if exc.retry_after_ms is not None:
        body["retry_after_ms"] = exc.retry_after_ms
    return body


def error_from_wire(body: dict[str, Any]) -> TokenwireError:
    """The error of :func:`error_to_wire` again, code and retry hint kept (an unknown code
    becomes ``internal_error``)."""
    try:
        code = ErrorCode(str(body.get("code")))
    except ValueError:
        code = ErrorCode.INTERNAL_ERROR
    exc = TokenwireError(
        str(body.get("message") or code.value), code=code, retryable=bool(body.get("retryable"))
    )
    hint = body.get("retry_after_ms")
    if isinstance(hint, int) and not isinstance(hint, bool) and hint > 0:
        exc.retry_after_s = hint / 1000
    return exc


def _main(argv: list[str]) -> int:
    """``python -m shared.exceptions [PATH]``: write the SDK's close-code table (default:
    web/sdk/close-codes.js of this checkout)."""
    path = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / CLOSE_CODES_JS
    path.write_text(close_codes_module(), encoding="utf-8")
    print(f"wrote {path}")
    return 0


#: Where the generated table lives, relative to the repository.
CLOSE_CODES_JS: Final = "web/sdk/close-codes.js"

if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
