"""A resume position from a client (`Last-Event-ID`, `?after=`) is checked in linear time.

A broker's `check_id` reads what any client sends before a stream starts;
see tests/linear.py for the check.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tidewire.broker.memory import MemoryBroker
from tidewire.broker.redis import RedisBroker

from ..linear import assert_linear

WORST: dict[str, Callable[[int], str]] = {
    "digits": lambda n: "7" * n,
    "spaces around digits": lambda n: " " * (n // 2) + "7" + " " * (n // 2),
    "dashes": lambda n: "-" * n,
    "digits and dashes": lambda n: "1-" * (n // 2),
    "redis id, spaces around the dash": lambda n: "1" + " " * (n // 2) + "-" + " " * (n // 2) + "1",
    "underscores": lambda n: "1_" * (n // 2) + "1",
}


@pytest.mark.parametrize("worst", WORST.values(), ids=WORST.keys())
def test_redis_ids_are_checked_in_linear_time(worst: Callable[[int], str]) -> None:
    # check_id is pure: no Redis is needed, and none is reached.
    assert_linear(RedisBroker("redis://127.0.0.1:1/0").check_id, worst)


@pytest.mark.parametrize("worst", WORST.values(), ids=WORST.keys())
def test_memory_ids_are_checked_in_linear_time(worst: Callable[[int], str]) -> None:
    assert_linear(MemoryBroker().check_id, worst)
