"""The Redis link against Debian's real redis-server: connect, publish, subscribe, and fail.

Every failure the link must survive is inflicted for real: Redis absent at
start, restarted, frozen with SIGSTOP, and a subscription that silently
stops delivering (a proxy that keeps the TCP connection and drops what Redis
sends). Waits are for the link's own state changes and for messages, each
bounded by a trio-clock ``fail_after``; timeouts are short so that failures
are found in well under a second.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import structlog
import trio
import trio.testing
import trustme
from structlog.typing import EventDict

from relayd.config import ClusterSettings
from relayd.routing.cluster import codec
from relayd.routing.cluster.link import NOT_SENT, Health, NotSent, Published
from relayd.routing.cluster.metrics import ClusterCollector
from relayd.routing.cluster.redis import RedisLink
from relayd.routing.cluster.redis_probe import Prober
from relayd.routing.cluster.redis_subscriber import CHANNELS_PER_COMMAND, Subscriptions
from relayd.routing.cluster.redis_wire import Command, Reply, Wire
from tests.redis_server import RedisServer, free_port, running_redis
from tests.tcp_proxy import TcpProxy

#: Short timeouts: a probe every 50 ms, late after 300 ms; retries within 200 ms.
FAST: dict[str, Any] = {
    "probe_interval_s": 0.05,
    "probe_timeout_s": 0.3,
    "node_timeout_s": 0.5,
    "reconnect_max_s": 0.2,
    "connect_timeout_s": 1.0,
}
LIMIT_S = 10.0  # trio-clock bound on anything that could hang


def UP(health: Health) -> bool:
    return health.up


def DOWN(health: Health) -> bool:
    return not health.up


class Inbox:
    """A receiver that keeps what arrives and wakes whoever waits for it."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.downs = 0
        self._lot = trio.lowlevel.ParkingLot()

    def received(self, messages: list[tuple[bytes, bytes]]) -> None:
        self.messages += messages
        self._lot.unpark_all()

    def link_down(self) -> None:
        self.downs += 1

    async def wait_for(self, count: int) -> list[tuple[bytes, bytes]]:
        while len(self.messages) < count:
            await self._lot.park()
        return self.messages


@pytest.fixture
def logs() -> Iterator[list[EventDict]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


CHANNELS = codec.Channels("test:")


@asynccontextmanager
async def link_to(
    url: str, node: str = "n1", *, up: bool = True, log: Any = None, **settings: Any
) -> AsyncIterator[tuple[RedisLink, Inbox]]:
    inbox = Inbox()
    link = RedisLink(
        ClusterSettings(enabled=True, broker_url=url, **{**FAST, **settings}),
        node=node,
        channels=CHANNELS,
        receiver=inbox,
        log=structlog.get_logger() if log is None else log,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        if up:
            await link.wait_for(UP)
        yield link, inbox
        link.close()


@asynccontextmanager
async def two_nodes(
    url_one: str, url_two: str, **settings: Any
) -> AsyncIterator[tuple[RedisLink, RedisLink, Inbox]]:
    """Nodes n1 and n2, both up; yields n1's link, n2's link and n2's inbox."""
    async with (
        link_to(url_one, **settings) as (one, _),
        link_to(url_two, "n2", **settings) as (two, inbox),
    ):
        yield one, two, inbox


async def listening(link: RedisLink, client_id: str) -> bytes:
    """Subscribe ``link`` to ``client_id``'s channel, confirmed; the channel."""
    channel = CHANNELS.of_id(client_id)
    link.subscribe(channel)
    await link.subscribed(channel)
    return channel


async def publish(link: RedisLink, *pairs: tuple[bytes, bytes]) -> list[int] | NotSent | None:
    """Publish and wait for Redis's counts (None: the batch's fate is unknown)."""
    return await _counted(link.publish, pairs)


async def _counted(
    way: Callable[[list[tuple[bytes, bytes]], Published], bool],
    pairs: tuple[tuple[bytes, bytes], ...],
) -> list[int] | NotSent | None:
    """Publish ``pairs`` by ``way`` (``Link.publish``, ``Link.ask``); what ``done`` was given."""
    done = trio.Event()
    result: list[list[int] | NotSent | None] = []

    def published(counts: list[int] | NotSent | None) -> None:
        result.append(counts)
        done.set()

    assert way(list(pairs), published)
    await done.wait()
    return result[0]


async def test_publish_reaches_a_subscriber_and_counts_receivers(redis_server: RedisServer) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server.url, redis_server.unix_url) as (one, two, inbox2):
            channel = await listening(two, "abc")
            assert await publish(one, (channel, b"hello"), (CHANNELS.of_id("nobody"), b"x")) == [
                1,
                0,
            ]
            assert await inbox2.wait_for(1) == [(channel, b"hello")]
            two.unsubscribe(channel)
            await two.wait_for(lambda health: health.subscriptions == 2)  # its own two
            assert await publish(one, (channel, b"again")) == [0]
            assert one.health.published == 3
            assert two.health.received == 1


async def test_subscriptions_are_counted_holds(redis_server: RedisServer) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server.url, redis_server.url) as (one, two, _inbox):
            channel = CHANNELS.of_id("shared")
            two.subscribe(channel)
            two.subscribe(channel)
            two.unsubscribe(channel)
            await two.subscribed(channel)
            assert await publish(one, (channel, b"still held")) == [1]
            two.unsubscribe(channel)
            await two.wait_for(lambda health: health.subscriptions == 2)
            assert await publish(one, (channel, b"gone")) == [0]


