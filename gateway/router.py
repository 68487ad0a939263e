"""Every frame of this gateway's connections, from one subscription, to its connection.

How this works: a worker publishes a request's frames on the job's reply subject, which names
the gateway process and the connection that asked (``tw.frames.<p>.<gateway>.<conn>.<key>``,
``shared/subjects.py``), which its stream republishes as ``tw.live.<p>.<gateway>.<conn>.<key>``
once stored. The gateway subscribes once to ``tw.live.*.<gateway>.>``
(``gateway/bus.py``) and hands each message to :meth:`Router.route`, which reads the
connection id out of the subject and passes the frame to that connection, found in a dict.
A connection registers when its session asks to hear its frames (``SubscribeConnection``) and
unregisters when it detaches (``Unsubscribe``): no NATS call either way, so neither the
gateway's NATS subscriptions nor its tasks grow with its connections.

* A frame for no registered connection (the client left; its request goes on and is kept in
  the stream) is dropped: the client gets it back with ``resume``.
* Frames NATS could not hand over, because the subscription's pending queue was full (a slow
  consumer: the gateway's event loop fell behind) or the link was down (a reconnect), are read
  back from the stream by the connections they were meant for: :meth:`Router.lost` tells the
  one connection a dropped message names, :meth:`Router.reconnected` every connection.
* One connection's slow client never holds the others up: a connection queues a frame without
  waiting (its outbox is bounded; full, the session closes it as a slow consumer, 4101).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from nats.aio.msg import Msg

from shared.exceptions import InternalError
from shared.subjects import frame_address

__all__ = ["FrameSink", "Router"]


class FrameSink(Protocol):
    """What the router hands frames to: one connection (``gateway/connection.py``)."""

    def receive_frame(self, msg: Msg) -> Awaitable[None]:
        """One live frame of one of the connection's requests (with its stream headers)."""
        ...

    def frames_lost(self) -> None:
        """Frames meant for the connection may have been lost: read its requests back."""
        ...


class Router:
    """``conn id → connection`` for one gateway process's frame subscription."""

    def __init__(self) -> None:
        self._sinks: dict[str, FrameSink] = {}

    def __len__(self) -> int:
        return len(self._sinks)

    def register(self, conn_id: str, sink: FrameSink) -> None:
        """Route ``conn_id``'s frames to ``sink`` from now on."""
        held = self._sinks.setdefault(conn_id, sink)
        if held is not sink:
            raise InternalError(f"connection id {conn_id!r} is already routed on this gateway")

    def unregister(self, conn_id: str, sink: FrameSink) -> None:
        """Stop routing to ``sink`` (a no-op when it is not, or no longer, the one routed)."""
        if self._sinks.get(conn_id) is sink:
            del self._sinks[conn_id]

    async def route(self, msg: Msg) -> None:
        """Hand one message of the subscription to the connection its subject names."""
        sink = self._sink_of(msg.subject)
        if sink is not None:
            await sink.receive_frame(msg)

    def lost(self, subject: str) -> None:
        """NATS dropped a message on ``subject`` (slow consumer): its connection reads back."""
        sink = self._sink_of(subject)
        if sink is not None:
            sink.frames_lost()

    def reconnected(self) -> None:
        """NATS came back: whatever was published meanwhile is read back by every connection."""
        for sink in list(self._sinks.values()):
            sink.frames_lost()

    def _sink_of(self, subject: str) -> FrameSink | None:
        address = frame_address(subject)
        return None if address is None else self._sinks.get(address.conn)
