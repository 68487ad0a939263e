"""A wheel installed with no extras into a fresh venv, run from an unrelated folder.

This is how most users meet tokenwire: ``pip install tokenwire`` (here: the wheel this tree
builds), then ``tokenwire dev``. The test venv's packages, ``PYTHONPATH`` and the clone are out
of reach: the only tokenwire these tests can run is the installed one.
"""

from __future__ import annotations

import http.client
import os
import selectors
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.install.installs import (
    READY_PHRASE,
    DevRun,
    ask,
    clean_env,
    copy_tree,
    install,
    make_venv,
    run,
    system_python,
    tracked_files,
)
from tokenwire.natsserver import free_port
from tokenwire.simulator import expected_final_answer

# Each module builds and installs tokenwire once: allow for that beside the test itself.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

QUESTION = "Where is my order?"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # From a copy of the clone's files, as a fresh clone would build it (no stale build/).
    src = copy_tree(tracked_files(), tmp_path_factory.mktemp("src"))
    run([system_python(), "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, src], cwd=out)
    (built,) = out.glob("tokenwire-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a fresh venv holding the wheel and its dependencies, no extras."""
    bin_dir = make_venv(tmp_path_factory.mktemp("wheel-venv") / "venv")
    install(bin_dir, wheel, cwd=wheel.parent)
    return bin_dir


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A folder that has nothing to do with the clone."""
    folder = tmp_path / "somewhere-else"
    folder.mkdir()
    assert not (folder / "web").exists()
    return folder


@pytest.fixture
def dev(venv: Path, elsewhere: Path) -> Iterator[tuple[DevRun, str]]:
    port = free_port()
    proc = DevRun([venv / "tokenwire", "dev", "--port", str(port)], cwd=elsewhere, env=clean_env())
    try:
        url = proc.wait_ready(90)
        yield proc, url
        assert proc.stop() == 0, proc.output.text
    finally:
        proc.close()


def get(url_port: int, path: str, **headers: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", url_port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("content-type") or "", response.read()
    finally:
        conn.close()


def test_the_wheel_holds_every_module_and_the_page_but_nothing_else(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        f
        for f in tracked_files()
        if f.endswith(".py") and f.split("/")[0] in ("gateway", "worker", "shared", "tokenwire")
    }
    missing = sorted(m for m in modules if m not in names)
    assert not missing, f"modules the wheel leaves out: {missing}"
    page = {"index.html", "app.js", "app.css", "widget.js", "sdk/tokenwire.js", "sdk/markdown.js"}
    assert {f"tokenwire/web/{name}" for name in page} <= names
    assert "tokenwire/web/sdk/tokenwire.d.ts" in names
    leaked = sorted(
        n for n in names if any(part in n for part in ("/test/", "node_modules", "package"))
    )
    assert not leaked, f"the wheel ships what the page does not need: {leaked}"


def test_a_plain_wheel_serves_the_page_and_answers_over_the_socket(
    dev: tuple[DevRun, str],
) -> None:
    proc, url = dev
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    status, kind, body = get(port, "/")
    assert status == 200 and kind.startswith("text/html"), (status, kind)
    assert b"app.js" in body
    for path in ("/app.js", "/app.css", "/widget.js", "/sdk/tokenwire.js", "/sdk/markdown.js"):
        status, kind, body = get(port, path)
        assert status == 200 and body, f"{path}: {status}"
    status, kind, sdk = get(port, "/sdk/tokenwire.js")
    assert "javascript" in kind and b"export class" in sdk, kind

    assert ask(url, QUESTION) == expected_final_answer(QUESTION)
    assert "Traceback" not in proc.output.text, proc.output.text
    assert "Dify simulator" in proc.output.text


def test_dev_demo_apps_answer_every_kind_from_a_plain_install(dev: tuple[DevRun, str]) -> None:
    """dev's simulator serves one app of each kind, by name: a workflow run and an agent chat."""
    import asyncio

    from tests.integration.wsclient import Client, answer_of, assert_seq_complete
    from tokenwire.simulator import expected_workflow_answer

    proc, url = dev
    assert "workflow" in proc.output.text and "Demo apps" in proc.output.text
    ws_url = url.replace("http", "ws", 1).rstrip("/") + "/v1/ws?user=demo-user"
    inputs = {"query": "Ticket 42: the parcel is late"}

    async def go() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        async with Client(ws_url) as client:
            await client.send({"type": "run", "id": "w1", "app": "workflow", "inputs": inputs})
            await client.send({"type": "chat", "id": "a1", "app": "agent", "query": QUESTION})
            return await client.finish("w1", timeout=60), await client.finish("a1", timeout=60)

    run, agent = asyncio.run(go())
    for frames in (run, agent):
        assert frames[-1]["type"] == "end", frames[-1]
        assert_seq_complete(frames)
    assert answer_of(run) == expected_workflow_answer(inputs)
    assert run[-1]["outputs"]["answer"] == expected_workflow_answer(inputs)  # type: ignore[index]
    assert answer_of(agent) == expected_final_answer(QUESTION)


def test_tokenwire_jobs_and_chat_from_a_plain_install(
    venv: Path, dev: tuple[DevRun, str], elsewhere: Path
) -> None:
    proc, url = dev
    nats_line = next(line for line in proc.output.lines if "NATS with JetStream at" in line)
    nats_url = nats_line.split(" at ", 1)[1].split(",", 1)[0].strip()
    listed = run(
        [venv / "tokenwire", "jobs", "list", "--json"],
        cwd=elsewhere,
        env=clean_env(TOKENWIRE_NATS_URL=nats_url),
        timeout=60,
    )
    assert isinstance(orjson.loads(listed.stdout), list), listed.stdout

    # The terminal client: a question on stdin, the answer on stdout, Ctrl-D to leave.
    chat = subprocess.Popen(
        [str(venv / "tokenwire"), "chat", url, "--user", "terminal-user"],
        cwd=elsewhere,
        env=clean_env(COLUMNS="200"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert chat.stdin is not None
        chat.stdin.write(f"{QUESTION}\n".encode())
        chat.stdin.flush()
        first_words = " ".join(expected_final_answer(QUESTION).split()[:1])
        deadline = time.monotonic() + 60
        seen = b""
        assert chat.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(chat.stdout, selectors.EVENT_READ)
            while first_words.encode() not in seen and time.monotonic() < deadline:
                if sel.select(timeout=1):
                    chunk = os.read(chat.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    seen += chunk
        assert first_words.encode() in seen, seen.decode(errors="replace")
        chat.stdin.close()  # Ctrl-D
        assert chat.wait(timeout=30) == 0
    finally:
        if chat.poll() is None:
            chat.kill()
            chat.wait()


def test_every_command_and_its_help_start_from_a_plain_install(venv: Path, elsewhere: Path) -> None:
    top = run([venv / "tokenwire", "--help"], cwd=elsewhere).stdout
    commands = ("dev", "gateway", "worker", "jobs", "chat", "simulate-dify")
    for command in commands:
        assert command in top, f"{command} is missing from tokenwire --help"
        assert "Usage" in run([venv / "tokenwire", command, "--help"], cwd=elsewhere).stdout
    # Every core of a pod: the process-count flags are part of each command's help.
    assert "--workers" in run([venv / "tokenwire", "gateway", "--help"], cwd=elsewhere).stdout
    assert "--processes" in run([venv / "tokenwire", "worker", "--help"], cwd=elsewhere).stdout
    for sub in ("list", "show", "replay", "purge"):
        assert "Usage" in run([venv / "tokenwire", "jobs", sub, "--help"], cwd=elsewhere).stdout
    assert "Usage" in run([venv / "python", "-m", "tokenwire", "--help"], cwd=elsewhere).stdout
    # The processes import everything they need at start (not only when --help is read).
    for module in ("gateway.app", "worker.app", "tokenwire.dev", "tokenwire.jobs"):
        run([venv / "python", "-c", f"import {module}"], cwd=elsewhere)


def test_simulate_dify_from_a_plain_install(venv: Path, elsewhere: Path) -> None:
    port = free_port()
    sim = subprocess.Popen(
        [str(venv / "tokenwire"), "simulate-dify", "--port", str(port)],
        cwd=elsewhere,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, _, body = get(port, "/v1/info", Authorization="Bearer app-demo")
                break
            except OSError:
                assert sim.poll() is None, f"simulate-dify exited with {sim.returncode}"
                assert time.monotonic() < deadline, "simulate-dify never answered"
                time.sleep(0.2)
        assert status == 200 and orjson.loads(body)["mode"]
    finally:
        sim.terminate()
        sim.wait(timeout=15)


# --- a child that cannot start: dev says why in one line and never says ready ----------


def failed_dev(venv: Path, cwd: Path, *args: str, **env: str) -> tuple[int, list[str]]:
    proc = DevRun(
        [venv / "tokenwire", "dev", "--port", str(free_port()), *args],
        cwd=cwd,
        env=clean_env(**env),
    )
    try:
        code = proc.wait_exit(120)
        return code, proc.output.lines
    finally:
        proc.close()


def reason(lines: list[str], marker: str) -> str:
    found = [line for line in lines if marker in line]
    assert len(found) == 1, f"expected one line with {marker!r}:\n" + "\n".join(lines)
    return found[0]


def test_a_worker_that_cannot_start_ends_dev_with_its_reason(venv: Path, elsewhere: Path) -> None:
    # Tracing asked for, but the plain install has no otel extra.
    code, lines = failed_dev(
        venv, elsewhere, TOKENWIRE_OTEL_ENDPOINT="http://127.0.0.1:9/v1/traces"
    )
    assert code != 0
    assert not any(READY_PHRASE in line for line in lines), "\n".join(lines)
    line = reason(lines, "while starting")
    assert "refusing to start" in line and "tokenwire[otel]" in line, line
    log = Path(line.split("(full log: ", 1)[1].split(")", 1)[0])
    assert log.is_file() and log.is_relative_to(elsewhere), log
    assert "tokenwire[otel]" in log.read_text()


def test_a_key_dify_refuses_ends_dev_at_once(venv: Path, elsewhere: Path) -> None:
    port = free_port()
    sim = subprocess.Popen(
        [str(venv / "tokenwire"), "simulate-dify", "--port", str(port), "--api-key", "app-right"],
        cwd=elsewhere,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        code, lines = failed_dev(
            venv,
            elsewhere,
            DIFY_API_URL=f"http://127.0.0.1:{port}/v1",
            DIFY_API_KEY="app-wrong",
        )
    finally:
        sim.terminate()
        sim.wait(timeout=15)
    assert code != 0
    assert not any(READY_PHRASE in line for line in lines)
    line = reason(lines, "was not ready")
    assert line.startswith("worker was not ready (") and "rejected" in line, line
    assert "app-wrong" not in "\n".join(lines), "the key must never be printed"


def test_an_unreachable_dify_ends_dev_after_the_ready_timeout(venv: Path, elsewhere: Path) -> None:
    closed = free_port()
    code, lines = failed_dev(
        venv,
        elsewhere,
        "--ready-timeout",
        # Long enough for the worker's /readyz to answer at all on a loaded machine (it must
        # say why it is not ready: Dify unreachable), short enough to keep the test quick.
        "12",
        DIFY_API_URL=f"http://127.0.0.1:{closed}/v1",
        DIFY_API_KEY="app-anything",
    )
    assert code != 0
    assert not any(READY_PHRASE in line for line in lines)
    line = reason(lines, "was not ready")
    assert f"127.0.0.1:{closed}" in line and "unreachable" in line, line


def test_gateway_and_worker_refuse_bad_settings_in_one_line(venv: Path, elsewhere: Path) -> None:
    for argv, env in (
        (["worker"], {"DIFY_API_KEY": "app-x", "TOKENWIRE_WORKER_CONCURRENCY": "lots"}),
        (["gateway"], {"TOKENWIRE_OTEL_ENDPOINT": "http://127.0.0.1:9/v1/traces"}),
        (["worker"], {}),
    ):
        done = subprocess.run(
            [str(venv / "tokenwire"), *argv],
            cwd=elsewhere,
            env=clean_env(**env),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, (argv, env, done.stdout, done.stderr)
        said = done.stderr.strip().splitlines()
        assert len(said) == 1 and said[0].startswith("refusing to start"), done.stderr
        assert "Traceback" not in done.stderr
