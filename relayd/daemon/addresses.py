"""Socket addresses as relayd names them in logs, limits and messages.

One spelling everywhere: ``host:port`` for IPv4 and names, ``[v6]:port`` for
IPv6, and IPv4 clients of a dual-stack socket as IPv4.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import trio

__all__ = ["ip_of", "peer_address", "show", "socket_address"]


def show(host: str, port: int) -> str:
    """``host:port``, or ``[host]:port`` for an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_address(
    client: socket.socket | trio.socket.SocketType | trio.abc.Stream,
) -> str | None:
    """``host:port`` of the client (``[v6]:port``), or None if it already reset.

    ``client`` is a plain socket or a stream, as the accept loops hand them over.
    """
    # trio forbids subclassing these classes: their types say it, without
    # isinstance's pass through the stream ABC's __instancecheck__.
    if type(client) is trio.SSLStream:
        client = client.transport_stream
    if type(client) is trio.SocketStream:
        client = client.socket
    # In-memory streams (tests) have no socket; they all count as one address.
    if not isinstance(client, (socket.socket, trio.socket.SocketType)):
        return "memory:0"
    try:
        peer = client.getpeername()
    except OSError:
        return None
    return socket_address(peer)


def socket_address(peer: Any) -> str:
    """``host:port`` (``[v6]:port``) of an IP socket address as the socket module gives it.

    ``peer`` is ``(host, port)``, or ``(host, port, flowinfo, scope_id)`` for IPv6:
    what ``accept()`` and ``getpeername()`` return.
    """
    host, port, *_ = peer
    # A dual-stack socket (relayd.socket's BindIPv6Only=both) shows IPv4
    # clients as ::ffff:a.b.c.d; name them as themselves, for logs and limits.
    mapped = ipaddress.ip_address(host.split("%", 1)[0]) if ":" in host else None
    if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped is not None:
        host = str(mapped.ipv4_mapped)
    return show(host, port)


def ip_of(address: str) -> str:
    """The host part of a ``host:port`` or ``[v6]:port`` address."""
    # Not interned, though connections from one address would share a string:
    # from Python 3.12 an interned string is immortal, and a client choosing
    # among an IPv6 /64's addresses would grow the process for good.
    return address.rpartition(":")[0].strip("[]")
