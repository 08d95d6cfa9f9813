"""relayd.daemon.writer over a real socket pair: writes without a task, and what they leave over.

A connected pair of Unix sockets stands for the client's TCP connection: the
server's end is a :class:`trio.SocketStream`, so :meth:`Transport.try_send
<relayd.daemon.transport.Transport.try_send>` can write to it without waiting,
and a small send buffer makes the kernel take only part of a large frame.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
import trio.testing

from relayd.config import LimitsSettings
from relayd.daemon.transport import Transport
from relayd.daemon.writer import Writer
from relayd.policy.timers import Timers
from relayd.routing.batch import routing_batch
from relayd.routing.outbox import TAKE_BYTES, Offer, Outbox
from relayd.wire.frames import OP_PONG
from relayd.wire.lifecycle import Lifecycle
from relayd.wire.server_frames import encode_frame, text_frame
from tests.wire import server_frames


@dataclass
class _Owner:
    """Records each time the writer says the client is gone."""

    gone: list[bool]

    def client_gone(self) -> None:
        self.gone.append(True)


@dataclass
class Rig:
    writer: Writer
    outbox: Outbox
    client: trio.SocketStream
    transport: Transport
    lifecycle: Lifecycle
    gone: list[bool]
    nursery: trio.Nursery

    def queue(self, *frames: bytes) -> None:
        for frame in frames:
            assert self.outbox.offer(frame) is Offer.QUEUED
        self.writer.wake()

    async def read(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            data += await self.client.receive_some(size - len(data))
        return bytes(data)

    def tasks(self) -> int:
        """Writer tasks running now."""
        return len(self.nursery.child_tasks)


@asynccontextmanager
async def rig(
    send_buffer: int = 0, transport_class: type[Transport] = Transport
) -> AsyncIterator[Rig]:
    a, b = socket.socketpair()
    if send_buffer:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    server = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    client = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    transport = transport_class(server)
    outbox = Outbox(8)
    lifecycle = Lifecycle()
    timers = Timers(LimitsSettings(), trio.current_time())
    gone: list[bool] = []
    writer = Writer(transport, outbox, lifecycle, timers, _Owner(gone))
    async with server, client, trio.open_nursery() as nursery:
        writer.attach(nursery)
        yield Rig(writer, outbox, client, transport, lifecycle, gone, nursery)
        writer.detach()
        nursery.cancel_scope.cancel()


async def test_a_lone_message_is_written_at_once_without_a_task() -> None:
    async with rig() as r:
        frame = text_frame(b'{"type":"message"}')
        r.queue(frame)
        # Written before anything yields: no writer task was needed for it.
        assert (r.writer.messages_out, r.writer.bytes_out) == (1, len(frame))
        assert r.tasks() == 0
        assert await r.read(len(frame)) == frame


async def test_pongs_and_messages_waiting_together_go_in_one_write_pongs_first() -> None:
    async with rig() as r:
        assert r.outbox.offer(text_frame(b"m1")) is Offer.QUEUED
        assert r.outbox.control(encode_frame(OP_PONG, b"p"))
        r.writer.wake()
        assert r.writer.messages_out == 1  # the pong is not a message
        data = await r.read(2 + 1 + 2 + 2)
        assert server_frames(data, after_head=False) == [(OP_PONG, b"p"), (0x1, b"m1")]


async def test_what_the_socket_does_not_take_is_finished_by_a_task_before_anything_else() -> None:
    async with rig(send_buffer=4096) as r:
        big = text_frame(b"x" * 200_000)
        small = text_frame(b"after")
        r.queue(big)
        # The kernel took part of it: not counted until the rest goes.
        assert (r.writer.messages_out, r.writer.bytes_out) == (0, 0)
        assert r.tasks() == 1  # a writer task finishes it
        r.queue(small)  # queued behind the rest of the big frame
        data = await r.read(len(big) + len(small))
        assert server_frames(data, after_head=False) == [(0x1, b"x" * 200_000), (0x1, b"after")]
        await trio.testing.wait_all_tasks_blocked()
        assert (r.writer.messages_out, r.writer.bytes_out) == (2, len(big) + len(small))


async def test_a_client_gone_before_a_write_without_a_task_is_reported_and_counted() -> None:
    async with rig() as r:
        await r.client.aclose()
        r.queue(text_frame(b"too late"))
        assert r.gone == [True]
        assert (r.writer.dropped, r.writer.messages_out) == (1, 0)
        assert r.transport.broken
        assert not r.transport.direct


async def test_a_connection_ending_with_nothing_to_write_starts_no_writer() -> None:
    async with rig() as r:
        r.lifecycle.receive_close(1000, "")  # dropping: nothing more is written
        r.outbox.discard()
        r.writer.wake()
        assert r.tasks() == 0
        assert not r.writer.running


async def test_what_a_routing_batch_gives_a_connection_is_written_as_the_batch_ends() -> None:
    async with rig() as r:
        frames = [text_frame(b"one"), text_frame(b"two"), text_frame(b"three")]
        with routing_batch():
            r.queue(*frames[:2])
            r.queue(frames[2])
            assert r.writer.bytes_out == 0  # held while the router hands out its batch
        # Then written at once, together, without a writer task.
        assert (r.writer.messages_out, r.tasks()) == (3, 0)
        data = await r.read(sum(map(len, frames)))
        assert server_frames(data, after_head=False) == [
            (0x1, b"one"),
            (0x1, b"two"),
            (0x1, b"three"),
        ]


async def test_more_than_one_take_of_frames_waiting_is_all_written_without_a_task() -> None:
    # Eight 10 KB frames are more than one take (TAKE_BYTES): the write without a
    # task used to send the first take only and leave the rest in the outbox, with
    # no writer task to write them, until the connection's next frame. The send
    # buffer is set large enough for all of them, whatever the platform's default.
    async with rig(send_buffer=1 << 20) as r:
        payloads = [bytes([0x61 + i]) * 10_000 for i in range(8)]
        frames = [text_frame(p) for p in payloads]
        assert sum(map(len, frames)) > TAKE_BYTES
        with routing_batch():
            r.queue(*frames)
        assert (r.writer.messages_out, r.writer.bytes_out) == (8, sum(map(len, frames)))
        assert (len(r.outbox), r.tasks()) == (0, 0)
        with trio.fail_after(10):
            data = await r.read(sum(map(len, frames)))
        assert server_frames(data, after_head=False) == [(0x1, p) for p in payloads]


class ScriptedTransport(Transport):
    """A transport whose k-th ``try_send`` takes at most ``script[k]`` bytes, or raises it."""

    __slots__ = ("calls", "script")

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream)
        self.script: list[int | Exception] = []
        self.calls = 0

    def try_send(self, data: bytes) -> int | None:
        step = self.script[self.calls] if self.calls < len(self.script) else len(data)
        self.calls += 1
        if isinstance(step, Exception):
            self.broken = True
            raise step
        return super().try_send(data[:step])


async def test_a_later_take_the_socket_takes_in_part_is_finished_by_a_task() -> None:
    # The first take goes whole, the second only in part: its rest, and the
    # frames behind it, are the writer task's, in order.
    async with rig(send_buffer=1 << 20, transport_class=ScriptedTransport) as r:
        assert isinstance(r.transport, ScriptedTransport)
        payloads = [bytes([0x61 + i]) * 10_000 for i in range(8)]
        frames = [text_frame(p) for p in payloads]
        first_take = sum(map(len, frames[:6]))  # six frames fit one take of 64 KiB
        r.transport.script = [first_take, 5_000]
        with routing_batch():
            r.queue(*frames)
        assert r.transport.calls == 2
        # The second take's first 5,000 bytes went, and count once its rest has gone.
        assert (r.writer.messages_out, r.writer.bytes_out) == (6, first_take)
        assert r.tasks() == 1  # a writer task finishes it
        pong = encode_frame(OP_PONG, b"p")
        assert r.outbox.control(pong)  # queued while the rest waits: goes after it
        r.writer.wake()
        with trio.fail_after(10):
            data = await r.read(sum(map(len, frames)) + len(pong))
        assert server_frames(data, after_head=False) == [(0x1, p) for p in payloads] + [
            (OP_PONG, b"p")
        ]
        await trio.testing.wait_all_tasks_blocked()
        assert (r.writer.messages_out, r.writer.dropped, len(r.outbox)) == (8, 0, 0)
        assert r.writer.bytes_out == len(data)


async def test_a_write_cut_short_counts_none_of_its_bytes() -> None:
    # As docs/logging.md says of bytes_out: the part the kernel took of a write that
    # never finished (a slow consumer closed, here its writer cancelled) is not counted.
    async with rig(send_buffer=4096) as r:
        big = text_frame(b"x" * 200_000)
        r.queue(big)
        assert r.tasks() == 1  # the kernel took part of it; a writer task has the rest
        await trio.testing.wait_all_tasks_blocked()  # ...and waits: nobody reads
        r.writer.stop()
        await r.writer.join()
        assert (r.writer.messages_out, r.writer.dropped, r.writer.bytes_out) == (0, 1, 0)


async def test_a_client_gone_between_two_takes_counts_each_message_once() -> None:
    async with rig(send_buffer=1 << 20, transport_class=ScriptedTransport) as r:
        assert isinstance(r.transport, ScriptedTransport)
        frames = [text_frame(bytes([0x61 + i]) * 10_000) for i in range(8)]
        first_take = sum(map(len, frames[:6]))
        r.transport.script = [first_take, trio.BrokenResourceError("gone")]
        with routing_batch():
            r.queue(*frames)
        # The first take went out; the second take's two messages are dropped,
        # counted once, and the client is reported gone once.
        assert r.transport.calls == 2
        assert r.gone == [True]
        assert (r.writer.messages_out, r.writer.dropped) == (6, 2)
        assert r.tasks() == 0


async def _writer_task_between_writes(r: Rig) -> bytes:
    """Leave a writer task running and waiting for frames; what it wrote, read."""
    big = text_frame(b"x" * 200_000)
    r.queue(big)  # the socket takes part: a writer task finishes it
    assert r.tasks() == 1
    data = await r.read(len(big))
    await trio.testing.wait_all_tasks_blocked()
    assert r.writer.running  # waiting for frames, up to WRITER_IDLE_S
    return data


def _route(r: Rig, frames: list[bytes]) -> list[bytes]:
    """Hand ``frames`` to the connection in one routing batch, as Connection.deliver does.

    Returns the frames queued, in order; the rest were refused (``recipient_busy``).
    """
    queued = []
    with routing_batch():
        for frame in frames:
            offered = r.outbox.offer(frame)
            if offered is Offer.FULL and r.writer.make_room():
                offered = r.outbox.offer(frame)
            if offered is Offer.QUEUED:
                r.writer.wake()
                queued.append(frame)
    return queued


async def test_a_batch_that_fills_the_outbox_while_a_writer_task_waits_is_written_now() -> None:
    # Between two of a writer task's writes, the router's batch filled the outbox (it
    # holds 8) and the task could not run until the batch ended: the recipient reads,
    # yet every delivery past the outbox was refused recipient_busy.
    async with rig(send_buffer=4096) as r:
        await _writer_task_between_writes(r)
        task = set(r.nursery.child_tasks)
        frames = [text_frame(b"m%d" % n) for n in range(20)]
        assert _route(r, frames) == frames
        data = await r.read(sum(map(len, frames)))
        assert server_frames(data, after_head=False) == [(0x1, b"m%d" % n) for n in range(20)]
        await trio.testing.wait_all_tasks_blocked()
        assert r.writer.messages_out == 21
        assert set(r.nursery.child_tasks) == task  # the same task, none started beside it


async def test_what_an_early_write_leaves_goes_before_the_running_tasks_next_frames() -> None:
    async with rig(send_buffer=4096) as r:
        first = await _writer_task_between_writes(r)
        big, after = text_frame(b"y" * 100_000), text_frame(b"after")
        with routing_batch():
            assert r.outbox.offer(big) is Offer.QUEUED
            r.writer.wake()
            assert r.writer.make_room()  # the socket takes part of it; the task the rest
            assert r.outbox.offer(after) is Offer.QUEUED
            r.writer.wake()
        data = await r.read(len(big) + len(after))
        assert server_frames(data, after_head=False) == [(0x1, b"y" * 100_000), (0x1, b"after")]
        await trio.testing.wait_all_tasks_blocked()
        written = len(first) + len(big) + len(after)
        assert (r.writer.messages_out, r.writer.bytes_out) == (3, written)


async def test_the_rest_of_an_early_write_is_written_with_nothing_queued_after_it() -> None:
    async with rig(send_buffer=4096) as r:
        await _writer_task_between_writes(r)
        big = text_frame(b"y" * 100_000)
        with routing_batch():
            assert r.outbox.offer(big) is Offer.QUEUED
            r.writer.wake()
            assert r.writer.make_room()
        assert server_frames(await r.read(len(big)), after_head=False) == [(0x1, b"y" * 100_000)]


async def test_a_second_full_outbox_in_one_batch_waits_for_the_rest_of_the_first_write() -> None:
    # The first early write left part of a frame unwritten (the socket is full): the next
    # delivery to find the outbox full is refused, never written around that rest.
    async with rig(send_buffer=4096) as r:
        await _writer_task_between_writes(r)
        frames = [text_frame(bytes([65 + n]) * 30_000) for n in range(20)]
        queued = _route(r, frames)
        assert frames[:9] == queued[:9]  # the outbox's 8 and the one after the early write
        assert len(queued) < len(frames)  # refused: recipient_busy
        data = await r.read(sum(map(len, queued)))
        assert server_frames(data, after_head=False) == [(0x1, f[4:]) for f in queued]


async def test_no_early_write_while_the_writer_task_is_in_a_write_of_its_own() -> None:
    # The socket is full and the task waits to finish its write: writing around it
    # would cut its frame in two on the wire.
    async with rig(send_buffer=4096) as r:
        big = text_frame(b"x" * 200_000)
        r.queue(big)
        await trio.testing.wait_all_tasks_blocked()  # the task waits for the socket
        assert (r.tasks(), r.writer.bytes_out) == (1, 0)
        small = [text_frame(b"m%d" % n) for n in range(12)]
        queued = _route(r, small)
        assert queued == small[:8]  # the outbox's 8; the rest refused
        data = await r.read(len(big) + sum(map(len, queued)))
        assert server_frames(data, after_head=False) == [(0x1, b"x" * 200_000)] + [
            (0x1, b"m%d" % n) for n in range(8)
        ]


async def test_a_writer_task_cancelled_before_it_wrote_the_rest_of_an_early_write() -> None:
    # Cancelled while it waited (its nursery, a close's bound), and a routing batch ran
    # before it did: the frame the early write began is cut short. It is counted as
    # dropped and the transport broken, so that nothing is written behind half a frame.
    async with rig(send_buffer=4096) as r:
        await _writer_task_between_writes(r)
        r.writer.stop()
        big = text_frame(b"y" * 100_000)
        with routing_batch():
            assert r.outbox.offer(big) is Offer.QUEUED
            r.writer.wake()
            assert r.writer.make_room()
        await trio.testing.wait_all_tasks_blocked()
        assert not r.writer.running
        assert (r.writer.messages_out, r.writer.dropped) == (1, 1)
        assert r.transport.broken
        r.queue(text_frame(b"after"))
        assert r.writer.messages_out == 1  # not written behind the cut frame
