"""The metric families of both processes: names, types, labels, and helpers that move them.

What an operator relies on: the names in deploy/grafana and deploy/prometheus exist, labels
never carry an unbounded id, and each helper changes the series it is named after.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics as gm
from worker import metrics as wm

# family name (as exposed, without _total/_bucket) -> (type, label names)
GATEWAY_FAMILIES = {
    "tokenwire_gateway_connections": ("gauge", set()),
    "tokenwire_gateway_connections_opened": ("counter", set()),
    "tokenwire_gateway_connections_closed": ("counter", {"code"}),
    "tokenwire_gateway_frames_in": ("counter", {"type"}),
    "tokenwire_gateway_frames_out": ("counter", {"type"}),
    "tokenwire_gateway_requests_accepted": ("counter", set()),
    "tokenwire_gateway_requests": ("counter", {"outcome"}),
    "tokenwire_gateway_ttft_seconds": ("histogram", set()),
    "tokenwire_gateway_resumes": ("counter", {"outcome"}),
    "tokenwire_gateway_refusals": ("counter", {"kind"}),
    "tokenwire_gateway_in_progress": ("gauge", {"work"}),
    "tokenwire_gateway_draining": ("gauge", set()),
    "tokenwire_gateway_asyncio_tasks": ("gauge", set()),
    "tokenwire_gateway_nats_connected": ("gauge", set()),
    "tokenwire_gateway_stale_frames": ("counter", set()),
}
WORKER_FAMILIES = {
    "tokenwire_worker_jobs_received": ("counter", set()),
    "tokenwire_worker_jobs_redelivered": ("counter", set()),
    "tokenwire_worker_jobs": ("counter", {"outcome"}),
    "tokenwire_worker_jobs_queued": ("counter", {"reason"}),
    "tokenwire_worker_queue_wait_seconds": ("histogram", set()),
    "tokenwire_worker_streams_running": ("gauge", set()),
    "tokenwire_worker_dify_requests": ("counter", {"endpoint", "status"}),
    "tokenwire_worker_dify_latency_seconds": ("histogram", {"endpoint"}),
    "tokenwire_worker_dify_first_token_seconds": ("histogram", set()),
    "tokenwire_worker_dify_errors": ("counter", {"code"}),
    "tokenwire_worker_dify_breaker_open": ("gauge", set()),
    "tokenwire_worker_frames_published": ("counter", {"type"}),
    "tokenwire_worker_answer_tokens": ("counter", set()),
    "tokenwire_worker_resets": ("counter", set()),
    "tokenwire_worker_stops": ("counter", set()),
    "tokenwire_worker_fenced": ("counter", set()),
    "tokenwire_worker_consumer_pending": ("gauge", set()),
    "tokenwire_worker_consumer_ack_pending": ("gauge", set()),
    "tokenwire_worker_queue_oldest_age_seconds": ("gauge", set()),
    "tokenwire_worker_dead_letters": ("gauge", set()),
    "tokenwire_worker_stream_bytes": ("gauge", {"stream"}),
    "tokenwire_worker_stream_max_bytes": ("gauge", {"stream"}),
    "tokenwire_worker_draining": ("gauge", set()),
    "tokenwire_worker_asyncio_tasks": ("gauge", set()),
}
FORBIDDEN_LABELS = {"user", "id", "request", "request_id", "key", "conn", "session", "trace_id"}


def value(name: str, **labels: str) -> float:
    got = REGISTRY.get_sample_value(name, labels)
    return 0.0 if got is None else got


def exercise_everything() -> None:
    """Touch every labelled series once so its labels appear in the exposition."""
    gm.connection_opened()
    gm.connection_closed(4100)
    gm.frame_in("chat")
    gm.frame_out("delta")
    gm.request_accepted()
    gm.request_finished("completed")
    gm.observe_ttft(0.2)
    gm.resume("replayed")
    gm.refusal("auth")
    wm.job_queued("upstream_unavailable")
    wm.dify_response(200, 0.05)
    wm.dify_error("dify_server_error")
    wm.frame_published("delta")
    wm.set_stream_bytes("TW_FRAMES", 1, 2)
    wm.job_finished("completed")


def exposed() -> dict[str, tuple[str, set[str]]]:
    exercise_everything()
    text = generate_latest(REGISTRY).decode()
    out: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        # The classic text format shows each counter's `_created` series as a family of its own.
        if not family.name.startswith("tokenwire_") or family.name.endswith("_created"):
            continue
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
        out[family.name] = (family.type, labels)
    return out


@pytest.mark.parametrize("expected", [GATEWAY_FAMILIES, WORKER_FAMILIES], ids=["gateway", "worker"])
def test_families_are_exposed_with_their_types_and_labels(
    expected: dict[str, tuple[str, set[str]]],
) -> None:
    got = exposed()
    for name, (kind, labels) in expected.items():
        assert name in got, f"{name} is not on /metrics"
        assert got[name] == (kind, labels), name


def test_no_family_is_left_out_of_the_tables_and_no_label_is_an_id() -> None:
    got = exposed()
    ours = {n: v for n, v in got.items() if n.startswith(("tokenwire_gateway", "tokenwire_worker"))}
    assert set(ours) == set(GATEWAY_FAMILIES) | set(WORKER_FAMILIES)
    for name, (_, labels) in ours.items():
        assert not labels & FORBIDDEN_LABELS, name


def test_module_docstrings_list_every_family() -> None:
    for module, families in ((gm, GATEWAY_FAMILIES), (wm, WORKER_FAMILIES)):
        doc = module.__doc__ or ""
        for name in families:
            short = name.split("_", 2)[2]
            assert f"``{short}" in doc, f"{name} is missing from {module.__name__}'s docstring"


def test_connection_helpers_move_the_gauge_and_count_close_codes() -> None:
    open_before = value("tokenwire_gateway_connections")
    opened_before = value("tokenwire_gateway_connections_opened_total")
    draining_before = value("tokenwire_gateway_connections_closed_total", code="4100")
    gm.connection_opened()
    gm.connection_opened()
    assert value("tokenwire_gateway_connections") == open_before + 2
    assert value("tokenwire_gateway_connections_opened_total") == opened_before + 2
    gm.connection_closed(4100)
    gm.connection_closed(3999)  # not a code tokenwire knows: bounded to "other"
    assert value("tokenwire_gateway_connections") == open_before
    assert value("tokenwire_gateway_connections_closed_total", code="4100") == draining_before + 1
    assert value("tokenwire_gateway_connections_closed_total", code="other") >= 1
    assert value("tokenwire_gateway_connections_closed_total", code="3999") == 0


HelperCase = tuple[Callable[[], None], str, dict[str, str], float]

COUNTING_HELPERS: list[HelperCase] = [
    (lambda: gm.frame_in("stop"), "tokenwire_gateway_frames_in_total", {"type": "stop"}, 1),
    (lambda: gm.frame_in("x" * 200), "tokenwire_gateway_frames_in_total", {"type": "other"}, 1),
    (lambda: gm.frame_out("end"), "tokenwire_gateway_frames_out_total", {"type": "end"}, 1),
    (gm.request_accepted, "tokenwire_gateway_requests_accepted_total", {}, 1),
    (
        lambda: gm.request_finished("stopped"),
        "tokenwire_gateway_requests_total",
        {"outcome": "stopped"},
        1,
    ),
    (lambda: gm.observe_ttft(0.4), "tokenwire_gateway_ttft_seconds_count", {}, 1),
    (lambda: gm.observe_ttft(0.4), "tokenwire_gateway_ttft_seconds_sum", {}, 0.4),
    (lambda: gm.resume("unknown"), "tokenwire_gateway_resumes_total", {"outcome": "unknown"}, 1),
    (
        lambda: gm.refusal("rate_limit"),
        "tokenwire_gateway_refusals_total",
        {"kind": "rate_limit"},
        1,
    ),
    (lambda: gm.refusal("user-42"), "tokenwire_gateway_refusals_total", {"kind": "other"}, 1),
    (lambda: wm.job_received(1), "tokenwire_worker_jobs_received_total", {}, 1),
    (lambda: wm.job_received(1), "tokenwire_worker_jobs_redelivered_total", {}, 0),
    (lambda: wm.job_received(3), "tokenwire_worker_jobs_redelivered_total", {}, 1),
    (
        lambda: wm.job_finished("handed_back"),
        "tokenwire_worker_jobs_total",
        {"outcome": "handed_back"},
        1,
    ),
    (
        lambda: wm.job_finished("dead_lettered"),
        "tokenwire_worker_jobs_total",
        {"outcome": "dead_lettered"},
        1,
    ),
    (
        lambda: wm.job_queued("dify_rate_limited"),
        "tokenwire_worker_jobs_queued_total",
        {"reason": "dify_rate_limited"},
        1,
    ),
    (lambda: wm.observe_queue_wait(2.5), "tokenwire_worker_queue_wait_seconds_sum", {}, 2.5),
    (
        lambda: wm.dify_response(503, 0.1),
        "tokenwire_worker_dify_requests_total",
        {"endpoint": "chat", "status": "503"},
        1,
    ),
    (
        lambda: wm.dify_response(None, 5.0),
        "tokenwire_worker_dify_requests_total",
        {"endpoint": "chat", "status": "none"},
        1,
    ),
    (
        lambda: wm.dify_response(200, 0.3, endpoint="stop"),
        "tokenwire_worker_dify_latency_seconds_count",
        {"endpoint": "stop"},
        1,
    ),
    (
        lambda: wm.observe_dify_first_token(0.7),
        "tokenwire_worker_dify_first_token_seconds_count",
        {},
        1,
    ),
    (
        lambda: wm.dify_error("upstream_cut"),
        "tokenwire_worker_dify_errors_total",
        {"code": "upstream_cut"},
        1,
    ),
    (
        lambda: wm.frame_published("reset"),
        "tokenwire_worker_frames_published_total",
        {"type": "reset"},
        1,
    ),
    (lambda: wm.answer_tokens(37), "tokenwire_worker_answer_tokens_total", {}, 37),
    (wm.reset_sent, "tokenwire_worker_resets_total", {}, 1),
    (wm.stop_acted, "tokenwire_worker_stops_total", {}, 1),
]


@pytest.mark.parametrize(
    ("helper", "sample", "labels", "delta"),
    COUNTING_HELPERS,
    ids=[f"{case[1]}{case[2] or ''}" for case in COUNTING_HELPERS],
)
def test_each_helper_moves_its_series(
    helper: Callable[[], None], sample: str, labels: dict[str, str], delta: float
) -> None:
    before = value(sample, **labels)
    helper()
    assert value(sample, **labels) == pytest.approx(before + delta)


def test_ttft_buckets_resolve_milliseconds_to_seconds() -> None:
    before_fast = value("tokenwire_gateway_ttft_seconds_bucket", le="0.05")
    before_slow = value("tokenwire_gateway_ttft_seconds_bucket", le="5.0")
    gm.observe_ttft(0.03)
    gm.observe_ttft(4.0)
    assert value("tokenwire_gateway_ttft_seconds_bucket", le="0.05") == before_fast + 1
    assert value("tokenwire_gateway_ttft_seconds_bucket", le="5.0") == before_slow + 2
    assert gm.TTFT_BUCKETS[0] <= 0.01 and gm.TTFT_BUCKETS[-1] >= 30


def test_gauges_follow_what_they_are_set_to() -> None:
    before = value("tokenwire_worker_streams_running")
    with wm.running_stream():
        assert value("tokenwire_worker_streams_running") == before + 1
    assert value("tokenwire_worker_streams_running") == before

    wm.set_consumer_lag(pending=12, ack_pending=5)
    assert value("tokenwire_worker_consumer_pending") == 12
    assert value("tokenwire_worker_consumer_ack_pending") == 5
    wm.set_consumer_lag(pending=0, ack_pending=0)
    assert value("tokenwire_worker_consumer_pending") == 0

    wm.set_queue_age(42.0)
    assert value("tokenwire_worker_queue_oldest_age_seconds") == 42.0
    wm.set_dead_letters(3)
    assert value("tokenwire_worker_dead_letters") == 3
    wm.set_stream_bytes("TW_JOBS", 700, 1000)
    assert value("tokenwire_worker_stream_bytes", stream="TW_JOBS") == 700
    assert value("tokenwire_worker_stream_max_bytes", stream="TW_JOBS") == 1000

    for setter, name in (
        (gm.set_draining, "tokenwire_gateway_draining"),
        (gm.set_nats_connected, "tokenwire_gateway_nats_connected"),
        (wm.set_draining, "tokenwire_worker_draining"),
        (wm.set_breaker_open, "tokenwire_worker_dify_breaker_open"),
    ):
        setter(True)
        assert value(name) == 1
        setter(False)
        assert value(name) == 0


def test_bounded_label_sets_follow_the_protocol_catalogues() -> None:
    from shared.exceptions import CloseCode, ErrorCode

    assert {"hello", "accepted", "delta", "end", "error", "pong"} <= gm.SERVER_FRAME_TYPES
    assert gm.SERVER_FRAME_TYPES == wm.SERVER_FRAME_TYPES
    assert {"chat", "stop", "resume", "ping", "invalid"} <= gm.CLIENT_FRAME_TYPES
    assert {int(c) for c in CloseCode} <= gm.CLOSE_CODES
    assert {c.value for c in ErrorCode} == wm.ERROR_CODES
