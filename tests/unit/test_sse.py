"""Tests for shared.sse: table tests, every-split tests, hypothesis round trips and fuzzing."""

from __future__ import annotations

import ast
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from random import Random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shared.sse
from shared.sse import SSEEvent, SSEParser, SSEProtocolError

# -- helpers ---------------------------------------------------------------------------------


def ev(
    data: str = "", event: str = "", id: str | None = None, retry: int | None = None
) -> SSEEvent:
    return SSEEvent(event=event, data=data, id=id, retry=retry)


def parse(body: bytes, *, max_event_bytes: int = 4 * 1024 * 1024) -> list[SSEEvent]:
    """Parse a whole body in one feed, then EOF."""
    return parse_chunks([body], max_event_bytes=max_event_bytes)


def parse_chunks(chunks: list[bytes], *, max_event_bytes: int = 4 * 1024 * 1024) -> list[SSEEvent]:
    parser = SSEParser(max_event_bytes=max_event_bytes)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.feed_eof()
    return events


def split_at(body: bytes, points: list[int]) -> list[bytes]:
    cuts = [0, *sorted(points), len(body)]
    return [body[a:b] for a, b in pairwise(cuts)]


def assert_every_split(body: bytes, expected: list[SSEEvent]) -> None:
    """Two chunks, cut at every byte boundary, give the same events as the whole body."""
    assert parse(body) == expected
    for i in range(len(body) + 1):
        assert parse_chunks([body[:i], body[i:]]) == expected, f"split at {i}"


# -- table tests -----------------------------------------------------------------------------

DIFY_BODY = (
    b"event: ping\n\n"
    b'data: {"event": "message", "answer": "Hi", "conversation_id": "c1"}\n\n'
    b'data: {"event":"message","answer":"\xe4\xbd\xa0\xe5\xa5\xbd \xf0\x9f\x91\x8b"}\n\n'
    b"event: ping\n\n"
    b'data: {"event": "message_end", "id": "m1"}\n\n'
)
DIFY_EVENTS = [
    ev(event="ping"),
    ev('{"event": "message", "answer": "Hi", "conversation_id": "c1"}'),
    ev('{"event":"message","answer":"你好 👋"}'),
    ev(event="ping"),
    ev('{"event": "message_end", "id": "m1"}'),
]

