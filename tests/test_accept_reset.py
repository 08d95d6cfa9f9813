"""Clients that reset before relayd has their request: in the accept queue, or halfway through it.

The accept loop keeps the address ``accept()`` returns (no ``getpeername``), and
Linux returns one even for a socket the client has reset meanwhile: relayd counts
it like any client that leaves before its request (docs/logging.md, ``conn``).
One that resets after part of its request is logged as a connection that broke.
"""

from __future__ import annotations

import socket
import struct

import pytest
import structlog
import trio
import trio.testing

from relayd.daemon.server import Server
from tests.client import connect, running, settings, split_url


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        pytest.param(None, "the client closed before a complete request", id="in-accept-queue"),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: relayd.test\r\n",  # no end of head yet
            "the connection broke before a complete request",
            id="halfway-through-its-request",
        ),
    ],
)
async def test_a_connection_reset_before_its_request_is_counted_and_harms_nobody(
    sent: bytes | None, reason: str
) -> None:
    server = Server(settings())
    with structlog.testing.capture_logs() as events:
        async with running(server) as url:
            host, port, _ = split_url(url)
            raw = socket.create_connection((host, port))
            # With nothing sent, the reset comes with no checkpoint since the
            # connect: relayd's accept loop, parked in trio, cannot accept before
            # it (the kernel completes the TCP handshake on its own, and keeps the
            # reset socket in the queue).
            if sent is not None:
                raw.sendall(sent)
                # relayd has accepted it, read what came and waits for the rest.
                await trio.testing.wait_all_tasks_blocked()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
            # A real client after it: relayd accepts in order, the reset one first.
            async with connect(url) as a:
                await a.send(a.id, "hi")
                assert await a.recv() == "hi"
            await trio.testing.wait_all_tasks_blocked()
    # Counted and logged (at debug level) as a client that left before its
    # request; the relay goes on, and the next client is numbered after it.
    assert server.stats.rejected == {(0, "client_left"): 1}
    rejected = [e for e in events if e["event"] == "handshake.rejected"]
    assert [(e["conn"], e["status"], e["reason"]) for e in rejected] == [(1, None, reason)]
    assert [e["conn"] for e in events if e["event"] == "connection.open"] == [2]
