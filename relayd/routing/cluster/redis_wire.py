"""The command writer: commands to Redis from the task that has them, each reply taken as parsed.

coredis 6.9's connection (:class:`coredis.connection.BaseConnection`) does the
handshake and the RESP3 parsing in its reader task; once the handshake is
done, the writing is done here. A command through coredis costs three steps
of its writer task (woken, its send's checkpoint, its receive's) and a reply
two of a task awaiting it, for reasons measured on this machine
(docs/scaling.md, "The Redis client"). So :class:`Wire` writes commands from
the caller's task straight to the socket (one ``send``, no checkpoint; a task
only for what the socket did not take), and each reply is taken by a
:class:`Reply` in coredis's reader task as it parses it. Over TLS the bytes
must go through the TLS layer: commands are queued for coredis's writer task
instead.

This reads two private parts of a coredis 6.9 connection: its request queue
(``_requests``, where each reply is matched to the oldest request: a
:class:`Reply` is appended in the order its command is written) and its
packer (``_packer``). pyproject.toml keeps coredis to 6.9.x for that, and
tests/test_cluster_link.py exercises both against a real Redis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

import trio
from anyio.abc import SocketAttribute
from coredis.connection import BaseConnection
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import NoScriptError
from coredis.typing import RedisValueT, ResponseType

__all__ = [
    "SKIP_REPLY",
    "Command",
    "Lost",
    "Reply",
    "Wire",
    "as_bytes",
    "call",
    "evalsha",
    "load_script",
    "ms",
]


class Lost(Exception):
    """The session is over: a connection closed or failed, or a probe did not come back."""


#: One Redis command as written: its name, then its arguments.
Command = tuple[RedisValueT, ...]

#: Makes a holder's answer ask for no reply: Redis skips the reply of the next command.
SKIP_REPLY: Final[Command] = (b"CLIENT", b"REPLY", b"SKIP")


class Reply:
    """The reply to one command, taken in coredis's reader task as it is parsed.

    coredis matches each reply to the oldest entry of the connection's request
    queue: it reads ``current_decode`` and ``current_encoding``, calls
    :meth:`consume`, and when the connection ends calls :meth:`fail` on every
    entry left. That is all an entry needs. ``on_reply`` is called exactly
    once: with the reply, an error reply (a :class:`RedisError`), or the error
    the connection ended with. It runs in coredis's reader task and must not
    wait.
    """

    __slots__ = ("_on_reply", "complete")

    current_decode: Final = False
    current_encoding: Final = "utf-8"

    def __init__(self, on_reply: Callable[[ResponseType | BaseException], None]) -> None:
        self._on_reply = on_reply
        self.complete = False

    def consume(self, response: ResponseType | BaseException) -> None:
        """Take the reply (coredis's reader), or the end of the connection: once."""
        if not self.complete:
            self.complete = True
            self._on_reply(response)

    fail = consume


class Wire:
    """One Redis connection's outgoing side, once coredis's handshake is done.

    :meth:`send` writes commands from the caller's task: one ``send`` on the
    socket, which never waits and is no checkpoint. What the socket does not
    take is kept (:attr:`unwritten`) and written by :meth:`run` as the socket
    takes it, before anything sent later. Over TLS (``direct`` false) the
    commands are queued for coredis's writer task instead. Either way a
    command's :class:`Reply` joins coredis's request queue as the command
    is written, so every reply meets its command.

    Resource handling: the session owns the connection and runs :meth:`run`
    in its nursery. Once coredis has closed the socket, :meth:`send` fails
    (the socket object knows it is closed: a descriptor number reused since
    is never written to). Error handling: a write that fails breaks the wire;
    :meth:`send` then refuses, and :meth:`run` raises :class:`Lost`, which
    ends the session.
    """

    __slots__ = (
        "_broken",
        "_connection",
        "_lot",
        "_pack",
        "_requests",
        "_socket",
        "_unwritten",
        "role",
    )

    def __init__(self, connection: BaseConnection, role: str, *, direct: bool) -> None:
        self.role = role
        self._connection = connection
        self._requests = connection._requests  # coredis's request queue: see the module docstring
        self._pack = connection._packer.pack_commands
        stream = connection.stream
        self._socket = (
            stream.extra(SocketAttribute.raw_socket) if direct and stream is not None else None
        )
        self._unwritten = bytearray()
        self._lot = trio.lowlevel.ParkingLot()  # run, waiting for bytes to write
        self._broken: str | None = None

    @property
    def direct(self) -> bool:
        """Whether commands are written to the socket from the caller's task."""
        return self._socket is not None

    @property
    def unwritten(self) -> int:
        """Bytes sent and not yet taken by the socket."""
        return len(self._unwritten)

    def send(self, commands: list[Command], reply: Reply | None = None) -> bool:
        """Write ``commands``, without waiting; ``reply`` takes the last one's reply.

        Returns:
            False if nothing was written: the connection is gone (``reply`` is
            then never called).
        """
        if self._broken is not None:
            return False
        sock = self._socket
        if sock is None:
            try:
                for name, *arguments in commands:
                    assert isinstance(name, bytes)
                    self._connection.send_command(name, *arguments)
            except RedisConnectionError:  # not connected (any more): nothing was queued
                return False
        else:
            data = b"".join(self._pack(commands))
            if self._unwritten:
                self._unwritten += data
            else:
                try:
                    sent = sock.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError as error:  # closed, reset: none of data was written
                    self._broken = f"the {self.role} connection failed: {error}"
                    self._lot.unpark()
                    return False
                if sent < len(data):
                    self._unwritten += memoryview(data)[sent:]
                    self._lot.unpark()
        if reply is not None:
            self._requests.append(reply)  # type: ignore[arg-type]  # what coredis reads of one
        return True

    async def run(self) -> None:
        """Write what the socket did not take at once, as it takes it.

        Raises:
            Lost: a write failed, here or in :meth:`send`.
        """
        sock, unwritten = self._socket, self._unwritten
        while True:
            while not unwritten and self._broken is None:
                await self._lot.park()
            if self._broken is not None or sock is None:
                raise Lost(self._broken or f"the {self.role} connection failed")
            try:
                await trio.lowlevel.wait_writable(sock)
                sent = sock.send(unwritten)
            except BlockingIOError:
                continue
            except (OSError, trio.ClosedResourceError) as error:
                raise Lost(f"the {self.role} connection failed: {error}") from error
            del unwritten[:sent]


async def call(wire: Wire, *command: RedisValueT) -> ResponseType:
    """Send one command and wait for its reply; the caller bounds the wait.

    Raises:
        Lost: the connection is gone.
        RedisError: Redis answered with an error, or the connection ended first.
    """
    return await _last_reply(wire, [command])


async def _last_reply(wire: Wire, commands: list[Command]) -> ResponseType:
    """Write ``commands`` at once and wait for the last one's reply (the others ask for none)."""
    done = trio.Event()
    replies: list[ResponseType | BaseException] = []

    def on_reply(reply: ResponseType | BaseException) -> None:
        replies.append(reply)
        done.set()

    if not wire.send(commands, Reply(on_reply)):
        raise Lost(f"the {wire.role} connection failed")
    await done.wait()
    reply = replies[0]
    if isinstance(reply, BaseException):
        raise reply
    return reply


async def load_script(wire: Wire, script: bytes) -> bytes:
    """``SCRIPT LOAD`` ``script``; its hash. The caller bounds the wait.

    Raises:
        Lost: the connection is gone, or the reply is not a script's hash.
        RedisError: Redis refused.
    """
    return as_bytes(await call(wire, b"SCRIPT", b"LOAD", script))


async def evalsha(
    wire: Wire,
    script: bytes,
    sha: bytes,
    *arguments: RedisValueT,
    reloading: Callable[[], None] = lambda: None,
) -> ResponseType:
    """Run ``script`` by its hash ``sha``; loaded again first if Redis has lost it.

    Redis answers ``NOSCRIPT``, having run nothing, once its script cache was
    emptied (``SCRIPT FLUSH``, a failover behind a proxy to a Redis without the
    script): ``reloading`` is called, and the script is loaded again and run
    once more, as coredis's own ``Script`` does, but with both commands in one
    write (the load asking for no reply; over TLS queued together for coredis's
    writer), not the run after the load's reply: Redis runs the commands of one
    read one after the other, before another client's, so a flush from elsewhere
    does not come between them, however often Redis is flushed (it did, between
    the load's reply and the run, when flushes came tens of ms apart). One load
    per ``NOSCRIPT``, never more. The caller bounds the wait.

    Raises:
        Lost: the connection is gone.
        RedisError: Redis answered with an error, or the connection ended first
            (``NoScriptError`` again if Redis refused the load: ``SKIP_REPLY``
            drops its error reply too).
    """
    try:
        return await call(wire, b"EVALSHA", sha, *arguments)
    except NoScriptError:
        reloading()
    load: Command = (b"SCRIPT", b"LOAD", script)
    return await _last_reply(wire, [SKIP_REPLY, load, (b"EVALSHA", sha, *arguments)])


def ms(seconds: float) -> int:
    """``seconds`` in whole milliseconds, rounded up (Redis's scripts count in ms)."""
    return math.ceil(seconds * 1000)


def as_bytes(reply: object) -> bytes:
    """A reply that must be a string, as bytes.

    Raises:
        Lost: it is not one.
    """
    if isinstance(reply, str):
        return reply.encode()
    if isinstance(reply, bytes):
        return reply
    raise Lost(f"unexpected reply from Redis: {reply!r}")
