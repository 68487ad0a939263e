"""``tokenwire chat`` in a pseudo-terminal against a real gateway: what a person at a terminal
sees. The answer must appear token by token (many redraws before the last word shows), the
commands must work, and a gateway killed mid-answer must not cost a word."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.stack import Stack
from tokenwire.simulator import answer_tokens, expected_final_answer

pytestmark = pytest.mark.integration

COLS, ROWS = 200, 60
_ANSI = re.compile(
    r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]"
)


def screen_text(raw: bytes) -> str:
    """What the terminal shows, as text: escape sequences and carriage returns removed."""
    return _ANSI.sub("", raw.decode("utf-8", errors="replace")).replace("\r", "")


def squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


def rendered(markdown: str) -> str:
    """The simulator answer as rich shows it, without whitespace: no ``**``, bullets as •."""
    return squeeze(markdown.replace("**", "").replace("\n- ", "\n• "))


class Terminal:
    """``tokenwire chat`` on a pseudo-terminal; everything it writes is kept."""

    def __init__(self, url: str, user: str) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENWIRE_", "DIFY_"))}
        env |= {"TERM": "xterm-256color", "PYTHONUNBUFFERED": "1", "COLUMNS": str(COLS)}
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenwire", "chat", url, "--user", user],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.master = master
        self.output = bytearray()
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            with self.lock:
                self.output += chunk

    def text(self, start: int = 0) -> str:
        with self.lock:
            return screen_text(bytes(self.output[start:]))

    def mark(self) -> int:
        with self.lock:
            return len(self.output)

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def expect(self, pattern: str, start: int = 0, timeout: float = 45.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text(start)
            if re.search(pattern, text):
                return text
            if self.proc.poll() is not None:
                time.sleep(0.2)
                break
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} never appeared; the screen:\n{self.text(start)[-3000:]}")

    def close(self) -> int | None:
        with contextlib.suppress(OSError):
            self.type("/quit")
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(5)
        finally:
            with contextlib.suppress(OSError):
                os.close(self.master)


@pytest.fixture
def terminal(spine: Stack, request: pytest.FixtureRequest) -> Iterator[Terminal]:
    term = Terminal(f"http://127.0.0.1:{spine.gateway_ports[0]}/", f"tty-{request.node.name}")
    try:
        term.expect(r"connected to ws://127\.0\.0\.1:\d+/v1/ws as tty-")
        term.expect("› ")
        yield term
    finally:
        code = term.close()
        assert code == 0, f"tokenwire chat exited with {code}:\n{term.text()[-2000:]}"


def sim_requests(spine: Stack) -> list[dict[str, object]]:
    """The chat requests Dify (the simulator) received."""
    response = httpx.get(spine.sim_url.removesuffix("/v1") + "/_sim/requests")
    result: list[dict[str, object]] = response.json()
    return result


def conversation(spine: Stack, conversation_id: str, user: str) -> list[dict[str, object]]:
    """A conversation's messages, oldest first, from Dify's own history API."""
    response = httpx.get(
        spine.sim_url + "/messages",
        params={"conversation_id": conversation_id, "user": user},
        headers={"Authorization": "Bearer app-test-key"},
    )
    response.raise_for_status()
    result: list[dict[str, object]] = response.json()["data"]
    return result


def test_answer_streams_token_by_token(terminal: Terminal) -> None:
    query = "/slow what does a terminal see?"
    tokens = answer_tokens(query, 40)
    first_words = "".join(tokens[:3]).strip()
    last_words = "".join(tokens[-3:]).strip()
    start = terminal.mark()
    terminal.type(query)
    screen = terminal.expect("✓ done", start)

    before_end = screen[: screen.index(last_words)]
    redraws = before_end.count(first_words)
    assert redraws >= 10, f"the answer was drawn {redraws} times before its end: not streamed"
    # Partial answers were on screen: a redraw that holds the start but not yet the end.
    partial = before_end[before_end.index(first_words) :]
    assert squeeze(first_words) in squeeze(partial)
    final = screen[screen.rindex(first_words) : screen.index("✓ done")]
    assert rendered(expected_final_answer(query)) in squeeze(final)


def test_stop_new_and_multiline(terminal: Terminal, spine: Stack) -> None:
    # A multi-line message: a line ending with \ continues.
    start = terminal.mark()
    terminal.type("first line \\")
    terminal.expect("… ", start)
    terminal.type("second line")
    screen = terminal.expect("✓ done", start)
    assert rendered(expected_final_answer("first line \nsecond line")) in squeeze(screen)

    # The conversation continues, until /new.
    start = terminal.mark()
    terminal.type("next turn")
    terminal.expect("✓ done", start)
    terminal.type("/new")
    terminal.expect("new conversation", start)
    start = terminal.mark()
    terminal.type("fresh turn")
    terminal.expect("✓ done", start)
    asked = {str(r["query"]): r for r in sim_requests(spine)}
    assert not asked["first line \nsecond line"]["conversation_id"]
    continued = str(asked["next turn"]["conversation_id"])
    history = [m["query"] for m in conversation(spine, continued, str(asked["next turn"]["user"]))]
    assert history == ["first line \nsecond line", "next turn"]
    assert not asked["fresh turn"]["conversation_id"], "/new starts a new conversation"

    # /stop while an answer streams.
    query = "/slow stop this one"
    tokens = answer_tokens(query, 40)
    start = terminal.mark()
    terminal.type(query)
    terminal.expect(re.escape("".join(tokens[:2]).strip()), start)
    terminal.type("/stop")
    screen = terminal.expect("■ stopped", start)
    assert squeeze("".join(tokens[-4:])) not in squeeze(screen)


def test_gateway_restart_mid_answer_shows_reconnecting_and_completes(
    terminal: Terminal, spine: Stack
) -> None:
    """Last in the module: it replaces the module's gateway."""
    query = "/slow keep streaming through a restart"
    tokens = answer_tokens(query, 40)
    port = spine.gateway_ports[0]
    old = next(p for p in spine.procs if p.name == "gateway" and p.alive)
    start = terminal.mark()
    terminal.type(query)
    terminal.expect(re.escape("".join(tokens[:2]).strip()), start)
    old.signal(signal.SIGKILL)
    terminal.expect("reconnecting", start)
    spine.gateway("gateway-tty", port)
    screen = terminal.expect("✓ done", start)
    final = screen[screen.rindex("".join(tokens[:3]).strip()) : screen.index("✓ done")]
    assert rendered(expected_final_answer(query)) in squeeze(final)
