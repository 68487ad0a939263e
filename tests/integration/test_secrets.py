"""Secrets stay secret: a full run with a recognizable Dify key, JWT secret and tokens.

Every process of the run (NATS, simulator, worker, gateways) logs at DEBUG into files; the
clients keep every frame they get; /metrics of the gateway and the worker are read at the end.
Then none of that text may hold the Dify key, the JWT secret or any token used in the run
(good, forged, expired, refreshed, or sent where it is not allowed), not even a token's
signature alone. The run goes through the paths that handle secrets: each way of sending a
token, every refusal, a refresh, Dify errors, rate and connection limits.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
import websockets

from tests.integration.stack import Stack
from tests.integration.wsclient import Client
from tokenwire.natsserver import NatsServer

pytestmark = pytest.mark.integration

MARK = uuid.uuid4().hex[:12]
DIFY_KEY = f"app-DIFYKEY{MARK}"
JWT_SECRET = f"JWTSECRET{MARK}-" + "s" * 32
FORGERY_SECRET = f"FORGERY{MARK}-" + "f" * 32


class Tokens:
    """Mints tokens and remembers every one, to look for them afterwards."""

    def __init__(self) -> None:
        self.issued: list[str] = []

    def __call__(self, sub: str, exp_in: float = 600, secret: str = JWT_SECRET) -> str:
        token = jwt.encode({"sub": sub, "exp": int(time.time() + exp_in)}, secret)
        self.issued.append(token)
        return token

    def needles(self) -> set[str]:
        found = set(self.issued)
        found |= {t.rsplit(".", 1)[1] for t in self.issued}  # the signature alone
        return found


def header(token: str) -> dict[str, Any]:
    return {"additional_headers": {"Authorization": f"Bearer {token}"}}


async def run_everything(stack: Stack, gateway_port: int, tokens: Tokens) -> list[str]:
    """Drive every secret-handling path; return every frame received, as text."""
    url = f"ws://127.0.0.1:{gateway_port}/v1/ws"
    seen: list[str] = []

    def keep(client: Client) -> None:
        for frames in client.frames.values():
            seen.extend(orjson.dumps(f).decode() for f in frames)
        seen.extend(orjson.dumps(f).decode() for f in client.other)

    async def refused(query: str = "", **kw: Any) -> None:
        try:
            async with websockets.connect(url + query, subprotocols=["tokenwire.v1"], **kw) as ws:
                async for message in ws:
                    seen.append(str(message))
        except websockets.ConnectionClosed as closed:
            seen.append(closed.rcvd.reason if closed.rcvd else "")
        except websockets.InvalidStatus as status:
            seen.append(
                status.response.body.decode(errors="replace") if status.response.body else ""
            )

    # Good tokens: header, subprotocol, first auth frame, and a refresh.
    async with Client(url, **header(tokens("alice"))) as alice:
        await alice.finish(await alice.chat("hello with a header token"))
        await alice.send({"type": "auth", "token": tokens("alice", exp_in=900)})
        await alice.finish(await alice.chat("after a refresh"))
        # Dify refusing and failing (worker error paths), and a stop.
        await alice.finish(await alice.chat("bad", inputs={"tw_sim": {"fault": "400"}}))
        await alice.finish(await alice.chat("breaks", inputs={"tw_sim": {"fault": "error_event"}}))
        rid = await alice.chat("/slow to be stopped")
        await alice.wait_for(rid, "accepted")
        await alice.send({"type": "stop", "id": rid})
        await alice.finish(rid)
        keep(alice)
    async with websockets.connect(
        url, subprotocols=["tokenwire.v1", f"bearer.{tokens('bob')}"]
    ) as ws:
        seen.append(str(await ws.recv()))
    async with websockets.connect(url, subprotocols=["tokenwire.v1"]) as ws:
        await ws.send(orjson.dumps({"type": "auth", "token": tokens("carol")}).decode())
        seen.append(str(await ws.recv()))

    # Refusals: forged, expired, another user's refresh, a query-string token, garbage.
    await refused(**header(tokens("mallory", secret=FORGERY_SECRET)))
    await refused(**header(tokens("alice", exp_in=-60)))
    await refused(additional_headers={"Authorization": f"Bearer {tokens('x')[:-3]}zzz"})
    async with Client(url, **header(tokens("dave"))) as dave:
        await dave.send({"type": "auth", "token": tokens("eve")})
        await asyncio.wait_for(dave.closed.wait(), 15)
        keep(dave)
    await refused(f"?access_token={tokens('frank')}")
    # Limits: a second connection of one user (cap 1), and a burst over the rate.
    async with Client(url, **header(tokens("gina"))) as gina:
        await refused(**header(tokens("gina")))
        rids = [await gina.chat(f"burst {n}") for n in range(8)]
        for rid in rids:
            await gina.finish(rid)
        keep(gina)
    return seen


async def test_no_secret_or_token_in_logs_frames_or_metrics(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats", stop_grace=5.0)
    server.start()
    stack = Stack(
        nats_url=server.url,
        workdir=tmp_path,
        env_extra={"DIFY_API_KEY": DIFY_KEY, "TOKENWIRE_LOG_LEVEL": "DEBUG"},
    )
    tokens = Tokens()
    try:
        stack.simulator("--api-key", DIFY_KEY)
        worker = stack.worker()
        gateway = stack.gateway(
            TOKENWIRE_AUTH="jwt",
            TOKENWIRE_ALLOW_INSECURE="0",
            TOKENWIRE_JWT_SECRET=JWT_SECRET,
            TOKENWIRE_MAX_CONNECTIONS_PER_USER="1",
            TOKENWIRE_RATE_BURST="6",
            TOKENWIRE_RATE_PER_USER="1/min",
            TOKENWIRE_AUTH_TIMEOUT_S="1",
        )
        port: int = gateway.port  # type: ignore[attr-defined]
        seen = await run_everything(stack, port, tokens)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        worker_metrics_url = (worker.health_url or "").replace("/healthz", "/metrics")
        metrics += httpx.get(worker_metrics_url, timeout=5).text
    finally:
        stack.close()
        server.stop()

    # A gateway that refuses to start must not echo the secret it refused either.
    short = f"SHORT{MARK}"
    start = subprocess.run(  # noqa: ASYNC221 - the stack is down; nothing else runs
        [sys.executable, "-m", "tokenwire", "gateway", "--port", "1"],
        env={**os.environ, "TOKENWIRE_AUTH": "jwt", "TOKENWIRE_JWT_SECRET": short},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert start.returncode == 2 and "at least 32 bytes" in start.stderr

    logs = {p.name: p.log_text() for p in stack.procs}
    logs["nats-server"] = server.log_path.read_text(errors="replace")
    logs["refused start"] = start.stdout + start.stderr
    # The run really happened: answers came back, refusals were made, the worker logged.
    everything_seen = "\n".join(seen)
    for code in (
        "unauthorized",
        "token_expired",
        "forbidden",
        "too_many_connections",
        "rate_limited",
    ):
        assert code in everything_seen, code
    assert '"type":"end"' in everything_seen and "dify_bad_request" in everything_seen
    assert all(logs[name] for name in ("gateway", "worker", "simulator"))

    secrets = {"DIFY_API_KEY": DIFY_KEY, "JWT secret": JWT_SECRET, "forgery": FORGERY_SECRET}
    secrets |= {f"token {n}": t for n, t in enumerate(tokens.needles())}
    secrets["refused secret"] = short
    places = {f"log of {name}": text for name, text in logs.items()}
    places |= {"frames": everything_seen, "metrics": metrics}
    leaks = [
        f"{what} in {where}"
        for what, needle in secrets.items()
        for where, text in places.items()
        if needle in text
    ]
    assert not leaks, leaks
    # Guard against a vacuous pass: the needles are real and the gateway saw the tokens.
    assert len(tokens.issued) >= 12