async def test_unreachable_at_start_then_connects(
    tmp_path_factory: pytest.TempPathFactory, logs: list[EventDict]
) -> None:
    port = free_port()
    server = RedisServer(tmp_path_factory.mktemp("r"), port=port)
    with trio.fail_after(LIMIT_S):
        async with link_to(f"redis://127.0.0.1:{port}/0", up=False) as (link, _):
            await link.wait_for(lambda health: health.failed_attempts >= 2)
            assert not link.health.up
            assert not link.publish([(b"c", b"d")], lambda counts: None)
            server.start()
            try:
                await link.wait_for(UP)
                assert await publish(link, (CHANNELS.of_id("x"), b"y")) == [0]
            finally:
                server.stop()
    unreachable = next(e for e in logs if e["event"] == "broker.unreachable")
    assert unreachable["log_level"] == "warning"
    assert "Connection" in unreachable["reason"] or "refused" in unreachable["reason"]
    connected = next(e for e in logs if e["event"] == "broker.connected")
    assert connected["node"] == "n1"


async def test_redis_restart_reconnects_and_resubscribes(
    redis_server: RedisServer, logs: list[EventDict]
) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server.url, redis_server.url) as (one, two, inbox):
            channel = await listening(two, "survivor")
            redis_server.restart()
            await one.wait_for(DOWN)
            await two.wait_for(DOWN)
            assert inbox.downs == 1
            await one.wait_for(UP)
            await two.wait_for(UP)
            assert await publish(one, (channel, b"after restart")) == [1]
            assert await inbox.wait_for(1) == [(channel, b"after restart")]
    lost = [e for e in logs if e["event"] == "broker.lost"]
    assert {e["node"] for e in lost} == {"n1", "n2"}
    reconnected = [e for e in logs if e["event"] == "broker.connected" and e["node"] == "n2"]
    assert reconnected[-1]["resubscribed"] == 1


async def test_frozen_redis_is_detected_by_the_probe(
    redis_server: RedisServer, logs: list[EventDict]
) -> None:
    with trio.fail_after(LIMIT_S):
        async with link_to(redis_server.url) as (link, _):
            redis_server.freeze()
            try:
                frozen_at = trio.current_time()
                await link.wait_for(DOWN)
                detected_after = trio.current_time() - frozen_at
                assert not link.publish([(b"c", b"d")], lambda counts: None)
            finally:
                redis_server.thaw()
            await link.wait_for(UP)
    # Within a probe interval plus the probe timeout (and scheduling slack).
    assert detected_after < FAST["probe_interval_s"] + FAST["probe_timeout_s"] + 0.5
    lost = next(e for e in logs if e["event"] == "broker.lost")
    assert "probe did not come back" in lost["reason"]


