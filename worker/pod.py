"""``tokenwire worker --processes N``: N worker processes behind one metrics port.

The supervisor (tokenwire/supervisor.py) starts N children, each a whole ``tokenwire worker``
with its own NATS connection, consumer subscription and worker id (``host:pid``: job status,
leases, app slots), each serving its probes on a Unix socket in a private directory instead
of a port. This process serves the pod's ``--metrics-port``:

* ``/metrics``: every child's families summed (prometheus-client's multiprocess mode);
* ``/healthz``: 200 when every child's ``/healthz`` is (NATS connected), else 503 naming who;
* ``/readyz``: 200 only when every child is ready and the pod is not stopping; the body has
  one worker's facts (``nats``, ``jobs``, ``dify``: those of the first child that is not
  ready) and, in ``processes``, each child's own answer.

SIGTERM is forwarded to every child, which drains as one worker does; the port keeps
answering (503 on ``/readyz``) until the last child is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from shared.settings import Settings
from tokenwire.supervisor import Supervisor, listen, metrics_dir
from worker import metrics
from worker.readiness import READY_FACTS

__all__ = ["ChildProbes", "combine_readiness", "pod_app", "run_worker_pod"]

#: How long a child may take to answer one probe.
PROBE_TIMEOUT_S = 3.0


def combine_readiness(answers: Sequence[dict[str, Any] | None]) -> tuple[bool, dict[str, Any]]:
    """The pod's ``/readyz`` from each child's (``None``: that child did not answer)."""
    processes: list[dict[str, Any]] = []
    for slot, body in enumerate(answers):
        if body is None:
            processes.append({"process": slot, "ready": False, "state": "not answering"})
        else:
            processes.append({"process": slot, **body})
    ready = bool(processes) and all(p.get("ready") is True for p in processes)
    answered = [p for p in processes if "state" not in p]
    facts: dict[str, Any] = {}
    for fact, good in READY_FACTS.items():
        values = [p.get(fact) for p in answered]
        facts[fact] = next((v for v in values if v != good), good if values else "no answer")
    return ready, {"ready": ready, **facts, "processes": processes}


class ChildProbes:
    """HTTP to each child's Unix socket."""

    def __init__(self, sockets: Sequence[Path]) -> None:
        self.sockets = list(sockets)
        self._clients = [
            httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(path)),
                base_url="http://worker",
                timeout=PROBE_TIMEOUT_S,
            )
            for path in self.sockets
        ]

    async def get(self, slot: int, path: str) -> httpx.Response | None:
        """The child's answer, or None when it does not answer (starting, restarting)."""
        try:
            return await self._clients[slot].get(path)
        except httpx.HTTPError:
            return None

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


def pod_app(probes: ChildProbes, supervisor: Supervisor, multiprocess_dir: Path) -> Starlette:
    """The pod's ``/metrics``, ``/healthz`` and ``/readyz`` (see the module's docstring)."""

    async def ask(path: str) -> list[httpx.Response | None]:
        async def one(slot: int) -> httpx.Response | None:
            if not supervisor.running(slot):
                return None
            return await probes.get(slot, path)

        return await asyncio.gather(*(one(slot) for slot in range(len(probes.sockets))))

    async def prometheus(request: Request) -> Response:
        body = await asyncio.to_thread(metrics.exposition, multiprocess_dir)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        problems = [
            f"process {slot}: " + (answer.text if answer is not None else "not answering")
            for slot, answer in enumerate(await ask("/healthz"))
            if answer is None or answer.status_code != 200
        ]
        if problems:
            return PlainTextResponse("; ".join(problems), status_code=503)
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        bodies: list[dict[str, Any] | None] = []
        for answer in await ask("/readyz"):
            try:
                bodies.append(orjson.loads(answer.content) if answer is not None else None)
            except orjson.JSONDecodeError:
                bodies.append(None)
        ready, body = combine_readiness(bodies)
        if supervisor.stopping:
            ready, body = False, {**body, "ready": False, "draining": True}
        return Response(
            orjson.dumps(body),
            status_code=200 if ready else 503,
            media_type="application/json",
        )

    return Starlette(
        routes=[
            Route("/metrics", prometheus),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
        ]
    )


class _PodServer(uvicorn.Server):
    """uvicorn without its signal handlers: the supervisor owns SIGTERM and SIGINT, and stops
    this server once the children are gone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def run_worker_pod(settings: Settings, host: str, port: int, count: int) -> int:
    """Run ``count`` worker processes and the pod's probes on ``host:port``; the exit code."""
    try:
        listener = listen(host, port)
    except OSError as exc:
        print(f"refusing to start: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 3
    with (
        listener,
        metrics_dir() as mdir,
        tempfile.TemporaryDirectory(prefix="tokenwire-worker-") as sockdir,
    ):
        sockets = [Path(sockdir) / f"worker-{slot}.sock" for slot in range(count)]
        supervisor = Supervisor(
            "worker",
            count,
            lambda slot: [
                sys.executable,
                "-m",
                "tokenwire",
                "worker",
                "--processes",
                "1",
                "--uds",
                str(sockets[slot]),
            ],
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mdir)},
            # The children's drain, then uvicorn's own shutdown.
            stop_grace_s=settings.worker_drain_s + 15,
            metrics=mdir,
        )
        return asyncio.run(_serve(supervisor, sockets, mdir, listener))


async def _serve(
    supervisor: Supervisor,
    sockets: list[Path],
    mdir: Path,
    listener: socket.socket,
) -> int:
    probes = ChildProbes(sockets)
    server = _PodServer(
        uvicorn.Config(
            pod_app(probes, supervisor, mdir),
            log_config=None,
            access_log=False,
            lifespan="off",
        )
    )
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        code = await supervisor.run()
    finally:
        server.should_exit = True
        await serving
        await probes.aclose()
    return code
