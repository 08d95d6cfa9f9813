"""relayd: a WebSocket relay daemon on trio.

Clients connect, get an id, and send each other messages through it. The
daemon is :class:`relayd.daemon.server.Server`; the command line is :mod:`relayd.cli`.
"""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("relayd")
except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    __version__ = "0+unknown"