async def test_a_silently_muted_subscription_is_detected_and_replaced(
    redis_server: RedisServer, logs: list[EventDict]
) -> None:
    proxy = TcpProxy(redis_server.port)
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.run)
            async with (
                link_to(f"redis://127.0.0.1:{port}/0") as (link, inbox),
                link_to(redis_server.url, "n2") as (other, _),
            ):
                channel = CHANNELS.of_id("quiet")
                link.subscribe(channel)
                await link.subscribed(channel)
                proxy.mute(2)  # the subscriber: connected second
                # Redis still counts the subscription, and nothing arrives...
                assert await publish(other, (channel, b"lost in the proxy")) == [1]
                # ...until the probe notices and the link reconnects.
                await link.wait_for(DOWN)
                await link.wait_for(UP)
                assert await publish(other, (channel, b"delivered")) == [1]
                assert (await inbox.wait_for(1))[-1] == (channel, b"delivered")
            nursery.cancel_scope.cancel()
    lost = next(e for e in logs if e["event"] == "broker.lost")
    assert "probe did not come back" in lost["reason"]


def metric(health: Health, name: str) -> float:
    """What ``/metrics`` shows for ``name`` (one of the ``relayd_cluster_*`` samples)."""
    for family in ClusterCollector(health, lambda: 0).collect():
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no metric {name}")


async def test_after_a_script_flush_a_batch_is_not_sent_and_the_next_one_runs(
    redis_server: RedisServer,
) -> None:
    """Redis answers NOSCRIPT without running anything: not sent, not "fate unknown".

    And the link loads the script again at once: the next batch runs on the same
    connection, with no reconnection.
    """
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server.url, redis_server.url) as (one, two, inbox2):
            channel = await listening(two, "flushed")
            assert redis_server.cli("SCRIPT", "FLUSH") == "OK"
            assert await publish(one, (channel, b"refused")) is NOT_SENT
            assert await publish(one, (channel, b"after")) == [1]
            assert [data for _, data in await inbox2.wait_for(1)] == [b"after"]
            assert (one.health.losses, one.health.connects) == (0, 1)
            assert metric(one.health, "relayd_cluster_publish_failures_total") == 1


@asynccontextmanager
async def watched(url: str) -> AsyncIterator[tuple[RedisLink, Inbox]]:
    """n1, up, and the inbox of another node that receives n1's probes (one came)."""
    async with link_to(url) as (one, _), link_to(url, "watcher") as (watcher, probes):
        watcher.subscribe(CHANNELS.of_node("n1"))  # n1's probes arrive there
        await watcher.subscribed(CHANNELS.of_node("n1"))
        await probes.wait_for(1)
        yield one, probes


async def test_a_script_flush_does_not_break_the_link(redis_server: RedisServer) -> None:
    """The probe's script is loaded again too: the probes go on, the link stays up."""
    with trio.fail_after(LIMIT_S):
        async with watched(redis_server.url) as (one, probes):
            assert redis_server.cli("SCRIPT", "FLUSH") == "OK"
            seen = len(probes.messages)
            # The second probe after the flush was sent after it (the first may
            # have been run before, and read after).
            await probes.wait_for(seen + 2)
            assert (one.health.up, one.health.losses, one.health.connects) == (True, 0, 1)


async def test_flushes_right_after_each_reload_do_not_break_the_link(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, logs: list[EventDict]
) -> None:
    """Redis flushed again as soon as it answers each reload: the link stays up.

    (A proxy flapping between two Redis servers, at its worst.)

    The probe's retry used to wait for its SCRIPT LOAD's answer before running the
    script again, so a flush in between ended the session (broker.lost NoScriptError,
    a reconnection, /readyz 503). Each reload is one SCRIPT LOAD, logged once.
    """
    flushing = False
    send = Wire.send

    def flush_after_each_reload(
        self: Wire, commands: list[Command], reply: Reply | None = None
    ) -> bool:
        if flushing and reply is not None and any(c[:2] == (b"SCRIPT", b"LOAD") for c in commands):
            answered = reply

            def then_flush(answer: Any) -> None:
                assert redis_server.cli("SCRIPT", "FLUSH") == "OK"  # before relayd sees it
                answered.consume(answer)

            reply = Reply(then_flush)
        return send(self, commands, reply)

    monkeypatch.setattr(Wire, "send", flush_after_each_reload)
    with trio.fail_after(LIMIT_S):
        async with watched(redis_server.url) as (one, probes):
            flushing = True
            assert redis_server.cli("SCRIPT", "FLUSH") == "OK"
            seen = len(probes.messages)
            async with trio.open_nursery() as nursery:

                async def fail_if_lost() -> None:
                    await one.wait_for(DOWN)
                    raise AssertionError("the link was lost")

                nursery.start_soon(fail_if_lost)
                await probes.wait_for(seen + 4)  # each one's script flushed before it
                nursery.cancel_scope.cancel()
            flushing = False
            assert (one.health.up, one.health.losses, one.health.connects) == (True, 0, 1)
    # n1 (the watcher too) loaded its heartbeat script once per probe at most.
    reloads = [
        line["script"]
        for line in logs
        if line["event"] == "broker.script_reloaded" and line["node"] == "n1"
    ]
    assert set(reloads) == {"heartbeat"}
    assert 3 <= len(reloads) <= len(probes.messages)


