"""relayd's client side, on trio-websocket: a library for programs, and ``relayd chat``.

The daemon imports none of this, and this imports none of the daemon's
dependencies (pydantic, structlog, prometheus_client, PyJWT): a program that
only talks to relayd needs trio, trio-websocket and msgspec. A program::

    import trio
    import relayd.client

    async def main() -> None:
        async with relayd.client.connect("ws://localhost:9030/") as client:
            print("my id:", client.id)
            await client.send(client.id, {"hello": "me"})  # returns on relayd's ack
            async for message in client:
                print(message.sender, message.data)
                break

    trio.run(main)

The public API is what this module exports (docs/client.md); it is built from:

* :mod:`~relayd.client.client`: :func:`connect` and the :class:`Client`;
* :mod:`~relayd.client.options`: what ``connect`` takes, its defaults, checked;
* :mod:`~relayd.client.endings`: what follows when a connection ends;
* :mod:`~relayd.client.errors`: every exception, one per error and close code;
* :mod:`~relayd.client.messages`: :class:`Message`, and the frames, without I/O;
* :mod:`~relayd.client.backoff`: :class:`Backoff`, when to reconnect;
* :mod:`~relayd.client.link`: one WebSocket connection, on trio-websocket;
* :mod:`~relayd.client.opening`: a connection opened: TCP, TLS, upgrade, welcome;
* :mod:`~relayd.client.outstanding`, :mod:`~relayd.client.endpoint`: reply
  matching and URLs, without I/O;
* :mod:`~relayd.client.chat`, :mod:`~relayd.client.chat_session` and
  :mod:`~relayd.client.terminal`: ``relayd chat``.
"""

from relayd.client.backoff import Backoff
from relayd.client.client import Client, CloseInfo, connect
from relayd.client.errors import (
    ClientError,
    ConnectError,
    ConnectionClosed,
    ConnectionLost,
    ConnectTimeout,
    DeliveryUnconfirmed,
    HandshakeRefused,
    InternalError,
    InvalidData,
    InvalidEnvelope,
    InvalidJSON,
    MessageTooBig,
    MessageTooLarge,
    NormalClosure,
    PolicyViolation,
    ProtocolViolation,
    RateLimited,
    RecipientBusy,
    RecipientUnreachable,
    SendError,
    ServerShuttingDown,
    TLSError,
    TryAgainLater,
    UnknownRecipient,
    UnsupportedData,
)
from relayd.client.messages import Message
from relayd.errors import CloseCode, ErrorCode
from relayd.wire.dialects import Dialect

__all__ = [
    "Backoff",
    "Client",
    "ClientError",
    "CloseCode",
    "CloseInfo",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionClosed",
    "ConnectionLost",
    "DeliveryUnconfirmed",
    "Dialect",
    "ErrorCode",
    "HandshakeRefused",
    "InternalError",
    "InvalidData",
    "InvalidEnvelope",
    "InvalidJSON",
    "Message",
    "MessageTooBig",
    "MessageTooLarge",
    "NormalClosure",
    "PolicyViolation",
    "ProtocolViolation",
    "RateLimited",
    "RecipientBusy",
    "RecipientUnreachable",
    "SendError",
    "ServerShuttingDown",
    "TLSError",
    "TryAgainLater",
    "UnknownRecipient",
    "UnsupportedData",
    "connect",
]
