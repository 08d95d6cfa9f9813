"""Fixtures for the end-to-end suite: one real relayd per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import RelaydProcess, running_relayd


@pytest.fixture(scope="module")
def relayd_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelaydProcess]:
    """A relayd shared by one test module, on a random loopback port.

    Teardown sends SIGTERM and asserts a graceful stop (exit 0, ``server.stop`` last), and
    that the daemon logged no internal ``error`` event while the module's tests drove it.
    """
    with running_relayd(tmp_path_factory.mktemp("relayd")) as relayd:
        yield relayd
    errors = [e for e in relayd.events if e.get("event") == "error"]
    assert not errors, f"relayd logged internal errors: {errors}\n{relayd.describe()}"
