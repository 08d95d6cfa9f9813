"""The process around the server: signals, systemd notifications, watchdog, reload.

:func:`run_daemon` owns one nursery with the server and its companions::

    run_daemon
    ├── serve      Server.run; when it returns, everything else is cancelled
    ├── signals    SIGTERM/SIGINT: drain (a second one: stop at once);
    │              SIGHUP: reload the settings
    ├── watchdog   WATCHDOG=1 every half WATCHDOG_USEC, from the event loop
    └── status     STATUS= with live counts, every STATUS_INTERVAL_S

Because the watchdog pings from the event loop itself, a loop that hangs
stops pinging and systemd restarts relayd (``WatchdogSec`` in the unit).

A reload re-reads every source the daemon started from (the same ``--config``,
environment and flags). An invalid result is refused with a ``config.reload``
event giving the reason, and the old settings stay; a valid one is applied
where it can be (:meth:`relayd.daemon.server.Server.reload`) and the keys that need a
restart are named in the event.
"""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import trio

from relayd.config import Settings, grace_too_short
from relayd.config_sources import Loaded
from relayd.daemon.addresses import show
from relayd.daemon.listeners import NotListening
from relayd.daemon.reload import FileRead
from relayd.daemon.server import Server
from relayd.daemon.systemd import Notifier
from relayd.errors import ConfigError
from relayd.policy.auth import Authenticator
from relayd.policy.weakening import Weakening, weakenings
from relayd.telemetry.log import configure, get_logger

__all__ = ["STATUS_INTERVAL_S", "run_daemon"]

#: Seconds between STATUS= updates for ``systemctl status``.
STATUS_INTERVAL_S: Final = 5.0

#: What to change when a port cannot be bound, said with the error.
_PUBLIC_HINT: Final = "set server.port (--port) or server.host (--host) to a free address"
#: What to do when a socket without SO_REUSEPORT took the port while relayd started.
_NOT_LISTENING_HINT: Final = (
    "a socket without SO_REUSEPORT took the port while relayd started (relayd.socket, "
    "started again?): stop it, or set server.reuse_port = false"
)
#: What to change when the host does not resolve (a name the resolver does not know, yet).
_UNRESOLVED_HINT: Final = "set server.host (--host) to an address or name of this machine"
_ADMIN_UNRESOLVED_HINT: Final = (
    "set admin.host (--admin-host) to an address or name of this machine"
)
_ADMIN_HINT: Final = (
    "set admin.port (--admin-port) or admin.host (--admin-host) to a free address, "
    "or admin.enabled = false"
)

#: Reads the settings anew for a reload: the settings (with where each came from), the
#: authenticator, and the files the settings name as read now
#: (:meth:`~relayd.daemon.server.Server.reload`).
Reloader = Callable[[], tuple[Loaded, Authenticator | None, Mapping[str, FileRead]]]


