"""The bus contract against the in-memory FakeBus that the runner's unit tests use."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.bus_contract import BusContract
from tests.unit.fakes import FakeBus


class FakeProbe:
    def __init__(self, bus: FakeBus) -> None:
        self.bus = bus

    async def record_stop(self, key: str) -> None:
        self.bus.stops.add(key)

    async def status(self, key: str) -> dict[str, Any] | None:
        return self.bus.statuses.get(key)

    async def dead_letters(self) -> list[tuple[str, str, int]]:
        return list(self.bus.dead)


class TestFakeBus(BusContract):
    @pytest.fixture
    def bus(self) -> FakeBus:
        return FakeBus()

    @pytest.fixture
    def probe(self, bus: FakeBus) -> FakeProbe:
        return FakeProbe(bus)
