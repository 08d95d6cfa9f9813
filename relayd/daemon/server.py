"""The composition root: listeners, connections and the router, started and drained in order.

Task tree of one daemon (each box owns what is under it)::

    Server.run
    ├── admin           admin.serve_admin: /metrics, /healthz, /readyz and the
    │                   server API, started first, so that a health check is
    │                   answered while the router starts (a cluster node's first
    │                   attempt at Redis may take seconds: /readyz says 503
    │                   ``starting``, the API 503 ``broker_unavailable``), and
    │                   closed last, once the calls in progress are answered
    ├── router          Router.run: the routing task (relayd.routing)
    └── connections     one task per accepted stream (daemon.gate.Gate), and
        │               beside it, while it has more to write than its socket
        │               takes, its writer task (daemon.writer.Writer), which
        │               the connection bounds and waits for
        └── accepting   accepting.serve_public: the accept loops, within the
                        open-file budget

Lifecycle: :meth:`Server.run` binds, reports ``started`` with the bound
addresses and logs ``server.ready``; :meth:`Server.shutdown` (on SIGTERM or
SIGINT, from :mod:`relayd.cli`) starts the drain, which follows the data path
so that nothing already accepted is dropped:

1. stop accepting (the listening sockets close);
2. answer handshakes still in progress with 503; stop every reader, and wait
   for what each had read to be handed to the router (a reader that waits for
   its client to make room for the replies takes their slots beyond the
   outbox's bound instead);
3. close the router's inbox: it delivers what is queued, then detaches every
   connection (no more deliveries will come);
4. writers flush their outboxes and close with 1001;
5. the admin listener stops accepting and waits for the requests in progress
   to be answered (a server API call let in before the drain gets its answer,
   ``shutting_down`` or the outcome of a publish already handed over, never a
   closed connection); until then it answered as during the drain (``/readyz``
   503 ``shutting down``, every new call 503 ``shutting_down``);
6. all of it within ``shutdown_grace_s`` of the drain's start, after which
   whatever is left is cancelled and its transport dropped.
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import structlog
import trio
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.registry import Collector

from relayd import __version__
from relayd.config import Settings
from relayd.daemon.accepting import Sockets, check_budget, public_sockets, serve_public
from relayd.daemon.addresses import show
from relayd.daemon.admin import AdminListener, Area, serve_admin
from relayd.daemon.api import api_area
from relayd.daemon.gate import Gate
from relayd.daemon.listeners import (
    NotListening,
    address,
    bind,
    bind_admin,
    listening,
    migrates_on_close,
    with_tls,
)
from relayd.daemon.poller import POLLER_TASK, ReadPoller
from relayd.daemon.reload import (
    FileRead,
    Reload,
    changes,
    files_changed,
    files_in_force,
    in_force,
)
from relayd.policy.auth import Authenticator
from relayd.routing.factory import build_router
from relayd.routing.interface import Router
from relayd.telemetry.clock import reading_clock
from relayd.telemetry.line_sink import flush_held_lines
from relayd.telemetry.log import get_logger, report_suppressed_lines
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats, StatsCollector

__all__ = ["Server"]


class Server:
    """One relayd daemon.

    Args:
        settings: the effective settings.
        log: the logger to use; the configured relayd logger by default.
        router: makes the router from the server's message events and
            counters; by default the one the settings ask for
            (:func:`relayd.routing.factory.build_router`).
        authenticator: checks clients' tokens; None when ``auth.mode`` is off.
            Build it with :func:`relayd.daemon.credentials.load_authenticator`.
        tls: the TLS context for ``wss://``; None serves plain ``ws://``.
            Build it with :func:`relayd.daemon.credentials.load_tls`.
        config_file: the config file the settings were read from, for
            ``server.start``; None when none was.
        api_key: the server API's key (:func:`relayd.daemon.credentials.load_api_key`);
            None serves the API without one (the config allows that on loopback only).
        files: the files the settings name (a tokens file, a certificate), by dotted
            key, as the start read them: a reload reports those whose content is new.
    """

    _gate: Gate

    def __init__(
        self,
        settings: Settings,
        *,
        log: structlog.typing.FilteringBoundLogger | None = None,
        router: Callable[[MessageEvents, Stats], Router] | None = None,
        authenticator: Authenticator | None = None,
        tls: ssl.SSLContext | None = None,
        config_file: Path | None = None,
        api_key: bytes | None = None,
        files: Mapping[str, FileRead] | None = None,
    ) -> None:
        self._settings = settings
        self._files = dict(files or {})
        self._config_file = config_file
        self._api_key = api_key
        self._log_format = settings.log.format
        self._tls = tls
        self._log = log or get_logger()
        self.stats = Stats()
        #: Where every message's outcome is counted and logged.
        self.events = MessageEvents(
            self._log,
            self.stats,
            messages=settings.log.messages,
            sample=settings.log.messages_sample,
            bodies=settings.log.bodies,
        )
        make_router = router or functools.partial(
            build_router, settings, shared_ids=lambda: self._gate.authenticating
        )
        self._router = make_router(self.events, self.stats)
        self._gate = Gate(
            self._router,
            settings.limits,
            self._log,
            events=self.events,
            echo_route=settings.diagnostics.echo,
            allowed_origins=settings.server.allowed_origins,
            authenticator=authenticator,
            stats=self.stats,
        )
        self._stop = trio.Event()
        self._stop_reason = ""
        self._accepting = False
        # The router runs (its start reported): the server API may ask it from then on.
        self._routing = False
        # The router's start, while run() waits for it: a cluster node's first attempt
        # to reach Redis may take seconds, which a shutdown need not wait out.
        self._starting: trio.CancelScope | None = None
        self._admin_address: tuple[str, int] | None = None
        #: The public sockets open and their budget, once :meth:`run` serves.
        self.sockets = Sockets(budget=1)
        #: What ``/metrics`` exposes.
        self.registry = _registry(
            StatsCollector(self.stats, self._gate.open_totals, lambda: self.ready),
            self._router.collector(),
        )

    @property
    def settings(self) -> Settings:
        """The settings this daemon was built with."""
        return self._settings

    @property
    def log_format(self) -> str:
        """The log format relayd started with (changing it needs a restart)."""
        return self._log_format

    @property
    def router(self) -> Router:
        """The router: where connections register, and what the server API asks."""
        return self._router

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
            if self._starting is not None:
                self._starting.cancel()

    async def listen(self) -> list[trio.socket.SocketType]:
        """Bind ``server.host``/``server.port``; all interfaces, IPv4 and IPv6, for "".

        With ``server.reuse_port`` the sockets listen only once :meth:`run` accepts
        (:func:`~relayd.daemon.listeners.bind`).

        Raises:
            OSError: the address is in use, or binding it is not permitted.
        """
        server = self._settings.server
        return await bind(server.host, server.port, reuse_port=server.reuse_port)

    @property
    def ready(self) -> bool:
        """True while relayd accepts connections and its router reaches everyone (``/readyz``).

        Not while every public socket the open-file budget allows is open (the accept
        loops pause, and a new client would wait in the backlog), nor, on a cluster
        node, while its link to the cluster is down: :attr:`unready` says which.
        """
        return self.unready is None

    @property
    def unready(self) -> str | None:
        """Why relayd is not ready now, for ``/readyz``'s 503; None while it is."""
        if self._stop.is_set():
            return "shutting down"
        if not self._accepting:
            # Before the accept loops: the router's start (a cluster node reaching
            # Redis), then the listeners'.
            return "starting"
        if self.sockets.full:
            return "every descriptor for clients is in use (open-file budget)"
        if not self._router.ready:
            return "the link to the cluster is down"
        return None

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """Where the admin listener listens, once :meth:`run` has started it."""
        return self._admin_address

    def reload(
        self,
        settings: Settings,
        authenticator: Authenticator | None,
        files: Mapping[str, FileRead] | None = None,
    ) -> Reload:
        """Apply the reloadable part of ``settings``; report what changed.

        :mod:`relayd.daemon.reload` says which keys are reloadable; ``log.level``
        is applied by the caller, which owns logging. Everything else needs a
        restart and is only reported. ``files``: the files the settings name, as
        the reload read them; a key whose file holds something new is reported
        as changed (a tokens file, applied with ``authenticator``; a certificate,
        which needs a restart). Caps changed to more public sockets
        than the open-file budget holds are warned about, as at start.
        """
        read = files or {}
        result = changes(self._settings, settings, files_changed(self._files, read))
        before, after = self._settings.limits, settings.limits
        caps = (after.max_connections, after.max_handshakes)
        if self._accepting and caps != (before.max_connections, before.max_handshakes):
            # As at start: caps raised past the open-file budget would never be reached.
            check_budget(after, self.sockets, self._log)
        self._gate.reconfigure(
            settings.limits,
            allowed_origins=settings.server.allowed_origins,
            authenticator=authenticator,
        )
        self.events.reconfigure(
            messages=settings.log.messages,
            sample=settings.log.messages_sample,
            bodies=settings.log.bodies,
        )
        # What is in force now: the keys that need a restart keep the values
        # relayd started with, so the next reload compares against those.
        self._settings = in_force(self._settings, settings)
        self._files = files_in_force(self._files, read)
        return result

    def _api(self) -> Area:
        """The server API, for the admin listener; it refuses calls until the router runs."""
        return api_area(
            self._router,
            # As in force now: a reload may change it.
            max_message_bytes=lambda: self._settings.limits.max_message_bytes,
            key=self._api_key,
            stats=self.stats,
            events=self.events,
            reply_timeout_s=self._settings.cluster.reply_timeout_s,
            stopping=lambda: self.stopping,
            starting=lambda: not self._routing,
        )

    async def _close_admin(self, admin: AdminListener | None, deadline: float) -> bool:
        """Close the admin listener, waiting for the requests in progress until ``deadline``.

        Each request is over within its own bounds (5 s to arrive, a call's
        ``cluster.reply_timeout_s`` + 1 s for the router, 1 s for its answer), and
        those let in during the drain are refused at once, so the wait is short;
        ``deadline`` (the drain's ``shutdown_grace_s``) bounds it all the same, after
        which the root's cancel cuts what is left. True if every request was answered
        in time (or there is no admin listener).
        """
        if admin is None:
            return True
        with trio.move_on_at(deadline) as waited:
            await admin.close()
        return not waited.cancelled_caught

    async def run(
        self,
        listeners: Sequence[trio.socket.SocketType] | None = None,
        *,
        inherited: bool = False,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until :meth:`shutdown`, then drain and return.

        Args:
            listeners: sockets to serve on: bound by :meth:`listen` (with
                ``server.reuse_port``, made to listen only when accepting starts), or
                listening ones from systemd; by default :meth:`listen`'s. Closed by the
                time this returns.
            inherited: the listeners came from systemd (socket activation).
            task_status: reports ``started`` with the ``(host, port)`` of
                every listening socket once connections are accepted.

        Raises:
            OSError: binding failed (address in use, permission denied).
            NotListening: a socket bound with ``server.reuse_port`` could not listen
                when accepting was to start (another socket took the port meanwhile);
                nothing was served.
        """
        refused = await self._run(listeners, inherited, task_status)
        if refused is not None:
            raise refused

    async def _run(
        self,
        listeners: Sequence[trio.socket.SocketType] | None,
        inherited: bool,
        task_status: trio.TaskStatus[list[tuple[str, int]]],
    ) -> NotListening | None:
        """:meth:`run`'s work; a late listen's failure is returned, once all is closed."""
        server = self._settings.server
        started = trio.current_time()
        self._log.info(
            "server.start",
            version=__version__,
            pid=os.getpid(),
            host=server.host,
            port=server.port,
            # Sockets handed over by systemd decide the address, not host/port.
            sockets="inherited" if inherited else "bound",
            config=None if self._config_file is None else str(self._config_file),
        )
        if listeners is None:
            listeners = await self.listen()
        migrates = migrates_on_close()
        if server.reuse_port and not inherited and not migrates:
            # Said at every start: this process's stop or restart will reset the
            # clients waiting in its backlog instead of handing them to the others.
            self._log.warning("server.reuse_port", tcp_migrate_req=None if migrates is None else 0)
        addresses = [address(sock) for sock in listeners]
        try:
            admin_listeners = await bind_admin(self._settings.admin)
        except BaseException:
            for sock in listeners:
                sock.close()
            raise
        if admin_listeners:
            self._admin_address = address(admin_listeners[0].socket)
        forced = True
        admin: AdminListener | None = None
        try:
            # Connections read trio's clock straight (relayd.telemetry.clock).
            with reading_clock():
                async with trio.open_nursery() as root:
                    root.start_soon(flush_held_lines)
                    root.start_soon(report_suppressed_lines)
                    if admin_listeners:
                        # Before the router: its start may take seconds (a cluster
                        # node's first attempt at Redis, up to 2 x connect_timeout_s +
                        # probe_timeout_s), which a health check should not wait out.
                        # Until the router runs, /readyz says "starting" and the API
                        # refuses every call (503 broker_unavailable: ask again).
                        # Closed last (_close_admin), or cancelled with the root.
                        admin = await root.start(
                            functools.partial(
                                serve_admin,
                                admin_listeners,
                                self.registry,
                                lambda: self.unready,
                                areas=[self._api()],
                            )
                        )
                    with trio.CancelScope() as self._starting:
                        if self._stop.is_set():
                            self._starting.cancel()
                        await root.start(self._router.run)
                    self._starting = None
                    self._routing = True
                    if self._stop.is_set():
                        # Stopped before it served: no client to drain, nothing to
                        # say ready (the caller hears of the listeners all the same).
                        task_status.started(addresses)
                        forced = not await self._close_admin(
                            admin, trio.current_time() + self._settings.server.shutdown_grace_s
                        )
                        root.cancel_scope.cancel()
                        for sock in listeners:
                            sock.close()
                        return None
                    # Reads every plain TCP connection's socket while its reader
                    # waits; it outlives the connections (cancelled with the root).
                    poller = self._gate.poller = ReadPoller()
                    root.start_soon(poller.run, name=POLLER_TASK)
                    try:
                        served = with_tls(listening(listeners), self._tls)
                    except NotListening as refused:
                        # Only a reuse_port socket listens this late: a socket without
                        # SO_REUSEPORT may bind and listen on a port that one has bound
                        # but not listened on yet.
                        self._stop_reason = "cannot listen"
                        forced = False  # nothing was served: nothing to drain
                        root.cancel_scope.cancel()
                        return refused
                    async with trio.open_nursery() as connections:
                        async with trio.open_nursery() as accepting:
                            # Counted now that every listening socket is open.
                            self.sockets = public_sockets(self._settings.limits, self._log)
                            await accepting.start(
                                functools.partial(
                                    serve_public,
                                    self._gate,
                                    served,
                                    handler_nursery=connections,
                                    sockets=self.sockets,
                                    log=self._log,
                                )
                            )
                            self._accepting = True
                            task_status.started(addresses)
                            self._log.info(
                                "server.ready",
                                listeners=[show(h, p) for h, p in addresses],
                                port=addresses[0][1],
                                admin=show(*self._admin_address) if self._admin_address else None,
                            )
                            await self._stop.wait()
                            accepting.cancel_scope.cancel()
                            self._accepting = False
                        # As in force now: a reload may have changed it.
                        drained_by = trio.current_time() + self._settings.server.shutdown_grace_s
                        connections.cancel_scope.deadline = drained_by
                        # What the readers read before they stopped goes to the router
                        # before it closes: routed and answered, not dropped. Closed
                        # whatever happens (the grace may run out in the wait: the
                        # nursery's deadline is the same).
                        try:
                            with trio.move_on_at(drained_by):
                                await self._gate.handed_off()
                        finally:
                            self._router.close()
                    forced = connections.cancel_scope.cancelled_caught
                    # Within the same grace: the admin listener answered meanwhile.
                    forced = not await self._close_admin(admin, drained_by) or forced
                    root.cancel_scope.cancel()  # the poller (and an admin listener left)
        finally:
            for sock in listeners:
                sock.close()  # the accept loops' own close, or theirs never started
            self._gate.poller = None
            self._log.info(
                "server.stop",
                reason=self._stop_reason or "cancelled",
                forced=forced,
                duration_s=round(trio.current_time() - started, 3),
            )
        return None


def _registry(stats: Collector, router: Collector | None) -> CollectorRegistry:
    """The metrics: relayd's counters, the process's (CPU, memory, descriptors), the router's."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(stats)
    ProcessCollector(registry=registry)
    if router is not None:
        registry.register(router)
    return registry
