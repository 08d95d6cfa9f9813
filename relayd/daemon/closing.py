"""A connection's end: the closing handshake, and the ``connection.close`` event.

Once a connection has stopped reading and writing
(:meth:`~relayd.daemon.connection.Connection.run`), :func:`closing_handshake`
sends the close frame its :class:`~relayd.wire.lifecycle.Lifecycle` decided
on and, for a close relayd began, awaits the client's, all within
:data:`CLOSE_TIMEOUT_S`; :func:`log_close` then counts the connection's close
and its bytes, and logs ``connection.close``.

Error handling: a client gone meanwhile ends the handshake quietly (the
transport's writes are bounded and say what they sent); nothing else raises
but cancellation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final

import structlog
import trio

from relayd.daemon.reader import RECEIVE_BYTES, Reader
from relayd.daemon.transport import Transport
from relayd.daemon.writer import Writer
from relayd.errors import ProtocolError
from relayd.telemetry.log import info_line
from relayd.telemetry.metrics import Stats
from relayd.wire.frames import OP_CLOSE
from relayd.wire.lifecycle import Lifecycle

if TYPE_CHECKING:
    from relayd.daemon.connection import Connection

__all__ = ["CLOSE_TIMEOUT_S", "closing_handshake", "log_close"]

#: How long relayd gives a flush before a policy close, a write in progress
#: once it stops writing, and the closing handshake. A peer that is still
#: reading answers in milliseconds; one that is not would hold the connection
#: forever.
CLOSE_TIMEOUT_S: Final = 5.0


async def closing_handshake(
    transport: Transport, lifecycle: Lifecycle, reader: Reader, writer: Writer
) -> None:
    """Send the close frame this end owes, and for a close relayd began, await the client's."""
    frame = lifecycle.close_frame
    if frame is None:
        return  # the client vanished without a close frame
    # The clock is read only for a close that waits for the client's (an echo
    # of the client's close, the usual ending, waits for nothing).
    awaits = lifecycle.awaits_client_close
    deadline = trio.current_time() + CLOSE_TIMEOUT_S if awaits else math.inf
    sent = await transport.send_close(*frame, timeout_s=CLOSE_TIMEOUT_S)
    writer.bytes_out += sent
    if sent and awaits:
        with trio.move_on_at(deadline):  # what is left of the same bound
            await _client_close(transport, reader)


async def _client_close(transport: Transport, reader: Reader) -> None:
    """After relayd's close frame: wait for the client's (bounded by the caller)."""
    # After relayd's close frame, the client's messages are not read
    # (RFC 6455 §1.4); only its close frame, or the end of the stream.
    receive = transport.receive
    while True:
        data = await receive(RECEIVE_BYTES)
        reader.bytes_in += len(data)
        try:
            events = reader.feed(data, trio.current_time()) if data else [(OP_CLOSE, b"")]
        except ProtocolError:
            return
        if any(opcode == OP_CLOSE for opcode, _ in events):
            transport.close_received = bool(data)
            return


def log_close(
    connection: Connection,
    lifecycle: Lifecycle,
    reader: Reader,
    writer: Writer,
    log: structlog.typing.FilteringBoundLogger,
    stats: Stats,
) -> None:
    """Count ``connection``'s close and its bytes, and log ``connection.close``."""
    close = lifecycle.close
    assert close is not None  # run() always decides how it ended
    code = int(close.code)  # a CloseCode member logs as its name otherwise
    stats.closes[code] += 1
    stats.bytes_received += reader.bytes_in
    stats.bytes_sent += writer.bytes_out
    info_line(
        log,
        "connection.close",
        conn=connection.conn,
        id=connection.client_id,
        code=code,
        reason=close.reason,
        closed_by=close.closed_by,
        duration_s=round(trio.current_time() - connection.started, 3),
        messages_in=reader.messages_in,
        messages_out=writer.messages_out,
        bytes_in=reader.bytes_in,
        bytes_out=writer.bytes_out,
        undelivered=connection.outbox.dropped + writer.dropped,
    )
