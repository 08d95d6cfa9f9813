"""The sockets relayd listens on: bound from the settings, wrapped in TLS, and where they are.

The server (:class:`~relayd.daemon.server.Server`) binds the public listeners
with :func:`bind` unless systemd handed them over (:mod:`relayd.daemon.systemd`),
and the admin listener with :func:`bind_admin`; it serves the public ones
through :func:`with_tls`. Binding raises :class:`OSError` (the address is in
use, binding it is not permitted); the caller owns and closes what was bound.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

import trio

from relayd.config import AdminSettings

__all__ = ["Listener", "address", "bind", "bind_admin", "with_tls"]

#: A public listener as served: plain, or TLS around a plain one.
Listener = trio.SocketListener | trio.SSLListener[trio.SocketStream]


async def bind(host: str, port: int) -> list[trio.SocketListener]:
    """Listen on ``host``/``port``: all interfaces, IPv4 and IPv6, for ``""``.

    Raises:
        OSError: the address is in use, or binding it is not permitted.
    """
    return await trio.open_tcp_listeners(port, host=host or None)


async def bind_admin(admin: AdminSettings) -> list[trio.SocketListener]:
    """The admin listeners, or none when ``admin.enabled`` is off.

    Raises:
        OSError: as :func:`bind`.
    """
    return await bind(admin.host, admin.port) if admin.enabled else []


def with_tls(
    listeners: Sequence[trio.SocketListener], tls: ssl.SSLContext | None
) -> list[Listener]:
    """``listeners`` as served: each wrapped in TLS, unless ``tls`` is None."""
    # TLS wraps each accepted stream; its handshake runs inside the
    # WebSocket handshake's timeout, in the connection's own task.
    if tls is None:
        return list(listeners)
    return [trio.SSLListener(listener, tls, https_compatible=True) for listener in listeners]


def address(listener: trio.SocketListener) -> tuple[str, int]:
    """The ``(host, port)`` ``listener`` is bound to."""
    host, port, *_ = listener.socket.getsockname()
    return host, port
