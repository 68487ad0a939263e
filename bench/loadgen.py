"""The load generator: asyncio clients in several processes, with progress bars.

One :class:`LoadSpec` describes a load (which server, how many connections, how many chats
each, paced or for a time window). :func:`run_load` splits the connections over client
processes (``multiprocessing`` spawn context, each on uvloop with its file limit raised to the
hard limit), shows their progress and merges what they measured into one :class:`LoadResult`.

Client kinds:

* ``tokenwire`` / ``bare``: the tokenwire protocol (``chat`` → ``accepted``, ``start``,
  ``delta``…, ``end``) over a WebSocket offering ``tokenwire.v1`` and permessage-deflate, like
  a browser. TTFT is ``chat`` sent → first ``delta``.
* ``tutorial``: the tutorial bridge's protocol: the query as a text frame, the answer as raw
  text frames, no end marker (the client stops once it holds the expected text).
* ``sse``: Dify's API directly (``POST /chat-messages``, streaming), one pooled httpx client
  per process: what any server-side client of the simulator sees, with nothing in between.
* ``idle``: connections that open, get ``hello`` (or just open, for the tutorial bridge) and
  then wait until the parent releases them: the idle-memory load.

Every stream's final text is compared with the simulator's deterministic answer
(:func:`tokenwire.simulator.expected_answer`); a stream counts as *complete* only if equal.
All clocks are ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import random
import resource
import secrets
import time
import traceback
from array import array
from dataclasses import asdict, dataclass, field
from multiprocessing.sharedctypes import Synchronized
from typing import Any, Literal

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["LoadResult", "LoadSpec", "raise_nofile", "run_load"]

Kind = Literal["tokenwire", "bare", "tutorial", "sse", "idle"]
QUERY = "How do I reset my password? ({tag})"


def raise_nofile() -> int:
    """Raise this process's open-file limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


@dataclass
class LoadSpec:
    """One load; ``connections`` is the total over all client processes."""

    kind: Kind
    urls: list[str]
    connections: int
    tokens: int = 40
    token_delay_ms: float = 20.0
    # Paced loads: each connection runs ``rounds`` chats back to back, its first one after a
    # random offset in [0, stagger_s] so that the load is steady, not one synchronized burst.
    rounds: int = 1
    stagger_s: float = 0.0
    # Window loads (throughput): chat back to back until ``window_s`` has passed; only frames
    # arriving inside the window are counted. None: paced load.
    window_s: float | None = None
    # Latencies (TTFT, gaps) are kept only for frames arriving in this span after the start
    # (seconds; None: from the start / until the end), to leave out the ramp up and down.
    measure_from_s: float | None = None
    measure_to_s: float | None = None
    # Idle loads: for tutorial bridges, nothing is sent on open (no hello to wait for).
    idle_target: Literal["tokenwire", "tutorial"] = "tokenwire"
    processes: int = 2
    stream_timeout_s: float = 60.0
    timeout_s: float = 300.0
    label: str = ""


@dataclass
class LoadResult:
    spec: LoadSpec
    ttft_s: list[float] = field(default_factory=list)
    gaps_s: list[float] = field(default_factory=list)
    streams: int = 0
    complete: int = 0
    wrong: int = 0
    failed: int = 0
    frames: int = 0
    tokens: int = 0
    window_s: float = 0.0
    connected: int = 0
    errors: list[str] = field(default_factory=list)
    timed_out: bool = False

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.window_s if self.window_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.window_s if self.window_s else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.spec.label,
            "kind": self.spec.kind,
            "connections": self.spec.connections,
            "streams": self.streams,
            "complete": self.complete,
            "wrong": self.wrong,
            "failed": self.failed,
            "errors": self.errors[:5],
            "timed_out": self.timed_out,
        }


# --------------------------------------------------------------------------- client side


def _carried(ends: list[int], done: int, length: int) -> int:
    """How many more tokens a text of ``length`` completes, ``done`` being completed before."""
    n = done
    while n < len(ends) and ends[n] <= length:
        n += 1
    return n - done


