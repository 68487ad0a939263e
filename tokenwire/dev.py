"""The supervisor behind ``tokenwire dev``: all of tokenwire on one machine, one Ctrl-C away.

How it works: the supervisor starts, in this order, an embedded nats-server (JetStream, data
under ``<data_dir>/nats``), the bundled Dify simulator when no ``DIFY_API_KEY`` is set, one
worker and one gateway, each as a child process of its own. It then waits for the gateway's
``/readyz`` (NATS connected and subscribed, Dify answering ``GET /info``) and the gateway's
``/readyz``, and only then prints ``tokenwire is ready: http://H:P/``: from that line on a
question is answered. Each child's output goes to the terminal and to
``<data_dir>/logs/<name>.log``; a child that dies (while starting or later) is reported in one
line with its cause and that path, and dev exits non-zero. SIGINT, SIGTERM or SIGHUP stop
the children in reverse order (gateway first, so no new work arrives; nats-server last, so
the others can drain into it), each with SIGTERM and, after a grace, SIGKILL. If any child
dies on its own the rest are stopped too and the exit code is non-zero: a half-running dev
stack only confuses.

No orphans: every child gets ``PR_SET_PDEATHSIG`` and its own process group (see
:mod:`tokenwire.procs`), so even a SIGKILL of this supervisor takes the children down, and
a terminal's Ctrl-C reaches only the supervisor, which stops the rest in order.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

import orjson
from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from tokenwire.childlog import ChildLog
from tokenwire.natsserver import NatsServer, NatsServerError, free_port
from tokenwire.procs import spawn, stop_process

__all__ = ["DEFAULT_DATA_DIR", "READY_PHRASE", "run_dev"]

DEFAULT_DATA_DIR = Path(".tokenwire")
#: Printed once everything answers; tests and the README look for it.
READY_PHRASE = "tokenwire is ready:"
SIMULATOR_API_KEY = "app-simulator"
STOP_GRACE_S = 10.0
READY_TIMEOUT_S = 30.0
# `tokenwire jobs` and other clients default to this port, so dev takes it when it is free.
PREFERRED_NATS_PORT = 4222
_POLL_S = 0.1
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_dev(
    host: str,
    port: int,
    data_dir: Path = DEFAULT_DATA_DIR,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> int:
    """Run the whole stack until a stop signal (exit code 0) or a child's death (non-zero)."""
    console = Console(highlight=False, soft_wrap=True)
    supervisor = _Supervisor(host, port, Path(data_dir).absolute(), console, ready_timeout_s)
    with _handle_stop_signals(supervisor.request_stop):
        try:
            return supervisor.run()
        finally:
            supervisor.shutdown()


@dataclass(slots=True)
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: ChildLog


