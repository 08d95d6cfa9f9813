"""The read poller: one task reads every parked socket, and wakes a reader only with a handover.

First with real sockets (socket pairs) and stand-in readers, whose ``readable`` says
what the poller does next: wait on (None), or wake the reader's task with a value.
Then the real reader through the poller, in a real server, on each way a read handled
in the poller's task hands over to the reader's (the rest of the suite's tests of a
running server go through the poller too, on every plain TCP connection).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
import structlog
import trio
import trio.testing

from relayd.daemon.poller import ReadPoller
from relayd.daemon.reader import Handover
from relayd.daemon.server import Server
from relayd.errors import RouterClosed
from relayd.routing.interface import Inbound, Relay
from relayd.routing.local import LocalRouter
from tests.client import connect, running, settings


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
async def polling() -> AsyncIterator[tuple[ReadPoller, trio.Nursery]]:
    poller = ReadPoller()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller.run)
        yield poller, nursery
        nursery.cancel_scope.cancel()


async def test_reads_handled_at_once_wake_no_one_and_a_handover_wakes_the_reader() -> None:
    handed: list[Handover] = []
    with pair() as (ours, theirs):
        stand = Stand(ours, lambda data: None if data != b"wake" else b"for the task")
        async with polling() as (poller, nursery):

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
        async with polling() as (poller, nursery):
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
        async with polling() as (poller, nursery):

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
        async with polling() as (poller, nursery):
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
        async with polling() as (poller, nursery):

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
        async with polling() as (poller, nursery):

            async def reader() -> None:
                handed.append(await poller.wait(ours.fileno(), Stand(ours, lambda d: d)))

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            theirs.close()
            await trio.testing.wait_all_tasks_blocked()
    assert handed == [b""]


async def test_when_the_poller_ends_its_parked_readers_are_woken_to_wait_themselves() -> None:
    # A root nursery cancelled before the connections', or a bug in the poller: a reader
    # left parked would hang, and one parking again would find the epoll closed (found
    # by a reviewer: the server logged an error and closed the client with 1011).
    poller = ReadPoller()
    handed: list[Handover] = []
    with pair() as (ours, _):
        async with trio.open_nursery() as readers, trio.open_nursery() as polling:
            polling.start_soon(poller.run)
            await trio.testing.wait_all_tasks_blocked()
            assert poller.running

            async def reader() -> None:
                handed.append(await poller.wait(ours.fileno(), Stand(ours, lambda d: d)))

            readers.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert poller.parked == 1
            polling.cancel_scope.cancel()
    assert handed == [None]  # nothing read: the reader waits again, itself
    assert not poller.running
    assert poller.parked == 0


# -- the real reader, through the poller, in a server ---------------------------------------


class _Scripted(LocalRouter):
    """A router whose routing at once fails as a message's recipient id says.

    ``busy``: once, as a full inbox does (the reader's task routes it, waiting);
    ``closed``: the router closes (shutting down) as the read comes; ``bye``: the
    sender is disconnected while its read is routed (reading ends in the poller's step).
    """

    busy_once = True

    def try_route(self, items: list[Inbound]) -> bool:
        for item in items:
            if isinstance(item, Relay) and item.envelope.to == "busy" and self.busy_once:
                self.busy_once = False
                return False
            if isinstance(item, Relay) and item.envelope.to == "closed":
                self.close()  # as a shutdown would, between the read and its routing
                raise RouterClosed("router is shutting down")
            if isinstance(item, Relay) and item.envelope.to == "bye":
                item.sender.disconnect(4000, "bye")
        return super().try_route(items)


async def test_a_read_whose_routing_must_wait_is_finished_by_the_readers_task() -> None:
    async with running(Server(settings(), router=_Scripted)) as url, connect(url, v1=True) as c:
        await c.send("busy", "x", ref=1)  # try_route refused it: routed with a wait
        assert await c.recv_json() == {
            "type": "error",
            "error": "unknown_recipient",
            "detail": "no client with that id is connected",
            "ref": 1,
        }
        # No reply slot was lost on the way: a whole outbox of messages at once is
        # still answered (a lost slot would hold the last one back).
        for n in range(16):
            await c.send(c.id, n, ref=n)
        frames = [await c.recv_json() for _ in range(32)]
    assert sorted(f["message"] for f in frames if f["type"] == "message") == list(range(16))
    assert sorted(f["ref"] for f in frames if f["type"] == "ack") == list(range(16))


async def test_a_router_closed_under_the_pollers_read_drains_the_connection() -> None:
    async with running(Server(settings(), router=_Scripted)) as url, connect(url) as c:
        await c.send("closed", "x")
        frames, code = await c.until_closed()
    assert (frames, code) == ([], 1001)


async def test_reading_that_ended_in_the_pollers_step_closes_as_asked() -> None:
    with structlog.testing.capture_logs() as events:
        async with running(Server(settings(), router=_Scripted)) as url, connect(url) as c:
            await c.send("bye", "x")
            frames, code = await c.until_closed()
    assert code == 4000
    assert frames == [
        '{"error":"unknown_recipient","detail":"no client with that id is connected"}'
    ]
    assert not [e for e in events if e["event"] == "error"]
