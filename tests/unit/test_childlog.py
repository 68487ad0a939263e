"""The one line ``tokenwire dev`` prints when a child dies: its cause, from the child's output."""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from tokenwire.childlog import ChildLog, cause_of

TRACEBACK = """\
INFO:     Started server process [1]
Traceback (most recent call last):
  File "/venv/bin/tokenwire", line 8, in <module>
    sys.exit(main())
  File "/venv/lib/python3.11/site-packages/worker/app.py", line 25, in <module>
    from faststream.nats.opentelemetry import NatsTelemetryMiddleware
ModuleNotFoundError: No module named 'opentelemetry.semconv'
""".splitlines()


def test_a_traceback_gives_its_exception_line() -> None:
    assert cause_of(TRACEBACK) == "ModuleNotFoundError: No module named 'opentelemetry.semconv'"


def test_a_refusal_wins_over_everything_else() -> None:
    lines = [*TRACEBACK, "refusing to start: bad configuration: worker_concurrency: not an int"]
    assert cause_of(lines).startswith("refusing to start: bad configuration")


def test_the_last_error_record_of_a_json_log() -> None:
    lines = [
        orjson.dumps({"level": "info", "msg": "worker ready"}).decode(),
        orjson.dumps({"level": "error", "msg": "cannot reach NATS", "error": "Refused"}).decode(),
        orjson.dumps({"level": "warning", "msg": "retrying"}).decode(),
    ]
    assert cause_of(lines) == "cannot reach NATS: Refused"
    with_exc = orjson.dumps(
        {"level": "critical", "msg": "startup failed", "exc": "Traceback…\nOSError: disk full"}
    ).decode()
    assert cause_of([with_exc]) == "startup failed: OSError: disk full"


def test_otherwise_the_last_line_and_never_more_than_one() -> None:
    assert cause_of(["starting", "  killed  by\tthe   OOM killer  ", ""]) == (
        "killed by the OOM killer"
    )
    assert cause_of([]) == "it printed nothing"
    assert "\n" not in cause_of(["x" * 5000])
    assert len(cause_of(["x" * 5000])) <= 300
    assert cause_of(["\x1b[31mred error\x1b[0m"]) == "red error"


def test_the_log_keeps_everything_and_names_the_cause(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    log = ChildLog(tmp_path / "logs" / "worker.log", echo=None)
    log.follow(os.fdopen(read_fd, "rb"))
    with os.fdopen(write_fd, "wb") as child_output:  # the child writes, then dies
        child_output.write("\n".join(TRACEBACK).encode() + b"\n")
    assert log.cause() == TRACEBACK[-1]
    log.close()
    assert (tmp_path / "logs" / "worker.log").read_text().splitlines() == TRACEBACK
