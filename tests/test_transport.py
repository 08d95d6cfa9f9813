"""relayd.daemon.transport over real sockets: how a connection's socket is written, read and closed.

A connected pair of Unix sockets stands for the client's TCP connection, the
server's end a plain socket, as the accept loop hands it over
(``tests/test_writer.py`` gives it a :class:`trio.SocketStream`, which the
transport takes apart). The options an accepted socket gets are checked over
real TCP.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import structlog
import trio
import trio.testing

from relayd.daemon.accepting import Sockets, serve_public
from relayd.daemon.transport import LINGER_S, NOTSENT_LOWAT, Accepted, Transport, discard

#: Real time a close that does not linger takes at most, here: a loopback round.
PROMPT_S = LINGER_S / 4


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[Transport, trio.SocketStream, socket.socket]]:
    """A transport over the server's end, the client's end, and the server's socket.

    The server's end is the standard library's socket, non-blocking, as the
    accept loop hands it over.
    """
    server, b = socket.socketpair()
    server.setblocking(False)
    client = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    async with client:
        try:
            yield Transport(server), client, server
        finally:
            server.close()


def closing(nursery: trio.Nursery, transport: Transport) -> trio.Event:
    """Close ``transport`` in ``nursery``; the event is set once it is closed."""
    closed = trio.Event()

    async def close() -> None:
        await transport.close()
        closed.set()

    nursery.start_soon(close)
    return closed


async def test_after_the_clients_close_frame_the_socket_is_closed_without_lingering() -> None:
    async with pair() as (transport, client, _):
        transport.close_received = True  # the reader read its close frame
        with trio.fail_after(PROMPT_S):
            await transport.close()
        assert await client.receive_some(100) == b""  # an end of stream, not a reset


async def test_a_client_still_sending_is_read_to_its_end_so_its_last_bytes_get_no_reset() -> None:
    async with pair() as (transport, client, _):
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
    async with pair() as (transport, client, _):
        async with trio.open_nursery() as nursery:
            closed = closing(nursery, transport)
            assert await client.receive_some(100) == b""
            await trio.testing.wait_all_tasks_blocked()
            assert not closed.is_set()  # it might still send: relayd waits for its end
            await client.send_eof()
        assert closed.is_set()


async def test_a_close_cancelled_while_it_lingers_still_closes_the_socket() -> None:
    async with pair() as (transport, client, server):
        await client.send_all(b"still sending")  # unread: the close must linger
        with trio.CancelScope() as forced:
            async with trio.open_nursery() as nursery:
                closing(nursery, transport)
                assert await client.receive_some(100) == b""  # its FIN: it lingers now
                await trio.testing.wait_all_tasks_blocked()
                forced.cancel()  # a forced stop, as shutdown_grace_s ends
        assert transport.fd == -1
        assert server.fileno() == -1  # closed, not left to the collector
        assert transport.broken  # and nothing more may be written


async def test_what_the_socket_does_not_take_at_once_is_written_as_the_client_reads() -> None:
    data = bytes(range(256)) * 8192  # 2 MiB: far more than a socket buffer
    async with pair() as (transport, client, _):
        assert transport.try_send(b"") == 0
        received = bytearray()

        async def read_all() -> None:
            while len(received) < len(data):
                received.extend(await client.receive_some(65536))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            with trio.fail_after(10):
                await transport.send_all(data)
        assert received == data  # whole, in order, once
        assert not transport.broken


async def test_a_write_to_a_client_that_has_gone_is_refused_and_breaks_the_transport() -> None:
    async with pair() as (transport, client, _):
        await client.aclose()
        with pytest.raises(trio.BrokenResourceError):
            await transport.send_all(b"x")  # refused at once
        assert transport.broken
        assert await transport.send_close(1000, timeout_s=PROMPT_S) == 0  # nothing more


async def test_a_client_that_goes_while_a_write_waits_for_room_breaks_the_transport() -> None:
    async with pair() as (transport, client, _):
        failed: list[BaseException] = []

        async def send() -> None:
            try:
                await transport.send_all(b"x" * (4 << 20))  # more than fits: it waits
            except trio.BrokenResourceError as exc:
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            assert not failed  # waiting for room
            assert not transport.broken
            await client.aclose()  # gone, with relayd's bytes unread
        assert len(failed) == 1  # as a client gone, not a crash (a bare OSError would be)
        assert transport.broken


async def test_a_close_wakes_a_read_waiting_for_the_socket() -> None:
    woken: list[BaseException] = []

    async def read(transport: Transport) -> None:
        try:
            await transport.receive_some(100)
        except trio.ClosedResourceError as exc:
            woken.append(exc)

    async with pair() as (transport, client, _), trio.open_nursery() as nursery:
        nursery.start_soon(read, transport)
        await trio.testing.wait_all_tasks_blocked()
        await client.send_eof()  # nothing unread: the close is at once
        await transport.close()
    assert len(woken) == 1  # told the transport is closed, not left waiting


async def test_a_write_cut_short_by_a_cancel_breaks_the_transport(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with pair() as (transport, _, _):
        with trio.move_on_after(1) as waited:
            await transport.send_all(b"x" * (4 << 20))  # the client never reads
        assert waited.cancelled_caught
        assert transport.broken  # part of a frame may be out: nothing more may follow


async def test_a_reset_is_an_end_to_receive_and_an_error_to_receive_some() -> None:
    for method in ("receive", "receive_some"):
        async with pair() as (transport, client, _):
            # The client closes with bytes of relayd's unread: its side resets.
            await transport.send_all(b"unread")
            await client.aclose()
            with trio.fail_after(PROMPT_S):
                if method == "receive":
                    assert await transport.receive(100) == b""
                else:
                    with pytest.raises(trio.BrokenResourceError):
                        await transport.receive_some(100)


async def test_a_read_woken_as_its_socket_closes_never_reads_the_next_socket_there() -> None:
    # A round may wake a read and, before it runs, a close; a socket opened then
    # takes the closed one's descriptor number, which the read must not touch.
    # trio runs a round's tasks in either order: forty tries see both.
    seen = {await _read_as_the_socket_closes() for _ in range(40)}
    assert seen <= {b"", "closed"}  # its client's end of stream, or told it closed
    assert "closed" in seen  # the close did come first, at least once


async def _read_as_the_socket_closes() -> object:
    """One try: what a read woken in the round of its socket's close returns."""
    async with pair() as (transport, client, server):
        number = server.fileno()
        result: list[object] = []
        later: list[socket.socket] = []
        go, went = socket.socketpair()

        async def read() -> None:
            try:
                result.append(await transport.receive_some(100))
            except trio.ClosedResourceError:
                result.append("closed")

        async def close_and_open_another() -> None:
            await trio.lowlevel.wait_readable(went)
            await transport.close()  # at once: the client's end of stream is there
            later.extend(socket.socketpair())
            for mine, theirs in (later, later[::-1]):
                if mine.fileno() == number:
                    theirs.send(b"another client's bytes")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            nursery.start_soon(close_and_open_another)
            await trio.testing.wait_all_tasks_blocked()
            # Both readable before trio looks again: no checkpoint between.
            client.socket.shutdown(socket.SHUT_WR)
            go.send(b"!")
        for sock in (go, went, *later):
            sock.close()
        [only] = result
        return only


