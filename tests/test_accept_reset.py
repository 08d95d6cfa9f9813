"""A client that resets while its connection waits in the kernel's accept queue.

The accept loop keeps the address ``accept()`` returns (no ``getpeername``), and
Linux returns one even for a socket the client has reset meanwhile: relayd counts
it like any client that leaves before its request (docs/logging.md, ``conn``).
"""

from __future__ import annotations

import socket
import struct

import structlog
import trio
import trio.testing

from relayd.daemon.server import Server
from tests.client import connect, running, settings, split_url


async def test_a_connection_reset_before_it_is_accepted_counts_as_a_client_that_left() -> None:
    server = Server(settings())
    with structlog.testing.capture_logs() as events:
        async with running(server) as url:
            host, port, _ = split_url(url)
            # Connect and reset with no checkpoint between: relayd's accept loop,
            # parked in trio, cannot accept before the reset (the kernel completes
            # the TCP handshake on its own, and keeps the reset socket in the queue).
            raw = socket.create_connection((host, port))
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
            # A real client after it: relayd accepts in order, the reset one first.
            async with connect(url) as a:
                await a.send(a.id, "hi")
                assert await a.recv() == "hi"
            await trio.testing.wait_all_tasks_blocked()
    # Counted and logged (at debug level) as any client that closes before its
    # request; the relay goes on, and the next client is numbered after it.
    assert server.stats.rejected == {0: 1}
    rejected = [e for e in events if e["event"] == "handshake.rejected"]
    assert [(e["conn"], e["status"], e["reason"]) for e in rejected] == [
        (1, None, "the client closed before a complete request")
    ]
    assert [e["conn"] for e in events if e["event"] == "connection.open"] == [2]
