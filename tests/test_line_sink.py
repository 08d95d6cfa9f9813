"""relayd.telemetry.line_sink when nobody reads the log: relayd keeps serving, drops and counts.

The first test runs a real relayd whose stdout is a pipe, closes the pipe's only read end
(what ``relayd serve | head -1`` does once ``head`` has its line) and checks what an
operator sees: relayd serves the next client, says once on stderr that the log's reader
has gone, counts the lines on ``/metrics`` and exits 0 on SIGTERM with no traceback. Its
reads of the child's pipes wait on ``select`` with a deadline, never on a sleep; the ports
are the kernel's choice (``--port 0``, ``RELAYD_ADMIN__PORT=0``), on loopback only.
"""

from __future__ import annotations

import array
import fcntl
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import termios
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from relayd.telemetry.line_sink import LineSink, dropped_lines
from tests import wire

RELAYD: Final = [sys.executable, "-m", "relayd"]
#: The longest any one step waits for the child (a slow, shared machine).
WAIT_TIMEOUT_S: Final = 20.0
#: What relayd writes on stderr when its log's reader has gone.
NOTICE: Final = (
    "relayd: the log's reader has gone (stdout is closed); relayd keeps serving, "
    "and counts the log lines it drops in relayd_log_lines_dropped_total\n"
)


def read_until(fd: int, done: bytes, deadline: float) -> bytes:
    """Read ``fd`` until what was read contains ``done``; fail at ``deadline``."""
    data = b""
    while done not in data:
        left = deadline - time.monotonic()
        readable, _, _ = select.select([fd], [], [], max(0.0, left))
        if not readable:
            pytest.fail(f"no {done!r} within {WAIT_TIMEOUT_S}s; read so far: {data!r}")
        chunk = os.read(fd, 65536)
        if not chunk:
            pytest.fail(f"the pipe closed before {done!r}; read so far: {data!r}")
        data += chunk
    return data


