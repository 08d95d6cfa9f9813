"""The sockets relayd listens on: bound from the settings, wrapped in TLS, and where they are.

The server (:class:`~relayd.daemon.server.Server`) binds the public sockets with
:func:`bind` unless systemd handed them over (:mod:`relayd.daemon.systemd`), makes
them listeners with :func:`listening` when it starts accepting, and serves them
through :func:`with_tls`; it binds the admin listener with :func:`bind_admin`.
Binding raises :class:`OSError` (the address is in use, binding it is not
permitted); the caller owns and closes what was bound.

**Sharing a port** (``server.reuse_port``): every socket gets ``SO_REUSEPORT``
before it is bound, so several relayd processes of one user bind the same
address, and the kernel spreads new connections over those that listen by a hash
of each client's address and port: an even split, where one socket shared by
every process goes to whichever accepts first. Such a socket listens only from
:func:`listening` on, since the kernel sends a listening one its share of new
connections at once: a node still reaching Redis would hold them in its backlog
while the others could serve them. Its closing (the drain's first step) hands
the connections waiting in its backlog to the others where
``net.ipv4.tcp_migrate_req`` is 1 (:func:`migrates_on_close`); where it is 0
the kernel resets them.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import trio

from relayd.config import AdminSettings
from relayd.daemon.addresses import show

__all__ = [
    "BACKLOG",
    "MIGRATE_REQ",
    "Listener",
    "NotListening",
    "address",
    "bind",
    "bind_admin",
    "listening",
    "migrates_on_close",
    "with_tls",
]

#: A public listener as served: plain, or TLS around a plain one.
Listener = trio.SocketListener | trio.SSLListener[trio.SocketStream]
#: The listen backlog asked for: as much as the kernel allows (it caps it at
#: ``net.core.somaxconn``, 4096 by default since Linux 5.4), as trio asks.
BACKLOG: Final = 0xFFFF
#: Whether a closing listener's waiting connections go to the others of its port.
MIGRATE_REQ: Final = Path("/proc/sys/net/ipv4/tcp_migrate_req")


async def bind(host: str, port: int, *, reuse_port: bool = False) -> list[trio.socket.SocketType]:
    """Sockets bound to ``host``/``port``: all interfaces, IPv4 and IPv6, for ``""``.

    ``trio.open_tcp_listeners``' steps, with ``SO_REUSEPORT`` when ``reuse_port``
    (then the sockets do not listen yet: :func:`listening`); the others listen
    at once, so clients wait in the backlog while relayd starts.

    Raises:
        OSError: the address is in use, or binding it is not permitted.
    """
    addresses = await trio.socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    bound: list[trio.socket.SocketType] = []
    try:
        for family, kind, proto, _, sockaddr in addresses:
            try:
                sock = trio.socket.socket(family, kind, proto)
            except OSError as exc:
                # getaddrinfo may offer IPv6 on a kernel without it, or IPv4 alone.
                if exc.errno != errno.EAFNOSUPPORT:
                    raise
                continue
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await sock.bind(sockaddr)
            if not reuse_port:
                sock.listen(BACKLOG)
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    if not bound:
        raise OSError(errno.EAFNOSUPPORT, f"no socket of any family {host!r} resolves to")
    return bound


class NotListening(Exception):
    """A socket bound at start could not listen when accepting was to start.

    Only a ``server.reuse_port`` socket listens that late, and only another socket can
    make it fail: one without ``SO_REUSEPORT`` may bind and listen on a port that a
    reuse_port socket has bound but not listened on yet.

    Attributes:
        where: the address that could not be listened on, as ``host:port``.
        error: what ``listen()`` raised.
    """

    def __init__(self, sock: trio.socket.SocketType, error: OSError) -> None:
        self.where = show(*address(sock))
        self.error = error
        super().__init__(f"cannot listen on {self.where}: {error}")


def listening(sockets: Sequence[trio.socket.SocketType]) -> list[trio.SocketListener]:
    """``sockets`` as listeners; those not listening yet (reuse_port's) listen now.

    Raises:
        NotListening: one could not listen (the caller closes them all).
    """
    listeners = []
    for sock in sockets:
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            try:
                sock.listen(BACKLOG)
            except OSError as exc:
                raise NotListening(sock, exc) from exc
        listeners.append(trio.SocketListener(sock))
    return listeners


def migrates_on_close(path: Path | None = None) -> bool | None:
    """Whether the kernel hands a closing listener's waiting connections to the others.

    Read from ``path``, by default :data:`MIGRATE_REQ`. None where it cannot say (no
    such setting before Linux 5.14, or no ``/proc``).
    """
    try:
        return (path or MIGRATE_REQ).read_text(encoding="ascii").strip() != "0"
    except (OSError, UnicodeDecodeError):
        return None


async def bind_admin(admin: AdminSettings) -> list[trio.SocketListener]:
    """The admin listeners, or none when ``admin.enabled`` is off.

    Raises:
        OSError: as :func:`bind`.
    """
    return listening(await bind(admin.host, admin.port)) if admin.enabled else []


def with_tls(
    listeners: Sequence[trio.SocketListener], tls: ssl.SSLContext | None
) -> list[Listener]:
    """``listeners`` as served: each wrapped in TLS, unless ``tls`` is None."""
    # TLS wraps each accepted stream; its handshake runs inside the
    # WebSocket handshake's timeout, in the connection's own task.
    if tls is None:
        return list(listeners)
    return [trio.SSLListener(listener, tls, https_compatible=True) for listener in listeners]


def address(sock: trio.socket.SocketType) -> tuple[str, int]:
    """The ``(host, port)`` ``sock`` is bound to."""
    host, port, *_ = sock.getsockname()
    return host, port