async def test_messages_redis_refused_unrun_are_not_counted_published(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server.url, redis_server.url) as (one, two, _):
            channel = await listening(two, "flushed")
            assert redis_server.cli("SCRIPT", "FLUSH") == "OK"
            assert await publish(one, (channel, b"refused"), (channel, b"too")) is NOT_SENT
            assert metric(one.health, "relayd_cluster_published_total") == 0
            assert await publish(one, (channel, b"after")) == [1]
            assert metric(one.health, "relayd_cluster_published_total") == 1


async def test_a_lost_script_is_logged_once_per_loss_not_per_batch(
    redis_server: RedisServer, logs: list[EventDict]
) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server.url, redis_server.url) as (one, two, _):
            channel = await listening(two, "flushed")
            for _ in range(2):  # two losses
                assert redis_server.cli("SCRIPT", "FLUSH") == "OK"
                refused: list[list[int] | NotSent | None] = []
                for n in range(5):  # all six written before the first is answered
                    assert one.publish([(channel, b"%d" % n)], refused.append)
                assert await publish(one, (channel, b"5")) is NOT_SENT
                assert await publish(one, (channel, b"after")) == [1]
                assert refused == [NOT_SENT] * 5
    published = [
        line
        for line in logs
        if line["event"] == "broker.script_reloaded" and line["script"] == "publish"
    ]
    assert (
        published
        == [
            {
                "event": "broker.script_reloaded",
                "log_level": "warning",
                "url": redis_server.url,
                "node": "n1",
                "script": "publish",
            }
        ]
        * 2
    )


async def test_a_full_publish_buffer_is_a_publish_failure(redis_server: RedisServer) -> None:
    """The link is up, so the node tried: unlike a refusal while the link is down."""
    with trio.fail_after(LIMIT_S):
        async with link_to(redis_server.url, publish_buffer_bytes=65536) as (link, _):
            assert not link.publish([(b"c", b"x" * 65536)], lambda counts: None)
            assert not link.ask([(b"c", b"x" * 65536)], lambda counts: None)
            assert not link.send([(b"c", b"x" * 65536)])
            assert metric(link.health, "relayd_cluster_publish_failures_total") == 3
            assert await publish(link, (b"c", b"fits")) == [0]


