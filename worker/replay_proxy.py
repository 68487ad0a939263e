"""Creates replay consumers for restricted gateways (the rules: ``shared/replay_proxy.py``).

A worker already holds every permission a replay needs; a gateway with the restricted
permissions asks one worker of the queue group to create its consumer (or to say whether a
request's frames are kept). What the gateway asked is checked, narrowed to one request's frames
pushed to an inbox, and passed to JetStream's API; JetStream's answer goes back unchanged.
"""

from __future__ import annotations

import logging

import orjson
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from shared import natsedge
from shared.exceptions import BadParams, TokenwireError
from shared.natsedge import map_nats_errors
from shared.replay_proxy import (
    ConsumerAsk,
    check_consumer,
    create_subject,
    decode_ask,
    error_reply,
    has_reply,
    key_stream,
)
from shared.subjects import request_frames_any_connection

__all__ = ["ReplayProxy"]

log = logging.getLogger("tokenwire.worker")

# JetStream's answer to a consumer request comes at once, or its leader is being elected.
_API_TIMEOUT_S = 5.0


class ReplayProxy:
    """Answers ``tw.ctl.replay`` requests."""

    def __init__(self, nc: Client, js: JetStreamContext, partitions: int) -> None:
        self.nc = nc
        self.js = js
        self.partitions = partitions

    async def handle(self, data: bytes) -> bytes:
        try:
            ask = decode_ask(data)
            if isinstance(ask, ConsumerAsk):
                return await self._create(ask)
            key = ask.key
            subject = request_frames_any_connection(key, partitions=self.partitions)
            stream = key_stream(key, self.partitions)
            # Where the frames are too, so the gateway's replay can filter on their literal
            # subject (check_consumer allows it).
            span = await natsedge.kept_span(self.js, stream, subject)
            return has_reply(span is not None, span)
        except BadParams as exc:
            log.warning("replay request refused", extra={"error": str(exc)})
            return error_reply(exc)
        except TokenwireError as exc:
            return error_reply(exc)

    async def _create(self, ask: ConsumerAsk) -> bytes:
        config = check_consumer(ask, self.partitions)
        body = orjson.dumps({"stream_name": ask.stream, "config": config})
        with map_nats_errors("create a replay consumer"):
            msg = await self.nc.request(
                create_subject(ask.stream, config), body, timeout=_API_TIMEOUT_S
            )
        return bytes(msg.data)
