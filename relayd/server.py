"""The composition root: listeners, connections and the router, started and drained in order.

Task tree of one daemon (each box owns what is under it)::

    Server.run
    ├── router          LocalRouter.run: the one routing task
    └── connections     one task per accepted stream (listener.Gate)
        └── accepting   trio.serve_listeners: the accept loops

Lifecycle: :meth:`Server.run` binds, reports ``started`` with the bound
addresses and logs ``server.ready``; :meth:`Server.shutdown` (on SIGTERM or
SIGINT, from :mod:`relayd.cli`) starts the drain, which follows the data path
so that nothing already accepted is dropped:

1. stop accepting (the listening sockets close);
2. answer handshakes still in progress with 503; stop every reader;
3. close the router's inbox: it delivers what is queued, then closes every
   outbox;
4. writers flush their outboxes and close with 1001;
5. all of it within ``shutdown_grace_s``, after which whatever is left is
   cancelled and its transport dropped.
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Sequence

import structlog
import trio

from relayd import __version__
from relayd.auth import Authenticator
from relayd.config import Settings
from relayd.listener import Gate
from relayd.log import get_logger
from relayd.router import LocalRouter, Router

__all__ = ["Server"]

Listener = trio.SocketListener | trio.SSLListener[trio.SocketStream]


class Server:
    """One relayd daemon.

    Args:
        settings: the effective settings.
        log: the logger to use; the configured relayd logger by default.
        router: the router to use; a :class:`LocalRouter` by default.
        authenticator: checks clients' tokens; None when ``auth.mode`` is off.
            Build it with :func:`relayd.credentials.load_authenticator`.
        tls: the TLS context for ``wss://``; None serves plain ``ws://``.
            Build it with :func:`relayd.credentials.load_tls`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        log: structlog.typing.FilteringBoundLogger | None = None,
        router: Router | None = None,
        authenticator: Authenticator | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._settings = settings
        self._tls = tls
        self._log = log or get_logger()
        self._router = router or LocalRouter(
            self._log,
            log_messages=settings.log.messages,
            log_bodies=settings.log.bodies,
        )
        self._gate = Gate(
            self._router,
            settings.limits,
            self._log,
            log_messages=settings.log.messages,
            echo_route=settings.diagnostics.echo,
            allowed_origins=settings.server.allowed_origins,
            authenticator=authenticator,
        )
        self._stop = trio.Event()
        self._stop_reason = ""

    @property
    def settings(self) -> Settings:
        """The settings this daemon was built with."""
        return self._settings

    @property
    def gate(self) -> Gate:
        """The handshake gate: open connections and their counts."""
        return self._gate

    @property
    def stopping(self) -> bool:
        """True once :meth:`shutdown` was called."""
        return self._stop.is_set()

    def shutdown(self, reason: str = "requested") -> None:
        """Begin the graceful drain; :meth:`run` returns when it is done. Idempotent.

        From this call on, handshakes are answered with 503 and readers stop;
        :meth:`run` closes the listeners and the router and bounds the rest.
        """
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()
            self._gate.drain()

    async def listen(self) -> list[trio.SocketListener]:
        """Bind ``server.host``/``server.port``; all interfaces, IPv4 and IPv6, for "".

        Raises:
            OSError: the address is in use, or binding it is not permitted.
        """
        server = self._settings.server
        return await trio.open_tcp_listeners(server.port, host=server.host or None)

    def _serving(self, listeners: Sequence[trio.SocketListener]) -> list[Listener]:
        # TLS wraps each accepted stream; its handshake runs inside the
        # WebSocket handshake's timeout, in the connection's own task.
        if self._tls is None:
            return list(listeners)
        return [
            trio.SSLListener(listener, self._tls, https_compatible=True) for listener in listeners
        ]

    async def run(
        self,
        listeners: Sequence[trio.SocketListener] | None = None,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until :meth:`shutdown`, then drain and return.

        Args:
            listeners: sockets to serve on; by default :meth:`listen`.
            task_status: reports ``started`` with the ``(host, port)`` of
                every listening socket once connections are accepted.

        Raises:
            OSError: binding failed (address in use, permission denied).
        """
        server = self._settings.server
        started = trio.current_time()
        self._log.info(
            "server.start", version=__version__, pid=os.getpid(), host=server.host, port=server.port
        )
        if listeners is None:
            listeners = await self.listen()
        addresses = [_address(listener) for listener in listeners]
        forced = True
        try:
            async with trio.open_nursery() as root:
                await root.start(self._router.run)
                async with trio.open_nursery() as connections:
                    async with trio.open_nursery() as accepting:
                        await accepting.start(
                            functools.partial(
                                trio.serve_listeners,
                                self._gate,
                                self._serving(listeners),
                                handler_nursery=connections,
                            )
                        )
                        task_status.started(addresses)
                        self._log.info(
                            "server.ready",
                            listeners=[_show(h, p) for h, p in addresses],
                            port=addresses[0][1],
                        )
                        await self._stop.wait()
                        accepting.cancel_scope.cancel()
                    self._router.close()
                    connections.cancel_scope.deadline = (
                        trio.current_time() + server.shutdown_grace_s
                    )
                forced = connections.cancel_scope.cancelled_caught
        finally:
            self._log.info(
                "server.stop",
                reason=self._stop_reason or "cancelled",
                forced=forced,
                duration_s=round(trio.current_time() - started, 3),
            )


def _address(listener: trio.SocketListener) -> tuple[str, int]:
    host, port, *_ = listener.socket.getsockname()
    return host, port


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
