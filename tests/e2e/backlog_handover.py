"""What becomes of clients waiting for a relayd that stops, beside another on its port.

Run by ``tests/e2e/test_backlog_handover.py`` inside a network namespace of its own
(``unshare --net``), where it may set ``net.ipv4.tcp_migrate_req`` without touching the
machine's: ``python -m tests.e2e.backlog_handover 0|1``. Two relayd processes share a
loopback port with ``server.reuse_port``. One, ``full``, runs with so few file
descriptors that it holds only a handful of public sockets (its open-file budget), so of
the clients the kernel hashes to it, the rest wait in its backlog, their TCP handshake
done and their WebSocket upgrade request sent, unanswered. Then ``full`` gets SIGTERM,
and its drain closes its socket first. The last stdout line is a JSON report: the
budget, how many clients were waiting, and what each of them got then (``101`` from the
other process, ``reset``, ``eof``, or the status line of another answer).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import resource
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

from tests.e2e.harness import RelaydProcess, relayd_command, relayd_env
from tests.wire import upgrade_request

#: Clients opened against the two processes.
CLIENTS: Final = 40
#: The open-file limit of ``full``: its budget (the limit, less the descriptors open at
#: start, less the 64 relayd keeps back) is then a few sockets.
FULL_NOFILE: Final = 80
#: How long the clients may take to settle, and those waiting to get their answer.
SETTLE_TIMEOUT_S: Final = 15.0


def _backlog(pid: int) -> int:
    """Connections waiting in the accept queues of process ``pid``'s listening sockets.

    For a listening socket, /proc/net/tcp's rx_queue is its accept queue's length.
    """
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    waiting = 0
    for line in Path("/proc/net/tcp").read_text(encoding="ascii").splitlines()[1:]:
        fields = line.split()
        state, queues, inode = fields[3], fields[4], fields[9]
        if state == "0A" and inode in inodes:  # 0A: LISTEN
            waiting += int(queues.split(":")[1], 16)
    return waiting


def _answer(sock: socket.socket, deadline: float) -> str:
    """What ``sock`` got: ``101``, another status line, ``reset`` or ``eof``; or ``none``."""
    received = b""
    while b"\r\n" not in received:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return "none"
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return "reset"
        if not chunk:
            return "eof"
        received += chunk
    status = received.split(b"\r\n", 1)[0].decode("latin-1")
    return "101" if status.startswith("HTTP/1.1 101 ") else status


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _start(config: Path, port: int, nofile: int | None) -> RelaydProcess:
    """A relayd with reuse_port on ``port``, ready; ``nofile``: its open-file limit."""
    argv = [*relayd_command(), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--admin-port", "0", "--log-format", "json", "--config", str(config)]
    env = relayd_env() | {"RELAYD_SERVER__REUSE_PORT": "true", "RELAYD_LOG__MESSAGES": "off"}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if nofile is not None:  # inherited by the child; this process's own is put back
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
    try:
        relayd = RelaydProcess(argv, env)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    relayd.wait_ready()
    return relayd


def main(migrate: str) -> None:
    """Set ``net.ipv4.tcp_migrate_req`` to ``migrate`` (in this namespace), run, report."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text(migrate, encoding="ascii")
    port = _free_port()
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "relayd.toml"
        config.write_text("# built-in defaults\n", encoding="utf-8")
        full = _start(config, port, FULL_NOFILE)
        other = _start(config, port, None)
        clients: list[socket.socket] = []
        try:
            budget = full.wait_for_event("server.descriptors")["budget"]
            for _ in range(CLIENTS):
                client = socket.create_connection(("127.0.0.1", port))
                client.sendall(upgrade_request(f"127.0.0.1:{port}"))
                clients.append(client)
            # Full has stopped accepting, its budget reached, before the count below is
            # taken: a client it was still to accept would have counted as waiting.
            full.wait_for_event("listener.paused", timeout=SETTLE_TIMEOUT_S)
            # Settled: every client answered (by full within its budget, or by the
            # other) or waiting in full's backlog; polled, since a backlog's length
            # sends no event.
            answered: dict[socket.socket, str] = {}
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while len(answered) + _backlog(full.proc.pid) < CLIENTS:
                assert time.monotonic() < deadline, (len(answered), _backlog(full.proc.pid))
                unanswered = [client for client in clients if client not in answered]
                for client in select.select(unanswered, [], [], 0.05)[0]:
                    answered[client] = _answer(client, deadline)
            waiting = [client for client in clients if client not in answered]
            full.terminate()
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            outcomes = collections.Counter(_answer(client, deadline) for client in waiting)
            full.assert_clean_stop(full.wait_exit())
        finally:
            for client in clients:
                client.close()
            full.stop()
            other.stop()
    report = {
        "budget": budget,
        "answered_before": collections.Counter(answered.values()),
        "waiting": len(waiting),
        "outcomes": outcomes,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