async def test_while_the_link_resubscribes_the_subscriptions_metric_stays_0(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0 until the link is up again, as broker_up, though Redis confirms them before."""
    probed = trio.Event()
    first = Prober.first

    async def first_once_allowed(self: Prober, publisher: Wire) -> None:
        await probed.wait()
        await first(self, publisher)

    with trio.fail_after(LIMIT_S):
        async with link_to(redis_server.url) as (link, _):
            link.subscribe(CHANNELS.of_id("held"))
            await link.wait_for(lambda health: health.subscriptions == 3)
            monkeypatch.setattr(Prober, "first", first_once_allowed)
            redis_server.stop()
            await link.wait_for(DOWN)
            redis_server.start()
            # Resubscribed, the first probe held back: not up yet.
            await link.wait_for(lambda health: health.subscriptions == 3)
            assert not link.health.up
            assert metric(link.health, "relayd_cluster_subscriptions") == 0
            probed.set()
            await link.wait_for(UP)
            assert metric(link.health, "relayd_cluster_subscriptions") == 3


async def test_while_the_link_is_down_redis_holds_no_subscriptions_for_it(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with link_to(redis_server.url) as (link, _):
            link.subscribe(CHANNELS.of_id("held"))
            await link.wait_for(lambda health: health.subscriptions == 3)
            assert metric(link.health, "relayd_cluster_subscriptions") == 3
            redis_server.stop()
            await link.wait_for(DOWN)
            assert metric(link.health, "relayd_cluster_subscriptions") == 0
            redis_server.start()
            await link.wait_for(lambda health: health.up and health.subscriptions == 3)


async def test_a_node_cut_off_from_redis_makes_absent_ids_unreachable(
    redis_server: RedisServer,
) -> None:
    """While a node with a fresh heartbeat no longer listens, PUBLISH to nobody says -1."""
    with trio.fail_after(LIMIT_S):
        async with link_to(redis_server.url, node_timeout_s=60.0) as (one, _):
            async with link_to(redis_server.url, "n2", node_timeout_s=60.0):
                assert await publish(one, (CHANNELS.of_id("nobody"), b"x")) == [0]
            # n2 is gone without removing its heartbeat (as a crash would).
            redis_server.forget_clients("relayd:n2:")
            assert await publish(one, (CHANNELS.of_id("nobody"), b"x")) == [-1]


async def ask(link: RedisLink, *pairs: tuple[bytes, bytes]) -> list[int] | NotSent | None:
    """As :func:`publish`, for questions (``Link.ask``)."""
    return await _counted(link.ask, pairs)


async def test_a_question_some_live_node_missed_is_counted_as_missed_a_message_is_not(
    redis_server: RedisServer,
) -> None:
    """A question must reach every live node: -1 while one is cut off, whoever else got it.

    n1 holds the id (and listens on the nodes channel), n2 is cut off with a fresh
    heartbeat. A message received by n1 stays counted (it may be delivered); a
    question received by n1 alone is -1: n2's part of the answer is missing.
    """
    holder = CHANNELS.of_id("held")
    with trio.fail_after(LIMIT_S):
        async with link_to(redis_server.url, node_timeout_s=60.0) as (one, _):
            one.subscribe(holder)
            await one.subscribed(holder)
            async with link_to(redis_server.url, "n2", node_timeout_s=60.0):
                # Every live node listens: questions are counted as messages are.
                assert await ask(one, (holder, b"q"), (CHANNELS.nodes, b"q")) == [1, 2]
                assert await ask(one, (CHANNELS.of_id("nobody"), b"q")) == [0]
            # n2 is gone without removing its heartbeat (as a crash would).
            redis_server.forget_clients("relayd:n2:")
            assert await publish(one, (holder, b"m"), (CHANNELS.of_id("nobody"), b"m")) == [1, -1]
            assert await ask(one, (holder, b"q"), (CHANNELS.nodes, b"q")) == [-1, -1]
            # Its heartbeat ages past node_timeout_s: gone, not cut off.
            redis_server.cli("ZREM", CHANNELS.heartbeats.decode(), "n2")
            assert await ask(one, (holder, b"q"), (CHANNELS.nodes, b"q")) == [1, 1]


class Recording:
    """A subscriber connection that keeps the channels it is sent SUBSCRIBE for, in order."""

    def __init__(self) -> None:
        self.channels: list[bytes] = []

    def send(self, commands: list[Command], reply: Reply | None = None) -> bool:
        for command in commands:
            assert command[0] == b"SUBSCRIBE"
            self.channels += [channel for channel in command[1:] if isinstance(channel, bytes)]
        return True


async def test_a_resubscribing_node_listens_on_the_nodes_channel_only_once_it_holds_its_ids() -> (
    None
):
    """The nodes channel last: while a node resubscribes it counts as cut off.

    Redis runs one connection's commands in order, and PUBLISH_SCRIPT counts a node as
    listening by the nodes channel: subscribed first, a node half-way through its ids
    counted as holding none of the rest (a presence of 0, a message ``unknown_recipient``).
    """
    own = CHANNELS.of_node("n1")
    subscriptions = Subscriptions([CHANNELS.nodes, own], Health(up=True))
    ids = [CHANNELS.of_id(f"id{n}") for n in range(2 * CHANNELS_PER_COMMAND + 1)]
    for channel in ids:
        subscriptions.subscribe(channel)
    wire = Recording()
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(subscriptions.restore, cast(Wire, wire))
            await trio.testing.wait_all_tasks_blocked()
            for channel in wire.channels:  # Redis confirms, in order
                subscriptions.confirmed(channel)
    assert wire.channels == [*ids, CHANNELS.nodes, own]


async def test_after_a_redis_restart_longer_than_node_timeout_the_others_are_not_gone(
    redis_server: RedisServer,
) -> None:
    """A restarted Redis has no heartbeats; the first node back puts the others' back.

    The outage (and the reconnection wait after it) must not count against them:
    n2, alive until Redis stopped and not yet back, still holds bob as far as
    anyone knows, so a message to bob is "unreachable, try again" (-1), not
    "nobody holds it" (0), although Redis was away longer than node_timeout_s.
    """
    timeout_s = 2.0
    with trio.fail_after(LIMIT_S):
        # n2 first: n1's first probe, before it is up, sees n2's heartbeat.
        async with (
            link_to(redis_server.url, "n2", node_timeout_s=timeout_s) as (two, _),
            link_to(redis_server.url, node_timeout_s=timeout_s) as (one, _),
        ):
            channel = await listening(two, "bob")
            redis_server.stop()
            await one.wait_for(DOWN)
            two.close()  # n2 stays away (as a node still in its backoff would)
            await trio.sleep(timeout_s + 0.5)  # the outage itself, longer than node_timeout_s
            redis_server.start()
            await one.wait_for(UP)
            assert await publish(one, (channel, b"for bob")) == [-1]


async def test_a_node_whose_own_link_broke_does_not_bring_back_one_that_left(
    redis_server: RedisServer,
) -> None:
    """Redis kept its heartbeats: a node back from its own outage puts none back.

    n2 leaves cleanly (its heartbeat removed) while n1 is cut off; when n1 is back,
    n2 must stay gone: a message to an id nobody holds is "nobody" (0), not
    "maybe a node that cannot be reached" (-1), which every node would answer
    for node_timeout_s if n1 brought n2's heartbeat back.
    """
    proxy = TcpProxy(redis_server.port)
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.run)
            # n2 first: n1's first probe, before it is up, sees n2's heartbeat.
            async with (
                link_to(redis_server.url, "n2", node_timeout_s=60.0) as (two, _),
                link_to(f"redis://127.0.0.1:{port}/0", node_timeout_s=60.0) as (one, _),
            ):
                nobody = CHANNELS.of_id("nobody")
                assert await publish(one, (nobody, b"x")) == [0]
                for number in range(1, proxy.accepted + 1):
                    proxy.mute(number)  # n1 hears nothing more on its connections
                await two.leave()
                two.close()
                await one.wait_for(DOWN)
                await one.wait_for(UP)  # on fresh connections through the proxy
                assert await publish(one, (nobody, b"x")) == [0]
            nursery.cancel_scope.cancel()


class Errors:
    """A logger for one link that keeps its error events and wakes whoever waits for one."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.seen = trio.Event()

    def error(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))
        self.seen.set()

    def warning(self, event: str, **fields: Any) -> None:
        pass

    def info(self, event: str, **fields: Any) -> None:
        pass


