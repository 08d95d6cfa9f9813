"""relayd.daemon.transport over a real socket pair: how a connection's socket is closed.

A connected pair of Unix sockets stands for the client's TCP connection, the
server's end a :class:`trio.SocketStream`, as in ``tests/test_writer.py``.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from relayd.daemon.transport import LINGER_S, Transport

#: Real time a close that does not linger takes at most, here: a loopback round.
PROMPT_S = LINGER_S / 4


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[Transport, trio.SocketStream]]:
    a, b = socket.socketpair()
    server = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    client = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    async with client:
        yield Transport(server), client


def closing(nursery: trio.Nursery, transport: Transport) -> trio.Event:
    """Close ``transport`` in ``nursery``; the event is set once it is closed."""
    closed = trio.Event()

    async def close() -> None:
        await transport.close()
        closed.set()

    nursery.start_soon(close)
    return closed


async def test_after_the_clients_close_frame_the_socket_is_closed_without_lingering() -> None:
    async with pair() as (transport, client):
        transport.close_received = True  # the reader read its close frame
        with trio.fail_after(PROMPT_S):
            await transport.close()
        assert await client.receive_some(100) == b""  # an end of stream, not a reset


async def test_a_client_still_sending_is_read_to_its_end_so_its_last_bytes_get_no_reset() -> None:
    async with pair() as (transport, client):
        transport.close_received = True
        await client.send_all(b"after its close frame")  # unread when the close begins
        async with trio.open_nursery() as nursery:
            closed = closing(nursery, transport)
            assert await client.receive_some(100) == b""  # relayd's FIN: nothing more comes
            await trio.testing.wait_all_tasks_blocked()
            assert not closed.is_set()  # still reading what the client sends
            await client.send_eof()
        assert closed.is_set()


async def test_without_the_clients_close_frame_the_socket_lingers_until_its_end() -> None:
    async with pair() as (transport, client):
        async with trio.open_nursery() as nursery:
            closed = closing(nursery, transport)
            assert await client.receive_some(100) == b""
            await trio.testing.wait_all_tasks_blocked()
            assert not closed.is_set()  # it might still send: relayd waits for its end
            await client.send_eof()
        assert closed.is_set()


async def test_a_close_cancelled_while_it_lingers_still_closes_the_socket() -> None:
    async with pair() as (transport, client):
        await client.send_all(b"still sending")  # unread: the close must linger
        with trio.CancelScope() as forced:
            async with trio.open_nursery() as nursery:
                closing(nursery, transport)
                assert await client.receive_some(100) == b""  # its FIN: it lingers now
                await trio.testing.wait_all_tasks_blocked()
                forced.cancel()  # a forced stop, as shutdown_grace_s ends
        assert transport.fd == -1
        assert isinstance(transport.stream, trio.SocketStream)
        assert transport.stream.socket.fileno() == -1  # closed, not left to the collector
        assert transport.broken  # and nothing more may be written
