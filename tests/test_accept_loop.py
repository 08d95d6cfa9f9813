"""The public accept loop over real TCP: bursts from a full backlog, failed clients, its end.

The loop accepts on the listener's descriptor itself (``relayd.daemon.accepting``):
it takes every client waiting in the backlog without a wait, yields to the
scheduler once every :data:`~relayd.daemon.accepting.ACCEPT_BURST` clients, goes
on past a client that failed in the backlog, and stops on any other failure.
"""

from __future__ import annotations

import errno
import functools
import itertools
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
from relayd.daemon.transport import NOTSENT_LOWAT, Accepted


class Served:
    """What the handler saw: each client, its options, how many were open when it started.

    Args:
        budget: the open sockets' budget.
        hold: the handler keeps its client (and its place in the budget) until set.
    """

    def __init__(self, budget: int = 10_000, hold: trio.Event | None = None) -> None:
        self.clients: list[Accepted] = []
        self.options: list[tuple[int, int]] = []
        self.open_at_start: list[int] = []
        self.sockets = Sockets(budget=budget)
        self.first = trio.Event()
        self._hold = hold

    async def handler(self, client: Accepted, released: Any, peer: object) -> None:
        self.open_at_start.append(self.sockets.open)
        self.clients.append(client)
        assert isinstance(client, socket.socket)
        self.options.append(
            (
                client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT),
            )
        )
        self.first.set()
        if self._hold is not None:
            await self._hold.wait()
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
    # A whole burst was taken without a wait before the first client started, and
    # that client started before the last burst was taken. (trio runs a round's tasks
    # in either order: the loop may take one more burst before they start.)
    assert ACCEPT_BURST <= served.open_at_start[0] <= 2 * ACCEPT_BURST < count
    assert max(served.open_at_start) < count
    # Queued before the listener had its options, each was given them one by one.
    assert set(served.options) == {(1, NOTSENT_LOWAT)}
    assert ACCEPT_BURST >= 16  # many clients a round, where trio's accept takes one
    assert listeners[0].socket.fileno() == -1  # closed with the loop


async def test_a_client_that_failed_in_the_backlog_is_passed_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ECONNABORTED and its kin name one client, not the listener: Linux's
    # accept(2) says to accept again, and the next client is served.
    real = accepting._accept_now
    failures = [OSError(errno.ECONNABORTED, "aborted"), OSError(errno.EPROTO, "protocol")]

    def failing_first(plain: socket.socket, untuned: bool) -> tuple[socket.socket, Any]:
        if failures:
            raise failures.pop(0)
        return real(plain, untuned)

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
    def broken(plain: socket.socket, untuned: bool) -> tuple[socket.socket, Any]:
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


async def test_a_run_of_failed_clients_still_lets_others_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each failed client counts toward the burst: however many fail in a row, the
    # loop yields at least every burst (two, as trio may order a round).
    failures = [OSError(errno.ECONNABORTED, "aborted")] * (5 * ACCEPT_BURST)

    def failing(plain: socket.socket, untuned: bool) -> tuple[socket.socket, Any]:
        if failures:
            raise failures.pop()
        raise BlockingIOError

    monkeypatch.setattr(accepting, "_accept_now", failing)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    left: list[int] = []
    async with accepting_on(listeners, Served()):
        while failures:
            left.append(len(failures))
            await trio.lowlevel.checkpoint()
        await trio.testing.wait_all_tasks_blocked()  # the loop waits for a client
    steps = [a - b for a, b in itertools.pairwise([5 * ACCEPT_BURST, *left, 0])]
    assert max(steps) <= 2 * ACCEPT_BURST


async def test_a_listener_closed_while_the_loop_waits_for_room_ends_it() -> None:
    # Closed behind the loop's back (not during its wait for a client, which the
    # close wakes), the listener's descriptor number may be another socket's by
    # the time there is room: the loop must not accept on it.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    hold = trio.Event()
    served = Served(budget=1, hold=hold)
    with pytest.raises(ExceptionGroup) as raised:  # noqa: PT012
        async with accepting_on(listeners, served):
            with socket.create_connection(("127.0.0.1", port)):
                await served.first.wait()
                await trio.testing.wait_all_tasks_blocked()  # waiting for room
                listeners[0].socket.close()
                with socket.socket() as other:  # takes the number, if it is free
                    other.bind(("127.0.0.1", 0))
                    other.listen()
                    other.setblocking(False)
                    with socket.create_connection(other.getsockname()), trio.fail_after(10):
                        hold.set()  # room again: the loop ends, cancelling this
                        await trio.sleep_forever()
    assert raised.group_contains(trio.ClosedResourceError)
    assert len(served.clients) == 1


async def test_a_default_socket_timeout_does_not_make_the_loop_wait_in_accept() -> None:
    # socket.setdefaulttimeout() (any imported library may call it) would give the
    # borrowed socket a timeout: accept() on an empty backlog would then block every
    # task for that long, and end the loop with TimeoutError.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    served = Served()
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(2.0)
    try:
        async with accepting_on(listeners, served):
            with socket.create_connection(("127.0.0.1", port)), trio.fail_after(10):
                await served.first.wait()
                await trio.testing.wait_all_tasks_blocked()  # the loop waits, not blocks
    finally:
        socket.setdefaulttimeout(before)
    assert len(served.clients) == 1
