"""What an idle connection holds in relayd's process, by the line that allocated it.

``bench/run.py``'s idle scenarios give the figure that counts (the server's RSS per
connection beside node-ws's); this says what makes it up. It runs a relayd in this
process under :mod:`tracemalloc`, opens connections from a child process (each
completes its handshake and reads its welcome, then stays silent), and compares two
snapshots: after a warm-up of ``--warm`` connections and with ``--count`` more held.
Every allocation still alive is charged to the line that made it, a coroutine to
the line that called its function; the report groups them by file and lists the
largest lines. tracemalloc's own bookkeeping inflates RSS, so only traced bytes are
reported; they run a few hundred bytes below the bench's RSS figure (the
allocator's pools and arenas).

Usage::

    .venv/bin/python bench/idle_memory.py --count 10000
    .venv/bin/python bench/idle_memory.py --count 2000 --lines 40 --json

The limits that would refuse so many connections from one address are raised; all
else is relayd's default configuration, with its log lines dropped (structlog
returns them unwritten). The client process is stopped whatever happens. Runs in
about 16 s for 10,000 connections; the open-file limit must allow
``--count`` plus ``--warm`` plus a margin in both processes.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import subprocess
import sys
import tracemalloc
from collections.abc import Sequence
from typing import Any, Final

import structlog
import trio
import trio.testing
from upgrade import upgrade_request

from relayd.config import AdminSettings, LimitsSettings, LogSettings, ServerSettings, Settings
from relayd.daemon.server import Server

#: How long the client process may take to open its connections before the run fails.
OPEN_TIMEOUT_S: Final = 120.0


def _settings(connections: int) -> Settings:
    limits = LimitsSettings(
        max_connections=connections,
        max_connections_per_ip=connections,
        max_handshakes=connections,
        max_handshakes_per_ip=connections,
    )
    return Settings(
        server=ServerSettings(host="127.0.0.1", port=0),
        limits=limits,
        log=LogSettings(),
        admin=AdminSettings(port=0),
    )


def _client(host: str, port: int, count: int) -> None:
    """The child process: ``count`` handshakes, each read to its welcome, then held.

    Prints ``ready`` once all are open; closes them all when its stdin ends.
    """
    held: list[socket.socket] = []
    for _ in range(count):
        sock = socket.create_connection((host, port))
        sock.sendall(upgrade_request(host, port))
        received = b""
        while True:  # the 101's head, then the welcome frame whole
            chunk = sock.recv(65536)
            if not chunk:
                raise SystemExit("relayd closed a connection during its handshake")
            received += chunk
            end = received.find(b"\r\n\r\n")
            frame = received[end + 4 :] if end >= 0 else b""
            if len(frame) >= 2 and len(frame) >= 2 + (frame[1] & 0x7F):
                break
        held.append(sock)
    print("ready", flush=True)
    sys.stdin.read()
    for sock in held:
        sock.close()


async def _hold(host: str, port: int, count: int) -> trio.Process:
    """Start a child holding ``count`` idle connections; return it once they are open."""
    process = await trio.lowlevel.open_process(
        [sys.executable, __file__, "--client", host, str(port), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        with trio.fail_after(OPEN_TIMEOUT_S):
            await _ready(process)
    except BaseException:
        process.kill()  # not left holding connections to a server that is going away
        raise
    return process


async def _ready(process: trio.Process) -> None:
    assert process.stdout is not None
    received = b""
    while b"ready" not in received:
        chunk = await process.stdout.receive_some()
        if not chunk:
            raise RuntimeError(f"the client process ended early ({await process.wait()})")
        received += chunk


async def _release(process: trio.Process) -> None:
    assert process.stdin is not None
    await process.stdin.aclose()
    with trio.fail_after(OPEN_TIMEOUT_S):
        await process.wait()


def _snapshot() -> tracemalloc.Snapshot:
    return tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )


async def _measure(count: int, warm: int) -> tuple[tracemalloc.Snapshot, tracemalloc.Snapshot]:
    server = Server(_settings(count + warm + 16))
    async with trio.open_nursery() as nursery:
        (host, port), *_ = await nursery.start(server.run)
        warmed = await _hold(host, port, warm)
        try:
            await trio.testing.wait_all_tasks_blocked()
            before = _snapshot()
            held = await _hold(host, port, count)
            try:
                # Every connection's task has reached its idle wait.
                await trio.testing.wait_all_tasks_blocked()
                after = _snapshot()
            finally:
                with trio.CancelScope(shield=True):
                    await _release(held)
        finally:
            with trio.CancelScope(shield=True):
                await _release(warmed)
        server.shutdown("idle_memory finished")
    return before, after


def report(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, count: int, lines: int
) -> dict[str, Any]:
    """Bytes and allocations per connection: in all, by file and by line."""
    by_line = after.compare_to(before, "lineno")
    by_file: dict[str, float] = {}
    for stat in by_line:
        name = stat.traceback[0].filename
        by_file[name] = by_file.get(name, 0.0) + stat.size_diff / count
    return {
        "connections": count,
        "bytes_per_connection": sum(stat.size_diff for stat in by_line) / count,
        "by_file": dict(sorted(by_file.items(), key=lambda item: -item[1])),
        "by_line": [
            {
                "where": f"{stat.traceback[0].filename}:{stat.traceback[0].lineno}",
                "bytes": stat.size_diff / count,
                "objects": stat.count_diff / count,
            }
            for stat in by_line[:lines]
        ],
    }


def _short(path: str) -> str:
    # trio/_core/_run.py, stdlib socket.py, relayd/daemon/gate.py: whose, then which.
    at = path.find("site-packages/")
    if at >= 0:
        return path[at + len("site-packages/") :]
    at = path.find("/lib/python3")
    if at >= 0:
        return "stdlib " + path[at + 1 :].split("/", 2)[2]
    at = path.rfind("relayd/")
    return path[at:] if at >= 0 else path


def _print(figures: dict[str, Any]) -> None:
    print(
        f"{figures['bytes_per_connection']:,.0f} bytes per idle connection "
        f"({figures['connections']:,} held; tracemalloc, traced bytes)"
    )
    print("\nby file:")
    for path, size in figures["by_file"].items():
        if abs(size) >= 16:
            print(f"  {size:7,.0f}  {_short(path)}")
    print("\nby line:")
    for row in figures["by_line"]:
        print(f"  {row['bytes']:7,.0f}  {row['objects']:5.2f} objects  {_short(row['where'])}")


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print; 0 when done (an error raises)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--client"]:
        _client(args[1], int(args[2]), int(args[3]))
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="connections measured")
    parser.add_argument("--warm", type=int, default=50, help="connections opened before")
    parser.add_argument("--lines", type=int, default=30, help="largest lines listed")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    options = parser.parse_args(args)
    if options.count < 1 or options.warm < 1:
        parser.error("--count and --warm must be at least 1")
    # Both processes hold every connection's socket: the soft limit goes up to the hard one.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    tracemalloc.start(1)
    before, after = trio.run(_measure, options.count, options.warm)
    tracemalloc.stop()
    figures = report(before, after, options.count, options.lines)
    if options.json:
        print(json.dumps(figures, indent=1))
    else:
        _print(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
