"""What :func:`relayd.client.connect` takes: its defaults, each bound explained, checked.

Without I/O: :func:`check_options` turns ``connect``'s arguments into the
:class:`~relayd.client.endpoint.Endpoint` and the :class:`LinkOptions` every
connection of the client is opened with, or raises :class:`ValueError` before
anything is connected.
"""

from __future__ import annotations

import math
import ssl
from dataclasses import dataclass
from typing import Final, Literal

from relayd.client.endpoint import Endpoint, check_token, parse_url
from relayd.wire.dialects import Dialect

__all__ = [
    "CLOSE_TIMEOUT_S",
    "CONNECT_TIMEOUT_S",
    "DELIVERY_ROOM",
    "KEEPALIVE_S",
    "MAX_ANNOUNCED_CHARS",
    "MAX_IN_FLIGHT",
    "MAX_MESSAGE_CHARS",
    "RECEIVE_QUEUE",
    "LinkOptions",
    "check_options",
    "default_message_bound",
]

#: Bound on connecting: TCP, TLS, the HTTP upgrade and the welcome. relayd
#: answers an incomplete handshake with 408 after ``handshake_timeout_s`` (10 s
#: by default); waiting a little longer lets that answer be seen.
CONNECT_TIMEOUT_S: Final = 15.0
#: Bound on the closing handshake: relayd waits as long for a client's.
CLOSE_TIMEOUT_S: Final = 5.0
#: Messages sent and not yet answered, per client. relayd keeps 16 replies
#: per connection before it stops reading (``outbox_messages``); more in flight
#: would only wait in TCP buffers.
MAX_IN_FLIGHT: Final = 16
#: Messages received and not yet read by the program, per client.
RECEIVE_QUEUE: Final = 16
#: Largest message accepted from relayd by default, in characters (trio-websocket
#: counts ``len()`` of the text), unless relayd announced a larger limit (see
#: :data:`DELIVERY_ROOM`). relayd's own limit is 64 KiB by default.
MAX_MESSAGE_CHARS: Final = 2**20
#: What a delivery may add to a sender's envelope of relayd's announced size: its
#: ``"type"`` and its sender's id (256 characters at most, each at most 6 as JSON).
#: By default a client takes messages of up to the announced limit plus this: what
#: relayd lets any client send it, however far above :data:`MAX_MESSAGE_CHARS`.
DELIVERY_ROOM: Final = 2048
#: The most a default bound rises to, whatever relayd announced: a server (or anything
#: on the other end of a ``ws://`` URL) announcing a huge limit must not make the client
#: ready to hold that much. A program that wants more sets ``max_message_chars``.
MAX_ANNOUNCED_CHARS: Final = 64 * 2**20


def default_message_bound(announced: int | None) -> int:
    """The largest message a client takes when the program set no bound, in characters.

    1 MiB, or ``announced`` (the limit relayd announced) plus :data:`DELIVERY_ROOM` when
    that is more, so that no client relayd accepts a message from can close this one
    with it; at most :data:`MAX_ANNOUNCED_CHARS`.
    """
    if announced is None:
        return MAX_MESSAGE_CHARS
    return min(max(MAX_MESSAGE_CHARS, announced + DELIVERY_ROOM), MAX_ANNOUNCED_CHARS)


#: Keepalive ping interval, and how long its pong may take: as relayd's own.
KEEPALIVE_S: Final = 30.0
#: The dialects ``connect`` speaks, by the names it takes.
_DIALECTS: Final = tuple(dialect.value for dialect in (Dialect.V1, Dialect.SEED))


@dataclass(frozen=True)
class LinkOptions:
    """What every connection of one client is opened with (see :func:`relayd.client.connect`)."""

    dialect: Dialect
    token: str | None
    ssl_context: ssl.SSLContext | None
    connect_timeout: float
    keepalive_s: float | None
    max_in_flight: int
    max_message_chars: int | None  # None: MAX_MESSAGE_CHARS, or what relayd announced


def check_options(
    url: str,
    *,
    token: str | None,
    ssl_context: ssl.SSLContext | None,
    dialect: Dialect | Literal["relayd.v1", "seed"],
    connect_timeout: float,
    close_timeout: float,
    max_in_flight: int,
    receive_queue: int,
    max_message_chars: int | None,
    keepalive_s: float | None,
) -> tuple[Endpoint, LinkOptions]:
    """The endpoint and the connections' options, from ``connect``'s arguments (its Args).

    Raises:
        ValueError: a bad URL, token, dialect or figure, or an ``ssl_context``
            with a ``ws://`` URL.
    """
    endpoint = parse_url(url)
    if token is not None:
        if not isinstance(token, str):
            raise ValueError("the token must be a str")
        check_token(token)
    if ssl_context is not None and not endpoint.tls:
        raise ValueError("an ssl_context needs a wss:// URL")
    for name, value in [("connect_timeout", connect_timeout), ("close_timeout", close_timeout)]:
        if not _is_number(value) or not value > 0:
            raise ValueError(f"{name} must be a positive number")
    if keepalive_s is not None and not (_is_number(keepalive_s) and 0 < keepalive_s < math.inf):
        raise ValueError("keepalive_s must be a positive number, or None")
    if not (
        is_count(max_in_flight, 1)
        and is_count(receive_queue, 0)
        and (max_message_chars is None or is_count(max_message_chars, 1))
    ):
        raise ValueError(
            "need max_in_flight >= 1, receive_queue >= 0, max_message_chars >= 1 (whole numbers)"
            " or None"
        )
    if dialect not in _DIALECTS:
        raise ValueError(f"dialect must be one of {', '.join(_DIALECTS)}, not {dialect!r}")
    options = LinkOptions(
        dialect=Dialect(dialect),
        token=token,
        ssl_context=ssl_context,
        connect_timeout=connect_timeout,
        keepalive_s=keepalive_s,
        max_in_flight=max_in_flight,
        max_message_chars=max_message_chars,
    )
    return endpoint, options


def is_count(value: object, least: int) -> bool:
    """Whether ``value`` is a whole number (an ``int``, not a ``bool``) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
