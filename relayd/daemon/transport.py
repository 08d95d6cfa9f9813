"""The client's byte stream as relayd writes to it and closes it.

:class:`Transport` wraps one accepted client (a plain TCP socket as
``accept()`` gave it, or a stream: TLS over TCP) for its whole life, from the
handshake to the last byte, and remembers two things that decide how the
connection can end:

* whether a close frame was sent (it is sent at most once);
* whether a write was cut short (cancelled half-way: the client then holds
  part of a frame, and nothing more may be written, a close frame included).

**Closing gracefully.** Closing a socket with unread input makes the kernel
send a reset, which destroys the client's copy of what relayd sent last (a
1009 close after an oversized frame, a 1002 after a protocol error, a refusal's
response to a request that came with more bytes). :meth:`Transport.close`
sends FIN, reads and discards until the client's EOF, then closes; bounded by
:data:`LINGER_S`.

**A plain TCP socket is used as it is.** trio's ``SocketStream`` around it
would cost every connection an object, two conflict detectors and, at each
accept, two context managers and an enum conversion, and trio's socket
wrapper another object; the accept loop hands over the standard library's
socket as ``accept()`` made it, with the two options ``SocketStream`` sets
(:func:`tune`): inherited from the listening socket, or, for a client queued
before the listener had them, set by the accept loop. The transport reads and
writes the socket's descriptor itself and waits with trio's ``wait_readable``
and ``wait_writable``; its close tells trio first (``notify_closing``), so
whoever waits on the descriptor is woken, as trio's own ``close`` would.

**Writing without waiting.** :meth:`Transport.try_send` writes what the
kernel takes at once, without a checkpoint: for a plain TCP socket it is one
``send`` on its (non-blocking) file descriptor; for TLS it declines (the TLS
layer must see every byte), and so do streams that are not sockets (tests).
It lets a connection with nothing else to write send a lone message without
waking a task for it. :meth:`Transport.send_all` and
:meth:`Transport.send_within` (a write with a timeout: the handshake's
response, a close frame) begin the same way, and wait (for a plain socket,
with ``wait_writable``; else through the stream) only for what the socket did
not take: a write that fits costs no scheduling
round and no cancel scope.

**Reading.** :meth:`Transport.receive` waits for a plain TCP socket to be
readable, then reads it once: one ``read`` per arrival. (trio's
``receive_some`` reads first and waits only if that fails, which suits a
stream that is usually ahead; a chat client's socket is usually empty when
its reader comes back to it, so that first read fails, once per message.)
TLS and other streams read through ``receive_some``. A plain socket's reads are
:meth:`Transport.read_nowait` on :attr:`Transport.fd`, once it is readable: by
the server's read poller (:mod:`relayd.daemon.poller`) while the connection's
reader waits in it, or by the reader itself, which then waits for the
descriptor in its own frame (an idle connection waits in one coroutine frame
less).

Resource handling: the gate's per-stream task owns the transport and calls
:meth:`Transport.close` in its ``finally`` (it closes the socket even when
cancelled); the connection's reader receives with :meth:`Transport.receive` or
:meth:`Transport.read_nowait` and its writer sends through
:meth:`Transport.send_all` or :meth:`Transport.try_send`, one write at a time.
A closed socket's descriptor number may soon be another socket's, so it is never
used after the close: the transport reads it again after every wait of its own,
and the reader, which waits on :attr:`Transport.fd` (itself, or parked in the
poller, whose epoll it leaves as its wait ends), runs in the gate's task, which
closes the transport only once the reader has returned and the writer has ended.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Final, TypeAlias

import trio

from relayd.wire.server_frames import close_frame

__all__ = [
    "LINGER_S",
    "NOTSENT_LOWAT",
    "Accepted",
    "PlainSocket",
    "Transport",
    "discard",
    "tune",
]

#: A plain TCP socket: the standard library's, as the accept loop hands it over
#: (non-blocking), or trio's (in tests, and inside a ``SocketStream``).
PlainSocket: TypeAlias = socket.socket | trio.socket.SocketType
#: What an accept loop hands over: a plain TCP socket, or a stream (TLS; in tests,
#: in-memory streams and trio's ``SocketStream``).
Accepted: TypeAlias = PlainSocket | trio.abc.Stream

#: How long a closing connection may keep sending before relayd resets it.
LINGER_S: Final = 2.0
_LINGER_READ: Final = 65536
#: The bytes a socket's kernel buffer holds that are not sent yet before it stops
#: taking more (``TCP_NOTSENT_LOWAT``, trio's ``SocketStream`` value): what a slow
#: client has not taken waits in the connection's outbox, bounded and counted, not in
#: the kernel. (Bytes sent and not yet acknowledged are bounded by the TCP window.)
NOTSENT_LOWAT: Final = 1 << 14
_OPTIONS: Final = ((socket.TCP_NODELAY, 1), (socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT))
_PLAIN: Final = (socket.socket, trio.socket.SocketType)


def tune(sock: PlainSocket) -> None:
    """Set on a listening TCP socket what trio's ``SocketStream`` sets on each connection.

    Linux copies both options from a listening socket to every connection
    established after they were set, so they cost no system call per
    connection (the accept loop tunes the clients queued before, one by one):
    ``TCP_NODELAY``, a lone message goes out at once, not after the client's
    acknowledgement of the last one; ``TCP_NOTSENT_LOWAT``: :data:`NOTSENT_LOWAT`.
    (``tests/test_transport.py`` checks them on a socket accepted over real TCP.)
    A socket that refuses either (not TCP) is served as it is.
    """
    for option, value in _OPTIONS:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


async def discard(accepted: Accepted) -> None:
    """Close a client that is not to be served, at once (a checkpoint, even if cancelled)."""
    if isinstance(accepted, _PLAIN):
        accepted.close()  # never waited on: trio has nothing to be told
        await trio.lowlevel.cancel_shielded_checkpoint()
    else:
        await trio.aclose_forcefully(accepted)


class Transport:
    """One client's socket or stream; see the module docstring.

    Args:
        accepted: the accepted client, a plain TCP socket (non-blocking,
            accepted from a :func:`tune`'d listener) or a stream; this object
            closes it. trio's ``SocketStream`` is taken apart: its socket is
            used as it is.
    """

    __slots__ = ("_closed", "_fd", "_socket", "_stream", "broken", "close_received", "close_sent")

    def __init__(self, accepted: Accepted) -> None:
        # (trio forbids subclassing SocketStream: its type says it, without
        # isinstance's pass through the stream ABC's __instancecheck__.)
        if type(accepted) is trio.SocketStream:
            accepted = accepted.socket
        if isinstance(accepted, _PLAIN):
            self._socket: PlainSocket | None = accepted
            self._stream: trio.abc.Stream | None = None
            # Its descriptor, for reads and writes without a checkpoint.
            self._fd = accepted.fileno()
        else:
            self._socket, self._stream, self._fd = None, accepted, -1
        #: True once a close frame went out.
        self.close_sent = False
        #: True once the client's close frame was read (it may send nothing after it).
        self.close_received = False
        #: True once a write failed or was cut short, or the transport began to
        #: close: write nothing more.
        self.broken = False
        self._closed = False

    async def send_all(self, data: bytes) -> None:
        """Write ``data`` whole.

        What a plain TCP socket takes at once is written without a checkpoint
        (:meth:`try_send`); only the rest waits for room.

        Raises:
            trio.BrokenResourceError: the client has gone (the transport is
                then broken).
            trio.Cancelled: while waiting for room; the write may have been
                cut short, so the transport is broken.
        """
        rest = self._send_now(data)
        if rest:
            await self._send_rest(rest)

    async def send_within(self, data: bytes, timeout_s: float) -> bool:
        """Write ``data`` whole, waiting at most ``timeout_s`` for room.

        The timeout costs nothing when the socket takes ``data`` at once.

        Returns:
            True once written; False if the client is gone, or did not take
            it in time (the transport is then broken).
        """
        try:
            rest = self._send_now(data)
            if not rest:
                return True
            with trio.move_on_after(timeout_s):
                await self._send_rest(rest)
                return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return False

    def _send_now(self, data: bytes) -> bytes | memoryview:
        """Write what a plain TCP socket takes now; what is left to send (all, for others)."""
        if self._fd < 0 or self.broken:
            return data
        sent = self.try_send(data) or 0
        if sent == len(data):
            return b""  # the usual case: all of it, no view to make
        return memoryview(data)[sent:] if sent else data

    async def _send_rest(self, rest: bytes | memoryview) -> None:
        try:
            if self._stream is not None:
                await self._stream.send_all(rest)
            else:
                await self._send_to_socket(memoryview(rest))
        except BaseException:
            # Cut short, perhaps half-way through a frame: nothing more may follow.
            self.broken = True
            raise

    async def _send_to_socket(self, rest: memoryview) -> None:
        """Write ``rest`` to the plain socket as it takes it, waiting for room each time."""
        while rest:
            await trio.lowlevel.wait_writable(self._open_fd())
            # Read again after the wait: closed meanwhile, its number may be another socket's.
            fd = self._open_fd()
            try:
                rest = rest[os.write(fd, rest) :]
            except BlockingIOError:  # writable, then not: wait again
                continue
            except OSError as exc:  # EPIPE, ECONNRESET: the peer is gone
                raise trio.BrokenResourceError(f"the client is gone: {exc}") from exc

    def _open_fd(self) -> int:
        """The plain socket's descriptor; ClosedResourceError once it is closed."""
        fd = self._fd
        if fd < 0:
            raise trio.ClosedResourceError("the transport is closed")
        return fd

    async def receive(self, max_bytes: int) -> bytes | bytearray:
        """Wait for data and return what one read brings, at most ``max_bytes``.

        Cancellation: only the wait is a checkpoint; once the read is made its
        bytes are returned.

        Returns:
            The bytes read; empty once the client has closed its side or gone
            (reset).

        Raises:
            trio.ClosedResourceError: the transport was closed meanwhile.
        """
        try:
            return await self.receive_some(max_bytes)
        except trio.BrokenResourceError:  # reset by the client
            return b""

    async def receive_some(self, max_bytes: int) -> bytes | bytearray:
        """As :meth:`receive`, but a connection that broke raises rather than ends.

        Raises:
            trio.BrokenResourceError: the client reset the connection, or its
                TLS handshake failed.
            trio.ClosedResourceError: the transport was closed meanwhile.
        """
        if self._stream is not None:
            return await self._stream.receive_some(max_bytes)
        while True:
            await trio.lowlevel.wait_readable(self._open_fd())
            try:
                # Read again after the wait: closed meanwhile, its number may be
                # another socket's.
                return os.read(self._open_fd(), max_bytes)
            except BlockingIOError:  # readable, then not: wait again
                continue
            except OSError as exc:  # ECONNRESET, ETIMEDOUT: the client is gone
                raise trio.BrokenResourceError(f"the client is gone: {exc}") from exc

    @property
    def fd(self) -> int:
        """A plain TCP socket's descriptor, to wait on before :meth:`read_nowait`; else -1.

        -1 for TLS and other streams (read them with :meth:`receive`), and
        once the transport is closed.
        """
        return self._fd

    def read_nowait(self, max_bytes: int) -> bytes | None:
        """What one read of a plain TCP socket brings now, at most ``max_bytes``.

        Returns:
            The bytes read, empty once the client has closed its side or gone;
            None when nothing is there yet, or this stream cannot be read
            without waiting (TLS, not a socket): use :meth:`receive`.
        """
        if self._fd < 0:
            return None
        try:
            return os.read(self._fd, max_bytes)
        except BlockingIOError:
            return None
        except OSError:  # ECONNRESET, ETIMEDOUT: the client is gone
            return b""

    @property
    def direct(self) -> bool:
        """True if :meth:`try_send` can write (a plain TCP socket, still open and whole)."""
        return self._fd >= 0 and not self.broken

    def try_send(self, data: bytes) -> int | None:
        """Write as much of ``data`` as the socket takes now, without waiting or a checkpoint.

        Returns:
            The bytes written (0 when the socket is full); None when this
            stream cannot be written without waiting (TLS, not a socket): use
            :meth:`send_all`.

        Raises:
            trio.BrokenResourceError: the client has gone (the transport is
                then broken).
        """
        if self._fd < 0 or self.broken:
            return None
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:  # EPIPE, ECONNRESET: the peer is gone
            self.broken = True
            raise trio.BrokenResourceError(f"the client is gone: {exc}") from exc

    async def send_close(self, code: int | None, reason: str = "", *, timeout_s: float) -> int:
        """Send a close frame within ``timeout_s``, unless one was sent or the stream is broken.

        Returns:
            The bytes this call sent: the frame's size, or 0.
        """
        if self.close_sent or self.broken:
            return 0
        self.close_sent = True
        frame = close_frame(code, reason)
        return len(frame) if await self.send_within(frame, timeout_s) else 0

    async def close(self) -> None:
        """Close gracefully within :data:`LINGER_S`; idempotent, and closes even if cancelled.

        A plain TCP socket is closed without a wait when nothing more can come
        that the close would answer with a reset: the client's end of stream
        is there, or its close frame came (:attr:`close_received`) and nothing
        after it.
        """
        if self._closed:
            return
        self._closed = True
        # Nothing more is written from here on, a close frame included.
        whole, self.broken = not self.broken, True
        fd, stream = self._fd, self._stream
        if fd >= 0:
            if self._done_sending(fd):
                # Nothing unread: close() itself sends the FIN (no reset), and a
                # shutdown() first would be one system call more for the same bytes.
                self._close_socket()
                return
            if whole:
                # A plain socket's FIN needs no wait (send_eof would checkpoint).
                with contextlib.suppress(OSError):  # ENOTCONN: the client is gone already
                    self._plain_socket().shutdown(socket.SHUT_WR)
        try:
            with (
                trio.move_on_after(LINGER_S),
                contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError
                ),
            ):
                if fd < 0 and whole and isinstance(stream, trio.abc.HalfCloseableStream):
                    await stream.send_eof()
                while await self.receive(_LINGER_READ):
                    pass
        finally:  # cancelled too: a forced stop closes at once
            if stream is None:
                self._close_socket()
            else:
                await trio.aclose_forcefully(stream)

    def _close_socket(self) -> None:
        """Close the plain TCP socket at once, as aclose would, without its checkpoint."""
        plain, fd = self._plain_socket(), self._fd
        # The descriptor may be reused once closed: never read or write it again.
        self._fd = -1
        # As trio's own close does: whoever waits on it is woken (ClosedResourceError),
        # and trio forgets the descriptor before its number can be another socket's.
        trio.lowlevel.notify_closing(fd)
        plain.close()

    def _done_sending(self, fd: int) -> bool:
        """True if the client can send nothing more, as one read without a wait shows."""
        try:
            data = os.read(fd, _LINGER_READ)
        except BlockingIOError:
            return self.close_received  # nothing unread, and nothing more may follow
        except OSError:  # ECONNRESET: gone
            return True
        return not data  # its end of stream; else it still sends: linger

    def _plain_socket(self) -> PlainSocket:
        assert self._socket is not None  # only when _fd was set
        return self._socket
