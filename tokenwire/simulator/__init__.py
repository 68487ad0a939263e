"""A Dify Service API simulator: real HTTP, Dify's streaming wire format, scripted faults."""

from tokenwire.simulator.app import create_app
from tokenwire.simulator.scenarios import (
    REPLACEMENT_TEXT,
    SimConfig,
    SimControls,
    answer_tokens,
    expected_answer,
    expected_final_answer,
    parse_controls,
)
from tokenwire.simulator.server import RunningSimulator, run, running, start_in_thread

__all__ = [
    "REPLACEMENT_TEXT",
    "RunningSimulator",
    "SimConfig",
    "SimControls",
    "answer_tokens",
    "create_app",
    "expected_answer",
    "expected_final_answer",
    "parse_controls",
    "run",
    "running",
    "start_in_thread",
]
