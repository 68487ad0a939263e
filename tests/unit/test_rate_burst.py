"""``TOKENWIRE_RATE_PER_USER=5/min`` means at most 5 at once: the burst defaults to the rate's
count unless ``TOKENWIRE_RATE_BURST`` is set."""

from __future__ import annotations

import asyncio

import pytest

from gateway.limits import RequestRate
from shared.exceptions import RateLimited
from shared.ratelimit import Rate, rate_count
from shared.settings import Settings
from shared.topology import rate_bucket_config
from tests.unit.test_limits import MemoryKv


@pytest.mark.parametrize(
    ("rate", "burst"),
    [("5/min", 5), ("60/min", 60), ("100/hour", 100), ("3/10s", 3), ("0.5/s", 1), ("2.5/min", 2)],
)
def test_unset_the_burst_is_the_rates_count(rate: str, burst: int) -> None:
    assert Settings(rate_per_user=rate).rate_burst == burst


def test_the_default_rate_allows_its_own_count_at_once() -> None:
    assert Settings().rate_per_user == "60/min"
    assert Settings().rate_burst == 60


def test_a_set_burst_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(rate_per_user="5/min", rate_burst=2).rate_burst == 2
    monkeypatch.setenv("TOKENWIRE_RATE_PER_USER", "5/min")
    assert Settings().rate_burst == 5, "read from the environment, the same rule"
    monkeypatch.setenv("TOKENWIRE_RATE_BURST", "9")
    assert Settings().rate_burst == 9


def test_a_bad_rate_is_one_error_about_the_rate() -> None:
    with pytest.raises(ValueError, match="rate_per_user") as refused:
        Settings(rate_per_user="lots")
    assert "rate_burst" not in str(refused.value)


def test_rate_count_reads_the_n_of_n_per_unit() -> None:
    assert rate_count("20/min") == 20
    assert rate_count(" 3 / 10 s ") == 3
    with pytest.raises(ValueError):
        rate_count("fast")


async def test_five_per_minute_lets_exactly_five_through_at_once() -> None:
    config = Settings(rate_per_user="5/min")
    rate = RequestRate(MemoryKv(), config)  # type: ignore[arg-type]
    outcomes = await asyncio.gather(
        *(rate.take("ivan", f"r{n}") for n in range(30)), return_exceptions=True
    )
    assert sum(o is None for o in outcomes) == 5
    refused = [o for o in outcomes if isinstance(o, RateLimited)]
    assert len(refused) == 25
    assert all(r.retry_after_ms is not None and r.retry_after_ms > 1000 for r in refused)


def test_the_rate_bucket_ttl_follows_the_burst() -> None:
    # An empty bucket of 5 refilling at 5/min is full again after a minute: the KV entry's TTL.
    assert rate_bucket_config(Settings(rate_per_user="5/min"))["ttl"] == pytest.approx(60.0)
    assert Rate.parse("5/min", Settings(rate_per_user="5/min").rate_burst).burst == 5
