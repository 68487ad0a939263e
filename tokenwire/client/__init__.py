"""A Python client for tokenwire's WebSocket protocol, with reconnect and resume built in."""

from tokenwire.client.calls import CallError, ServiceApi
from tokenwire.client.connection import (
    CONNECTION_CLOSED,
    FRAME_TOO_LARGE,
    MAX_REFRESH_TRIES,
    PROTOCOL,
    Backoff,
    ChatStream,
    Connection,
    ConnectionState,
    RequestFrame,
    RequestStatus,
    StateChange,
    TokenProvider,
)

__all__ = [
    "CONNECTION_CLOSED",
    "FRAME_TOO_LARGE",
    "MAX_REFRESH_TRIES",
    "PROTOCOL",
    "Backoff",
    "CallError",
    "ChatStream",
    "Connection",
    "ConnectionState",
    "RequestFrame",
    "RequestStatus",
    "ServiceApi",
    "StateChange",
    "TokenProvider",
]