@dataclass
class _Acc:
    """What one client process measured."""

    ttft: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]
    gaps: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]
    streams: int = 0
    complete: int = 0
    wrong: int = 0
    failed: int = 0
    frames: int = 0
    tokens: int = 0
    connected: int = 0
    errors: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)


class _Run:
    def __init__(
        self,
        spec: LoadSpec,
        index: int,
        count: int,
        progress: Synchronized[int],
        ready: Synchronized[int],
        release: Any,
        shared_start: Synchronized[float],
    ) -> None:
        self.spec = spec
        self.index = index
        self.progress = progress
        self.ready = ready
        self.release = release
        self.shared_start = shared_start
        self.go = asyncio.Event()
        # Handshakes in flight per process: thousands at once would all finish late together
        # (and overflow the listen backlog); browsers arrive spread out too.
        self.opening = asyncio.Semaphore(32)
        self._set_start(float("inf"))
        self.acc = _Acc()
        # Request ids and users are unique per load: tokenwire treats a re-sent (user, id)
        # as the same request and replays it, which is a feature, not a benchmark.
        self.nonce = secrets.token_hex(4)

    # --- helpers -------------------------------------------------------------------------

    def _set_start(self, start_at: float) -> None:
        spec = self.spec
        self.start_at = start_at
        self.window_end = start_at + spec.window_s if spec.window_s is not None else None
        self.measure_from = start_at + (spec.measure_from_s or 0.0)
        self.measure_to = (
            start_at + spec.measure_to_s if spec.measure_to_s is not None else float("inf")
        )

    async def _wait_go(self) -> None:
        """Released by the parent once every connection of every process is open."""
        await asyncio.to_thread(self.release.wait)  # a multiprocessing Event
        self._set_start(self.shared_start.value)
        self.go.set()

    def _is_ready(self) -> None:
        with self.ready.get_lock():
            self.ready.value += 1

    def _tick(self, n: int = 1) -> None:
        with self.progress.get_lock():
            self.progress.value += n

    def _in_window(self, t: float) -> bool:
        return self.window_end is None or self.start_at <= t <= self.window_end

    def _measured(self, t: float) -> bool:
        return self.measure_from <= t <= self.measure_to

    def _more(self, done_rounds: int) -> bool:
        if self.window_end is not None:
            return time.monotonic() < self.window_end
        return done_rounds < self.spec.rounds

    def _expected(self, query: str) -> str:
        from tokenwire.simulator import expected_answer

        return expected_answer(query, self.spec.tokens)

    def _token_ends(self, query: str) -> list[int]:
        """Where each of the simulator's tokens (Dify events) ends in the answer's text: a
        coalesced ``delta`` carries every token it completes (:func:`_carried`)."""
        from tokenwire.simulator import answer_tokens

        ends, at = [], 0
        for token in answer_tokens(query, self.spec.tokens):
            at += len(token)
            ends.append(at)
        return ends

    def _query(self, conn: int, n: int) -> str:
        return QUERY.format(tag=f"{self.spec.kind} {self.nonce}.{self.index}.{conn}.{n}")

    def _finish(self, query: str, text: str, *, ended: bool) -> None:
        if not ended:
            self.acc.failed += 1
        elif text == self._expected(query):
            self.acc.complete += 1
        else:
            self.acc.wrong += 1
            self.acc.error(f"wrong answer for {query!r}: {text[:60]!r}…")

    async def _until_start(self, stagger: bool) -> None:
        self._is_ready()
        await self.go.wait()
        offset = random.uniform(0, self.spec.stagger_s) if stagger else 0.0
        await asyncio.sleep(max(0.0, self.start_at + offset - time.monotonic()))

    # --- tokenwire protocol (gateway and bare server) ----------------------------------------

    async def _ws_connect(self, url: str) -> Any:
        from websockets.asyncio.client import connect

        return await connect(
            url,
            subprotocols=["tokenwire.v1"],  # type: ignore[list-item]
            max_size=None,
            ping_interval=None,
            open_timeout=60,
            close_timeout=2,
        )

    async def tokenwire_conn(self, conn: int, url: str) -> None:
        import orjson

        user = f"bench-{self.nonce}-{self.index}-{conn}"
        async with self.opening:
            ws = await self._ws_connect(f"{url}?user={user}")
            hello = orjson.loads(await ws.recv())
        try:
            if hello.get("type") != "hello":
                raise RuntimeError(f"no hello: {hello}")
            self.acc.connected += 1
            await self._until_start(stagger=True)
            n = 0
            while self._more(n):
                n += 1
                await self._tokenwire_chat(ws, conn, n)
        finally:
            await ws.close()

    async def _tokenwire_chat(self, ws: Any, conn: int, n: int) -> None:
        import orjson

        rid = f"r{conn}-{n}"
        query = self._query(conn, n)
        acc = self.acc
        acc.streams += 1
        text = ""
        ended = False
        last_seq = 0
        prev = 0.0
        ends = self._token_ends(query)
        done = 0  # tokens the text so far completes
        sent = time.monotonic()
        await ws.send(orjson.dumps({"type": "chat", "id": rid, "query": query}).decode())
        try:
            async with asyncio.timeout(self.spec.stream_timeout_s):
                while True:
                    raw = await ws.recv()
                    now = time.monotonic()
                    frame = orjson.loads(raw)
                    kind = frame.get("type")
                    if frame.get("id") != rid:
                        acc.error(f"unexpected frame {raw[:120]!r}")
                        continue
                    if frame["seq"] != last_seq + 1:
                        acc.error(f"seq gap after {last_seq}: {frame['seq']}")
                        break
                    last_seq = frame["seq"]
                    if self._in_window(now):
                        acc.frames += 1
                    if kind == "delta":
                        text += frame["text"]
                        carried = _carried(ends, done, len(text))
                        done += carried
                        if prev == 0.0:
                            if self._measured(now):
                                acc.ttft.append(now - sent)
                        elif self._measured(now):
                            acc.gaps.append(now - prev)
                        prev = now
                        if self._in_window(now):
                            acc.tokens += carried
                    elif kind == "end":
                        ended = True
                        break
                    elif kind == "error":
                        acc.error(f"error frame: {frame.get('code')} {frame.get('message')}")
                        break
        except TimeoutError:
            acc.error(f"stream {rid} timed out")
        self._finish(query, text, ended=ended)
        self._tick()

    # --- the tutorial bridge -----------------------------------------------------------------

    async def tutorial_conn(self, conn: int, url: str) -> None:
        from websockets.asyncio.client import connect

        async with self.opening:
            ws = await connect(url, max_size=None, ping_interval=None, open_timeout=60)
        try:
            self.acc.connected += 1
            await self._until_start(stagger=True)
            n = 0
            while self._more(n):
                n += 1
                await self._tutorial_chat(ws, conn, n)
        finally:
            await ws.close()

    async def _tutorial_chat(self, ws: Any, conn: int, n: int) -> None:
        acc = self.acc
        query = self._query(conn, n)
        expected = self._expected(query)
        acc.streams += 1
        text = ""
        prev = 0.0
        sent = time.monotonic()
        await ws.send(query)
        try:
            async with asyncio.timeout(self.spec.stream_timeout_s):
                # No end marker: the only way to know the answer is over is to know it.
                while len(text) < len(expected):
                    text += await ws.recv()
                    now = time.monotonic()
                    if prev == 0.0:
                        if self._measured(now):
                            acc.ttft.append(now - sent)
                    elif self._measured(now):
                        acc.gaps.append(now - prev)
                    prev = now
                    if self._in_window(now):
                        acc.frames += 1
                        acc.tokens += 1
        except TimeoutError:
            acc.error(f"tutorial stream {query!r} timed out")
        self._finish(query, text, ended=len(text) >= len(expected))
        self._tick()

    # --- Dify's API directly (SSE) ----------------------------------------------------------

    async def sse_conn(self, conn: int, client: Any) -> None:
        self.acc.connected += 1
        await self._until_start(stagger=True)
        n = 0
        while self._more(n):
            n += 1
            await self._sse_chat(client, conn, n)

    async def _sse_chat(self, client: Any, conn: int, n: int) -> None:
        import orjson

        acc = self.acc
        query = self._query(conn, n)
        body = {
            "inputs": {},
            "query": query,
            "response_mode": "streaming",
            "user": f"bench-{self.nonce}-{self.index}-{conn}",
        }
        acc.streams += 1
        text = ""
        ended = False
        prev = 0.0
        sent = time.monotonic()
        try:
            async with (
                asyncio.timeout(self.spec.stream_timeout_s),
                client.stream("POST", "/chat-messages", content=orjson.dumps(body)) as response,
            ):
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    now = time.monotonic()
                    event = orjson.loads(line[6:])
                    name = event.get("event")
                    if self._in_window(now):
                        acc.frames += 1
                    if name == "message":
                        text += event["answer"]
                        if prev == 0.0:
                            if self._measured(now):
                                acc.ttft.append(now - sent)
                        elif self._measured(now):
                            acc.gaps.append(now - prev)
                        prev = now
                        if self._in_window(now):
                            acc.tokens += 1
                    elif name == "message_end":
                        ended = True
                    elif name == "error":
                        acc.error(f"error event: {event}")
        except Exception as exc:
            acc.error(f"sse: {type(exc).__name__}: {exc}")
        self._finish(query, text, ended=ended)
        self._tick()

    # --- idle connections ---------------------------------------------------------------------

    async def idle_conn(self, conn: int, url: str, opened: asyncio.Event) -> None:
        from websockets.asyncio.client import connect

        async with self.opening:
            if self.spec.idle_target == "tutorial":
                ws = await connect(url, max_size=None, ping_interval=None, open_timeout=120)
            else:
                ws = await self._ws_connect(f"{url}?user=idle-{self.nonce}-{self.index}-{conn}")
                hello = await ws.recv()
                if b'"hello"' not in (hello if isinstance(hello, bytes) else hello.encode()):
                    raise RuntimeError(f"no hello: {hello!r}")
        self.acc.connected += 1
        self._tick()
        self._is_ready()
        try:
            await opened.wait()
        finally:
            with contextlib.suppress(Exception):
                await ws.close()

    # --- driver -----------------------------------------------------------------------------

    async def main(self, conns: list[int]) -> _Acc:
        spec = self.spec

        async def guarded(coro_fn: Any, conn: int, *args: Any) -> None:
            try:
                await coro_fn(conn, *args)
            except Exception as exc:
                self.acc.failed += 1
                self.acc.error(f"conn {conn}: {type(exc).__name__}: {exc}")

        if spec.kind != "idle":
            self._go_task = asyncio.create_task(self._wait_go())
        if spec.kind == "sse":
            import httpx

            limits = httpx.Limits(max_connections=len(conns) + 8, max_keepalive_connections=None)
            async with httpx.AsyncClient(
                base_url=spec.urls[0],
                limits=limits,
                timeout=httpx.Timeout(spec.stream_timeout_s),
                headers={"Authorization": "Bearer app-bench", "Content-Type": "application/json"},
            ) as client:
                await asyncio.gather(*(guarded(self.sse_conn, c, client) for c in conns))
            return self.acc
        if spec.kind == "idle":
            released = asyncio.Event()

            async def wait_release() -> None:
                await asyncio.to_thread(self.release.wait)  # a multiprocessing Event
                released.set()

            waiter = asyncio.create_task(wait_release())
            await asyncio.gather(
                *(self._idle_guarded(c, spec.urls[c % len(spec.urls)], released) for c in conns)
            )
            waiter.cancel()
            return self.acc
        fn = self.tutorial_conn if spec.kind == "tutorial" else self.tokenwire_conn
        await asyncio.gather(*(guarded(fn, c, spec.urls[c % len(spec.urls)]) for c in conns))
        return self.acc

    async def _idle_guarded(self, conn: int, url: str, released: asyncio.Event) -> None:
        try:
            await self.idle_conn(conn, url, released)
        except Exception as exc:
            self.acc.failed += 1
            self.acc.error(f"idle conn {conn}: {type(exc).__name__}: {exc}")


