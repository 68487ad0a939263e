"""``tokenwire chat``: a terminal chat over the WebSocket protocol, Markdown rendered live.

How this works: a daemon thread reads stdin lines into an asyncio queue (so the event loop
never blocks on the keyboard). At the prompt, lines are gathered into one message: a line
ending with ``\\`` continues on the next, and lines pasted together (arriving within
``PASTE_GAP_S`` of each other) stay together. While an answer streams, a rich ``Live``
region re-renders the Markdown on every frame with a status line under it (queued,
reconnecting, stopped); lines typed meanwhile are read as commands (``/stop``), and Ctrl-C
stops the answer. The connection (:mod:`tokenwire.client`) reconnects and resumes by itself.
At the prompt, ``/history``, ``/conversations``, ``/open``, ``/like``, ``/dislike`` and
``/upload PATH`` are calls (and an upload) to Dify through the gateway, as this user.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from tokenwire.client import (
    CallError,
    ChatStream,
    Connection,
    ConnectionState,
    RequestStatus,
    StateChange,
)

__all__ = ["HELP", "file_ref", "format_history", "gather_message", "run_chat", "websocket_url"]

PASTE_GAP_S: Final = 0.05
PROMPT: Final = "› "
CONTINUATION: Final = "… "
HELP: Final = (
    "Commands: /new (new conversation), /stop (stop the answer, or Ctrl-C), /quit (or Ctrl-D).\n"
    "/app NAME picks a configured app (/app alone: the default); /run TEXT or /run {json}\n"
    "runs a workflow or completion app; /answer ACTION [TEXT or {json}] answers its form.\n"
    "/conversations lists yours, /open ID continues one, /history shows this one's messages;\n"
    "/like and /dislike rate the last answer; /upload PATH attaches a file to the next message.\n"
    "End a line with \\ to continue on the next line; pasted lines stay together."
)


def websocket_url(url: str) -> str:
    """Accept what a user would paste (``http://host:8000/``) and give the WebSocket URL."""
    if "://" not in url:
        url = f"ws://{url}"
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/v1/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def gather_message(lines: list[str]) -> tuple[str, bool]:
    """Join input lines into one message; True if the last line asks to continue (``\\``)."""
    parts: list[str] = []
    more = False
    for raw in lines:
        line = raw.rstrip("\r\n")
        more = line.endswith("\\")
        parts.append(line[:-1] if more else line)
    return "\n".join(parts), more


@dataclass
class _View:
    """The live region: the answer as Markdown, and a status line under it."""

    conn: Connection
    stream: ChatStream
    note: str = ""

    def __rich__(self) -> RenderableType:
        parts: list[RenderableType] = []
        if self.stream.text:
            parts.append(Markdown(self.stream.text))
        status = self._status()
        if status:
            parts.append(Text(status, style="dim italic"))
        return Group(*parts)

    def _status(self) -> str:
        s, conn = self.stream, self.conn
        if conn.state is ConnectionState.RECONNECTING and not s.finished:
            return f"↻ connection lost: reconnecting (attempt {max(1, conn.attempt)})…"
        if s.status is RequestStatus.QUEUED and s.queued is not None:
            q = s.queued
            return (
                f"⏳ queued ({q.reason}): retrying in {q.retry_in_ms / 1000:.0f} s, "
                f"attempt {q.attempt}"
            )
        if s.finished:
            return ""
        if self.note:
            return self.note
        if s.refusals:
            return f"✗ answer refused: {s.refusals[-1].code}: {s.refusals[-1].message}"
        if s.form is not None:
            return describe_form(s.form)
        activity = _activity(s)
        if activity:
            return activity
        if s.status in (RequestStatus.SENDING, RequestStatus.ACCEPTED):
            return "… waiting for the answer"
        return ""


def _activity(stream: ChatStream) -> str:
    """What an agent or a workflow is doing right now, from its latest event."""
    if not stream.events:
        return ""
    event = stream.events[-1]
    data = event.data
    if event.event == "agent_thought" and data.get("tool") and not data.get("observation"):
        return f"⚙ using {data['tool']}…"
    if event.event == "node_started":
        node = data.get("data") or {}
        return f"⚙ running {node.get('title') or node.get('node_type') or 'a step'}…"
    return ""


@dataclass
class _Chat:
    conn: Connection
    console: Console
    lines: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    conversation_id: str | None = None
    app: str | None = None
    current: ChatStream | None = None
    interrupted: asyncio.Event = field(default_factory=asyncio.Event)
    #: The last answer's message id (what /like and /dislike rate).
    last_message_id: str | None = None
    #: Files uploaded with /upload, sent with the next message.
    files: list[dict[str, Any]] = field(default_factory=list)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        _start_reader(loop, self.lines)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, self._on_interrupt)
        self.conn.on_state.append(self._on_state)
        self.console.print(f"connecting to {self.conn.url}…", style="dim", markup=False)
        connecting = asyncio.ensure_future(self.conn.connect())
        interrupt = asyncio.ensure_future(self.interrupted.wait())
        await asyncio.wait({connecting, interrupt}, return_when=asyncio.FIRST_COMPLETED)
        interrupt.cancel()
        if not connecting.done():
            connecting.cancel()
            return 130  # Ctrl-C while connecting
        try:
            connecting.result()
        except ConnectionError as exc:
            self.console.print(f"cannot connect: {exc}", style="bold red", markup=False)
            return 1
        user = self.conn.hello.user if self.conn.hello else "?"
        self.console.print(f"[green]connected[/] to {self.conn.url} as [bold]{user}[/]")
        self.console.print(HELP, style="dim")
        while True:
            message = await self._read_message()
            if message is None:
                return 0
            command = message.strip()
            if command in ("/quit", "/exit"):
                return 0
            if command == "/new":
                self.conversation_id = None
                self.console.print("new conversation", style="dim")
                continue
            if command == "/help":
                self.console.print(HELP, style="dim")
                continue
            if command == "/stop":
                self.console.print("nothing to stop", style="dim")
                continue
            if command == "/app" or command.startswith("/app "):
                self.app = command[4:].strip() or None
                self.conversation_id = None
                self.console.print(f"app: {self.app or 'default'}", style="dim", markup=False)
                continue
            if command == "/run" or command.startswith("/run "):
                await self._ask(command[4:].strip(), run=True)
                continue
            if await self._service_command(command):
                continue
            if not command:
                continue
            await self._ask(message)

    async def _read_message(self) -> str | None:
        """One message from the prompt, or None at end of input / Ctrl-C."""
        self._prompt(PROMPT)
        collected: list[str] = []
        while True:
            line = await self._next_line()
            if line is None:
                return "\n".join(collected) if collected else None
            batch = [line]
            # Lines pasted together arrive together: keep them in one message.
            while True:
                try:
                    nxt = await asyncio.wait_for(self.lines.get(), PASTE_GAP_S)
                except TimeoutError:
                    break
                if nxt is None:
                    self.lines.put_nowait(None)
                    break
                batch.append(nxt)
            text, more = gather_message(batch)
            collected.append(text)
            if not more:
                return "\n".join(collected)
            self._prompt(CONTINUATION)

    async def _next_line(self) -> str | None:
        self.interrupted.clear()
        get = asyncio.ensure_future(self.lines.get())
        interrupt = asyncio.ensure_future(self.interrupted.wait())
        done, _ = await asyncio.wait({get, interrupt}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            interrupt.cancel()
            return get.result()
        get.cancel()
        self.console.print()
        return None  # Ctrl-C at the prompt quits

    async def _ask(self, query: str, *, run: bool = False) -> None:
        if run:
            stream = await self.conn.run(run_inputs(query), query=query, app=self.app)
        else:
            files, self.files = self.files, []
            stream = await self.conn.chat(
                query, conversation_id=self.conversation_id, app=self.app, files=files
            )
        self.current = stream
        view = _View(self.conn, stream)
        watcher = asyncio.get_running_loop().create_task(self._watch_commands(stream, view))
        try:
            with Live(
                view,
                console=self.console,
                refresh_per_second=4,
                vertical_overflow="visible",
                transient=False,
            ) as live:
                async for _frame in stream:
                    live.refresh()  # every frame shows: token by token
        finally:
            watcher.cancel()
            self.current = None
        self._footer(stream)
        if stream.status is not RequestStatus.ERROR and stream.conversation_id:
            self.conversation_id = stream.conversation_id
        if stream.end is not None and stream.end.message_id:
            self.last_message_id = stream.end.message_id

    async def _service_command(self, command: str) -> bool:
        """``/history``, ``/conversations``, ``/open``, ``/like``, ``/dislike``, ``/upload``:
        True if ``command`` was one (its outcome is printed)."""
        name, _, arg = command.partition(" ")
        if name not in ("/history", "/conversations", "/open", "/like", "/dislike", "/upload"):
            return False
        try:
            note = await self._service(name, arg.strip())
        except CallError as exc:
            self.console.print(f"✗ {exc.code}: {exc.message}", style="bold red", markup=False)
            return True
        self.console.print(note, markup=False, highlight=False)
        return True

    async def _service(self, name: str, arg: str) -> str:
        app = {"app": self.app} if self.app else {}
        if name == "/conversations":
            page = await self.conn.conversations(limit=20, **app)
            rows = [f"{c['id']}  {c.get('name') or '(unnamed)'}" for c in page.get("data", [])]
            return "\n".join(rows) or "no conversations yet"
        if name == "/open":
            if not arg:
                return "usage: /open CONVERSATION_ID (see /conversations)"
            self.conversation_id = arg
            return f"continuing conversation {arg}"
        if name == "/history":
            if self.conversation_id is None:
                return "no conversation yet: ask something, or /open one"
            page = await self.conn.messages(self.conversation_id, limit=20, **app)
            return format_history(page.get("data", []))
        if name in ("/like", "/dislike"):
            if self.last_message_id is None:
                return "no answer to rate yet"
            like = name == "/like"
            await self.conn.feedback(self.last_message_id, "like" if like else "dislike", **app)
            return f"{'👍' if like else '👎'} sent"
        if not arg:
            return "usage: /upload PATH"
        path = Path(arg).expanduser()  # noqa: ASYNC240 (a local stat, at the prompt)
        if not path.is_file():
            return f"no such file: {path}"
        uploaded = await self.conn.upload(path, app=self.app)
        self.files.append(file_ref(uploaded))
        return f"attached {uploaded.get('name')} ({uploaded.get('size')} bytes) to the next message"

    async def _watch_commands(self, stream: ChatStream, view: _View) -> None:
        """Lines typed while an answer streams are commands."""
        while not stream.finished:
            line = await self.lines.get()
            if line is None:
                await stream.stop()
                self.lines.put_nowait(None)  # end of input: quit after this answer
                return
            command = line.strip()
            if command == "/stop":
                view.note = "stopping…"
                await stream.stop()
            elif command.startswith("/answer"):
                view.note = await answer_form(stream, command[7:].strip())
            elif command:
                view.note = "an answer is streaming: /stop stops it"

    def _footer(self, stream: ChatStream) -> None:
        if stream.status is RequestStatus.STOPPED:
            self.console.print("■ stopped", style="yellow")
        elif stream.status is RequestStatus.ERROR and stream.error is not None:
            e = stream.error
            self.console.print(f"✗ {e.code}: {e.message}", style="bold red", markup=False)
        elif stream.end is not None and stream.end.usage:
            tokens = stream.end.usage.get("total_tokens")
            self.console.print(f"✓ done · {tokens} tokens", style="dim")
        else:
            self.console.print("✓ done", style="dim")

    def _prompt(self, text: str) -> None:
        self.console.print(Text(text, style="bold cyan"), end="")
        self.console.file.flush()

    def _on_interrupt(self) -> None:
        if self.current is not None and not self.current.finished:
            asyncio.get_running_loop().create_task(self.current.stop())
        else:
            self.interrupted.set()

    def _on_state(self, change: StateChange) -> None:
        if self.conn.hello is None and change.state is ConnectionState.RECONNECTING:
            if change.delay_s:
                why = change.reason or f"closed with {change.code}"
                self.console.print(
                    f"cannot reach the gateway ({why}); retrying in {change.delay_s:.1f} s",
                    style="yellow",
                    markup=False,
                )
            return
        if self.current is None and change.state is ConnectionState.CLOSED and change.code:
            self.console.print(
                f"[bold red]disconnected[/] ({change.code} {change.reason})", highlight=False
            )


_KINDS: Final = {
    "image": {"jpg", "jpeg", "png", "webp", "gif", "svg"},
    "audio": {"mp3", "m4a", "wav", "amr", "mpga"},
    "video": {"mp4", "mov", "mpeg", "webm"},
}


def file_ref(uploaded: dict[str, Any]) -> dict[str, Any]:
    """The ``files`` item of a chat for a file uploaded through the gateway."""
    extension = str(uploaded.get("extension") or "").lower().lstrip(".")
    kind = next((k for k, exts in _KINDS.items() if extension in exts), "document")
    return {"type": kind, "transfer_method": "local_file", "upload_file_id": uploaded["id"]}


def format_history(messages: list[dict[str, Any]], width: int = 200) -> str:
    """A page of ``messages.list`` as text: oldest first, each question and its answer."""
    lines: list[str] = []
    for message in messages:
        answer = " ".join(str(message.get("answer") or "").split())
        if len(answer) > width:
            answer = answer[: width - 1] + "…"
        lines.append(f"you: {message.get('query', '')}")
        lines.append(f"bot: {answer}")
    return "\n".join(lines) or "no messages yet"


def run_inputs(text: str) -> dict[str, object]:
    """``/run`` inputs: a JSON object as typed, else the text as the ``query`` input."""
    if text.startswith("{"):
        with contextlib.suppress(ValueError):
            value = json.loads(text)
            if isinstance(value, dict):
                return value
    return {"query": text} if text else {}


def describe_form(form: dict[str, object]) -> str:
    """A waiting form in a line or two: its title, content and actions."""
    actions = form.get("actions")
    names = (
        [str(a.get("id")) for a in actions if isinstance(a, dict)]
        if isinstance(actions, list)
        else []
    )
    title = form.get("node_title") or "a person"
    content = str(form.get("form_content") or "").strip()
    return f"⏸ waiting for {title}: {content}\n/answer {'|'.join(names)} [TEXT or {{json}}]"


async def answer_form(stream: ChatStream, args: str) -> str:
    """``/answer ACTION [TEXT or {json}]``: TEXT fills the form's first input."""
    form = stream.form
    if form is None:
        return "no form is waiting"
    action, _, rest = args.partition(" ")
    if not action:
        return describe_form(form)
    inputs: dict[str, object] = {}
    rest = rest.strip()
    if rest.startswith("{"):
        with contextlib.suppress(ValueError):
            value = json.loads(rest)
            inputs = value if isinstance(value, dict) else {}
    elif rest:
        fields = form.get("inputs")
        first = fields[0] if isinstance(fields, list) and fields else {}
        name = first.get("output_variable_name") if isinstance(first, dict) else None
        inputs = {str(name or "comment"): rest}
    await stream.answer(action, inputs)
    return f"answered: {action}"


def _start_reader(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]) -> None:
    """Read stdin lines in a daemon thread (the process may exit while it blocks)."""

    def read() -> None:
        while True:
            try:
                line = sys.stdin.readline()
            except (OSError, ValueError):
                line = ""
            if not line:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(queue.put_nowait, None)
                return
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, line)

    threading.Thread(target=read, name="stdin", daemon=True).start()


def run_chat(url: str, user: str | None = None, token: str | None = None) -> int:
    """Run the terminal chat until /quit, Ctrl-D or Ctrl-C at the prompt; the exit code."""
    console = Console(highlight=False)
    user = user or os.environ.get("TOKENWIRE_USER") or f"cli-{secrets.token_hex(4)}"
    token = token or os.environ.get("TOKENWIRE_TOKEN") or None

    async def main() -> int:
        provider = (lambda: token) if token else None
        conn = Connection(websocket_url(url), provider, user=None if token else user)
        try:
            return await _Chat(conn, console).run()
        finally:
            await conn.close()

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 130
