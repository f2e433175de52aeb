"""Shared fixtures: real peers on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from simulator.mosquitto import PrivateMosquitto


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[PrivateMosquitto]:
    """A private Mosquitto on a free port, for the whole session."""
    with PrivateMosquitto() as broker:
        yield broker
