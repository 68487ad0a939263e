"""A Python client for tokenwire's WebSocket protocol, with reconnect and resume built in."""

from tokenwire.client.connection import (
    CONNECTION_CLOSED,
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
    "PROTOCOL",
    "Backoff",
    "ChatStream",
    "Connection",
    "ConnectionState",
    "RequestFrame",
    "RequestStatus",
    "StateChange",
    "TokenProvider",
]
