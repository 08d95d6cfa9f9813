"""What one Redis carries for a relayd cluster: memory per subscribed id, messages per second.

Usage (from the repository root; needs Debian's ``redis-server`` and relayd's ``cluster``
extra, both installed by ``./dev test``)::

    .venv/bin/python bench/redis_capacity.py              # 100,000 ids, 200,000 messages
    .venv/bin/python bench/redis_capacity.py --quick      # 10,000 ids, 20,000 messages

It starts its own ``redis-server`` on a free loopback port (persistence off, in a temporary
directory), stops it by its pid afterwards, and measures through relayd's own link
(:class:`relayd.routing.cluster.redis.RedisLink`) and publish script:

* **memory per subscribed id**: Redis's ``used_memory`` before and after one node
  subscribes N id channels (ids of relayd's 22 characters), divided by N;
* **messages per second**: one publishing link sends M messages of 32 bytes (as the
  inter-node format wraps them) to ids a second link holds, in batches of 1, 10 and 100
  (a routing pass's size under light, moderate and heavy load), waiting for each batch's
  counts; and Redis's CPU seconds for them (``/proc/<pid>/stat``), as a share of one core.

Both links run in this one process, so the messages per second are a floor for Redis (the
Python side is the bottleneck at small batches); Redis's CPU per message is the figure
that sizes Redis. docs/scaling.md quotes one run.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relayd.config import ClusterSettings
from relayd.routing.cluster import codec
from relayd.routing.cluster.link import Health, NotSent, Published
from relayd.routing.cluster.redis import RedisLink
from tests.redis_server import running_redis

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def redis_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Counter:
    """A receiver that counts messages and wakes a waiter at a target."""

    def __init__(self) -> None:
        self.count = 0
        self.downs = 0
        self.target = 0
        self.reached = trio.Event()

    def received(self, messages: list[tuple[bytes, bytes]]) -> None:
        """Count ``messages``."""
        self.count += len(messages)
        if self.count >= self.target:
            self.reached.set()

    def link_down(self) -> None:
        """Note a broken link: the measurement is then void."""
        self.downs += 1


def _setter(done: trio.Event) -> Published:
    """A publish callback that sets ``done`` once the batch is published (or given up)."""

    def published(_counts: list[int] | NotSent | None) -> None:
        done.set()

    return published


def up(health: Health) -> bool:
    """Whether the link is up."""
    return health.up


async def measure(url: str, pid: int, info: Any, ids: int, messages: int) -> dict[str, Any]:
    """Subscribe ``ids`` channels, publish ``messages`` at three batch sizes; the figures."""
    settings = ClusterSettings(enabled=True, broker_url=url, probe_interval_s=5.0,
                               probe_timeout_s=30.0, node_timeout_s=60.0,
                               publish_buffer_bytes=64 * 1024 * 1024)  # fmt: skip
    channels = codec.Channels("relayd:")
    log = structlog.get_logger()
    holder_inbox, sender_inbox = Counter(), Counter()
    holder = RedisLink(settings, node="holder", channels=channels, receiver=holder_inbox, log=log)
    sender = RedisLink(settings, node="sender", channels=channels, receiver=sender_inbox, log=log)
    result: dict[str, Any] = {"ids": ids, "messages": messages}
    async with trio.open_nursery() as nursery:
        await nursery.start(holder.run)
        await nursery.start(sender.run)
        await holder.wait_for(up)
        await sender.wait_for(up)
        before = info()
        names = [secrets.token_urlsafe(16) for _ in range(ids)]
        for name in names:
            holder.subscribe(channels.of_id(name))
        await holder.wait_for(lambda health: health.subscriptions >= ids + 2)
        after = info()
        result["used_memory_per_id_bytes"] = round((after - before) / ids, 1)
        body = b'"' + b"x" * 30 + b'"'  # 32 bytes of JSON
        for batch in (1, 10, 100):
            holder_inbox.count, holder_inbox.target = 0, messages
            holder_inbox.reached = trio.Event()
            cpu0, t0 = redis_cpu_s(pid), time.perf_counter()
            sent = 0
            while sent < messages:
                pairs = [
                    (
                        channels.of_id(names[(sent + i) % ids]),
                        codec.encode(codec.Deliver("sender", sent + i + 1, "alice", body)),
                    )
                    for i in range(batch)
                ]
                done = trio.Event()
                assert sender.publish(pairs, _setter(done))
                await done.wait()
                sent += batch
            await holder_inbox.reached.wait()
            elapsed, cpu = time.perf_counter() - t0, redis_cpu_s(pid) - cpu0
            result[f"batch_{batch}"] = {
                "messages_per_s": round(messages / elapsed),
                "redis_cpu_share": round(cpu / elapsed, 3),
                "redis_cpu_us_per_message": round(cpu / messages * 1e6, 2),
            }
        if holder_inbox.downs or sender_inbox.downs:
            raise SystemExit("the link broke during the measurement")
        holder.close()
        sender.close()
    return result


def main() -> int:
    """Run the measurement; print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 ids, 20,000 messages")
    args = parser.parse_args()
    ids, messages = (10_000, 20_000) if args.quick else (100_000, 200_000)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    with (
        tempfile.TemporaryDirectory(prefix="relayd-redis-") as directory,
        running_redis(Path(directory)) as redis,
    ):

        def used_memory() -> int:
            for line in redis.cli("INFO", "memory").splitlines():
                if line.startswith("used_memory:"):
                    return int(line.split(":")[1])
            raise AssertionError("no used_memory in INFO")

        result = trio.run(measure, redis.url, redis.pid, used_memory, ids, messages)
        result["redis_version"] = redis.cli("INFO", "server").split("redis_version:")[1].split()[0]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