async def run_daemon(
    server: Server,
    *,
    reload_settings: Reloader,
    notifier: Notifier,
    watchdog_s: float | None = None,
    listeners: Sequence[trio.socket.SocketType] | None = None,
    reload_first: Callable[[], bool] = lambda: False,
) -> int:
    """Serve until a signal stops it; returns the exit status.

    Args:
        server: the daemon to run.
        reload_settings: reads the settings (and credentials) anew, for SIGHUP.
        notifier: systemd's notification socket (a no-op outside systemd).
        watchdog_s: seconds between WATCHDOG=1 pings; None when systemd has
            no watchdog for relayd.
        listeners: sockets handed over by socket activation; None binds.
        reload_first: whether a SIGHUP came before relayd took its signals: it
            reloads once serving (asked after it took them, so none falls between).

    Returns:
        0 after a graceful drain; 1 when the public or the admin port cannot be
        bound; 128 plus the signal number when a second signal cut the drain
        short.
    """
    settings = server.settings
    inherited = bool(listeners)
    if not listeners:
        problem: str | None = None
        try:
            listeners = await server.listen()
        except OSError as exc:
            where = show(settings.server.host or "*", settings.server.port)
            hint = _UNRESOLVED_HINT if isinstance(exc, socket.gaierror) else _PUBLIC_HINT
            problem = f"cannot listen on {where}: {exc}; {hint}"
        if problem is not None:  # logged outside the except: no traceback, it says it all
            return _cannot_start(problem)
    status = 0
    admin_problem: str | None = None
    late_problem: str | None = None  # a reuse_port socket's listen, as accepting starts
    # A SIGHUP before relayd serves (its router's start: a cluster node's first attempt
    # at Redis may take seconds) is kept and made a reload once it serves, as one that
    # came before relayd took its signals: a reload ends with READY=1, which would tell
    # systemd relayd is ready while it does not accept yet.
    serving = False
    hangup_kept = False

    async with trio.open_nursery() as nursery:

        async def serve(
            task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            await server.run(listeners, inherited=inherited, task_status=task_status)
            nursery.cancel_scope.cancel()

        async def signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            nonlocal status, hangup_kept
            with trio.open_signal_receiver(
                signal.SIGTERM, signal.SIGINT, signal.SIGHUP
            ) as received:
                task_status.started()
                async for signum in received:
                    if signum == signal.SIGHUP and not serving:
                        hangup_kept = True
                    elif signum == signal.SIGHUP:
                        _reload(server, reload_settings, notifier)
                    elif not server.stopping:
                        notifier.stopping()
                        server.shutdown(f"signal {signal.Signals(signum).name}")
                    else:
                        status = 128 + signum
                        nursery.cancel_scope.cancel()

        await nursery.start(signals)
        try:
            await nursery.start(serve)
        except NotListening as exc:
            late_problem = f"{exc}; {_NOT_LISTENING_HINT}"
            nursery.cancel_scope.cancel()
        except OSError as exc:
            # The public listeners are bound (or inherited) above, so the one bind
            # Server.run does before it reports started is the admin listener's.
            admin = settings.admin
            where = show(admin.host or "*", admin.port)
            hint = _ADMIN_UNRESOLVED_HINT if isinstance(exc, socket.gaierror) else _ADMIN_HINT
            admin_problem = f"cannot listen on {where} (the admin listener): {exc}; {hint}"
            nursery.cancel_scope.cancel()
        else:
            # Not after STOPPING=1: a stop asked for while a cluster node first tried
            # to reach Redis ended its start before it served.
            if not server.stopping:
                notifier.ready(_status_line(server, 0.0))
            serving = True
            # Asked after the receiver took SIGHUP, so none falls between.
            if (reload_first() or hangup_kept) and not server.stopping:
                _reload(server, reload_settings, notifier)
            if watchdog_s is not None:
                nursery.start_soon(_watchdog, notifier, watchdog_s)
            if notifier.enabled:
                nursery.start_soon(_report_status, server, notifier)
    notifier.close()
    if admin_problem is not None or late_problem is not None:  # outside the except, as above
        return _cannot_start(admin_problem or late_problem or "")
    return status


def _cannot_start(problem: str) -> int:
    """Say why relayd cannot serve, as an ``error`` event and on stderr; exit status 1."""
    get_logger().error("error", summary=problem)
    print(f"relayd: {problem}", file=sys.stderr)
    return 1


def _reload(server: Server, reload_settings: Reloader, notifier: Notifier) -> None:
    log = get_logger()
    # While draining, systemd has been told STOPPING=1: RELOADING=1 and READY=1
    # would tell it otherwise. The reload is made all the same (a shorter grace).
    tell = not server.stopping
    if tell:
        notifier.reloading()
    try:
        refused: str | None = None
        try:
            loaded, authenticator, files = reload_settings()
            settings = loaded.settings
        except ConfigError as exc:
            # One line, as logging.md promises: str(exc) has a line per problem.
            refused = "; ".join(problem.line for problem in exc.problems)
        except Exception as exc:  # a bug in reading: refuse the reload, keep serving
            log.exception("error", summary=f"{type(exc).__name__}: {exc}")
            refused = f"relayd could not read its settings: {type(exc).__name__}: {exc}"
        else:
            weakened = weakenings(server.settings, settings)
            refused = _unstated(weakened) or _grace_too_short(server.settings, loaded)
        if refused is not None:  # the old settings stay
            server.stats.count_reload(applied=False)
            log.error("config.reload", applied=False, reason=refused)
            return
        level_changed = settings.log.level != server.settings.log.level
        result = server.reload(settings, authenticator, files)
        server.stats.count_reload(applied=True)
        if level_changed:
            # The format stays: changing it needs a restart (and is reported so).
            configure(settings.log.model_copy(update={"format": server.log_format}))
        # Stated on purpose, and still worth an operator's second look.
        (log.warning if weakened else log.info)(
            "config.reload",
            applied=True,
            changed=result.changed,
            restart_required=result.restart_required,
            weakened=[str(weakening) for weakening in weakened],
        )
    finally:
        if tell:
            notifier.ready(_status_line(server, 0.0))


def _grace_too_short(running: Settings, reloaded: Loaded) -> str | None:
    """Why a reload's grace is refused: too short for the ``reply_timeout_s`` in force.

    The file's settings passed the same rule, but ``[cluster]`` needs a restart: a
    reload that lowers ``reply_timeout_s`` and the grace together keeps the old one.
    As ``check-config`` prints it: ``key: reason (source)``.
    """
    cluster, key = running.cluster, "server.shutdown_grace_s"
    if not cluster.enabled:
        return None
    grace_s = reloaded.settings.server.shutdown_grace_s
    reason = grace_too_short(grace_s, cluster.reply_timeout_s, "in force until a restart")
    if reason is None:
        return None
    return ConfigError(reason, key=key, source=reloaded.source(key)).line


def _unstated(weakened: list[Weakening]) -> str | None:
    """Why a reload that weakens security without saying so is refused, or None."""
    unstated = [weakening for weakening in weakened if not weakening.stated]
    if not unstated:
        return None
    return "; ".join(
        f"{weakening}, but no source sets {weakening.key} (a file emptied or cut short?);"
        " set it explicitly to apply this"
        for weakening in unstated
    )


async def _watchdog(notifier: Notifier, interval_s: float) -> None:
    while True:
        notifier.watchdog()
        await trio.sleep(interval_s)


async def _report_status(server: Server, notifier: Notifier) -> None:
    before = server.stats.messages.total()
    while True:
        await trio.sleep(STATUS_INTERVAL_S)
        now = server.stats.messages.total()
        notifier.status(_status_line(server, (now - before) / STATUS_INTERVAL_S))
        before = now


def _status_line(server: Server, rate: float) -> str:
    state = "draining" if server.stopping else "serving"
    return f"{state}: {len(server.gate.connections)} connections, {rate:.0f} messages/s"