CASES: list[tuple[str, bytes, list[SSEEvent]]] = [
    ("dify body", DIFY_BODY, DIFY_EVENTS),
    ("data without space", b"data:x\n\n", [ev("x")]),
    ("only one space removed", b"data:  x \n\n", [ev(" x ")]),
    ("multi-line data", b"data: a\ndata:\ndata: b\n\n", [ev("a\n\nb")]),
    ("empty data line dispatches", b"data\n\n", [ev("")]),
    ("empty data value dispatches", b"data:\n\n", [ev("")]),
    ("two empty data lines", b"data\ndata\n\n", [ev("\n")]),
    ("comment ignored", b": hello\ndata: x\n: bye\n\n", [ev("x")]),
    ("comment-only block dispatches nothing", b": keep-alive\n\n:\n\n", []),
    ("blank lines alone dispatch nothing", b"\n\n\r\n\r", []),
    ("CRLF endings", b"event: e\r\ndata: a\r\ndata: b\r\n\r\n", [ev("a\nb", event="e")]),
    ("lone CR endings", b"event: e\rdata: a\rdata: b\r\r", [ev("a\nb", event="e")]),
    ("mixed endings", b"data: a\rdata: b\ndata: c\r\n\r\n", [ev("a\nb\nc")]),
    ("CR CR is two line ends", b"data: a\r\rdata: b\n\n", [ev("a"), ev("b")]),
    ("LF CR is two line ends", b"data: a\n\rdata: b\n\n", [ev("a"), ev("b")]),
    ("BOM stripped", b"\xef\xbb\xbfdata: x\n\n", [ev("x")]),
    ("BOM before a comment", b"\xef\xbb\xbf: c\n\n", []),
    ("only the first BOM", b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n", []),
    ("BOM later is data", b"data: a\n\n\xef\xbb\xbfdata: b\n\n", [ev("a")]),
    ("BOM inside value kept", b"data: \xef\xbb\xbfx\n\n", [ev("\ufeffx")]),
    ("event without data dispatches", b"event: ping\n\n", [ev(event="ping")]),
    ("empty event field dispatches", b"event\n\n", [ev()]),
    ("event resets after dispatch", b"event: a\ndata: 1\n\ndata: 2\n\n", [ev("1", "a"), ev("2")]),
    ("last event field wins", b"event: a\nevent: b\ndata: x\n\n", [ev("x", "b")]),
    (
        "id persists across events",
        b"id: 1\ndata: a\n\ndata: b\n\nid\ndata: c\n\n",
        [ev("a", id="1"), ev("b", id="1"), ev("c", id="")],
    ),
    ("id only dispatches", b"id: 7\n\n", [ev(id="7")]),
    ("id with NUL ignored", b"id: 1\n\nid: 2\x003\ndata: x\n\n", [ev(id="1"), ev("x", id="1")]),
    ("id with NUL alone dispatches nothing", b"id: \x00\n\n", []),
    ("retry digits", b"retry: 3000\ndata: x\n\n", [ev("x", retry=3000)]),
    ("retry only dispatches", b"retry: 0\n\n", [ev(retry=0)]),
    ("retry is per event", b"retry: 5\ndata: a\n\ndata: b\n\n", [ev("a", retry=5), ev("b")]),
    ("retry non-digits ignored", b"retry: 10s\ndata: x\n\n", [ev("x")]),
    ("retry negative ignored", b"retry: -1\n\n", []),
    ("retry empty ignored", b"retry:\n\n", []),
    ("retry non-ASCII digits ignored", "retry: ١٢\n\n".encode(), []),
    ("retry huge ignored", b"retry: " + b"9" * 5000 + b"\n\n", []),
    ("retry leading zeros", b"retry: " + b"0" * 5000 + b"42\n\n", [ev(retry=42)]),
    ("unknown fields ignored", b"foo: bar\nDATA: y\ndata : z\ndata: x\n\n", [ev("x")]),
    ("unknown field only dispatches nothing", b"foo: bar\n\n", []),
    ("field names are case sensitive", b"Event: e\nData: d\n\n", []),
    ("colon in value kept", b"data: a: b:c\n\n", [ev("a: b:c")]),
    ("invalid UTF-8 replaced", b"data: \xff\xfe ok\n\n", [ev("\ufffd\ufffd ok")]),
    ("incomplete event at EOF discarded", b"data: a\n\ndata: b\n", [ev("a")]),
    ("unterminated line at EOF discarded", b"data: a\n\ndata: b", [ev("a")]),
    ("event without blank line at EOF discarded", b"event: ping\n", []),
    ("empty body", b"", []),
    ("NUL in data kept", b"data: a\x00b\n\n", [ev("a\x00b")]),
    ("ASCII VT FF FS are not line ends", b"data: a\x0bb\x0cc\x1cd\n\n", [ev("a\x0bb\x0cc\x1cd")]),
    (
        "unicode line separators are not line ends",
        "data: a\u2028b\x85c\n\n".encode(),
        [ev("a\u2028b\x85c")],
    ),
]


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_table(body: bytes, expected: list[SSEEvent]) -> None:
    assert_every_split(body, expected)


def test_dispatch_order_within_one_chunk() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: 1\n\ndata: 2\n\ndata: 3") == [ev("1"), ev("2")]
    assert parser.feed(b"\n\n") == [ev("3")]
    assert parser.feed_eof() == []


def test_cr_then_lf_in_next_chunk_is_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    # If the \n were taken as a blank line, "a" would be dispatched here.
    assert parser.feed(b"\n") == []
    assert parser.feed(b"data: b\r") == []
    assert parser.feed(b"") == []  # an empty chunk must not forget the pending \r
    assert parser.feed(b"\ndata: c\r\n\r") == [ev("a\nb\nc")]
    assert parser.feed(b"\n") == []
    assert parser.feed_eof() == []


def test_cr_then_cr_in_next_chunk_is_blank_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\r") == [ev("a")]


def test_bom_split_across_chunks() -> None:
    assert parse_chunks([b"\xef", b"\xbb", b"\xbfdata: x\n\n"]) == [ev("x")]


def test_one_byte_at_a_time() -> None:
    chunks = [DIFY_BODY[i : i + 1] for i in range(len(DIFY_BODY))]
    assert parse_chunks(chunks) == DIFY_EVENTS


def test_multibyte_utf8_split_inside_characters() -> None:
    text = "数据 🎉 émoji 𝄞 混合 \u00e9\u0301"
    body = f"event: 事件🎈\ndata: {text}\ndata: 第二行\n\n".encode()
    expected = [ev(f"{text}\n第二行", event="事件🎈")]
    # Every two-way split, including inside each 2-, 3- and 4-byte sequence.
    assert_every_split(body, expected)
    # And a few three-way splits straddling the emoji.
    emoji_at = body.index("🎉".encode())
    for a in range(emoji_at, emoji_at + 4):
        for b in range(a, emoji_at + 5):
            assert parse_chunks([body[:a], body[a:b], body[b:]]) == expected


def test_feed_after_eof_raises() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\n\n") == [ev("x")]
    assert parser.feed_eof() == []
    with pytest.raises(SSEProtocolError):
        parser.feed(b"data: y\n\n")
    with pytest.raises(SSEProtocolError):
        parser.feed(b"")
    with pytest.raises(SSEProtocolError):
        parser.feed_eof()


def test_protocol_error_is_a_value_error() -> None:
    assert issubclass(SSEProtocolError, ValueError)
    assert SSEProtocolError.__doc__


def test_line_too_long_raises() -> None:
    parser = SSEParser(max_event_bytes=16)
    assert parser.feed(b"data: 0123456789\n\n") == [ev("0123456789")]  # exactly 16 bytes
    with pytest.raises(SSEProtocolError):
        parser.feed(b"data: 0123456789A\n\n")
    # The parser is closed after an error.
    with pytest.raises(SSEProtocolError):
        parser.feed(b"data: x\n\n")


def test_unterminated_line_too_long_raises_before_the_end_of_line() -> None:
    parser = SSEParser(max_event_bytes=16)
    parser.feed(b"data: 0123")
    parser.feed(b"456789")
    with pytest.raises(SSEProtocolError):
        parser.feed(b"A")


def test_comment_line_too_long_raises() -> None:
    with pytest.raises(SSEProtocolError):
        parse(b":" + b"x" * 17 + b"\n", max_event_bytes=16)


def test_event_data_too_long_raises() -> None:
    ok = b"data: 0123456\ndata: 01234567\n\n"  # 7 + 1 + 8 = 16 bytes of data
    assert parse(ok, max_event_bytes=16) == [ev("0123456\n01234567")]
    with pytest.raises(SSEProtocolError):
        parse(b"data: 01234567\ndata: 01234567\n\n", max_event_bytes=16)
    # Many short lines also add up.
    with pytest.raises(SSEProtocolError):
        parse(b"data\n" * 18 + b"\n", max_event_bytes=16)


def test_limit_is_per_event() -> None:
    body = b"data: 0123456789\n\n" * 100
    assert parse(body, max_event_bytes=16) == [ev("0123456789")] * 100


def test_events_are_frozen_and_slotted() -> None:
    event = ev("x")
    with pytest.raises(AttributeError):
        event.data = "y"  # type: ignore[misc]
    assert not hasattr(event, "__dict__")


def test_module_imports_only_stdlib() -> None:
    tree = ast.parse(Path(shared.sse.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.module is not None
            assert node.level == 0
            imported.add(node.module.split(".")[0])
    assert imported <= sys.stdlib_module_names | {"__future__"}, imported


def test_public_names() -> None:
    assert sorted(shared.sse.__all__) == ["SSEEvent", "SSEParser", "SSEProtocolError"]


# -- performance: no re-scanning of buffered bytes -------------------------------------------
#
# Not a timing budget (those belong to bench/): the parser's CPU time must grow like its input.
# Eight times the input may cost at most ~3x eight times the time; re-scanning pending bytes
# (quadratic) would cost sixty-four times. CPU time of this process, best of two, so other
# processes on a busy machine barely move it.


def _cpu_s(work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(2):
        start = time.process_time()
        work()
        best = min(best, time.process_time() - start)
    return max(best, 1e-4)


def _long_line(size: int) -> None:
    parser = SSEParser(max_event_bytes=size + 16)
    chunk = b"x" * 1024
    assert parser.feed(b"data: ") == []
    for _ in range(size // len(chunk)):
        assert parser.feed(chunk) == []
    (event,) = parser.feed(b"\n\n")
    assert len(event.data) == size


def test_long_line_in_small_chunks_is_linear() -> None:
    # 16 MiB in 1 KiB chunks: re-scanning the pending line on every feed would touch ~128 GiB.
    # 16x the input costs 16x the time when linear and 256x when quadratic; the bound sits far
    # from both, because the small run takes only ~3 ms of CPU and a loaded machine's page
    # faults (counted in process time) once pushed an 8x ratio to 24x.
    small = _cpu_s(lambda: _long_line(1024 * 1024))
    large = _cpu_s(lambda: _long_line(16 * 1024 * 1024))
    assert large / small < 100, (small, large)


def _many_events(count: int) -> None:
    body = b'data: {"event": "message", "answer": "tok"}\n\n' * count
    assert len(parse(body)) == count


def test_many_events_in_one_chunk_is_linear() -> None:
    small = _cpu_s(lambda: _many_events(12_500))
    large = _cpu_s(lambda: _many_events(100_000))
    assert large / small < 24, (small, large)


# -- hypothesis: round trip of generated events ----------------------------------------------

LINE_ENDINGS = ("\n", "\r", "\r\n")
LINE_BREAK = re.compile(r"\r\n|\r|\n")
NO_BREAKS = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)


@dataclass(frozen=True)
class Block:
    """One event block to serialize: None means the field is left out."""

    event: str | None
    data: str | None
    id: str | None
    retry: int | None
    comment: str | None


blocks = st.builds(
    Block,
    event=st.none() | NO_BREAKS,
    data=st.none()
    | st.text(st.characters(codec="utf-8"), max_size=30)
    | st.sampled_from(["\n", "\r\n", "a\rb", "", "x\n", "\r\r\n"]),
    id=st.none() | NO_BREAKS.filter(lambda s: "\x00" not in s),
    retry=st.none() | st.integers(min_value=0, max_value=10**12),
    comment=st.none() | NO_BREAKS,
)


def field_line(name: str, value: str, rnd: Random) -> str:
    # The parser strips one leading space, so a value that starts with one needs the separator.
    space = value.startswith(" ") or rnd.random() < 0.5
    return f"{name}: {value}" if space else f"{name}:{value}"


def block_lines(block: Block, rnd: Random) -> list[str]:
    others: list[str] = []
    if block.comment is not None:
        others.append(":" + block.comment)
    if block.event is not None:
        others.append(field_line("event", block.event, rnd))
    if block.id is not None:
        others.append(field_line("id", block.id, rnd))
    if block.retry is not None:
        others.append(field_line("retry", str(block.retry), rnd))
    lines: list[str] = []
    if block.data is not None:
        lines = [field_line("data", part, rnd) for part in LINE_BREAK.split(block.data)]
    # Field order within a block is free, except that data lines keep their order.
    for line in others:
        lines.insert(rnd.randint(0, len(lines)), line)
    return [*lines, ""]


def join_lines(lines: list[str], rnd: Random) -> bytes:
    out: list[str] = []
    previous = ""
    for line in lines:
        ending = rnd.choice(LINE_ENDINGS)
        if previous == "\r" and line == "" and ending == "\n":
            ending = "\r"  # "\r" + "\n" would read as one CRLF, not as a blank line
        out += [line, ending]
        previous = ending
    return "".join(out).encode()


def expected_events(blocks_: list[Block]) -> list[SSEEvent]:
    """A model of the parser: what each block should dispatch."""
    events: list[SSEEvent] = []
    last_id: str | None = None
    for block in blocks_:
        if block.id is not None:
            last_id = block.id
        if block.data is None and block.event is None and block.id is None and block.retry is None:
            continue
        data = "" if block.data is None else "\n".join(LINE_BREAK.split(block.data))
        events.append(SSEEvent(event=block.event or "", data=data, id=last_id, retry=block.retry))
    return events


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, list[SSEEvent]]:
    blocks_ = draw(st.lists(blocks, max_size=8))
    rnd = draw(st.randoms(use_true_random=False))
    lines = [line for block in blocks_ for line in block_lines(block, rnd)]
    body = join_lines(lines, rnd)
    if draw(st.booleans()):
        body = b"\xef\xbb\xbf" + body
    return body, expected_events(blocks_)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=bodies(), data=st.data())
def test_round_trip_any_chunking(case: tuple[bytes, list[SSEEvent]], data: st.DataObject) -> None:
    body, expected = case
    assert parse(body) == expected
    points = data.draw(st.lists(st.integers(0, len(body)), max_size=12), label="split points")
    assert parse_chunks(split_at(body, points)) == expected


@settings(max_examples=300, deadline=None)
@given(case=bodies(), cut=st.integers(min_value=1))
def test_truncated_body_never_invents_events(case: tuple[bytes, list[SSEEvent]], cut: int) -> None:
    body, expected = case
    prefix = body[: cut % (len(body) + 1)]
    events = parse(prefix)
    # A block only dispatches on its closing blank line, so a cut anywhere yields exactly the
    # events of the blocks closed before it (a cut between "\r" and "\n" adds no blank line).
    assert events == expected[: len(events)]


# -- fuzzing: only SSEProtocolError escapes --------------------------------------------------

TOKENS = st.sampled_from(
    [
        b"data:",
        b"data: ",
        b"event:",
        b"event: ping",
        b"id:",
        b"id: \x00",
        b"retry:",
        b"retry: 1",
        b"retry: 99999999999999999999",
        b":",
        b" ",
        b"\r",
        b"\n",
        b"\r\n",
        b"\n\n",
        b"\xef\xbb\xbf",
        b"\xff",
        b"\xe4\xbd",
        b"\xa0",
        "🎉".encode(),
        b"\x00",
    ]
)
fuzz_chunk = st.lists(st.binary(max_size=16) | TOKENS, max_size=8).map(b"".join)
fuzz_chunks = st.lists(fuzz_chunk, max_size=10)


def outcome(chunks: list[bytes], max_event_bytes: int) -> list[SSEEvent] | str:
    try:
        return parse_chunks(chunks, max_event_bytes=max_event_bytes)
    except SSEProtocolError:
        return "error"


@settings(max_examples=500, deadline=None)
@given(chunks=fuzz_chunks, max_event_bytes=st.integers(0, 64))
def test_fuzz_only_protocol_error_escapes(chunks: list[bytes], max_event_bytes: int) -> None:
    # Any other exception fails the test; chunking never changes the outcome.
    whole = outcome([b"".join(chunks)], max_event_bytes)
    assert outcome(chunks, max_event_bytes) == whole
    for event in whole if isinstance(whole, list) else []:
        assert isinstance(event.event, str)
        assert isinstance(event.data, str)
        assert len(event.data.encode()) <= 3 * max_event_bytes  # each bad byte -> U+FFFD


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=10))
def test_fuzz_raw_bytes(chunks: list[bytes]) -> None:
    whole = outcome([b"".join(chunks)], 4 * 1024 * 1024)
    assert whole != "error"
    assert outcome(chunks, 4 * 1024 * 1024) == whole
