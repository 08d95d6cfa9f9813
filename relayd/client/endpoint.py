"""Where to connect, from a ``ws://`` or ``wss://`` URL, without I/O."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

__all__ = ["Endpoint", "check_token", "parse_url"]


@dataclass(frozen=True)
class Endpoint:
    """A parsed WebSocket URL.

    Attributes:
        url: the URL as given.
        host: the host to connect to (brackets removed from an IPv6 address).
        port: the TCP port (80 or 443 when the URL names none).
        host_header: the ``Host`` header: the URL's host and port as written.
        resource: the path and query sent in the request line.
        tls: ``wss://``.
    """

    url: str
    host: str
    port: int
    host_header: str
    resource: str
    tls: bool


def parse_url(url: str) -> Endpoint:
    """Parse the URL of a relayd.

    Raises:
        ValueError: not a URL this client can connect to: another scheme, no
            host, a bad port, a user and password (give a token instead), or
            a character a request line cannot hold (a space, a control
            character, or one that is not ASCII: percent-encode it).
    """
    if not url.isascii() or not url.isprintable() or " " in url:
        raise ValueError(
            "the URL must be printable ASCII without spaces (percent-encode the others;"
            " a host name in its xn-- form)"
        )
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError("the URL must start with ws:// or wss://")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    if parts.username is not None:
        raise ValueError("no user or password in the URL: give a token instead")
    tls = parts.scheme == "wss"
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError:
        # urllib's message quotes the port as written, which may be part of a password
        # (ws://user:pa/ss@host/ reads as host "user", port "pa").
        raise ValueError("the URL's port must be a number from 1 to 65535") from None
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Endpoint(url, parts.hostname, port, parts.netloc, resource, tls)


def check_token(token: str) -> None:
    """Refuse a token that cannot be one HTTP header value.

    Raises:
        ValueError: the token is empty, or has spaces or non-ASCII characters
            (the message never includes the token).
    """
    if not (token.isascii() and token.isprintable() and token) or " " in token:
        raise ValueError("the token must be printable ASCII without spaces")