def _client_entry(
    spec: LoadSpec,
    index: int,
    count: int,
    progress: Synchronized[int],
    ready: Synchronized[int],
    release: Any,
    shared_start: Synchronized[float],
    out: Any,
) -> None:
    raise_nofile()
    conns = list(range(index, spec.connections, count))
    run = _Run(spec, index, count, progress, ready, release, shared_start)
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            acc = runner.run(run.main(conns))
    except Exception:
        acc = run.acc
        acc.error(traceback.format_exc(limit=3))
    out.put(
        {
            **{k: v for k, v in asdict(acc).items() if k not in ("ttft", "gaps")},
            "ttft": acc.ttft.tobytes(),
            "gaps": acc.gaps.tobytes(),
        }
    )


# --------------------------------------------------------------------------- parent side


def _total(spec: LoadSpec) -> int:
    if spec.kind == "idle":
        return spec.connections
    if spec.window_s is not None:
        return 0  # unknown: the bar shows a count
    return spec.connections * spec.rounds


def run_load(
    spec: LoadSpec,
    *,
    while_idle: Any = None,
    on_go: Any = None,
    progress: Progress | None = None,
) -> LoadResult:
    """Run ``spec`` in ``spec.processes`` client processes and merge their measurements.

    Streams start together once every connection of every process is open (or once the
    open count has not grown for 15 s); ``on_go(start_at)`` is called then (monotonic time
    the streams start at). For an ``idle`` load, ``while_idle(open_count)`` is
    called at that moment instead, then the connections are released and closed.
    """
    ctx = mp.get_context("spawn")
    nprocs = max(1, min(spec.processes, spec.connections))
    counters = [ctx.Value("q", 0) for _ in range(nprocs)]
    ready = [ctx.Value("q", 0) for _ in range(nprocs)]
    shared_start = ctx.Value("d", 0.0)
    release = ctx.Event()
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_client_entry,
            args=(spec, i, nprocs, counters[i], ready[i], release, shared_start, out),
            daemon=True,
            name=f"bench-client-{i}",
        )
        for i in range(nprocs)
    ]
    for proc in procs:
        proc.start()
    result = LoadResult(spec)
    own = progress is None
    bar = progress or _progress()
    if own:
        bar.start()
    task = bar.add_task(spec.label or spec.kind, total=_total(spec) or None)
    deadline = time.monotonic() + spec.timeout_s
    started = False
    last_ready, last_change = -1, time.monotonic()
    payloads: list[dict[str, Any]] = []
    try:
        while len(payloads) < nprocs and time.monotonic() < deadline:
            bar.update(task, completed=sum(c.value for c in counters))
            if not started:
                now_ready = sum(r.value for r in ready)
                if now_ready != last_ready:
                    last_ready, last_change = now_ready, time.monotonic()
                stalled = time.monotonic() - last_change > 15.0
                if now_ready >= spec.connections or stalled:
                    if spec.kind == "idle":
                        time.sleep(1.0)  # let the server settle its buffers
                        if while_idle is not None:
                            while_idle(now_ready)
                    else:
                        shared_start.value = time.monotonic() + 0.2
                        if on_go is not None:
                            on_go(shared_start.value)
                    started = True
                    if spec.window_s is not None:
                        deadline = min(deadline, time.monotonic() + spec.window_s + 90)
                    release.set()
            with contextlib.suppress(Exception):
                payloads.append(out.get(timeout=0.1))
    finally:
        release.set()
        if len(payloads) < nprocs:
            result.timed_out = True
            result.errors.append(f"load {spec.label!r} hit its time bound")
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        bar.update(task, completed=sum(c.value for c in counters))
        if own:
            bar.stop()
    for payload in payloads:
        ttft, gaps = array("d"), array("d")
        ttft.frombytes(payload["ttft"])
        gaps.frombytes(payload["gaps"])
        result.ttft_s.extend(ttft)
        result.gaps_s.extend(gaps)
        for name in ("streams", "complete", "wrong", "failed", "frames", "tokens", "connected"):
            setattr(result, name, getattr(result, name) + payload[name])
        result.errors.extend(payload["errors"])
    if spec.window_s is not None:
        result.window_s = spec.window_s
    return result


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<40}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    )
