"""The least a seed-dialect relay on trio can do: the floor under relayd's costs.

Usage: ``python trio_floor_relay.py [PORT] [HOST] [--poller]`` (port 0 picks
one). Prints ``{"event": "server.ready", "port": N}`` once listening; SIGTERM
stops it. The bench runs it with ``--poller``, as relayd reads.

Not a relay anyone should run: it is what trio and CPython cost for the bench's
traffic with nothing of relayd's around them, so that relayd's ratio to node-ws
can be split into trio's floor and relayd's own part. One task per connection,
as relayd has, and what relayd does per message at its least: wait for the
socket (``wait_readable``; with ``--poller``, as relayd does, one task waits on
an epoll of every connection's socket and reads each ready one in its own
step: :class:`Poller`), read once, parse the frames (RFC 6455 as the
generator sends it: masked text, close, ping; a fragment or a frame over 64 KiB
closes the connection), decide with :func:`seed_protocol.decide`, and write the
recipient's frame straight to its socket (a task waits for room only when the
kernel takes part of it). No limits, no log lines, no metrics, no router task, no
outboxes, no timeouts. Accepting is relayd's: the backlog taken without a wait,
the options set once on the listener.
"""

from __future__ import annotations

import base64
import hashlib
import select
import signal
import socket
import struct
import sys

import trio
from seed_protocol import Deliver, decide, listen_address, new_id, ready_line
from websockets.speedups import apply_mask

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_PAYLOAD = 65535
_CLOSE = b"\x88\x00"


