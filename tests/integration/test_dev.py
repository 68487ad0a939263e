"""``tokenwire dev`` end to end: it comes up, says it uses the simulator, and Ctrl-C leaves
nothing behind.

Runs the real command as a user would (``python -m tokenwire dev``) in an empty folder with
no ``DIFY_API_KEY``, so it starts nats-server, the Dify simulator, a worker and a gateway.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.install.installs import Output
from tokenwire.dev import READY_PHRASE
from tokenwire.natsserver import free_port

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 45.0


@dataclass(frozen=True, slots=True)
class ProcInfo:
    pid: int
    ppid: int
    state: str
    start_time: int  # clock ticks since boot: tells a reused pid from the original


def _stat(pid: int) -> ProcInfo | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return ProcInfo(pid=pid, ppid=int(fields[1]), state=fields[0], start_time=int(fields[19]))


def _all_procs() -> Iterator[ProcInfo]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = _stat(int(entry.name))
            if info is not None:
                yield info


def descendants(root: int) -> list[ProcInfo]:
    """Every live process below ``root`` (children, grandchildren …)."""
    procs = list(_all_procs())
    found: list[ProcInfo] = []
    parents = {root}
    while True:
        layer = [p for p in procs if p.ppid in parents and p not in found]
        if not layer:
            return found
        found += layer
        parents = {p.pid for p in layer}


def is_alive(info: ProcInfo) -> bool:
    now = _stat(info.pid)
    return now is not None and now.start_time == info.start_time and now.state not in "ZX"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def http_status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def dev_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DIFY_", "TOKENWIRE_")) and k != "PYTEST_CURRENT_TEST"
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_dev_starts_everything_and_ctrl_c_stops_it_all(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenwire", "dev", "--port", str(port)],
        cwd=tmp_path,
        env=dev_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output = Output(proc)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not output.ready.wait(0.2):
            assert proc.poll() is None, f"dev exited with {proc.returncode}:\n{output.text}"
            assert time.monotonic() < deadline, f"dev was not ready in time:\n{output.text}"

        text = output.text
        assert f"{READY_PHRASE} http://127.0.0.1:{port}/" in text
        # Loud about not talking to a real Dify, and about how to change that.
        assert "Dify simulator" in text
        assert "DIFY_API_KEY" in text
        assert "DIFY_API_URL" in text

        assert http_status(port, "/healthz") == 200
        assert http_status(port, "/readyz") == 200
        assert (tmp_path / ".tokenwire" / "nats").is_dir()

        children = descendants(proc.pid)
        commands = " | ".join(cmdline(c.pid) for c in children)
        for part in ("nats-server", "simulate-dify", "worker", "gateway"):
            assert part in commands, f"no {part} among dev's children: {commands}"
        # Dify's keys reach the worker only, in dev as in production.
        (gateway,) = [c for c in children if " gateway " in cmdline(c.pid) + " "]
        (worker,) = [c for c in children if " worker " in cmdline(c.pid) + " "]
        gateway_env = Path(f"/proc/{gateway.pid}/environ").read_bytes().split(b"\0")
        worker_env = Path(f"/proc/{worker.pid}/environ").read_bytes().split(b"\0")
        assert not [
            v for v in gateway_env if v.startswith((b"DIFY_API_KEY=", b"TOKENWIRE_DIFY_APPS"))
        ]
        assert any(v.startswith(b"DIFY_API_KEY=") for v in worker_env)

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=EXIT_TIMEOUT_S) == 0, output.text
        time.sleep(0.2)  # let the kernel finish tearing down killed groups
        left = [f"{c.pid}: {cmdline(c.pid)}" for c in children if is_alive(c)]
        assert not left, f"processes outlived tokenwire dev: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()  # its children die with it (PR_SET_PDEATHSIG)
            proc.wait()
        output.close()
