"""N copies of one process, kept running: ``tokenwire gateway --workers N`` and
``tokenwire worker --processes N`` (docs/operations.md, "Every core of a pod").

How this works. The core, :class:`RestartPolicy`, does no I/O: told that the child in slot
``i`` exited with ``code`` at time ``now``, it answers :class:`Restart` (after a delay that
grows while the child keeps dying) or :class:`GiveUp` (it died too often, or it refused its
configuration, exit code 2, which no restart mends). The shell, :class:`Supervisor`, spawns
the children (:func:`tokenwire.procs.spawn`: each in its own process group, killed with us),
polls them, does what the policy says and logs each death with its cause, and turns SIGTERM
and SIGINT into a stop: the signal goes to every child, which drains as one process does,
nothing is restarted any more, and :meth:`Supervisor.run` returns once every child is gone.

Each child is a whole ``tokenwire`` process started afresh (not forked from us), so each
builds its own identity: its NATS connection, its connection ids or worker id, its lease
owner. Nothing is shared but what the parent hands over on purpose: a listening socket (the
gateway) and the directory where prometheus-client's multiprocess mode keeps every child's
metric values (:func:`metrics_dir`), so that ``/metrics`` sums the children.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import multiprocess

from tokenwire.procs import kill_process, spawn

__all__ = [
    "CONFIG_EXIT",
    "GiveUp",
    "Restart",
    "RestartPolicy",
    "Supervisor",
    "describe_exit",
    "listen",
    "metrics_dir",
]

log = logging.getLogger("tokenwire.supervisor")

#: What ``tokenwire gateway`` and ``tokenwire worker`` exit with when they refuse their
#: configuration: restarting them would only refuse again.
CONFIG_EXIT = 2


@dataclass(frozen=True, slots=True)
class Restart:
    """Start the slot's child again after ``delay_s`` seconds."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop every child: ``reason`` in words, and what the whole command exits with."""

    reason: str
    exit_code: int


