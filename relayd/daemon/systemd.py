"""What systemd hands relayd and what relayd tells it, written against the protocol.

* :class:`Notifier`: the ``sd_notify`` protocol, one datagram per message to
  ``$NOTIFY_SOCKET`` (``READY=1``, ``STATUS=…``, ``WATCHDOG=1``,
  ``RELOADING=1``, ``STOPPING=1``). Without ``NOTIFY_SOCKET`` every call is a
  no-op, so the same code runs under systemd, in a terminal and in tests.
* :func:`watchdog_interval`: how often to send ``WATCHDOG=1`` (half of
  ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises).
* :func:`listen_sockets`: the sockets of socket activation (``$LISTEN_FDS``,
  ``$LISTEN_PID``, ``$LISTEN_FDNAMES``, sd_listen_fds(3)), so a restart keeps
  the port and nothing is refused while relayd is down.

No libsystemd: each is a few lines of the documented protocol.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import MutableMapping
from typing import Final

__all__ = ["Notifier", "listen_sockets", "watchdog_interval"]

#: The first file descriptor systemd passes (sd_listen_fds(3)).
SD_LISTEN_FDS_START: Final = 3


class Notifier:
    """Sends sd_notify messages; a no-op when not started by systemd.

    Args:
        address: the ``NOTIFY_SOCKET`` value; a leading ``@`` names an abstract
            socket. None or empty disables notification.

    Resource handling: owns one datagram socket, closed by :meth:`close`.
    """

    def __init__(self, address: str | None) -> None:
        self._address: str | bytes | None = None
        self._socket: socket.socket | None = None
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier for ``$NOTIFY_SOCKET``."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """True when systemd is listening."""
        return self._socket is not None

    def notify(self, *assignments: str) -> None:
        """Send ``KEY=value`` lines in one datagram; errors are ignored.

        A lost notification must not take the daemon down: systemd's own
        timeouts (start, watchdog) handle a supervisor that stopped listening.
        """
        if self._socket is None or self._address is None:
            return
        with contextlib.suppress(OSError):
            self._socket.sendto("\n".join(assignments).encode(), self._address)

    def ready(self, status: str) -> None:
        """Serving: ``READY=1`` with a status line."""
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """A new status line for ``systemctl status``."""
        self.notify(f"STATUS={status}")

    def reloading(self) -> None:
        """A reload began (``READY=1`` ends it)."""
        self.notify(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )

    def stopping(self) -> None:
        """Shutting down."""
        self.notify("STOPPING=1", "STATUS=draining connections")

    def watchdog(self) -> None:
        """Still alive."""
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Release the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``, or None if off.

    ``$WATCHDOG_PID``, when set, must be this process.
    """
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


def listen_sockets(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """The listening sockets systemd passed, named ``relayd`` or unnamed, in order.

    The variables are removed afterwards so that children do not inherit them
    (sd_listen_fds(3) with ``unset_environment``).

    Raises:
        OSError: a passed descriptor is not a socket, or not a listening TCP one.
    """
    env = os.environ if environ is None else environ
    try:
        if int(env.get("LISTEN_PID", "")) != os.getpid():
            return []
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    sockets = []
    for index in range(count):
        name = names[index] if index < len(names) else ""
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        if name in ("", "unknown", "relayd"):
            sock = socket.socket(fileno=fd)
            sockets.append(sock)
            # relayd serves TCP: a datagram socket (ListenDatagram=), or one that does
            # not listen, is a unit's mistake to say now, not a traceback later.
            if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN
            ):
                raise OSError(f"descriptor {fd} is not a listening TCP socket ({sock.type.name})")
    return sockets