async def test_two_nodes_with_one_name_are_each_told_once(redis_server: RedisServer) -> None:
    # Each sees the other's probes on the channel of their one name.
    first, second = Errors(), Errors()
    with trio.fail_after(LIMIT_S):
        async with (
            link_to(redis_server.url, "twin", log=first),
            link_to(redis_server.url, "twin", log=second),
        ):
            await first.seen.wait()
            await second.seen.wait()
            # Neither takes the other's probe for its own: both stay up.
            for link_log in (first, second):
                [(event, fields)] = link_log.events
                assert (event, fields["node"]) == ("broker.duplicate_name", "twin")


async def test_a_batch_larger_than_the_socket_takes_is_written_whole_and_in_order(
    redis_server: RedisServer,
) -> None:
    """A unix socket takes about 200 KiB at once: the rest of each batch is written as it drains."""
    big = 1 << 20
    with trio.fail_after(LIMIT_S):
        async with two_nodes(
            redis_server.unix_url, redis_server.url, publish_buffer_bytes=8 * big
        ) as (one, two, inbox2):
            channel = await listening(two, "big")
            bodies = [bytes([65 + n]) * big for n in range(3)]
            counts: list[list[int] | NotSent | None] = []
            for body in bodies:  # all three before any is answered
                assert one.publish([(channel, body)], counts.append)
            one.send([(channel, b"then an answer")])
            assert await publish(one, (channel, b"and a small one")) == [1]
            assert counts == [[1], [1], [1]]
            received = await inbox2.wait_for(5)
            assert [data for _, data in received] == [
                *bodies,
                b"then an answer",
                b"and a small one",
            ]
            assert one.health.inflight_bytes == 0