def describe_exit(code: int) -> str:
    """A child's exit status in words: ``exit code 1``, ``killed by SIGKILL``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class RestartPolicy:
    """Restart a dead child, a little later each time it dies again soon; give up on a child
    that died ``max_exits`` times within ``window_s`` seconds, or refused to start."""

    max_exits: int = 5
    window_s: float = 60.0
    base_delay_s: float = 0.5
    max_delay_s: float = 10.0
    _exits: dict[int, deque[float]] = field(default_factory=dict)

    def on_exit(self, name: str, code: int, now: float, slot: int = 0) -> Restart | GiveUp:
        if code == CONFIG_EXIT:
            return GiveUp(f"{name} refused to start ({describe_exit(code)})", CONFIG_EXIT)
        exits = self._exits.setdefault(slot, deque())
        exits.append(now)
        while exits and now - exits[0] > self.window_s:
            exits.popleft()
        if len(exits) >= self.max_exits:
            return GiveUp(
                f"{name} keeps dying: {len(exits)} exits within {self.window_s:g} s, "
                f"the last with {describe_exit(code)}",
                1,
            )
        if len(exits) == 1:
            return Restart(0.0)
        return Restart(min(self.base_delay_s * 2 ** (len(exits) - 2), self.max_delay_s))


@dataclass
class _Child:
    slot: int
    popen: subprocess.Popen[bytes] | None = None
    restart_at: float | None = None
    last_code: int | None = None


class Supervisor:
    """Runs ``count`` children, ``argv(slot)`` each, until a signal or the policy stops them.

    ``stop_grace_s`` bounds a stop: whatever still runs that long after the first signal is
    killed (SIGKILL). Spawn from the event loop's thread, which lives as long as the children
    (see tokenwire/procs.py on the death signal).
    """

    def __init__(
        self,
        kind: str,
        count: int,
        argv: Callable[[int], Sequence[str]],
        *,
        env: Mapping[str, str],
        stop_grace_s: float,
        pass_fds: Sequence[int] = (),
        metrics: Path | None = None,
        policy: RestartPolicy | None = None,
        poll_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kind = kind
        self.children = [_Child(slot) for slot in range(count)]
        self._argv = argv
        self._env = dict(env)
        self._pass_fds = tuple(pass_fds)
        self._metrics = metrics
        self._policy = policy or RestartPolicy()
        self._stop_grace_s = stop_grace_s
        self._poll_s = poll_s
        self._clock = clock
        self._signals: list[signal.Signals] = []  # asked for, in order
        self._sent = 0  # of those, forwarded to the children
        self._stop_deadline: float | None = None
        self._give_up: GiveUp | None = None
        self._wake = asyncio.Event()

    @property
    def stopping(self) -> bool:
        return bool(self._signals)

    def running(self, slot: int) -> bool:
        """Whether the slot's child is started and not yet seen to exit."""
        popen = self.children[slot].popen
        return popen is not None and popen.returncode is None

    def request_stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop every child with ``sig`` (a second call sends its signal again: uvicorn then
        stops at once). Safe from a signal handler: it only records the wish."""
        self._signals.append(sig)
        self._wake.set()

    def _name(self, child: _Child) -> str:
        pid = f" (pid {child.popen.pid})" if child.popen is not None else ""
        return f"{self.kind} process {child.slot}{pid}"

    def _start(self, child: _Child) -> None:
        child.restart_at = None
        child.popen = spawn(
            self._argv(child.slot),
            env=self._env,
            pass_fds=self._pass_fds,
            # SIGKILL: a parent that died without stopping them left nobody to drain for.
            death_signal=signal.SIGKILL,
        )
        log.info(f"{self._name(child)} started", extra={"slot": child.slot})

    def _exited(self, child: _Child, code: int, now: float) -> None:
        assert child.popen is not None
        name, pid = self._name(child), child.popen.pid
        child.popen = None
        child.last_code = code
        if self._metrics is not None:
            # Its live gauges (connections open, streams running) no longer count.
            multiprocess.mark_process_dead(pid, str(self._metrics))  # type: ignore[no-untyped-call]
        if self.stopping:
            log.info(f"{name} exited: {describe_exit(code)}", extra={"slot": child.slot})
            return
        decision = self._policy.on_exit(name, code, now, child.slot)
        if isinstance(decision, GiveUp):
            log.error(f"{decision.reason}; stopping every {self.kind} process")
            self._give_up = decision
            self.request_stop(signal.SIGTERM)
            return
        log.warning(
            f"{name} died: {describe_exit(code)}; restarting it in {decision.delay_s:g} s",
            extra={"slot": child.slot, "exit": code},
        )
        child.restart_at = now + decision.delay_s

    def _forward_signals(self, now: float) -> None:
        while self._sent < len(self._signals):
            sig = self._signals[self._sent]
            self._sent += 1
            if self._stop_deadline is None:
                self._stop_deadline = now + self._stop_grace_s
            for child in self.children:
                child.restart_at = None
                if child.popen is not None and child.popen.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.popen.send_signal(sig)

    def _tick(self) -> bool:
        """One look at every child; False once a stop has ended them all."""
        now = self._clock()
        for child in self.children:
            if child.popen is not None:
                code = child.popen.poll()
                if code is not None:
                    self._exited(child, code, now)
            elif child.restart_at is not None and now >= child.restart_at and not self.stopping:
                self._start(child)
        self._forward_signals(now)
        if not self.stopping:
            return True
        left = [c for c in self.children if c.popen is not None]
        if left and self._stop_deadline is not None and now >= self._stop_deadline:
            for child in left:
                log.warning(f"{self._name(child)} did not stop in {self._stop_grace_s:g} s: killed")
                assert child.popen is not None
                kill_process(child.popen)
        return bool(left)

    def exit_code(self) -> int:
        """0 when every child ended as asked; the policy's code when it gave up; else 1."""
        if self._give_up is not None:
            return self._give_up.exit_code
        asked = {0} | {-int(s) for s in self._signals}
        return 0 if all(c.last_code in asked for c in self.children) else 1

    async def run(self) -> int:
        """Start every child, keep them running, and return :meth:`exit_code` after a stop."""
        loop = asyncio.get_running_loop()
        handled = (signal.SIGTERM, signal.SIGINT)
        for sig in handled:
            loop.add_signal_handler(sig, self.request_stop, sig)
        try:
            for child in self.children:
                self._start(child)
            while self._tick():
                # A signal wakes the loop at once; a child's exit is seen within poll_s.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll_s)
                self._wake.clear()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            for child in self.children:  # cancelled: leave nothing behind
                if child.popen is not None:
                    kill_process(child.popen)
        return self.exit_code()


def listen(host: str, port: int, *, send_buffer_bytes: int = 0) -> socket.socket:
    """A listening TCP socket for uvicorn (``sockets=[...]``) or for children to inherit.

    Accepted connections inherit the listener's send buffer: ``send_buffer_bytes`` bounds
    what the kernel holds for a client that stops reading (autotuned, it grows to megabytes).
    """
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if send_buffer_bytes:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
        listener.bind((host, port))
        listener.listen(2048)  # uvicorn's default backlog
    except OSError:
        listener.close()
        raise
    return listener


@contextlib.contextmanager
def metrics_dir() -> Iterator[Path]:
    """A fresh, private ``PROMETHEUS_MULTIPROC_DIR`` for one supervisor's children, removed
    after (prometheus-client asks for an empty one at every start)."""
    path = Path(tempfile.mkdtemp(prefix="tokenwire-metrics-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