class Peer:
    """One client's socket, and what the kernel has not taken yet."""

    __slots__ = ("pending", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = b""

    def send(self, data: bytes, nursery: trio.Nursery) -> None:
        """Write ``data`` now, or after what waits; never waits itself."""
        if self.pending:
            self.pending += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # gone: its own task sees the end
        if sent < len(data):
            self.pending = data[sent:]
            nursery.start_soon(self._drain)

    async def _drain(self) -> None:
        while self.pending:
            try:
                await trio.lowlevel.wait_writable(self.sock)
                sent = self.sock.send(self.pending)
            except (OSError, trio.ClosedResourceError):
                self.pending = b""
                return
            self.pending = self.pending[sent:]


clients: dict[str, Peer] = {}


def frame(payload: bytes, opcode: int = 1) -> bytes:
    """An unmasked server frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload


async def receive(sock: socket.socket) -> bytes:
    """What the client sent next; b"" at its end (or a reset)."""
    await trio.lowlevel.wait_readable(sock)
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return await receive(sock)
    except OSError:
        return b""


def accept_response(head: bytes) -> bytes | None:
    """The 101 for a request head, or None if it has no key."""
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            digest = hashlib.sha1(value.strip() + _GUID).digest()
            return (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                + base64.b64encode(digest)
                + b"\r\n\r\n"
            )
    return None


async def serve(sock: socket.socket, nursery: trio.Nursery) -> None:
    """One client from its request to its close."""
    try:
        head = b""
        while (end := head.find(b"\r\n\r\n")) < 0:
            data = await receive(sock)
            if not data:
                return
            head += data
        response = accept_response(head[:end])
        if response is None:
            sock.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        client_id = new_id()
        me = clients[client_id] = Peer(sock)
        try:
            me.send(response + frame(client_id.encode()), nursery)
            await _relay(me, head[end + 4 :], nursery)
        finally:
            del clients[client_id]
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()


def feed(me: Peer, buf: bytes, nursery: trio.Nursery) -> bytes | None:
    """Act on every whole frame in ``buf``; what is left of it, or None at the close."""
    at = 0
    while len(buf) - at >= 6:
        b0, b1 = buf[at], buf[at + 1]
        n, start = b1 & 0x7F, at + 2
        if n == 126:
            if len(buf) - at < 8:
                break
            n, start = int.from_bytes(buf[start : start + 2], "big"), start + 2
        elif n == 127 or not b0 & 0x80 or n > _MAX_PAYLOAD:
            me.send(_CLOSE, nursery)
            return None
        end = start + 4 + n
        if len(buf) < end:
            break
        payload = apply_mask(buf[start + 4 : end], buf[start : start + 4])
        at = end
        opcode = b0 & 0x0F
        if opcode == 1:
            decision = decide(payload.decode(), clients)
            if isinstance(decision, Deliver):
                clients[decision.to].send(frame(decision.text.encode()), nursery)
            else:
                me.send(frame(decision.frame.encode()), nursery)
        elif opcode == 9:
            me.send(frame(payload, 10), nursery)
        elif opcode != 10:  # a close (answered), or what the floor does not serve
            me.send(_CLOSE, nursery)
            return None
    return buf[at:]


async def relay(me: Peer, buf: bytes, nursery: trio.Nursery) -> None:
    """Relay the client's frames until its close frame or its end, in its own task."""
    while (rest := feed(me, buf, nursery)) is not None:
        data = await receive(me.sock)
        if not data:
            return
        buf = rest + data if rest else data


class Poller:
    """``--poller``: one task reads every connection's socket, through an epoll of its own.

    The connection's task only waits for the poller to say its client has ended: a
    read wakes no task of its own, and a ready socket costs no registration of trio's
    (the sockets stay in this epoll, level-triggered; trio waits on its descriptor).
    """

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.peers: dict[int, tuple[Peer, list[bytes], trio.Event]] = {}

    async def relay(self, me: Peer, buf: bytes, nursery: trio.Nursery) -> None:
        """Hand the client to the poller until its close frame or its end."""
        rest = feed(me, buf, nursery)
        if rest is None:
            return
        fd = me.sock.fileno()
        ended = trio.Event()
        self.peers[fd] = (me, [rest], ended)
        self.epoll.register(fd, select.EPOLLIN)
        try:
            await ended.wait()
        finally:
            if self.peers.pop(fd, None) is not None:
                self.epoll.unregister(fd)

    async def run(self, nursery: trio.Nursery) -> None:
        """Read what every ready socket has, act on it; forever."""
        poll, peers = self.epoll.poll, self.peers
        while True:
            await trio.lowlevel.wait_readable(self.epoll.fileno())
            for fd, _ in poll(0):
                entry = peers.get(fd)
                if entry is None:
                    continue
                me, held, ended = entry
                try:
                    data = me.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                rest = feed(me, held[0] + data if held[0] else data, nursery) if data else None
                if rest is None:
                    del peers[fd]
                    self.epoll.unregister(fd)
                    ended.set()
                else:
                    held[0] = rest


async def accept_loop(listener: socket.socket, nursery: trio.Nursery) -> None:
    """Accept as relayd does: the whole backlog without a wait, a yield every 32."""
    burst = 0
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            burst = 0
            await trio.lowlevel.wait_readable(listener)
            continue
        except OSError:
            await trio.sleep(0.1)  # out of descriptors, or a client gone: try again
            continue
        sock.setblocking(False)
        nursery.start_soon(serve, sock, nursery)
        burst += 1
        if burst == 32:
            burst = 0
            await trio.lowlevel.checkpoint()


async def main(port: int, host: str, poller: Poller | None) -> None:
    """Serve until SIGTERM or SIGINT."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 1 << 14)
    listener.bind((host, port))
    listener.listen(4096)
    listener.setblocking(False)
    with listener, trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_loop, listener, nursery)
            if poller is not None:
                nursery.start_soon(poller.run, nursery)
            print(ready_line(listener.getsockname()[1]), flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


#: How a connection's frames are read once it is open: ``relay``, or the poller's.
_relay = relay

if __name__ == "__main__":
    _poller = Poller() if "--poller" in sys.argv else None
    if _poller is not None:
        _relay = _poller.relay
    trio.run(main, *listen_address([a for a in sys.argv if a != "--poller"]), _poller)
