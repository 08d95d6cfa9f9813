"""relayd processes as nodes of one cluster on loopback, with Debian's redis-server between them.

Clients are the third-party ``websockets`` package; the nodes are the installed ``relayd``
command. Every failure of the issue is inflicted for real: Redis absent at start, restarted
mid-traffic, frozen with SIGSTOP, a subscription that silently delivers nothing (a proxy
that keeps the connection and drops what Redis sends), and a node killed with SIGKILL.
Waits are for log events the nodes print (``broker.connected``, ``broker.lost``) and for
frames, each bounded.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.redis_server import RedisServer, free_port
from tests.tcp_proxy import TcpProxy

from .cluster import FAST_CLUSTER, Node, cluster, start_node
from .wsclient import client, recv_json, recv_text, run, send_json, v1_id

pytestmark = pytest.mark.e2e


async def _v1_pair(one: Node, two: Node, to_unknown: bool = False) -> list[Any]:
    """Alice on n1 sends to Bob on n2 (and to nobody); what Alice and Bob got."""
    async with client(one.url, v1=True) as alice, client(two.url, v1=True) as bob:
        await v1_id(alice)
        bob_id = await v1_id(bob)
        await send_json(alice, {"to": bob_id, "message": {"n": 1}, "ref": "m1"})
        got = [await recv_json(alice), await recv_json(bob)]
        if to_unknown:
            await send_json(alice, {"to": "nobody-at-all", "message": 1, "ref": "m2"})
            got.append(await recv_json(alice))
        return got


def test_clients_on_two_nodes_reach_each_other_in_both_dialects(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with cluster(tmp_path, redis_server.url) as (one, two):
        ack, delivery, unknown = run(_v1_pair(one, two, to_unknown=True))
        assert ack == {"type": "ack", "ref": "m1"}
        assert delivery["type"] == "message"
        assert delivery["message"] == {"n": 1}
        assert unknown["error"] == "unknown_recipient"

        async def seed() -> tuple[str, str]:
            async with client(one.url) as carol, client(two.url, v1=True) as dave:
                await recv_text(carol)
                dave_id = await v1_id(dave)
                await send_json(carol, {"to": dave_id, "message": "from the seed"})
                message = await recv_json(dave)
                await send_json(carol, {"to": "gone", "message": "x"})
                return message["message"], (await recv_json(carol))["error"]

        assert run(seed()) == ("from the seed", "unknown_recipient")
        assert one.readyz() == 200
        assert two.readyz() == 200
        assert "relayd_cluster_broker_up 1.0" in one.metrics()


def test_redis_unreachable_at_start(tmp_path: Path) -> None:
    port = free_port()
    redis = RedisServer(tmp_path / "redis", port=port)
    (tmp_path / "redis").mkdir()
    node = start_node(tmp_path, f"redis://127.0.0.1:{port}/0", "n1")
    try:
        node.wait_for_event("broker.unreachable")
        assert node.readyz() == 503

        async def local_only() -> list[Any]:
            async with client(node.url, v1=True) as alice, client(node.url, v1=True) as bob:
                await v1_id(alice)
                bob_id = await v1_id(bob)
                await send_json(alice, {"to": "elsewhere", "message": 1, "ref": "far"})
                await send_json(alice, {"to": bob_id, "message": 2, "ref": "near"})
                return [await recv_json(alice), await recv_json(alice), await recv_json(bob)]

        far, near, delivered = run(local_only())
        assert far["error"] == "recipient_unreachable"
        assert near == {"type": "ack", "ref": "near"}
        assert delivered["message"] == 2
        redis.start()
        try:
            node.wait_for_event("broker.connected")
            assert node.readyz() == 200
        finally:
            node.stop()
            redis.stop()
    finally:
        if node.proc.poll() is None:
            node.kill()


def test_redis_restart_mid_traffic_recovers_on_its_own(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with cluster(tmp_path, redis_server.url) as (one, two):
        assert run(_v1_pair(one, two))[0]["type"] == "ack"
        redis_server.restart()
        for node in (one, two):
            node.wait_for_event("broker.lost")
        for node in (one, two):
            node.wait_connected(2)
        assert run(_v1_pair(one, two))[0] == {"type": "ack", "ref": "m1"}


def test_frozen_redis_makes_nodes_not_ready_until_it_thaws(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with cluster(tmp_path, redis_server.url) as (one, two):
        redis_server.freeze()
        try:
            for node in (one, two):  # each finds it out by its own probe
                lost = node.wait_for_event("broker.lost")
                assert "probe" in lost["reason"]
                assert node.readyz() == 503
        finally:
            redis_server.thaw()
        for node in (one, two):
            node.wait_connected(2)
        assert one.readyz() == 200
        assert run(_v1_pair(one, two))[0]["type"] == "ack"


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[TcpProxy]:
    """A TcpProxy to the test Redis, served by a trio loop in a thread of its own."""
    proxy = TcpProxy(redis_server.port)
    started = threading.Event()
    stop = threading.Event()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            started.set()
            await trio.to_thread.run_sync(stop.wait)
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    assert started.wait(10)
    yield proxy
    stop.set()
    thread.join(10)


def test_a_subscription_silently_delivering_nothing_is_found_and_replaced(
    redis_server: RedisServer, proxy: TcpProxy, tmp_path: Path
) -> None:
    two = start_node(tmp_path, redis_server.url, "n2")
    try:
        with cluster(tmp_path / "one", f"redis://127.0.0.1:{proxy.port}/0", 1) as (one,):
            two.wait_for_event("broker.connected")
            proxy.mute(2)  # n1's subscriber: its second connection to Redis
            lost = one.wait_for_event("broker.lost")
            assert "probe did not come back" in lost["reason"]
            one.wait_connected(2)
            assert run(_v1_pair(two, one))[0]["type"] == "ack"
    finally:
        two.stop()


def test_a_killed_nodes_clients_reconnect_elsewhere_and_its_ids_become_unknown(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with cluster(tmp_path, redis_server.url, 3) as (one, two, three):

        async def scenario() -> list[Any]:
            async with client(one.url, v1=True) as alice:
                await v1_id(alice)
                async with client(three.url, v1=True) as victim:  # closed whatever happens
                    old_id = await v1_id(victim)
                    await asyncio.to_thread(three.kill)
                    await victim.wait_closed()  # the TCP connection dies with the node
                async with client(two.url, v1=True) as again:
                    new_id = await v1_id(again)
                    await send_json(alice, {"to": new_id, "message": "found", "ref": "new"})
                    replies = [await recv_json(alice), await recv_json(again)]
                started = asyncio.get_running_loop().time()
                await send_json(alice, {"to": old_id, "message": 1, "ref": "old"})
                replies.append(await recv_json(alice))
                # Within node_timeout_s of its last heartbeat, the dead id is unknown.
                await asyncio.sleep(
                    FAST_CLUSTER["node_timeout_s"] + FAST_CLUSTER["probe_interval_s"]
                )
                await send_json(alice, {"to": old_id, "message": 2, "ref": "later"})
                replies.append(await recv_json(alice))
                replies.append(asyncio.get_running_loop().time() - started)
                return replies

        found, delivered, first, later, _elapsed = run(scenario())
        assert found == {"type": "ack", "ref": "new"}
        assert delivered["message"] == "found"
        assert first["error"] in {"recipient_unreachable", "unknown_recipient"}
        assert later["error"] == "unknown_recipient"
