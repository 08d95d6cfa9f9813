"""The public accept loop over real TCP: bursts from a full backlog, failed clients, its end.

The loop accepts on the listener's descriptor itself (``relayd.daemon.accepting``):
it takes every client waiting in the backlog without a wait, yields to the
scheduler once every :data:`~relayd.daemon.accepting.ACCEPT_BURST` clients, goes
on past a client that failed in the backlog, and stops on any other failure.
"""

from __future__ import annotations

import errno
import functools
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from relayd.daemon import accepting
from relayd.daemon.accepting import ACCEPT_BURST, Sockets, serve_public
from relayd.daemon.transport import Accepted


class Served:
    """What the handler saw: each client, and how many were open when it started."""

    def __init__(self) -> None:
        self.clients: list[Accepted] = []
        self.open_at_start: list[int] = []
        self.sockets = Sockets(budget=10_000)
        self.first = trio.Event()

    async def handler(self, client: Accepted, released: Any, peer: object) -> None:
        self.open_at_start.append(self.sockets.open)
        self.clients.append(client)
        self.first.set()
        assert isinstance(client, socket.socket)
        client.close()
        released()


@asynccontextmanager
async def accepting_on(
    listeners: list[trio.SocketListener], served: Served
) -> AsyncIterator[trio.Nursery]:
    """``serve_public`` on ``listeners``, cancelled (and the listeners closed) on exit."""
    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            serve_public,
            served.handler,
            listeners,
            handler_nursery=nursery,
            sockets=served.sockets,
            log=structlog.get_logger(),
        )
        await nursery.start(serve)
        yield nursery
        nursery.cancel_scope.cancel()


async def test_a_full_backlog_is_taken_in_bursts_and_the_first_clients_start_meanwhile() -> None:
    # The clients wait in the kernel's backlog before the loop starts: it finds
    # them all there without a wait, and must still let the first ones run
    # before it has taken the last.
    count = 3 * ACCEPT_BURST + 5
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    served = Served()
    try:
        async with accepting_on(listeners, served):
            while len(served.clients) < count:
                await trio.testing.wait_all_tasks_blocked()
    finally:
        for client in clients:
            client.close()
    assert len(served.clients) == count
    # The first burst's handlers ran before the last burst was accepted. (trio runs a
    # round's tasks in either order: the loop may take one more burst before they start.)
    assert served.open_at_start[0] <= 2 * ACCEPT_BURST < count
    assert max(served.open_at_start) < count
    assert listeners[0].socket.fileno() == -1  # closed with the loop


async def test_a_client_that_failed_in_the_backlog_is_passed_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ECONNABORTED and its kin name one client, not the listener: Linux's
    # accept(2) says to accept again, and the next client is served.
    real = accepting._accept_now
    failures = [OSError(errno.ECONNABORTED, "aborted"), OSError(errno.EPROTO, "protocol")]

    def failing_first(plain: socket.socket) -> tuple[socket.socket, Any]:
        if failures:
            raise failures.pop(0)
        return real(plain)

    monkeypatch.setattr(accepting, "_accept_now", failing_first)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    served = Served()
    async with accepting_on(listeners, served):
        with socket.create_connection(("127.0.0.1", port)):
            with trio.fail_after(10):
                await served.first.wait()
    assert not failures
    assert len(served.clients) == 1


async def test_a_broken_listener_stops_the_loop_with_its_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(plain: socket.socket) -> tuple[socket.socket, Any]:
        raise OSError(errno.EINVAL, "not listening")

    monkeypatch.setattr(accepting, "_accept_now", broken)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port)):  # noqa: SIM117
        with pytest.raises(ExceptionGroup) as raised:
            async with accepting_on(listeners, Served()):
                await trio.sleep_forever()
    assert raised.group_contains(OSError, match="not listening")
    assert listeners[0].socket.fileno() == -1