class _Supervisor:
    def __init__(
        self, host: str, port: int, data_dir: Path, console: Console, ready_timeout_s: float
    ) -> None:
        self.ready_timeout_s = ready_timeout_s
        self.host = host
        self.port = port
        self.data_dir = data_dir
        self.console = console
        self.stopping = threading.Event()
        # A second stop signal skips the grace periods.
        self.hurry = False
        self.nats: NatsServer | None = None
        self.children: list[_Child] = []
        self._lock: IO[bytes] | None = None

    def request_stop(self) -> None:
        if self.stopping.is_set():
            self.hurry = True
        self.stopping.set()

    # --- startup -----------------------------------------------------------------------

    def run(self) -> int:
        if not self._take_lock():
            return 1
        # Checked first: otherwise another program on the port would answer our readiness
        # probe, and "ready" would be a lie.
        if not _port_free(self.port, _connect_host(self.host)):
            self.console.print(
                f"[bold red]port {self.port} on {self.host} is already in use[/]; stop what "
                "uses it or pick another with --port"
            )
            return 1
        try:
            self.nats = self._start_nats()
        except NatsServerError as exc:
            self.console.print(f"[bold red]could not start nats-server:[/] {exc.message}")
            return 1
        if self.stopping.is_set():
            return 0
        self.console.print(f"NATS with JetStream at {self.nats.url}, data in {self.nats.store_dir}")
        if self.nats.port != PREFERRED_NATS_PORT:
            self.console.print(
                f"(port {PREFERRED_NATS_PORT} was taken; for `tokenwire jobs` in another "
                f"terminal: export TOKENWIRE_NATS_URL={self.nats.url})"
            )

        env = self._child_env(self.nats.url)
        python = [sys.executable, "-m", "tokenwire"]
        simulator_port: int | None = None
        if not os.environ.get("DIFY_API_KEY"):
            simulator_port = free_port()
            env["DIFY_API_URL"] = f"http://127.0.0.1:{simulator_port}/v1"
            env["DIFY_API_KEY"] = SIMULATOR_API_KEY
            # One app of every kind, by name, unless the user named apps of their own.
            env.setdefault("TOKENWIRE_DIFY_APPS", orjson.dumps(demo_apps()).decode())
            self._print_simulator_banner()
            self._spawn(
                "simulator",
                [
                    *python,
                    "simulate-dify",
                    *("--host", "127.0.0.1", "--port", str(simulator_port), "--apps", "demo"),
                ],
                env,
            )
        worker_port = free_port()
        self._spawn(
            "worker",
            [*python, "worker", "--metrics-port", str(worker_port), "--host", "127.0.0.1"],
            env,
        )
        # Only workers hold Dify's keys, in dev as in production.
        gateway_env = {k: v for k, v in env.items() if not _dify_secret(k)}
        self._spawn(
            "gateway",
            [*python, "gateway", "--host", self.host, "--port", str(self.port)],
            gateway_env,
        )

        deadline = time.monotonic() + self.ready_timeout_s
        if simulator_port is not None:
            ready = self._wait_for("simulator", lambda: _tcp_open(simulator_port), deadline)
            if ready is not None:
                return ready
        worker = _WorkerProbe(worker_port, env.get("DIFY_API_URL"))
        ready = self._wait_for("worker", worker, deadline)
        if ready is not None:
            return ready
        ready = self._wait_for("gateway", self._gateway_ready, deadline)
        if ready is not None:
            return ready

        url = f"http://{_host_in_url(self.host)}:{self.port}/"
        self.console.print(Text(f"{READY_PHRASE} {url}", style="bold green"), soft_wrap=True)
        self.console.print("Press Ctrl-C to stop.")
        sys.stdout.flush()
        return self._watch()

    def _take_lock(self) -> bool:
        """Refuse a second ``tokenwire dev`` on the same data: two JetStreams would corrupt it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lock = (self.data_dir / "dev.lock").open("wb")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            self.console.print(
                f"[bold red]another tokenwire dev is running on {self.data_dir}[/]; stop it "
                "or run this one from another folder"
            )
            return False
        self._lock = lock
        return True

    def _start_nats(self) -> NatsServer:
        store = self.data_dir / "nats"
        if _port_free(PREFERRED_NATS_PORT):
            try:
                return NatsServer(
                    store, port=PREFERRED_NATS_PORT, server_name="tokenwire-dev"
                ).start()
            except NatsServerError as exc:
                if "address already in use" not in str(exc):
                    raise
                # Someone took 4222 between the check and the bind: any port will do.
        return NatsServer(store, server_name="tokenwire-dev").start()

    def _child_env(self, nats_url: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            TOKENWIRE_NATS_URL=nats_url,
            TOKENWIRE_AUTH="none",
            TOKENWIRE_ALLOW_INSECURE="1",
            TOKENWIRE_STREAM_REPLICAS="1",
            # One machine, no load balancer to wait for: Ctrl-C stops the gateway at once.
            TOKENWIRE_DRAIN_DELAY_S="0",
        )
        # The contract's dev default: the page's own origin (both loopback spellings).
        env.setdefault("TOKENWIRE_ALLOWED_ORIGINS", ",".join(_own_origins(self.host, self.port)))
        # Children's logs should reach the terminal (or a test's pipe) as they happen.
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = ChildLog(self.data_dir / "logs" / f"{name}.log", _terminal())
        proc = spawn(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        log.follow(proc.stdout)
        self.children.append(_Child(name, proc, log))

    def _print_simulator_banner(self) -> None:
        body = Text.assemble(
            ("DIFY_API_KEY is not set, so answers come from the bundled ", ""),
            ("Dify simulator", "bold"),
            (", NOT from a real Dify.\n", "bold"),
            (f"Demo apps for a frame's app: {', '.join(sorted(demo_apps()))}.\n\n", ""),
            ("To use a real Dify, stop this and run it again with\n", ""),
            ("  DIFY_API_URL=https://api.dify.ai/v1  (or your Dify's /v1)\n", "bold"),
            ("  DIFY_API_KEY=app-...                  (the app's API key)", "bold"),
        )
        panel = Panel(
            body,
            title="Dify simulator",
            border_style="bold yellow",
            style="yellow",
            box=box.HEAVY,
            expand=False,
        )
        self.console.print(panel, soft_wrap=False)

    def _gateway_ready(self) -> bool:
        return _http_status(_connect_host(self.host), self.port, "/readyz") == 200

    def _wait_for(self, what: str, probe: Callable[[], bool], deadline: float) -> int | None:
        """Poll ``probe`` until true (None); else the exit code ``run`` should return.

        A probe may say why it is not ready (``probe.why``), and that the wait is hopeless
        (``probe.fatal``: Dify refused the key, say); both end up in the one line printed."""
        while True:
            if self.stopping.is_set():
                return 0
            if self._dead_child(starting=True) is not None:
                return 1
            if probe():
                return None
            why: str | None = getattr(probe, "why", None)
            fatal = bool(getattr(probe, "fatal", False))
            if fatal or time.monotonic() > deadline:
                reason = f" ({why})" if why else ""
                when = "" if fatal else f" after {self.ready_timeout_s:g} s"
                self._say_failure(
                    f"{what} was not ready{when}{reason}{self._log_hint(what)}; stopping"
                )
                return 1
            self.stopping.wait(_POLL_S)

    def _log_hint(self, name: str) -> str:
        for child in self.children:
            if child.name == name:
                return f" (full log: {child.log.path})"
        return ""

    def _say_failure(self, line: str) -> None:
        # One line, never wrapped: people grep it and tests read it.
        self.console.print(Text(line, style="bold red"), soft_wrap=True)

    # --- running -----------------------------------------------------------------------

    def _watch(self) -> int:
        while not self.stopping.wait(_POLL_S):
            if self._dead_child() is not None:
                return 1
        return 0

    def _dead_child(self, *, starting: bool = False) -> str | None:
        """The name of a child that exited (after saying so, with its cause), if any."""
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                self._report_death(child, code, starting=starting)
                return child.name
        if self.nats is not None and not self.nats.running:
            code = self.nats.returncode
            self.console.print(self.nats.last_log_lines(10), markup=False)
            self._say_failure(
                f"nats-server {_how_it_ended(code if code is not None else -1)}; "
                "stopping everything"
            )
            return "nats-server"
        return None

    def _report_death(self, child: _Child, code: int, *, starting: bool) -> None:
        when = " while starting" if starting else ""
        self._say_failure(
            f"{child.name} {_how_it_ended(code)}{when}: {child.log.cause()} "
            f"(full log: {child.log.path}); stopping everything"
        )

    # --- shutdown ----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop children newest first; nats-server last. Safe to call more than once."""
        if self.children or (self.nats is not None and self.nats.running):
            self.console.print("stopping tokenwire dev…")
        while self.children:
            child = self.children.pop()
            self._stop_child(child)
        if self.nats is not None:
            self.nats.stop(0.0 if self.hurry else STOP_GRACE_S)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _stop_child(self, child: _Child) -> None:
        proc = child.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            while proc.poll() is None and not self.hurry and time.monotonic() < deadline:
                time.sleep(_POLL_S)
            if proc.poll() is None:
                why = "asked to hurry" if self.hurry else f"{child.name} did not stop in time"
                self.console.print(f"[yellow]{why}; killing {child.name}[/]")
        # Reaps it, SIGKILLs it if still alive, and sweeps its process group.
        stop_process(proc, grace=0.0)
        child.log.close()


