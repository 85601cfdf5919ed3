import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import Relay, Sink, base_config  # noqa: E402


@pytest.fixture
async def sink():
    s = await Sink().start()
    yield s
    await s.stop()


@pytest.fixture
async def relay_factory(tmp_path):
    """relay_factory(**config sections) -> a started Relay; stopped after the test."""
    started = []

    async def make(**sections):
        relay = await Relay(tmp_path, base_config(tmp_path, **sections)).start()
        started.append(relay)
        return relay
    yield make
    for relay in started:
        await relay.stop()
