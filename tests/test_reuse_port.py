"""Several relayd processes serving one port: ``server.reuse_port`` (``SO_REUSEPORT``).

Two in-process servers stand for two nodes on one machine, on real loopback sockets:
the kernel must spread clients evenly over them (one socket shared by two idle
processes went to one of them 100 times in a row), send none to a server that does not
accept yet, and, once one has stopped, send every client to the other. What a stopping
node's backlog becomes (``net.ipv4.tcp_migrate_req``) is a kernel setting, checked here
only as relayd reads and reports it.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from relayd.config import Settings
from relayd.daemon import listeners
from relayd.daemon.reload import changes, in_force
from relayd.daemon.server import Server
from relayd.daemon.service import run_daemon
from relayd.daemon.systemd import Notifier
from relayd.routing.interface import Router
from relayd.routing.local import LocalRouter
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from tests.client import connect, settings
from tests.test_cli import MODULE, Daemon

#: Clients opened one after another against two servers sharing a port.
CLIENTS: int = 100
#: The fewest of them either server may hold. The kernel picks by a hash of each client's
#: address and port, so each count is binomial(100, 1/2): 24 or fewer about once in 11
#: million runs (either of the two: once in 5.5 million).
FEWEST: int = 25


def sharing(port: int = 0) -> Settings:
    """Settings for a server with ``reuse_port`` on loopback ``port``."""
    base = settings()
    server = base.server.model_copy(update={"port": port, "reuse_port": True})
    return base.model_copy(update={"server": server})


def held_open(server: Server) -> int:
    """The WebSocket connections ``server`` holds now (its ``/metrics`` gauge)."""
    value = server.registry.get_sample_value("relayd_connections_open")
    assert value is not None
    return int(value)


class _StartsOnCue(LocalRouter):
    """A router that starts when ``go`` is set, as a cluster node's waits for Redis."""

    def __init__(self, events: MessageEvents, stats: Stats, go: trio.Event) -> None:
        super().__init__(events, stats)
        self._go = go

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._go.wait()
        await super().run(task_status=task_status)


def starts_on_cue(go: trio.Event) -> Callable[[MessageEvents, Stats], Router]:
    return lambda events, stats: _StartsOnCue(events, stats, go)


async def open_clients(url: str, count: int, stack: contextlib.AsyncExitStack) -> None:
    """Open ``count`` clients one after another, each welcomed before the next; kept open."""
    for _ in range(count):
        await stack.enter_async_context(connect(url))


async def test_two_servers_with_reuse_port_share_one_port_and_split_its_clients_evenly() -> None:
    first = Server(sharing())
    async with trio.open_nursery() as nursery:
        [(host, port)] = await nursery.start(first.run)
        second = Server(sharing(port))
        assert await nursery.start(second.run) == [(host, port)]  # bound: no EADDRINUSE
        url = f"ws://{host}:{port}/"
        # A client left in a backlog nobody accepts from would wait there: 10 s is ample.
        with trio.fail_after(10):
            async with contextlib.AsyncExitStack() as stack:
                await open_clients(url, CLIENTS, stack)
                counts = [held_open(first), held_open(second)]
        assert sum(counts) == CLIENTS
        assert min(counts) >= FEWEST, counts
        first.shutdown("test finished")
        second.shutdown("test finished")


async def test_without_reuse_port_a_second_server_cannot_bind_the_port() -> None:
    first = Server(sharing())
    plain = settings()
    async with trio.open_nursery() as nursery:
        [(_, port)] = await nursery.start(first.run)
        taken = Server(
            plain.model_copy(update={"server": plain.server.model_copy(update={"port": port})})
        )
        with pytest.raises(OSError, match="in use") as raised:
            await taken.listen()
        assert raised.value.errno == errno.EADDRINUSE
        first.shutdown("test finished")


