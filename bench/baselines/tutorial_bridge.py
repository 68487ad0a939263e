"""BASELINE, not tokenwire: the common "Dify over WebSocket" tutorial bridge, re-implemented.

This is the bridge most blog posts and answers show, kept as faithful as possible so that
the comparison is fair to it and to us: one FastAPI WebSocket endpoint; for every text
message it creates a new ``httpx.AsyncClient``, POSTs Dify's ``/chat-messages`` in streaming
mode with one fixed user, reads the body line by line, parses each ``data:`` line with the
standard ``json`` module and sends every ``message`` event's ``answer`` as a raw text frame.
There is no request id, no end marker, no error frame, no stop, no resume: a client only knows
an answer is over by waiting (the benchmark knows the expected text and stops when it has it).

Run it (the benchmark does)::

    python -m bench.baselines.tutorial_bridge --port 8001 --dify-url http://127.0.0.1:5001/v1
"""

from __future__ import annotations

import argparse
import json
import os

import httpx
import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

DIFY_API_URL = os.environ.get("DIFY_API_URL", "http://127.0.0.1:5001/v1")
DIFY_API_KEY = os.environ.get("DIFY_API_KEY", "app-bench")

app = FastAPI()


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.websocket("/ws")
async def chat(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            query = await websocket.receive_text()
            async with (
                httpx.AsyncClient(timeout=60.0) as client,
                client.stream(
                    "POST",
                    f"{DIFY_API_URL}/chat-messages",
                    headers={"Authorization": f"Bearer {DIFY_API_KEY}"},
                    json={
                        "inputs": {},
                        "query": query,
                        "response_mode": "streaming",
                        "user": "abc-123",
                    },
                ) as response,
            ):
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        data = json.loads(line[5:])
                        if data.get("event") == "message":
                            await websocket.send_text(data["answer"])
    except WebSocketDisconnect:
        pass


def main() -> None:
    global DIFY_API_URL  # noqa: PLW0603 - the tutorial's module-level config, set by the CLI
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--dify-url", default=DIFY_API_URL)
    args = parser.parse_args()
    DIFY_API_URL = args.dify_url.rstrip("/")
    # As the tutorials run it: `uvicorn main:app` with uvicorn's defaults.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
