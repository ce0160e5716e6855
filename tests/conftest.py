"""Fixtures shared by test modules (helpers that are not fixtures live in ``helpers.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from helpers import expert_swarm


@pytest.fixture(scope="module")
def swarm(request: pytest.FixtureRequest) -> Iterator[Any]:
    """One trainer ``Swarm`` per test module over real in-process servers (``helpers.
    expert_swarm``), built from the module's ``pytestmark = pytest.mark.expert_swarm(
    {ExpertConfig kwargs}, ..., dht=..., **Swarm kwargs)``; ``swarm.node`` and
    ``swarm.servers`` are the DHT node and the expert servers."""
    marker = request.node.get_closest_marker("expert_swarm")
    if marker is None:
        raise pytest.UsageError(f"{request.node.name} uses `swarm` without an expert_swarm mark")
    with expert_swarm(*marker.args, **marker.kwargs) as built:
        yield built