async def test_a_server_still_starting_takes_no_client_and_a_stopped_one_none_after() -> None:
    # A node reaching Redis (its router's start) must not hold a share of the port's new
    # clients in its backlog while another node could serve them: it listens only once it
    # accepts. And once it has drained, every client goes to the node left.
    go = trio.Event()
    serving = Server(sharing())
    async with trio.open_nursery() as nursery:
        [(host, port)] = await nursery.start(serving.run)
        starting = Server(sharing(port), router=starts_on_cue(go))
        nursery.start_soon(starting.run)
        await trio.testing.wait_all_tasks_blocked()  # bound, its router waiting for go
        assert starting.unready == "starting"
        url = f"ws://{host}:{port}/"
        # A client left in the starting one's backlog would wait there: 10 s is ample.
        with trio.fail_after(10):
            async with contextlib.AsyncExitStack() as stack:
                await open_clients(url, CLIENTS // 2, stack)
                assert held_open(serving) == CLIENTS // 2
        go.set()
        await trio.testing.wait_all_tasks_blocked()
        assert starting.unready is None
        serving.shutdown("test: one node stops")
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(10):
            async with contextlib.AsyncExitStack() as stack:
                await open_clients(url, CLIENTS // 2, stack)
                assert held_open(starting) == CLIENTS // 2
        starting.shutdown("test finished")


@pytest.mark.parametrize(("text", "migrates"), [("1\n", True), ("0\n", False), (None, None)])
def test_migrates_on_close_reads_tcp_migrate_req(
    tmp_path: Path, text: str | None, migrates: bool | None
) -> None:
    setting = tmp_path / "tcp_migrate_req"
    if text is not None:
        setting.write_text(text, encoding="ascii")
    assert listeners.migrates_on_close(setting) is migrates


@pytest.mark.parametrize(("text", "logged"), [("0\n", [0]), (None, [None]), ("1\n", [])])
async def test_a_start_with_reuse_port_warns_when_a_stop_would_reset_waiting_clients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str | None, logged: list[int | None]
) -> None:
    setting = tmp_path / "tcp_migrate_req"
    if text is not None:
        setting.write_text(text, encoding="ascii")
    monkeypatch.setattr(listeners, "MIGRATE_REQ", setting)
    with structlog.testing.capture_logs() as lines:
        server = Server(sharing())
        async with trio.open_nursery() as nursery:
            # As relayd serve runs it: bound first (run_daemon), then served.
            await nursery.start(server.run, await server.listen())
            server.shutdown("test finished")
    warnings = [line for line in lines if line["event"] == "server.reuse_port"]
    assert [line["tcp_migrate_req"] for line in warnings] == logged
    assert all(line["log_level"] == "warning" for line in warnings)


def test_a_reload_that_changes_reuse_port_says_a_restart_is_needed() -> None:
    # The sockets are bound once: a reload cannot take a process into or out of the group.
    running = settings()
    reloaded = sharing(running.server.port)
    assert changes(running, reloaded).restart_required == ["server.reuse_port"]
    assert in_force(running, reloaded).server.reuse_port is False


async def test_a_socket_that_takes_the_port_while_relayd_starts_stops_it_with_one_error() -> None:
    # A socket without SO_REUSEPORT may bind and listen on a port that a reuse_port socket
    # has bound but not listened on yet (relayd's, while its router starts): relayd's
    # listen then fails. It must say so as a bind failure says it, having served nothing,
    # not end in a traceback.
    server = Server(sharing())
    bound = await server.listen()  # bound, not listening: a reuse_port socket
    [(host, port)] = [listeners.address(sock) for sock in bound]
    with socket.socket() as intruder, structlog.testing.capture_logs() as lines:
        intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        intruder.bind((host, port))
        intruder.listen()
        with pytest.raises(listeners.NotListening) as raised:
            await server.run(bound)
    assert raised.value.where == f"{host}:{port}"
    assert raised.value.error.errno == errno.EADDRINUSE
    assert str(raised.value) == f"cannot listen on {host}:{port}: {raised.value.error}"
    [stop] = [line for line in lines if line["event"] == "server.stop"]
    assert (stop["reason"], stop["forced"]) == ("cannot listen", False)
    assert not [line for line in lines if line["event"] == "server.ready"]
    assert all(sock.fileno() == -1 for sock in bound)  # closed


def test_relayd_serve_with_reuse_port_warns_exactly_when_this_kernel_would_reset() -> None:
    # The command as systemd runs it (it binds before serving): the warning is said where
    # this machine's setting would reset the clients waiting for a stopping process, and
    # only there (/proc/sys/net/ipv4/tcp_migrate_req is 0 on most machines).
    config_free = [*MODULE, "--config", "/dev/null", "--host", "127.0.0.1", "--port", "0"]
    daemon = Daemon(config_free, RELAYD_SERVER__REUSE_PORT="true")
    try:
        daemon.wait_event("server.ready")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    finally:
        daemon.close()
    warnings = [event for event in daemon.events if event["event"] == "server.reuse_port"]
    migrates = listeners.migrates_on_close()
    assert [event["tcp_migrate_req"] for event in warnings] == (
        [] if migrates else [None if migrates is None else 0]
    )
    assert daemon.events[0]["event"] == "server.start"  # the warning comes after it


async def test_relayd_exits_1_with_one_line_when_its_late_listen_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # run_daemon, as relayd serve runs it: exit status 1 (systemd restarts it; the port
    # may be free then), the failing address and what to do, no traceback.
    intruders: list[socket.socket] = []
    bind = Server.listen

    async def listen_then_taken(self: Server) -> list[trio.socket.SocketType]:
        bound = await bind(self)
        for sock in bound:
            intruder = socket.socket(sock.family)
            intruders.append(intruder)
            intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            intruder.bind(sock.getsockname()[:2])
            intruder.listen()
        return bound

    monkeypatch.setattr(Server, "listen", listen_then_taken)
    try:
        with structlog.testing.capture_logs() as lines:
            status = await run_daemon(
                Server(sharing()),
                reload_settings=_no_reload,
                notifier=Notifier.from_environment({}),
            )
        [(host, port)] = [intruder.getsockname()[:2] for intruder in intruders]
    finally:
        for intruder in intruders:
            intruder.close()
    assert status == 1
    [error] = [line for line in lines if line["event"] == "error"]
    assert error["summary"].startswith(
        f"cannot listen on {host}:{port}: [Errno {errno.EADDRINUSE}] "
    )
    assert "a socket without SO_REUSEPORT took the port" in error["summary"]
    assert capsys.readouterr().err == f"relayd: {error['summary']}\n"


def _no_reload() -> Any:
    raise AssertionError("no reload in this test")
