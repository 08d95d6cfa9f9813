"""The connections to Redis, made from the settings (coredis does the handshake).

:func:`open_connection` makes one :class:`coredis.connection.BaseConnection`
(TCP, TLS or a unix socket; AUTH, SELECT and the client name set in its
handshake); whoever runs it owns it. The link makes two per session: the
publisher and the subscriber.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from urllib.parse import parse_qs, unquote, urlsplit

from coredis.connection import (
    BaseConnection,
    TCPConnection,
    TCPLocation,
    UnixDomainSocketConnection,
    UnixDomainSocketLocation,
)

from relayd.config import ClusterSettings

__all__ = ["AfterEachRead", "open_connection", "redact", "tls_context"]


def redact(url: str) -> str:
    """``url`` as it may be logged: the password (never allowed there anyway) masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def tls_context(settings: ClusterSettings) -> ssl.SSLContext | None:
    """The TLS context for a ``rediss://`` broker URL; None for any other."""
    if urlsplit(settings.broker_url).scheme != "rediss":
        return None
    return ssl.create_default_context(cafile=settings.tls_ca_file or None)


class AfterEachRead:
    """The subscriber's ``processing_budget`` for coredis: hands each read over as it ends.

    coredis's reader enters it around the parsing of every read that no
    request waits for (on the subscriber, every read once it is connected).
    This one never waits and is no checkpoint; on the way out it calls
    ``after``, which takes what the read put in the push buffer. So what Redis
    sends reaches the router in the step of coredis's reader that read it.
    """

    __slots__ = ("_after",)

    def __init__(self, after: Callable[[], None]) -> None:
        self._after = after

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self._after()


def open_connection(
    settings: ClusterSettings,
    *,
    client_name: str,
    password: str | None,
    tls: ssl.SSLContext | None,
    after_each_read: Callable[[], None] | None = None,
) -> BaseConnection:
    """A connection to ``settings.broker_url``, not connected yet (its ``run`` connects).

    Args:
        settings: the ``[cluster]`` settings.
        client_name: what ``CLIENT LIST`` shows for it.
        password: the Redis password; None: no AUTH.
        tls: from :func:`tls_context`.
        after_each_read: called by coredis's reader after each read that no
            request waits for (see :class:`AfterEachRead`).
    """
    url = urlsplit(settings.broker_url)
    common = {
        "connect_timeout": settings.connect_timeout_s,
        "client_name": client_name,
        "username": unquote(url.username) if url.username else None,
        "password": password,
    }
    if after_each_read is not None:
        common["processing_budget"] = AfterEachRead(after_each_read)
    if url.scheme == "unix":
        db = int(parse_qs(url.query).get("db", ["0"])[0])
        return UnixDomainSocketConnection(
            UnixDomainSocketLocation(url.path),
            db=db,
            **common,  # type: ignore[arg-type]
        )
    return TCPConnection(
        TCPLocation(url.hostname or "", url.port or 6379),
        db=int(url.path.strip("/") or 0),
        ssl_context=tls,
        socket_keepalive=True,
        **common,  # type: ignore[arg-type]
    )
