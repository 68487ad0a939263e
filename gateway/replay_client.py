"""A restricted gateway's JetStream for replays: consumers are created by a worker.

Why: with the restricted gateway permissions (docs/security.md, "NATS permissions") the gateway
may not call JetStream's consumer API, which would let it read every kept frame. nats-py's
ordered consumer is kept as it is (gap detection, flow control, heartbeats, recreating its
consumer after a gap): only the one call that creates its consumer goes to a worker instead
(``tw.ctl.replay``; the worker creates it only for one request's frames, pushed to this
gateway's inbox: ``shared/replay_proxy.py``). JetStream's answer comes back unchanged.

This leans on nats-py's ``JetStreamContext._jsm`` (the manager its subscriptions call to create
and recreate consumers); the restricted-permission tests fail loudly if a nats-py upgrade moves it.
"""

from __future__ import annotations

from typing import Any

import orjson
from nats.aio.client import Client
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import APIError
from nats.js.manager import JetStreamManager

from shared.replay_proxy import encode_consumer_ask
from shared.subjects import REPLAY_SUBJECT

__all__ = ["WorkerMadeConsumers"]

# How long a worker may take to create a replay consumer (one JetStream API call).
_ASK_TIMEOUT_S = 5.0


class _AskingManager(JetStreamManager):
    """Creates consumers by asking a worker; nothing else is used by a replay."""

    async def add_consumer(
        self,
        stream: str,
        config: api.ConsumerConfig | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - nats-py's own signature
        **params: Any,
    ) -> api.ConsumerInfo:
        config = (config or api.ConsumerConfig()).evolve(**params)
        msg = await self._nc.request(
            REPLAY_SUBJECT,
            encode_consumer_ask(stream, config.as_dict()),
            timeout=timeout or _ASK_TIMEOUT_S,
        )
        resp = orjson.loads(msg.data)
        if "error" in resp and "code" in resp["error"]:
            raise APIError.from_error(resp["error"])
        info: api.ConsumerInfo = api.ConsumerInfo.from_response(resp)
        return info


class WorkerMadeConsumers(JetStreamContext):
    """A JetStream context whose subscriptions' consumers are made by a worker."""

    def __init__(self, nc: Client) -> None:
        super().__init__(nc, timeout=_ASK_TIMEOUT_S)

    @property
    def _jsm(self) -> JetStreamManager:
        return _AskingManager(conn=self._nc, prefix=self._prefix, timeout=self._timeout)
