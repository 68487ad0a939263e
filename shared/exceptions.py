"""tokenwire's errors, and the catalogue of codes a client can see.

Every error a client can receive is one of these classes; its ``code`` is the string in the
``error`` frame, so the protocol's codes and the code that raises them cannot drift apart::

    TokenwireError                      root; code, message, retryable
    ├── ClientError                     the client sent something we refuse (never retried)
    │   ├── FrameError                  bad_json, unknown_type, invalid_frame
    │   ├── FrameTooLarge               frame_too_large (also closes the socket with 1009)
    │   ├── DuplicateRequest            duplicate_id
    │   ├── UnknownRequest              unknown_request (stop/resume of an id we do not hold)
    │   ├── LimitExceeded               too_many_inflight (retry later)
    │   │   ├── RateLimited             rate_limited (with a retry hint)
    │   │   └── TooManyConnections      too_many_connections (closes with 4004 or 1013)
    │   ├── Unauthorized                unauthorized (closes the socket with 4001)
    │   │   └── TokenExpired            token_expired (closes the socket with 4002)
    │   ├── Forbidden                   forbidden (closes the socket with 4003)
    │   └── IdleTimeout                 idle_timeout (closes the socket with 4103)
    ├── UpstreamError                   Dify failed or refused
    │   ├── DifyRejected                dify_bad_request, dify_unauthorized,
    │   │                               conversation_not_found, dify_payload_too_large,
    │   │                               unknown_app (fails at once)
    │   ├── DifyUnavailable             upstream_unavailable, dify_rate_limited,
    │   │   │                           dify_server_error (retryable)
    │   │   └── CircuitOpen             upstream_unavailable: this worker does not ask Dify yet
    │   ├── DifyStreamError             upstream_error: an in-band ``error`` event
    │   └── DifyStreamCut               upstream_cut: the stream ended before the answer did
    └── InternalError                   internal_error, bus_unavailable: tokenwire failed
        └── BusUnavailable              bus_unavailable: NATS/JetStream cannot do it now
            └── BusRetryable            bus_unavailable: no answer yet (leader election);
                                        the same call soon may succeed

Close codes live here too (:class:`CloseCode`). 4000–4099 mean "do not reconnect as is"
(fix the token or the client first); 4100–4199 mean "reconnect, then ``resume``": a client can
decide from the number alone.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import ClassVar

__all__ = [
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
    "Forbidden",
    "FrameError",
    "FrameTooLarge",
    "IdleTimeout",
    "InternalError",
    "LimitExceeded",
    "RateLimited",
    "TokenExpired",
    "TokenwireError",
    "TooManyConnections",
    "Unauthorized",
    "UnknownRequest",
    "UpstreamError",
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


class CloseCode(IntEnum):
    """WebSocket close codes the gateway uses.

    Standard codes keep their RFC 6455 meaning. Private codes are split in two ranges so that a
    client knows what to do from the number: 4000–4099 do not reconnect unchanged,
    4100–4199 reconnect (with backoff) and ``resume`` in-flight requests.
    """

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    # This gateway is full (its TOKENWIRE_MAX_CONNECTIONS): try again later, maybe elsewhere.
    TRY_AGAIN_LATER = 1013
    # 4000-4099: do not reconnect as is.
    UNAUTHORIZED = 4001
    # The token expired: get a fresh one, then reconnect (and resume).
    TOKEN_EXPIRED = 4002
    FORBIDDEN = 4003
    # The user already holds TOKENWIRE_MAX_CONNECTIONS_PER_USER connections (cluster-wide).
    TOO_MANY_CONNECTIONS = 4004
    # 4100-4199: reconnect and resume.
    DRAINING = 4100
    SLOW_CONSUMER = 4101
    BUS_UNAVAILABLE = 4102
    # No client frame and no request in flight for TOKENWIRE_IDLE_TIMEOUT_S.
    IDLE_TIMEOUT = 4103

    @property
    def should_reconnect(self) -> bool:
        """Whether a client should reconnect (and resume) after this close."""
        return 4100 <= self.value <= 4199 or self in (
            CloseCode.GOING_AWAY,
            CloseCode.INTERNAL_ERROR,
            CloseCode.TRY_AGAIN_LATER,
        )


class TokenwireError(Exception):
    """Root of every tokenwire error. ``str()`` is ``"code: message"``."""

    default_code: ClassVar[ErrorCode] = ErrorCode.INTERNAL_ERROR
    default_retryable: ClassVar[bool] = False

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
    """A frame over ``TOKENWIRE_MAX_FRAME_BYTES``; the socket is closed with 1009."""

    default_code = ErrorCode.FRAME_TOO_LARGE


class DuplicateRequest(ClientError):
    """A ``chat`` whose id is already running on this connection."""

    default_code = ErrorCode.DUPLICATE_ID


class UnknownRequest(ClientError):
    """``stop`` or ``resume`` of an id that this user has no (unexpired) request for."""

    default_code = ErrorCode.UNKNOWN_REQUEST


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
        self.retry_after_s = retry_after_s


class TooManyConnections(LimitExceeded):
    """Over the per-user (cluster-wide) or per-gateway connection cap."""

    default_code = ErrorCode.TOO_MANY_CONNECTIONS

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthorized(ClientError):
    """No valid credentials: a missing, forged, expired or wrong-audience token."""

    default_code = ErrorCode.UNAUTHORIZED


class TokenExpired(Unauthorized):
    """The token's ``exp`` has passed (at the handshake, or during the connection's life)."""

    default_code = ErrorCode.TOKEN_EXPIRED


class Forbidden(ClientError):
    """Valid credentials that may not do this (e.g. an ``auth`` frame for another user)."""

    default_code = ErrorCode.FORBIDDEN


class IdleTimeout(ClientError):
    """Nothing happened on the connection for ``TOKENWIRE_IDLE_TIMEOUT_S``."""

    default_code = ErrorCode.IDLE_TIMEOUT


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


class BusRetryable(BusUnavailable):
    """NATS gave no answer yet (no responders, no stream response, a timeout): typically a
    JetStream leader election, so the same call soon may succeed. ``maybe_done``: the call
    may have taken effect even so (it timed out waiting for the acknowledgement)."""

    def __init__(self, message: str, *, maybe_done: bool = False) -> None:
        super().__init__(message)
        self.maybe_done = maybe_done
