"""A node's prober leaving: no heartbeat may follow the ``ZREM`` that removes its own.

Without Redis: the prober's commands are recorded by a stand-in for ``call`` (the
prober's own, and the one under ``evalsha``), and trio's autojump clock runs its
probe interval. (Two real nodes leaving are tested
with a real Redis in test_cluster_acl.py; this race failed one CI run there.)
"""

from __future__ import annotations

from typing import Any, cast

import pytest
import trio
import trio.testing

from relayd.config import ClusterSettings
from relayd.routing.cluster import codec, redis_probe, redis_wire
from relayd.routing.cluster.link import Health
from relayd.routing.cluster.redis_probe import Prober
from relayd.routing.cluster.redis_wire import Wire


async def test_no_probe_after_leaving_writes_the_heartbeat_back(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = ClusterSettings(
        enabled=True, probe_interval_s=0.05, probe_timeout_s=0.3, connect_timeout_s=1.0
    )
    prober = Prober(settings, "n1", codec.Channels("test:"), Health())
    sent: list[bytes] = []
    never = trio.Event()

    async def call(_: Wire, *command: Any) -> object:
        sent.append(command[0])
        if command[0] == b"EVALSHA":
            prober._back.set()  # the probe came back on the node's own channel
            return []
        await never.wait()  # the ZREM's reply is slow to come: a probe may be due meanwhile
        return 1

    monkeypatch.setattr(redis_probe, "call", call)
    monkeypatch.setattr(redis_wire, "call", call)  # under redis_wire.evalsha (the probe's)
    publisher = cast(Wire, object())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(prober.watch, publisher)
        await trio.sleep(0.2)  # the autojump clock's: a few probes
        assert sent.count(b"EVALSHA") >= 3
        await prober.leave(publisher)  # its wait for the reply ends at connect_timeout_s
        nursery.cancel_scope.cancel()
    after = sent[sent.index(b"ZREM") + 1 :]
    assert after == [], "a heartbeat was written after the node left"
