"""The README's first set-up command, exactly as written, answers a question in the page.

The command is read from the README itself (the first ``sh`` block after "Run it"), so the
README and this test cannot drift apart. It runs in a copy of the clone's files (what a fresh
clone holds) with the machine's own ``python3.11`` and an environment free of the test venv;
as soon as it prints that it is ready, Debian's Chromium opens the page, types a question and
must show exactly the simulator's answer.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path

import orjson
import pytest

from tests.install.installs import SOURCE, DevRun, clean_env, copy_tree, tracked_files
from tokenwire.simulator import expected_final_answer

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(600)]

QUESTION = "Does the README work?"
ASK_PAGE = SOURCE / "web/test/helpers/ask-page.mjs"


def run_command() -> str:
    readme = (SOURCE / "README.md").read_text()
    after = readme.split("**Run it**", 1)
    assert len(after) == 2, "the README has no 'Run it' command"
    block = re.search(r"```sh\n(.*?)\n```", after[1], re.S)
    assert block, "no sh block after 'Run it'"
    command = block.group(1).strip()
    assert "\n" not in command, "the set-up command is one line"
    return command


def port_of(command: str) -> int:
    found = re.search(r"--port[ =](\d+)", command)
    return int(found.group(1)) if found else 8000  # tokenwire dev's default


def test_the_readme_run_command_answers_in_the_page(tmp_path: Path) -> None:
    command = run_command()
    assert command.startswith("python3.11 -m venv .venv") and "tokenwire dev" in command
    port = port_of(command)
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            pytest.fail(f"port {port} is taken: the README's command needs it free")
    clone = copy_tree(tracked_files(), tmp_path / "tokenwire")
    assert not (clone / ".venv").exists()

    dev = DevRun(["bash", "-c", command], cwd=clone, env=clean_env())
    try:
        url = dev.wait_ready(240)  # the install happens first
        assert url == f"http://127.0.0.1:{port}/", url
        assert (clone / ".venv/bin/tokenwire").exists()
        node = shutil.which("node")
        assert node, "the tests need Node.js (README)"
        shown = subprocess.run(
            [node, str(ASK_PAGE), url, QUESTION, expected_final_answer(QUESTION)],
            cwd=SOURCE / "web",
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert shown.returncode == 0, shown.stderr + shown.stdout
        page = orjson.loads(shown.stdout.strip().splitlines()[-1])
        assert page["state"] == "done", page
        assert page["html"] == page["expected_html"], page
        assert not page["errors"], page["errors"]
        assert dev.stop() == 0, dev.output.text
    finally:
        dev.close()
