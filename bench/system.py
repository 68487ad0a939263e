"""The system under test as real processes: embedded NATS, gateways, workers, the simulator,
and the two baselines, each started as users start them and stopped at the end.

Every child is spawned with :func:`tokenwire.procs.spawn` (own process group, killed with
the benchmark if it dies) and logs to a file in the run's work dir.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tokenwire.natsserver import NatsServer, free_port
from tokenwire.procs import spawn, stop_process

__all__ = ["Proc", "SimSpec", "System", "rss_kib"]

# Generous limits so the queue never hides behind tokenwire's defaults: every stream the
# benchmark opens must be answered at once, not wait for a free worker slot.
BENCH_ENV = {
    "TOKENWIRE_AUTH": "none",
    "TOKENWIRE_ALLOW_INSECURE": "1",
    "DIFY_API_KEY": "app-bench",
    "TOKENWIRE_WORKER_CONCURRENCY": "4000",
    "TOKENWIRE_MAX_INFLIGHT_JOBS": "10000",
    # One benchmark user per connection chats far faster than a person: lift the per-user
    # chat rate and the per-gateway connection cap (the checks themselves still run).
    "TOKENWIRE_RATE_PER_USER": "1000/s",
    "TOKENWIRE_RATE_BURST": "1000",
    "TOKENWIRE_MAX_CONNECTIONS": "30000",
    "PYTHONUNBUFFERED": "1",
}


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` (VmRSS from /proc), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    health_url: str
    port: int = 0
    popen: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 45.0) -> Proc:
        with self.log_path.open("ab") as log:
            self.popen = spawn(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n{self.tail()}")
            try:
                if httpx.get(self.health_url, timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f}s:\n{self.tail()}")

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def stop(self) -> None:
        if self.popen is not None:
            stop_process(self.popen, grace=5.0)
            self.popen = None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


@dataclass(frozen=True)
class SimSpec:
    """How fast and how long the simulator answers (its server-wide defaults)."""

    token_delay_ms: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return 1000 / self.token_delay_ms if self.token_delay_ms else float("inf")


@dataclass
class System:
    """Processes around one embedded NATS; ``close()`` stops them all, newest first."""

    workdir: Path
    nats: NatsServer | None = None
    sim: Proc | None = None
    sim_spec: SimSpec | None = None
    sim_port: int = field(default_factory=free_port)
    gateways: list[Proc] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)
    extra: list[Proc] = field(default_factory=list)
    _counter: int = 0

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)

    # --- environment ----------------------------------------------------------------------

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}/v1"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENWIRE_", "DIFY_"))}
        env |= BENCH_ENV
        env["DIFY_API_URL"] = self.sim_url
        if self.nats is not None:
            env["TOKENWIRE_NATS_URL"] = self.nats.url
        return env

    def _proc(
        self, name: str, argv: list[str], health: str, port: int, env: dict[str, str] | None = None
    ) -> Proc:
        self._counter += 1
        return Proc(
            name=name,
            argv=argv,
            env=self.env() | (env or {}),
            log_path=self.workdir / f"{self._counter:02d}-{name}.log",
            health_url=health,
            port=port,
        )

    # --- pieces -----------------------------------------------------------------------------

    def start_nats(self) -> None:
        self.nats = NatsServer(self.workdir / "nats", stop_grace=5.0)
        self.nats.start()

    def start_simulator(self, spec: SimSpec) -> Proc:
        """(Re)start the simulator on its fixed port with ``spec`` as its defaults."""
        if self.sim is not None and self.sim_spec == spec:
            return self.sim
        if self.sim is not None:
            self.sim.stop()
        self.sim_spec = spec
        port = self.sim_port
        self.sim = self._proc(
            "simulator",
            [
                sys.executable, "-m", "tokenwire", "simulate-dify", "--port", str(port),
                "--token-delay-ms", str(spec.token_delay_ms), "--tokens", str(spec.tokens),
            ],
            f"http://127.0.0.1:{port}/_sim/health",
            port,
        ).start()  # fmt: skip
        return self.sim

    def start_worker(self, *variant: str, env: dict[str, str] | None = None) -> Proc:
        """``tokenwire worker``; with ``variant`` args, :mod:`bench.worker_variant` instead;
        ``env``: settings of its own (``TOKENWIRE_COALESCE_MS``)."""
        port = free_port()
        if variant:
            argv = [sys.executable, "-m", "bench.worker_variant", "--metrics-port", str(port),
                    *variant]  # fmt: skip
        else:
            argv = [sys.executable, "-m", "tokenwire", "worker", "--host", "127.0.0.1",
                    "--metrics-port", str(port)]  # fmt: skip
        name = "worker" + ("-" + "-".join(a.strip("-") for a in variant) if variant else "")
        health = f"http://127.0.0.1:{port}/healthz"
        proc = self._proc(name, argv, health, port, env).start()
        self.workers.append(proc)
        return proc

    def start_gateway(self, *variant: str, env: dict[str, str] | None = None) -> Proc:
        """``tokenwire gateway``; with ``variant`` args, :mod:`bench.gateway_variant` instead;
        ``env``: settings of its own (admission caps, for the storm)."""
        port = free_port()
        if variant:
            argv = [sys.executable, "-m", "bench.gateway_variant", "--port", str(port), *variant]
        else:
            argv = [sys.executable, "-m", "tokenwire", "gateway", "--host", "127.0.0.1",
                    "--port", str(port)]  # fmt: skip
        name = "gateway" + ("-" + "-".join(a.strip("-") for a in variant) if variant else "")
        proc = self._proc(name, argv, f"http://127.0.0.1:{port}/readyz", port, env).start()
        self.gateways.append(proc)
        return proc

    def start_bare(self, spec: SimSpec, *extra: str) -> Proc:
        port = free_port()
        proc = self._proc(
            "bare-ws" + ("-variant" if extra else ""),
            [sys.executable, "-m", "bench.baselines.bare_ws", "--port", str(port),
             "--token-delay-ms", str(spec.token_delay_ms), "--tokens", str(spec.tokens),
             *extra],
            f"http://127.0.0.1:{port}/healthz",
            port,
        ).start()  # fmt: skip
        self.extra.append(proc)
        return proc

    def start_tutorial(self) -> Proc:
        port = free_port()
        proc = self._proc(
            "tutorial-bridge",
            [sys.executable, "-m", "bench.baselines.tutorial_bridge", "--port", str(port),
             "--dify-url", self.sim_url],
            f"http://127.0.0.1:{port}/healthz",
            port,
        ).start()  # fmt: skip
        self.extra.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        for group in (self.gateways, self.workers, self.extra):
            if proc in group:
                group.remove(proc)

    def scale(self, gateways: int, workers: int) -> None:
        """Exactly this many default gateways and workers (variants are stopped)."""
        for gw in list(self.gateways):
            if "-" in gw.name or len(self.gateways) > gateways:
                self.stop(gw)
        for wk in list(self.workers):
            if "-" in wk.name:
                self.stop(wk)
        while len(self.workers) > workers:
            self.stop(self.workers[-1])
        while len(self.workers) < workers:
            self.start_worker()
        while len(self.gateways) < gateways:
            self.start_gateway()

    def close(self) -> None:
        for proc in [*reversed(self.extra), *reversed(self.gateways), *reversed(self.workers)]:
            proc.stop()
        self.extra.clear()
        self.gateways.clear()
        self.workers.clear()
        if self.sim is not None:
            self.sim.stop()
            self.sim = None
        if self.nats is not None:
            self.nats.stop()
            self.nats = None

    def logs(self) -> str:
        procs = [p for p in [self.sim, *self.workers, *self.gateways, *self.extra] if p]
        return "\n".join(f"===== {p.name}\n{p.tail()}" for p in procs)
