"""The read poller: one task reads every parked socket, and wakes a reader only with a handover.

Real sockets (socket pairs) and stand-in readers, whose ``readable`` says what the
poller does next: wait on (None), or wake the reader's task with a value. The reader's
own behaviour through the poller is tested with the whole server in test_server.py and
the rest of the suite, which run every plain TCP connection through it.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
import trio
import trio.testing

from relayd.daemon.poller import ReadPoller
from relayd.daemon.reader import Handover


class Stand:
    """A reader stand-in: reads what its socket has, and decides with ``decide``."""

    def __init__(self, sock: socket.socket, decide: Callable[[bytes], Handover]) -> None:
        self.sock = sock
        self.decide = decide
        self.reads: list[bytes] = []

    def readable(self) -> Handover:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return None
        self.reads.append(data)
        return self.decide(data)


@contextmanager
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair: the server's end (non-blocking) and the client's."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    with ours, theirs:
        yield ours, theirs


@asynccontextmanager
async def running() -> AsyncIterator[tuple[ReadPoller, trio.Nursery]]:
    poller = ReadPoller()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller.run)
        yield poller, nursery
        nursery.cancel_scope.cancel()


async def test_reads_handled_at_once_wake_no_one_and_a_handover_wakes_the_reader() -> None:
    handed: list[Handover] = []
    with pair() as (ours, theirs):
        stand = Stand(ours, lambda data: None if data != b"wake" else b"for the task")
        async with running() as (poller, nursery):

            async def reader() -> None:
                handed.append(await poller.wait(ours.fileno(), stand))

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert poller.parked == 1
            for data in (b"one", b"two"):
                theirs.send(data)
                await trio.testing.wait_all_tasks_blocked()
                assert stand.reads[-1] == data
            assert handed == []  # handled in the poller's task: the reader still waits
            theirs.send(b"wake")
            await trio.testing.wait_all_tasks_blocked()
            assert handed == [b"for the task"]
            assert poller.parked == 0
            # Unparked, its socket is out of the poller's epoll: nothing more is read.
            theirs.send(b"unread")
            await trio.testing.wait_all_tasks_blocked()
            assert stand.reads == [b"one", b"two", b"wake"]
            assert ours.recv(100) == b"unread"


async def test_a_cancelled_wait_leaves_the_epoll_and_another_socket_takes_its_number() -> None:
    with pair() as (ours, theirs):
        stand = Stand(ours, lambda _: None)
        async with running() as (poller, nursery):
            with trio.CancelScope() as waiting:

                async def cancel_once_parked() -> None:
                    await trio.testing.wait_all_tasks_blocked()
                    assert poller.parked == 1
                    waiting.cancel()  # as a timer's deadline, or the server's stop, would

                nursery.start_soon(cancel_once_parked)
                await poller.wait(ours.fileno(), stand)
            assert waiting.cancelled_caught
            assert poller.parked == 0
            theirs.send(b"unread")
            await trio.testing.wait_all_tasks_blocked()
            assert stand.reads == []
            # The same descriptor parks again (a reader's next stretch): registered anew.
            handed: list[Handover] = []

            async def reader() -> None:
                handed.append(await poller.wait(ours.fileno(), Stand(ours, lambda d: d)))

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert handed == [b"unread"]


async def test_a_cancel_during_the_read_lets_the_read_be_handed_over_first() -> None:
    # The read brought something the task must finish: the cancel that came while the
    # poller handled it must not lose it (trio's failed abort: woken with it, then the
    # scope's next checkpoint is cancelled).
    scope = trio.CancelScope()
    with pair() as (ours, theirs):

        def decide(data: bytes) -> Handover:
            scope.cancel()  # as a close for policy, decided while routing, would
            return data

        stand = Stand(ours, decide)
        handed: list[Handover] = []
        async with running() as (poller, nursery):

            async def reader() -> None:
                with scope:
                    handed.append(await poller.wait(ours.fileno(), stand))
                    await trio.lowlevel.checkpoint()
                    handed.append(b"not reached")

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            theirs.send(b"must not be lost")
            await trio.testing.wait_all_tasks_blocked()
    assert handed == [b"must not be lost"]
    assert scope.cancelled_caught


async def test_a_cancel_during_a_read_handled_at_once_ends_the_wait() -> None:
    scope = trio.CancelScope()
    with pair() as (ours, theirs):

        def decide(_: bytes) -> Handover:
            scope.cancel()
            return None  # handled: nothing for the task, but its wait ends

        stand = Stand(ours, decide)
        async with running() as (poller, nursery):
            ended = trio.Event()

            async def reader() -> None:
                with scope:
                    await poller.wait(ours.fileno(), stand)
                    await trio.lowlevel.checkpoint()
                ended.set()

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            theirs.send(b"x")
            await ended.wait()
            assert poller.parked == 0


async def test_a_bug_in_one_readers_read_is_raised_in_its_task_and_the_poller_serves_on() -> None:
    class Bug(Exception):
        pass

    def buggy(_: bytes) -> Handover:
        raise Bug("in the read")

    with pair() as (broken, broken_peer), pair() as (healthy, healthy_peer):
        raised: list[BaseException] = []
        handed: list[Handover] = []
        async with running() as (poller, nursery):

            async def broken_reader() -> None:
                with pytest.raises(Bug) as caught:
                    await poller.wait(broken.fileno(), Stand(broken, buggy))
                raised.append(caught.value)

            async def healthy_reader() -> None:
                handed.append(await poller.wait(healthy.fileno(), Stand(healthy, lambda d: d)))

            nursery.start_soon(broken_reader)
            nursery.start_soon(healthy_reader)
            await trio.testing.wait_all_tasks_blocked()
            broken_peer.send(b"boom")
            await trio.testing.wait_all_tasks_blocked()
            healthy_peer.send(b"still served")
            await trio.testing.wait_all_tasks_blocked()
    assert [str(e) for e in raised] == ["in the read"]
    assert handed == [b"still served"]


async def test_a_peer_gone_is_read_and_handed_over() -> None:
    with pair() as (ours, theirs):
        handed: list[Handover] = []
        async with running() as (poller, nursery):

            async def reader() -> None:
                handed.append(await poller.wait(ours.fileno(), Stand(ours, lambda d: d)))

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            theirs.close()
            await trio.testing.wait_all_tasks_blocked()
    assert handed == [b""]
