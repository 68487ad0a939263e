"""Ask tokenwire from a backend (a Django or FastAPI view, a worker, a bot): one Connection
shared by the process, a short-lived JWT for the end user it acts for, the answer streamed.

    TOKENWIRE_URL=ws://127.0.0.1:8000/v1/ws TOKENWIRE_JWT_SECRET=... \\
        python docs/examples/python_client.py alice "What is tokenwire?"

Without TOKENWIRE_JWT_SECRET it connects as a plain user (a gateway with TOKENWIRE_AUTH=none,
e.g. ``tokenwire dev``). tests/integration/test_python_client_example.py runs this file.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import jwt

from tokenwire.client import Connection, RequestStatus, TokenProvider


def tokens_for(user: str, secret: str) -> TokenProvider:
    """A token provider: the client asks it before every (re)connect, so tokens may be short."""

    def provider() -> str:
        now = int(time.time())
        return jwt.encode({"sub": user, "iat": now, "exp": now + 300}, secret, algorithm="HS256")

    return provider


async def ask(conn: Connection, question: str, conversation_id: str | None = None) -> str:
    """The whole answer; reconnects and resumes on its own if the socket drops meanwhile."""
    stream = await conn.chat(question, conversation_id=conversation_id)
    async for _frame in stream:
        pass  # a bot would edit its message with stream.text here, every few frames
    if stream.status is not RequestStatus.DONE:
        raise RuntimeError(f"no answer: {stream.status} {stream.error}")
    return stream.text


async def main(user: str, question: str) -> None:
    url = os.environ.get("TOKENWIRE_URL", "ws://127.0.0.1:8000/v1/ws")
    secret = os.environ.get("TOKENWIRE_JWT_SECRET")
    # Server-side, tokens are minted here; with TOKENWIRE_AUTH=none the user is just named.
    conn = Connection(url, tokens_for(user, secret)) if secret else Connection(url, user=user)
    async with conn:
        print(await ask(conn, question), end="")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