async def test_a_closed_transport_refuses_reads_and_writes() -> None:
    async with pair() as (transport, client, server):
        await client.send_eof()
        await transport.close()
        assert server.fileno() == -1
        with pytest.raises(trio.ClosedResourceError):
            await transport.receive_some(100)
        assert transport.try_send(b"x") is None
        with pytest.raises(trio.ClosedResourceError):
            await transport.send_all(b"x")


async def test_a_client_not_to_be_served_is_closed_at_once() -> None:
    async with pair() as (_, client, server):
        await client.send_all(b"GET / HTTP/1.1\r\n")  # unread: no lingering for it
        with trio.fail_after(PROMPT_S):
            await discard(server)
        assert server.fileno() == -1


async def test_an_accepted_tcp_socket_gets_what_trios_socket_stream_would_set() -> None:
    # Nagle off (a lone message goes out at once) and little unsent data held in
    # the kernel (a slow client's backlog waits in its bounded outbox).
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: list[Accepted] = []
    served = trio.Event()

    async def handler(client: Accepted, released: object, peer: object) -> None:
        accepted.append(client)
        served.set()

    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            serve_public,
            handler,
            listeners,
            handler_nursery=nursery,
            sockets=Sockets(budget=10),
            log=structlog.get_logger(),
        )
        await nursery.start(serve)
        async with await trio.open_tcp_stream("127.0.0.1", port):
            with trio.fail_after(10):
                await served.wait()
        nursery.cancel_scope.cancel()
    [sock] = accepted
    # The standard library's socket, as accept() made it: no trio wrapper, no
    # SocketStream; non-blocking, and the listener's options inherited.
    assert type(sock) is socket.socket
    with sock:
        assert not sock.getblocking()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == NOTSENT_LOWAT
    assert listeners[0].socket.fileno() == -1  # closed with the loop
