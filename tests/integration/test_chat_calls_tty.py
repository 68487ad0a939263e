"""``tokenwire chat``'s calls in a pseudo-terminal: /history, /conversations, /like,
/dislike and /upload PATH, against a real gateway, reaching the simulator as the user."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.integration.stack import Stack
from tests.integration.test_chat_tty import Terminal, terminal

pytestmark = pytest.mark.integration
__all__ = ["terminal"]  # the fixture, imported for this module's tests

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6300010000050001"
    "0d0a2db40000000049454e44ae426082"
)


def sim(spine: Stack, what: str) -> list[dict[str, object]]:
    response = httpx.get(spine.sim_url.removesuffix("/v1") + f"/_sim/{what}", timeout=10)
    result: list[dict[str, object]] = response.json()
    return result


def test_history_conversations_feedback_and_upload(
    terminal: Terminal, spine: Stack, tmp_path: Path
) -> None:
    start = terminal.mark()
    terminal.type("tell me about otters")
    terminal.expect("✓ done", start)
    start = terminal.mark()
    terminal.type("/history")
    terminal.expect("you: tell me about otters", start)
    terminal.expect("bot: ", start)
    start = terminal.mark()
    terminal.type("/conversations")
    terminal.expect(r"[0-9a-f-]{36}  ", start)

    start = terminal.mark()
    terminal.type("/like")
    terminal.expect("sent", start)
    user = "tty-test_history_conversations_feedback_and_upload"
    feedback = [c for c in sim(spine, "calls") if str(c["path"]).endswith("/feedbacks")]
    assert feedback and feedback[-1]["user"] == user
    assert feedback[-1]["body"]["rating"] == "like"  # type: ignore[index]
    start = terminal.mark()
    terminal.type("/dislike")
    terminal.expect("sent", start)

    picture = tmp_path / "otter.png"
    picture.write_bytes(PNG)
    start = terminal.mark()
    terminal.type(f"/upload {picture}")
    terminal.expect("attached otter.png", start)
    start = terminal.mark()
    terminal.type("what is in the picture?")
    terminal.expect("✓ done", start)
    asked = [r for r in sim(spine, "requests") if r["query"] == "what is in the picture?"]
    files = asked[-1]["files"]
    assert isinstance(files, list) and files[0]["transfer_method"] == "local_file"
    assert files[0]["type"] == "image"