class _WorkerProbe:
    """Ready when the worker's ``/readyz`` says so: NATS connected, jobs subscribed, and Dify
    (or the simulator) answering. Remembers why not, for the line dev prints."""

    def __init__(self, port: int, dify_url: str | None) -> None:
        self.port = port
        self.dify_url = dify_url
        self.why: str | None = None
        self.fatal = False

    def __call__(self) -> bool:
        status, body = _http_get("127.0.0.1", self.port, "/readyz")
        if status == 200:
            return True
        try:
            facts = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            facts = {}
        if not isinstance(facts, dict):
            facts = {}
        dify = str(facts.get("dify", ""))
        if dify.startswith(("rejected", "unreachable")):
            where = f" at {self.dify_url}" if self.dify_url else ""
            self.why = f"Dify{where}: {dify}"
            # A refused key or URL does not fix itself; an unreachable Dify may still come up.
            self.fatal = dify.startswith("rejected")
        elif facts:
            self.why = ", ".join(f"{k}: {v}" for k, v in facts.items() if k != "ready")
        else:
            self.why = "its /readyz does not answer yet"
        return False


def _dify_secret(name: str) -> bool:
    """A variable that holds (or points at) Dify's keys: the worker's alone."""
    return name in ("DIFY_API_KEY", "TOKENWIRE_DIFY_API_KEY") or name.startswith(
        "TOKENWIRE_DIFY_APPS"
    )


def demo_apps() -> dict[str, str]:
    """The simulator's demo apps by name (``app-workflow`` is ``workflow``), for a frame's
    ``app``; the default app stays the classic chat, ``app-simulator``."""
    from tokenwire.simulator import DEMO_APPS

    return {key.removeprefix("app-"): key for key in DEMO_APPS if key and key != SIMULATOR_API_KEY}


def _how_it_ended(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _terminal() -> IO[bytes] | None:
    """Where children's output is echoed: this process's stdout, as bytes."""
    return getattr(sys.stdout, "buffer", None)


@contextlib.contextmanager
def _handle_stop_signals(on_stop: Callable[[], None]) -> Iterator[None]:
    """Turn stop signals into a flag, so shutdown runs in order instead of mid-statement."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        on_stop()

    previous = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _connect_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _own_origins(host: str, port: int) -> list[str]:
    if host in ("127.0.0.1", "localhost", "0.0.0.0", "::", "::1", ""):
        return [f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://[::1]:{port}"]
    return [f"http://{_host_in_url(host)}:{port}"]


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As servers bind: a port in TIME_WAIT from a previous run counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _http_status(host: str, port: int, path: str) -> int | None:
    return _http_get(host, port, path)[0]


def _http_get(host: str, port: int, path: str) -> tuple[int | None, bytes]:
    # http.client, not httpx: no proxy variables from the environment apply to loopback.
    conn = http.client.HTTPConnection(host, port, timeout=2.0)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except OSError:
        return None, b""
    finally:
        conn.close()
