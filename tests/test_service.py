"""The process around the server (relayd.daemon.service): signals, reloads, systemd's notifications.

In process: :func:`~relayd.daemon.service.run_daemon` runs a real server on loopback,
signals are sent to this process, and what relayd would tell systemd is kept by
:class:`Notifications`. tests/test_daemon.py runs the real command.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Mapping
from pathlib import Path

import structlog
import trio

from relayd.config import ClusterSettings
from relayd.config_sources import Loaded
from relayd.daemon.reload import FileRead
from relayd.daemon.server import Server
from relayd.daemon.service import run_daemon
from relayd.daemon.systemd import Notifier
from relayd.policy.auth import Authenticator
from relayd.routing.local import LocalRouter
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from tests.client import connect, settings


class Notifications(Notifier):
    """What relayd tells systemd, kept instead of sent (without its status lines)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[str] = []
        self.changed = trio.lowlevel.ParkingLot()

    def notify(self, *assignments: str) -> None:
        self.sent.extend(a for a in assignments if not a.startswith(("STATUS=", "MONOTONIC")))
        self.changed.unpark_all()

    async def until(self, *sent: str) -> None:
        """Wait until exactly ``sent`` has been sent; the caller bounds the wait."""
        while tuple(self.sent) != sent:
            await self.changed.park()


async def test_a_bug_in_reading_the_settings_refuses_the_reload_and_relayd_serves_on() -> None:
    # Any exception but a ConfigError escaped the signal task and stopped relayd, every
    # client cut (a reviewer's: the cluster turned on in a reload, its Redis client
    # not installed).
    def broken() -> tuple[Loaded, Authenticator | None, Mapping[str, FileRead]]:
        raise RuntimeError("a bug in reading")

    notifications = Notifications()
    server = Server(settings())
    with structlog.testing.capture_logs() as events, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    run_daemon, server, reload_settings=broken, notifier=notifications
                )
            )
            await notifications.until("READY=1")
            os.kill(os.getpid(), signal.SIGHUP)
            await notifications.until("READY=1", "RELOADING=1", "READY=1")
            [ready] = [e for e in events if e["event"] == "server.ready"]
            async with connect(f"ws://127.0.0.1:{ready['port']}/") as a:
                await a.send(a.id, "still serving")
                assert await a.recv() == "still serving"
            os.kill(os.getpid(), signal.SIGTERM)
    [reload] = [e for e in events if e["event"] == "config.reload"]
    assert reload["applied"] is False
    assert reload["reason"] == "relayd could not read its settings: RuntimeError: a bug in reading"
    [error] = [e for e in events if e["event"] == "error"]
    assert error["summary"] == "RuntimeError: a bug in reading"
    assert server.stats.reloads == {"refused": 1}


async def test_a_reload_refuses_a_grace_too_short_for_the_reply_timeout_in_force() -> None:
    # The file may lower cluster.reply_timeout_s and shutdown_grace_s together and pass
    # the rule, but the cluster's keys need a restart: the grace was applied with the old
    # reply_timeout_s, and the next drain cut the answers it waited for.
    started = settings().model_copy(
        update={"cluster": ClusterSettings(enabled=True, reply_timeout_s=2.0)}
    )
    reloaded = started.model_copy(
        update={
            "server": started.server.model_copy(update={"shutdown_grace_s": 3.0}),
            "cluster": ClusterSettings(enabled=True, reply_timeout_s=0.5),
        }
    )
    path = Path("/etc/relayd/relayd.toml")
    read = Loaded(reloaded, path, sources={"server.shutdown_grace_s": f"in {path}"})
    notifications = Notifications()
    server = Server(started, router=LocalRouter)
    with structlog.testing.capture_logs() as events, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    run_daemon,
                    server,
                    reload_settings=lambda: (read, None, {}),
                    notifier=notifications,
                )
            )
            await notifications.until("READY=1")
            os.kill(os.getpid(), signal.SIGHUP)
            await notifications.until("READY=1", "RELOADING=1", "READY=1")
            os.kill(os.getpid(), signal.SIGTERM)
    [reload] = [e for e in events if e["event"] == "config.reload"]
    assert reload["applied"] is False
    # As check-config prints a problem (docs/logging.md): key: reason (source), both
    # values named, the reply_timeout_s's as the one in force.
    assert reload["reason"] == (
        "server.shutdown_grace_s: is 3 s, must be more than cluster.reply_timeout_s + 2 s"
        " (2 s, in force until a restart) in a cluster: a drain waits that long for other"
        f" nodes' answers to the server API calls and messages in flight (in {path})"
    )
    assert server.settings.server.shutdown_grace_s == started.server.shutdown_grace_s


class HeldStart(LocalRouter):
    """A router whose start waits for :attr:`go`, as a cluster node's first attempt at Redis."""

    def __init__(self, events: MessageEvents, stats: Stats) -> None:
        super().__init__(events, stats)
        self.go = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.go.wait()
        await super().run(task_status=task_status)


async def test_a_sighup_before_relayd_serves_is_a_reload_once_it_serves() -> None:
    # relayd takes its signals before its router has started (a cluster node's first
    # attempt at Redis may take 13 s): a SIGHUP then was a reload at once, which ends
    # with READY=1, so systemd heard relayd was ready while it accepted nobody.
    routers: list[HeldStart] = []

    def held(events: MessageEvents, stats: Stats) -> HeldStart:
        routers.append(HeldStart(events, stats))
        return routers[-1]

    def reread() -> tuple[Loaded, Authenticator | None, Mapping[str, FileRead]]:
        return Loaded(settings(max_connections_per_ip=7), None), None, {}

    notifications = Notifications()
    server = Server(settings(), router=held)
    with structlog.testing.capture_logs() as events, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    run_daemon, server, reload_settings=reread, notifier=notifications
                )
            )
            await trio.testing.wait_all_tasks_blocked()
            assert server.unready == "starting"
            os.kill(os.getpid(), signal.SIGHUP)
            await trio.testing.wait_all_tasks_blocked()
            assert notifications.sent == []
            routers[0].go.set()
            await notifications.until("READY=1", "RELOADING=1", "READY=1")
            assert server.settings.limits.max_connections_per_ip == 7
            os.kill(os.getpid(), signal.SIGTERM)
    told = [e["event"] for e in events if e["event"] in ("server.ready", "config.reload")]
    assert told == ["server.ready", "config.reload"]
