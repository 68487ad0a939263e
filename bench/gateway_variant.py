"""The gateway app under other server settings, for the levers that need no code change.

``tokenwire gateway`` runs ``gateway.app.create_app`` under uvicorn with uvicorn's automatic
choices (uvloop, the ``websockets-sansio`` implementation) and has no flag to change them.
This launcher builds the very same app from the very same settings and serves it with one
setting changed, so the benchmark can measure what each choice is worth:

    python -m bench.gateway_variant --port P --ws wsproto --loop asyncio --deflate
    python -m bench.gateway_variant --port P --server granian

It is a benchmark tool only; a lever that wins should become a real gateway option.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from typing import Any

from starlette.applications import Starlette


def _app(probe: bool = False) -> Any:
    from gateway.app import create_app
    from shared.logs import configure_logging
    from shared.settings import Settings

    settings = Settings()
    configure_logging("gateway", settings.log_level, json=settings.log_json)
    app = create_app(settings)
    return _LagProbe(app) if probe else app


class _MemoryCensus:
    """ASGI wrapper serving ``GET /_bench/memory?snap=a`` (take the baseline snapshot) and
    ``?snap=b&key=filename|lineno|traceback`` (the top allocations since the baseline, as
    text). Needs ``tracemalloc`` started before the app is built."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.base: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/_bench/memory":
            await self.app(scope, receive, send)
            return
        import tracemalloc
        from urllib.parse import parse_qs

        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        gc.collect()
        snapshot = tracemalloc.take_snapshot()
        if query.get("snap", "a") == "a" or self.base is None:
            self.base = snapshot
            body = b"baseline taken"
        else:
            key = query.get("key", "filename")
            stats = snapshot.compare_to(self.base, key)
            lines = [f"total {sum(s.size_diff for s in stats) / 1024:.0f} KiB"]
            for stat in stats[: int(query.get("top", "25"))]:
                where = " <- ".join(
                    f"{f.filename.rsplit('site-packages/', 1)[-1]}:{f.lineno}"
                    for f in reversed(stat.traceback[-6:])
                )
                lines.append(f"{stat.size_diff / 1024:9.0f} KiB {stat.count_diff:8d}  {where}")
            body = "\n".join(lines).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


class _LagProbe:
    """ASGI wrapper that reports, once a second on stderr, the event loop's worst lag (a
    5 ms sleep that woke late) and the garbage collector's pauses: what makes a token late."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.task: asyncio.Task[None] | None = None
        self.gc_pauses: list[float] = []
        self._gc_started = 0.0

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                self._gc_started = time.perf_counter()
            elif info.get("generation", 0) >= 1:
                self.gc_pauses.append((time.perf_counter() - self._gc_started) * 1000)

        gc.callbacks.append(on_gc)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._probe())
        await self.app(scope, receive, send)

    async def _probe(self) -> None:
        worst, window = 0.0, time.perf_counter()
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, (time.perf_counter() - before - 0.005) * 1000)
            if time.perf_counter() - window >= 1.0:
                pauses, self.gc_pauses = self.gc_pauses, []
                print(
                    json.dumps(
                        {
                            "probe": "lag",
                            "t": round(time.time(), 1),
                            "max_lag_ms": round(worst, 1),
                            "gc_pauses_ms": [round(p, 1) for p in pauses],
                        }
                    ),
                    file=sys.stderr,
                    flush=True,
                )
                worst, window = 0.0, time.perf_counter()


def granian_factory() -> Starlette:
    """Target of ``granian --factory bench.gateway_variant:granian_factory``."""
    app: Starlette = _app()
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn")
    parser.add_argument(
        "--ws", default="auto", choices=["auto", "websockets", "websockets-sansio", "wsproto"]
    )
    parser.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    deflate = parser.add_mutually_exclusive_group()
    deflate.add_argument("--deflate", action="store_true", help="accept permessage-deflate")
    deflate.add_argument("--no-deflate", action="store_true", help="refuse permessage-deflate")
    parser.add_argument("--lag-probe", action="store_true", help="report loop lag and GC pauses")
    parser.add_argument(
        "--trace-memory",
        action="store_true",
        help="tracemalloc on, and GET /_bench/memory?snap=a|b for a census of allocations",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() once the app is built: the collector stops re-scanning startup objects",
    )
    args = parser.parse_args()
    if args.server == "granian":
        from granian.constants import Interfaces, Loops
        from granian.server import Server

        Server(
            "bench.gateway_variant:granian_factory",
            address=args.host,
            port=args.port,
            interface=Interfaces.ASGI,
            factory=True,
            loop=Loops.uvloop if args.loop != "asyncio" else Loops.asyncio,
            log_enabled=False,
            websockets=True,
        ).serve()
        return
    import uvicorn

    from shared.settings import Settings

    settings = Settings()
    if args.trace_memory:
        import tracemalloc

        tracemalloc.start(8)
    app = _app(probe=args.lag_probe)
    if args.trace_memory:
        app = _MemoryCensus(app)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        ws=args.ws,
        loop=args.loop,
        # As `tokenwire gateway` (TOKENWIRE_WS_DEFLATE) unless a flag says otherwise.
        ws_per_message_deflate=(
            True
            if args.deflate
            else False
            if args.no_deflate
            else bool(getattr(settings, "ws_deflate", True))
        ),
        ws_max_size=settings.max_frame_bytes * 4,
        # The same pings as `tokenwire gateway` (older settings had none: 20 s).
        ws_ping_interval=getattr(settings, "ping_interval_s", 20.0),
        ws_ping_timeout=getattr(settings, "pong_timeout_s", 20.0),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
    sys.exit(0)