async def test_answers_ask_for_no_reply_and_replies_still_meet_their_batches(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server.url, redis_server.url) as (one, two, inbox2):
            channel = await listening(two, "answers")
            for n in range(3):
                assert one.send([(channel, b"answer %d" % n), (CHANNELS.of_id("nobody"), b"x")])
                assert await publish(one, (channel, b"message %d" % n)) == [1]
            received = [data for _, data in await inbox2.wait_for(6)]
            assert received == [
                b"answer 0", b"message 0", b"answer 1", b"message 1", b"answer 2", b"message 2"
            ]  # fmt: skip
            assert one.health.published == 9
            assert one.health.publish_failures == 0


async def test_sending_while_down_is_refused(tmp_path: Path) -> None:
    with trio.fail_after(LIMIT_S):
        async with link_to(f"redis://127.0.0.1:{free_port()}/0", up=False) as (link, _):
            await link.wait_for(lambda health: health.failed_attempts >= 1)
            assert not link.send([(b"c", b"d")])
            assert not link.ask([(b"c", b"d")], lambda counts: None)
            assert not link.publish([(b"c", b"d")], lambda counts: None)
            # The node does not try while the link is known to be down: no failure.
            assert metric(link.health, "relayd_cluster_publish_failures_total") == 0


async def test_over_tls_commands_go_through_the_tls_layer(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    tls_port = free_port()
    tls = [
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(tmp_path / "cert.pem"),
        "--tls-key-file", str(tmp_path / "key.pem"),
        "--tls-ca-cert-file", str(tmp_path / "ca.pem"),
        "--tls-auth-clients", "no",
    ]  # fmt: skip
    url = f"rediss://127.0.0.1:{tls_port}/0"
    with (
        tempfile.TemporaryDirectory(prefix="relayd-redis-") as directory,  # a short socket path
        running_redis(Path(directory), extra=tls),
        trio.fail_after(LIMIT_S),
    ):
        async with (
            link_to(url, tls_ca_file=str(tmp_path / "ca.pem")) as (one, _),
            link_to(url, "n2", tls_ca_file=str(tmp_path / "ca.pem")) as (two, inbox2),
        ):
            channel = await listening(two, "private")
            assert one.send([(channel, b"an answer")])
            assert await publish(one, (channel, b"over TLS"), (CHANNELS.of_id("nobody"), b"x")) == [
                1,
                0,
            ]
            received = [data for _, data in await inbox2.wait_for(2)]
            assert received == [b"an answer", b"over TLS"]


class Faulty(Inbox):
    """A receiver with a bug: it raises on the first message."""

    def received(self, messages: list[tuple[bytes, bytes]]) -> None:
        if not self.messages:
            self.messages += messages
            raise RuntimeError("a bug in the receiver")
        super().received(messages)


async def test_a_receiver_that_raises_is_logged_and_the_link_reconnects(
    redis_server: RedisServer, logs: list[EventDict]
) -> None:
    faulty = Faulty()
    link = RedisLink(
        ClusterSettings(enabled=True, broker_url=redis_server.url, **FAST),
        node="n2",
        channels=CHANNELS,
        receiver=faulty,
        log=structlog.get_logger(),
    )
    channel = CHANNELS.of_id("trap")
    with trio.fail_after(LIMIT_S):
        async with link_to(redis_server.url) as (one, _), trio.open_nursery() as nursery:
            await nursery.start(link.run)
            await link.wait_for(UP)
            link.subscribe(channel)
            await link.subscribed(channel)
            assert await publish(one, (channel, b"first")) == [1]
            await link.wait_for(DOWN)
            await link.wait_for(UP)
            assert await publish(one, (channel, b"second")) == [1]
            assert await faulty.wait_for(2) == [(channel, b"first"), (channel, b"second")]
            link.close()
    error = next(e for e in logs if e["event"] == "error")
    assert error["summary"] == "broker link: RuntimeError: a bug in the receiver"
    assert error["exc_info"] is not None
    lost = next(e for e in logs if e["event"] == "broker.lost" and e["node"] == "n2")
    assert "RuntimeError" in lost["reason"]
