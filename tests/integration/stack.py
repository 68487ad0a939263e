"""Real processes for integration tests: simulator, workers and gateways, as users run them.

Each is started with the ``tokenwire`` command in its own process (``python -m tokenwire``),
logs to a file in the test's tmp dir, and is stopped (or killed, for chaos) by the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tokenwire.natsserver import NatsServer, free_port
from tokenwire.procs import kill_process, spawn, stop_process

__all__ = ["Proc", "Stack", "running_stack"]


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    health_url: str | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Proc:
        log = self.log_path.open("ab")
        self.popen = spawn(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if self.health_url:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}"
                )
            try:
                if httpx.get(self.health_url or "", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not healthy after {timeout}s:\n{self.tail()}")

    def stop(self, grace: float = 10.0) -> int | None:
        return stop_process(self.popen, grace=grace) if self.popen else None

    def kill(self) -> int | None:
        return kill_process(self.popen) if self.popen else None

    def signal(self, sig: signal.Signals) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class Stack:
    """Processes around one NATS URL; ``sim_url`` is the simulator's base URL (``…/v1``)."""

    nats_url: str
    workdir: Path
    env_extra: Mapping[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    sim_port: int = 0
    gateway_ports: list[int] = field(default_factory=list)

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENWIRE_", "DIFY_"))}
        env |= {
            "TOKENWIRE_NATS_URL": self.nats_url,
            "TOKENWIRE_AUTH": "none",
            "TOKENWIRE_ALLOW_INSECURE": "1",
            "DIFY_API_URL": self.sim_url,
            "DIFY_API_KEY": "app-test-key",
            "PYTHONUNBUFFERED": "1",
        }
        env |= dict(self.env_extra)
        env |= extra
        return env

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}/v1"

    def _proc(self, name: str, args: list[str], health: str | None, **env: str) -> Proc:
        proc = Proc(
            name=name,
            argv=[sys.executable, "-m", "tokenwire", *args],
            env=self._env(**env),
            log_path=self.workdir / f"{name}.log",
            health_url=health,
        )
        self.procs.append(proc)
        return proc

    def simulator(self, *extra: str, port: int | None = None) -> Proc:
        self.sim_port = port or self.sim_port or free_port()
        return self._proc(
            "simulator",
            ["simulate-dify", "--port", str(self.sim_port), "--token-delay-ms", "2", *extra],
            f"http://127.0.0.1:{self.sim_port}/_sim/health",
        ).start()

    def worker(self, name: str = "worker", **env: str) -> Proc:
        port = free_port()
        return self._proc(
            name,
            ["worker", "--metrics-port", str(port), "--host", "127.0.0.1"],
            f"http://127.0.0.1:{port}/healthz",
            **env,
        ).start()

    def gateway(self, name: str = "gateway", port: int | None = None, **env: str) -> Proc:
        port = port or free_port()
        self.gateway_ports.append(port)
        proc = self._proc(
            name,
            ["gateway", "--host", "127.0.0.1", "--port", str(port)],
            f"http://127.0.0.1:{port}/readyz",
            **env,
        )
        proc.port = port  # type: ignore[attr-defined]
        return proc.start()

    def ws_url(self, gateway_port: int | None = None, user: str | None = None) -> str:
        port = gateway_port or self.gateway_ports[0]
        url = f"ws://127.0.0.1:{port}/v1/ws"
        return f"{url}?user={user}" if user else url

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(grace=5.0)

    def logs(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.tail(60)}" for p in self.procs)


@contextlib.contextmanager
def running_stack(workdir: Path, **worker_env: str) -> Iterator[Stack]:
    """A nats-server of its own, the simulator and one worker (with ``worker_env``); the caller
    adds gateways. On failure the processes' last log lines are printed; everything is stopped
    after."""
    server = NatsServer(workdir / "nats", stop_grace=5.0)
    server.start()
    stack = Stack(nats_url=server.url, workdir=workdir)
    try:
        stack.simulator()
        stack.worker(**worker_env)
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.close()
        server.stop()