def handshake(port: int) -> str:
    """Open a WebSocket connection to relayd, return the id it greets with, and close it."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_TIMEOUT_S) as sock:
        sock.sendall(wire.upgrade_request())
        data = b""
        while b"\r\n\r\n" not in data or not (frames := wire.server_frames(data)):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 101 "), data
        opcode, payload = frames[0]
        assert opcode == wire.OP_TEXT
        return payload.decode()


@pytest.fixture
def relayd(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A relayd on loopback with its stdout and stderr piped; killed if a test left it running."""
    config = tmp_path / "relayd.toml"
    config.write_text("# built-in defaults\n", encoding="utf-8")
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("RELAYD_")
        and name not in {"PORT", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "JOURNAL_STREAM"}
    }
    proc = subprocess.Popen(
        [*RELAYD, "--config", str(config), "--host", "127.0.0.1", "--port", "0"],
        env={**env, "RELAYD_ADMIN__HOST": "127.0.0.1", "RELAYD_ADMIN__PORT": "0"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=WAIT_TIMEOUT_S)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_relayd_keeps_serving_and_counts_its_log_when_stdout_is_closed(
    relayd: subprocess.Popen[bytes],
) -> None:
    assert relayd.stdout is not None
    assert relayd.stderr is not None
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    log = read_until(relayd.stdout.fileno(), b'"event":"server.ready"', deadline)
    ready: dict[str, Any] = next(
        event
        for event in map(json.loads, log.decode().splitlines())
        if event["event"] == "server.ready"
    )
    relayd.stdout.close()  # the only read end: relayd's next write finds no reader

    first = handshake(ready["port"])  # its connection.open line is the first one lost
    stderr = read_until(relayd.stderr.fileno(), b"\n", time.monotonic() + WAIT_TIMEOUT_S)
    assert stderr.decode() == NOTICE
    second = handshake(ready["port"])  # still serving, its lines dropped quietly
    assert len(first) == len(second) == 22
    assert first != second

    metrics = urllib.request.urlopen(
        f"http://{ready['admin']}/metrics", timeout=WAIT_TIMEOUT_S
    ).read()
    dropped = [
        line for line in metrics.decode().splitlines() if line.startswith("relayd_log_lines_")
    ]
    assert len(dropped) == 1, dropped
    name, value = dropped[0].split()
    assert name == "relayd_log_lines_dropped_total"
    # At least each connection's open and close lines; exactly how many others is not the point.
    assert float(value) >= 4

    relayd.send_signal(signal.SIGTERM)
    assert relayd.wait(timeout=WAIT_TIMEOUT_S) == 0
    rest = relayd.stderr.read()
    assert rest == b"", rest  # no second notice, no BrokenPipeError, no traceback


def test_a_sink_whose_pipe_has_no_reader_drops_and_counts_every_line_after_one_notice(
    capsys: pytest.CaptureFixture[str],
) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w") as stream:
        before = dropped_lines()
        sink = LineSink(stream)
        sink.msg(b'{"event":"one"}')
        assert sink.gone
        sink.msg(b'{"event":"two"}')
        sink.held = True
        sink.msg(b'{"event":"three"}')
        assert dropped_lines() == before + 3  # nobody reads: dropped at once, not held
        assert not sink.flush()  # nothing was held
        stream.write("written to /dev/null now: no error at close\n")
    assert capsys.readouterr().err == NOTICE


def test_a_sink_on_a_string_stream_writes_its_lines() -> None:
    stream = io.StringIO()
    sink = LineSink(stream)
    sink.msg(b'{"event":"one"}')
    sink.info('{"event":"two"}')
    assert stream.getvalue() == '{"event":"one"}\n{"event":"two"}\n'
    assert not sink.gone


def _connect(port: int) -> tuple[socket.socket, str]:
    """A WebSocket connection to relayd left open, and the id it was greeted with."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_TIMEOUT_S)
    sock.sendall(wire.upgrade_request())
    return sock, _next_text(sock, head=True).decode()


def _next_text(sock: socket.socket, *, head: bool = False) -> bytes:
    """The payload of the next text frame ``sock`` receives, after the HTTP head if ``head``."""
    data = b""
    while (head and b"\r\n\r\n" not in data) or not (
        frames := wire.server_frames(data, after_head=head)
    ):
        chunk = sock.recv(65536)  # the socket's timeout fails the test if relayd stalls
        assert chunk, data
        data += chunk
    assert not head or data.startswith(b"HTTP/1.1 101 "), data
    opcode, payload = frames[0]
    assert opcode == wire.OP_TEXT
    return payload


def _queued(fd: int) -> int:
    """How many bytes wait in the pipe whose read end is ``fd``."""
    size = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, size)
    return size[0]


def _stop_reading_and_fill(relayd: subprocess.Popen[bytes]) -> tuple[int, dict[str, Any]]:
    """Read relayd's stdout to server.ready, then make it write twice what the pipe holds.

    Returns the pipe's read end and the server.ready line.
    """
    assert relayd.stdout is not None
    out = relayd.stdout.fileno()
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    log = read_until(out, b'"event":"server.ready"', deadline)
    ready = next(
        event
        for event in map(json.loads, log.decode().splitlines())
        if event["event"] == "server.ready"
    )
    capacity = fcntl.fcntl(out, fcntl.F_GETPIPE_SZ)
    # Nobody reads stdout now. Each connection writes its open and close lines, over
    # 200 bytes: these write twice what the pipe holds, so the rest waits in relayd.
    for _ in range(2 * capacity // 200):
        handshake(ready["port"])
    assert _queued(out) > capacity // 2
    return out, ready


def test_relayd_keeps_serving_while_nobody_reads_its_stdout_and_writes_the_lines_later(
    relayd: subprocess.Popen[bytes],
) -> None:
    # `relayd serve | less` left at a page, a container's log driver that falls behind:
    # the pipe fills and a blocking write froze the event loop, so handshakes timed out
    # and /healthz did not answer (hunt 34b's stall.py reproduced it with 151 connections).
    out, ready = _stop_reading_and_fill(relayd)
    capacity = fcntl.fcntl(out, fcntl.F_GETPIPE_SZ)

    alice, _ = _connect(ready["port"])
    bob, bob_id = _connect(ready["port"])
    with alice, bob:
        alice.sendall(
            wire.frame(wire.OP_TEXT, json.dumps({"to": bob_id, "message": "hi"}).encode())
        )
        assert _next_text(bob) == b"hi"
        url = f"http://{ready['admin']}/healthz"
        with urllib.request.urlopen(url, timeout=WAIT_TIMEOUT_S) as health:
            assert health.status == 200

        # The reader comes back: the lines relayd held are written, in order, none lost.
        log = read_until(out, b'"event":"message.relay"', time.monotonic() + WAIT_TIMEOUT_S)
    opened = [
        event["conn"]
        for event in map(json.loads, log.decode().splitlines())
        if event["event"] == "connection.open"
    ]
    assert opened == list(range(1, len(opened) + 1))  # none lost, in order
    assert len(opened) == 2 * capacity // 200 + 2  # alice's and bob's last

    relayd.send_signal(signal.SIGTERM)
    assert relayd.wait(timeout=WAIT_TIMEOUT_S) == 0


def test_relayd_stops_at_once_on_sigterm_while_nobody_reads_its_stdout(
    relayd: subprocess.Popen[bytes],
) -> None:
    # The lines still waiting for the reader are counted as dropped, not waited for.
    _stop_reading_and_fill(relayd)
    relayd.send_signal(signal.SIGTERM)
    assert relayd.wait(timeout=WAIT_TIMEOUT_S) == 0
