"""Child processes that cannot outlive their parent.

``tokenwire dev`` and the test fixtures start long-running children (nats-server, the
simulator, a worker, a gateway). Two rules keep them from leaking:

* every child asks the kernel for ``PR_SET_PDEATHSIG`` (Linux), so it is killed when the
  process that started it dies, even by SIGKILL, where no ``finally`` runs;
* every child leads its own process group, so a Ctrl-C in the terminal reaches only the
  supervisor (which then stops the children in order), and a final ``killpg`` also takes
  any grandchildren with it.

Caveat from the kernel, not from us: the death signal fires when the *thread* that forked
the child exits, not only the process. Spawn from a thread that lives as long as the child
(the main thread, or the event loop's thread), never from ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["kill_process", "spawn", "stop_process"]

_PR_SET_PDEATHSIG = 1

# Children started by spawn(): each leads a process group named by its pid.
_group_leaders: weakref.WeakSet[subprocess.Popen[bytes]] = weakref.WeakSet()

_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    try:
        # The running program's own symbol table includes libc's prctl on Linux.
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        _prctl = None


def _death_signal_preexec(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child die with ``sig`` when its parent dies."""
    prctl = _prctl
    if prctl is None:  # pragma: no cover - not Linux
        return None
    parent = os.getpid()
    signum = int(sig)

    def preexec() -> None:
        # Runs in the forked child before exec: only async-signal-safe-ish calls here.
        prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        # The parent may have died between fork and prctl; then nobody will signal us.
        if os.getppid() != parent:
            os.kill(os.getpid(), signum)

    return preexec


def spawn(
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
    death_signal: signal.Signals = signal.SIGKILL,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group, tied to this process's life.

    stdin is always ``/dev/null``: the children are services, and a child of a background
    process group that reads the terminal would be stopped by SIGTTIN. ``pass_fds`` stay
    open in the child under the same numbers (a listening socket shared by a supervisor).
    """
    proc = subprocess.Popen(
        [os.fspath(a) for a in argv],
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        process_group=0,
        pass_fds=tuple(pass_fds),
        # The only way to set PR_SET_PDEATHSIG in the child; the hook calls nothing that
        # takes a lock, which is what makes preexec_fn risky with threads.
        preexec_fn=_death_signal_preexec(death_signal),  # noqa: PLW1509
    )
    _group_leaders.add(proc)
    return proc


def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals, *, group: bool) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group and proc in _group_leaders:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


def _sweep_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill what is left of the child's group (grandchildren) once the child is reaped.

    The group id stays reserved while any member lives, so this cannot hit a stranger
    unless the whole group is gone and its number was handed out again as a new group.
    """
    if proc in _group_leaders:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def stop_process(
    proc: subprocess.Popen[bytes],
    *,
    grace: float,
    sig: signal.Signals = signal.SIGTERM,
) -> int:
    """Ask the child to stop with ``sig``; SIGKILL its group after ``grace`` seconds.

    ``sig`` goes to the child alone so it can shut its own helpers down in order; the
    SIGKILL goes to the whole group. Returns the exit code (negative: killed by a signal).
    """
    if proc.poll() is None:
        _signal(proc, sig, group=False)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL, group=True)
            proc.wait()
    _sweep_group(proc)
    return proc.returncode


def kill_process(proc: subprocess.Popen[bytes]) -> int:
    """SIGKILL the child and its group at once (crash simulation), and reap it."""
    _signal(proc, signal.SIGKILL, group=True)
    proc.wait()
    _sweep_group(proc)
    return proc.returncode
