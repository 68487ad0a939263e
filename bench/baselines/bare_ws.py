"""BASELINE, not tokenwire: the ceiling of a Python WebSocket stack on this machine.

A bare Starlette WebSocket endpoint under uvicorn (the same server, loop and WebSocket
implementation the gateway uses by default) that answers each ``chat`` frame by pushing
tokenwire-shaped frames itself: ``accepted``, ``start``, one ``delta`` per token of the
simulator's deterministic answer (:func:`tokenwire.simulator.answer_tokens`), ``end``. No
NATS, no worker, no HTTP call, no validation: whatever tokenwire delivers end to end is
measured against what this process alone can push to the same clients.

    python -m bench.baselines.bare_ws --port 8002 --token-delay-ms 0 --tokens 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from shared.frames import Accepted, Delta, End, Hello, Start, encode
from tokenwire.simulator import answer_tokens


def create_app(token_delay_ms: float, tokens: int, tokens_per_frame: int = 1) -> Starlette:
    delay = token_delay_ms / 1000

    async def stream(ws: WebSocket, rid: str, query: str) -> None:
        await ws.send_text(encode(Accepted(id=rid, seq=1)).decode())
        await ws.send_text(
            encode(Start(id=rid, seq=2, conversation_id="c", message_id="m", task_id="t")).decode()
        )
        seq = 2
        parts = answer_tokens(query, tokens)
        # The first token comes after one delay, like the simulator's. With
        # tokens_per_frame > 1 the deltas are coalesced (what a coalescing worker would send).
        for i in range(0, len(parts), tokens_per_frame):
            await asyncio.sleep(delay)
            seq += 1
            text = "".join(parts[i : i + tokens_per_frame])
            await ws.send_text(encode(Delta(id=rid, seq=seq, text=text)).decode())
        end = End(id=rid, seq=seq + 1, conversation_id="c", message_id="m")
        await ws.send_text(encode(end).decode())

    async def websocket(ws: WebSocket) -> None:
        offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")]
        await ws.accept(subprotocol="tokenwire.v1" if "tokenwire.v1" in offered else None)
        user = ws.query_params.get("user", "anonymous")
        await ws.send_text(
            encode(Hello(session=secrets.token_hex(10), user=user, server="bare")).decode()
        )
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                frame = orjson.loads(await ws.receive_text())
                if frame.get("type") == "chat":
                    task = asyncio.create_task(stream(ws, frame["id"], frame["query"]))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        except WebSocketDisconnect:
            pass
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[WebSocketRoute("/v1/ws", websocket), Route("/healthz", healthz)],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--token-delay-ms", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--tokens-per-frame", type=int, default=1)
    parser.add_argument("--no-deflate", action="store_true", help="refuse permessage-deflate")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.token_delay_ms, args.tokens, args.tokens_per_frame),
        host=args.host,
        port=args.port,
        log_level="warning",
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        ws_per_message_deflate=not args.no_deflate,
    )


if __name__ == "__main__":
    main()
