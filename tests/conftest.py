"""Shared test set-up: every async test runs under a trio-clock deadline, so a hang fails.

The deadline wraps the test function itself (a fixture cannot: pytest-trio runs
fixtures in tasks of their own). Tests on trio's autojump clock see the
deadline in virtual time, like every other timeout in them.
"""

from __future__ import annotations

import functools
import inspect
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.redis_server import RedisServer, running_redis

#: Seconds of trio's clock after which an async test fails as hung. Loopback
#: tests finish in milliseconds; the figure only exists to catch hangs.
TEST_DEADLINE_S = 30.0
#: The same on the autojump clock, where tests wait out timeouts of minutes in
#: virtual time; a hang there jumps straight to this deadline.
VIRTUAL_TEST_DEADLINE_S = 3600.0


def _with_deadline(
    test: Callable[..., Coroutine[Any, Any, None]], seconds: float
) -> Callable[..., Coroutine[Any, Any, None]]:
    @functools.wraps(test)
    async def wrapper(*args: Any, **kwargs: Any) -> None:
        with trio.fail_after(seconds):
            await test(*args, **kwargs)

    return wrapper


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            virtual = "autojump_clock" in item.fixturenames
            seconds = VIRTUAL_TEST_DEADLINE_S if virtual else TEST_DEADLINE_S
            item.obj = _with_deadline(item.obj, seconds)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh Debian ``redis-server`` on a free loopback port, stopped by PID afterwards.

    In a short directory of its own: its unix socket's path must fit in 108 bytes.
    """
    with (
        tempfile.TemporaryDirectory(prefix="relayd-redis-") as directory,
        running_redis(Path(directory)) as server,
    ):
        yield server
