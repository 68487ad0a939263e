"""Installing tokenwire the ways users do, and running what they run, for tests/install/.

Nothing here uses the test venv's tokenwire: each test makes a fresh virtualenv with the
machine's own Python 3.11, installs into it the way the README, a wheel or the Dockerfile
does (no extras), and runs that venv's ``tokenwire`` from a folder outside the clone, with an
environment cleaned of the test run's venv, ``PYTHONPATH`` and tokenwire settings. pip's cache
is reused, so an install costs seconds, not a download.

``TOKENWIRE_INSTALL_SOURCE`` points these tests at another checkout (to show that they fail
on a tree with the defect they guard against).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tokenwire.dev import READY_PHRASE

__all__ = [
    "READY_PHRASE",
    "SOURCE",
    "DevRun",
    "Output",
    "ask",
    "clean_env",
    "copy_tree",
    "install",
    "make_venv",
    "run",
    "system_python",
    "tracked_files",
]

SOURCE = Path(os.environ.get("TOKENWIRE_INSTALL_SOURCE") or Path(__file__).resolve().parents[2])
_TEST_VENV_BIN = str(Path(sys.prefix) / "bin")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no test venv on PATH, no PYTHONPATH, no settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DIFY_", "TOKENWIRE_", "PYTEST_", "COV_"))
        and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")
    }
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and p != _TEST_VENV_BIN
    )
    env["PYTHONUNBUFFERED"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


def system_python() -> str:
    """The machine's ``python3.11`` (what the README's command calls), not the test venv's."""
    found = shutil.which("python3.11", path=clean_env()["PATH"])
    return found or getattr(sys, "_base_executable", sys.executable)


def run(
    argv: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end; a failure shows everything it printed."""
    done = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=env if env is not None else clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, (
        f"{' '.join(map(str, argv))} exited with {done.returncode}\n"
        f"--- stdout\n{done.stdout[-6000:]}\n--- stderr\n{done.stderr[-6000:]}"
    )
    return done


def make_venv(path: Path) -> Path:
    """A fresh virtualenv made by the machine's Python; returns its bin/ folder."""
    run([system_python(), "-m", "venv", path], cwd=path.parent)
    return path / "bin"


def install(bin_dir: Path, *what: str | Path, cwd: Path) -> None:
    """``pip install`` into that venv, quietly, from pip's cache where it can."""
    run([bin_dir / "python", "-m", "pip", "install", "-q", *what], cwd=cwd)


def tracked_files(root: Path = SOURCE) -> list[str]:
    """The files of a fresh clone of ``root``: tracked ones, plus new ones not yet committed
    (so a change is tested before its commit), never ignored ones such as .venv/."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (root / name).is_file()]


def copy_tree(files: list[str], dest: Path, root: Path = SOURCE) -> Path:
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    return dest


class Output:
    """Collects a child's merged stdout/stderr on a thread, so its pipe never fills up."""

    def __init__(self, proc: subprocess.Popen[bytes], ready_phrase: str = READY_PHRASE) -> None:
        assert proc.stdout is not None
        self._stream = proc.stdout
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._phrase = ready_phrase
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for raw in self._stream:
            line = raw.decode("utf-8", "replace")
            with self._lock:
                self._lines.append(line)
            if self._phrase in line:
                self.ready.set()

    @property
    def text(self) -> str:
        with self._lock:
            return "".join(self._lines)

    @property
    def lines(self) -> list[str]:
        with self._lock:
            return [line.rstrip("\n") for line in self._lines]

    def close(self, timeout: float = 5) -> None:
        self._thread.join(timeout)
        self._stream.close()


class DevRun:
    """One ``tokenwire dev`` (or any command that prints the ready phrase), as a user runs it."""

    def __init__(self, argv: list[str | Path], *, cwd: Path, env: dict[str, str]) -> None:
        self.argv = [str(a) for a in argv]
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Its own group, as a terminal would give it: a final killpg takes everything.
            process_group=0,
        )
        self.output = Output(self.proc)

    def wait_ready(self, timeout: float) -> str:
        """The URL that ``tokenwire is ready: URL`` names; fails if the command exits first."""
        deadline = time.monotonic() + timeout
        while not self.output.ready.wait(0.2):
            code = self.proc.poll()
            assert code is None, f"{self.argv} exited with {code}:\n{self.output.text}"
            assert time.monotonic() < deadline, f"not ready in {timeout} s:\n{self.output.text}"
        line = next(line for line in self.output.lines if READY_PHRASE in line)
        return line.split(READY_PHRASE, 1)[1].strip()

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s:\n{self.output.text}") from None

    def stop(self, timeout: float = 45.0) -> int:
        """Ctrl-C, as a user stops it; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.wait_exit(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.output.close()


def ask(
    base_url: str,
    question: str,
    *,
    headers: dict[str, str] | None = None,
    user: str = "installer",
) -> str:
    """Ask ``question`` over ``/v1/ws`` with a real WebSocket client; returns the answer text
    once the request has ended (asserting that it ended with ``end``, seq gapless). Without
    ``headers`` (a bearer token) the user is named in the URL, as with TOKENWIRE_AUTH=none."""
    import asyncio

    from tests.integration.wsclient import Client, answer_of, assert_seq_complete

    ws_url = base_url.replace("http", "ws", 1).rstrip("/") + "/v1/ws"
    if headers is None:
        ws_url += f"?user={user}"

    async def go() -> str:
        async with Client(ws_url, additional_headers=headers or {}) as client:
            rid = await client.chat(question)
            frames = await client.finish(rid, timeout=60)
        assert frames[-1]["type"] == "end", frames[-1]
        assert_seq_complete(frames)
        return answer_of(frames)

    return asyncio.run(go())
