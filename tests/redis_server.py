"""A real ``redis-server`` for the cluster tests: Debian's, on a free loopback port.

Each :class:`RedisServer` is a child process of the test run, in a temporary
directory of its own, with persistence off, stopped by its PID only. It never
uses 6379: another Redis may be running on the machine. Readiness is Redis's own
"Ready to accept connections" line, read from its stdout as it is printed
(nothing polls). The failure helpers are what the cluster tests inflict:
:meth:`RedisServer.restart` (same port, empty: a restart loses every
subscription), :meth:`RedisServer.kill`, :meth:`RedisServer.freeze` and
:meth:`RedisServer.thaw` (SIGSTOP/SIGCONT), :meth:`RedisServer.cli` (a command
through a fresh connection, for assertions), :meth:`RedisServer.forget_clients`.

A missing ``redis-server`` fails the test under ``CI=true`` and skips it
elsewhere (``require_tool``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from tests.e2e.harness import require_tool

__all__ = ["RedisServer", "running_redis"]

#: Seconds Redis may take to say it is ready, and to exit after SIGTERM.
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0
#: Attempts at a free port: another process may take the one the kernel named
#: between our probe and Redis's bind.
PORT_ATTEMPTS = 5


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's choice)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` child on 127.0.0.1.

    Args:
        directory: its working directory (and where its unix socket lives).
        port: the TCP port; 0 picks a free one.
        extra: more ``redis-server`` arguments, e.g. ``["--requirepass", "x"]``.
    """

    def __init__(self, directory: Path, *, port: int = 0, extra: list[str] | None = None) -> None:
        self.executable = require_tool("redis-server")
        self.directory = directory
        self.port = port
        self.extra = list(extra or [])
        self.unix_socket = directory / "redis.sock"
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._output: list[str] = []

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """``unix://<dir>/redis.sock``."""
        return f"unix://{self.unix_socket}"

    @property
    def pid(self) -> int:
        """The running server's PID."""
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> None:
        """Start it and wait for its ready line; a fresh port unless one was fixed."""
        fixed = self.port != 0
        for _ in range(1 if fixed else PORT_ATTEMPTS):
            port = self.port if fixed else free_port()
            if self._start_on(port):
                self.port = port
                return
        raise AssertionError("redis-server did not start:\n" + "\n".join(self._output[-20:]))

    def _start_on(self, port: int) -> bool:
        argv = [
            str(self.executable),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.unix_socket),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--loglevel", "notice",
            *self.extra,
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.directory,
        )
        ready = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self._output.append(line.rstrip("\n"))
                if "Ready to accept connections" in line:
                    ready.set()
            ready.set()  # it exited: stop waiting

        reader = threading.Thread(target=read, name=f"redis-{port}", daemon=True)
        reader.start()
        ready.wait(START_TIMEOUT_S)
        if proc.poll() is None and ready.is_set():
            self.proc, self._reader = proc, reader
            return True
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        _reap(proc, reader)
        return False

    def stop(self) -> None:
        """SIGTERM (and SIGCONT, in case it is frozen) by PID; wait for it to exit."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
        _reap(proc, self._reader)

    def kill(self) -> None:
        """SIGKILL by PID: Redis vanishes without a word."""
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            _reap(proc, self._reader)

    def restart(self) -> None:
        """Stop it and start a new, empty one on the same port."""
        self.stop()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: its connections stay open and nothing answers."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze`."""
        os.kill(self.pid, signal.SIGCONT)

    def cli(self, *args: str) -> str:
        """Run one command with ``redis-cli`` over the unix socket; its output, stripped."""
        cli = Path(self.executable).with_name("redis-cli")
        result = subprocess.run(
            [str(cli), "-s", str(self.unix_socket), *args],
            capture_output=True,
            text=True,
            timeout=STOP_TIMEOUT_S,
            check=True,
        )
        return result.stdout.strip()

    def forget_clients(self, name_prefix: str) -> None:
        """Make sure Redis has dropped the connections named ``name_prefix...``.

        A process that just closed them may be ahead of Redis, which sees a close
        at its next turn; ``CLIENT KILL`` returns once Redis has dropped the
        client (an error when it already had, which is as good).
        """
        for line in self.cli("CLIENT", "LIST").splitlines():
            fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
            if fields.get("name", "").startswith(name_prefix):
                self.cli("CLIENT", "KILL", "ID", fields["id"])

    @property
    def output(self) -> str:
        """What it printed, for assertion messages."""
        return "\n".join(self._output[-40:])


def _reap(proc: subprocess.Popen[str], reader: threading.Thread | None) -> None:
    """Wait for an exiting ``proc``, let its output reader finish, close its pipe."""
    proc.wait(STOP_TIMEOUT_S)
    if reader is not None:
        reader.join(STOP_TIMEOUT_S)
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def running_redis(directory: Path, *, extra: list[str] | None = None) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, stopped (by PID) when the block ends."""
    server = RedisServer(directory, extra=extra)
    server.start()
    try:
        yield server
    finally:
        server.stop()
