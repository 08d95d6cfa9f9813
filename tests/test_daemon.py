"""relayd as systemd runs it: notifications, watchdog, reload on SIGHUP, socket activation.

Each test runs the real command in a child process. systemd's side is played
by the test: a datagram socket bound where ``NOTIFY_SOCKET`` points collects
what relayd tells systemd, and ``systemd-socket-activate`` hands it a
listening socket the way ``relayd.socket`` does.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import jwt
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from relayd.daemon.accepting import RESERVED_DESCRIPTORS
from relayd.daemon.admin import ANSWER_TIMEOUT_S, MAX_CONNECTIONS, REQUEST_TIMEOUT_S
from relayd.daemon.systemd import Notifier, listen_sockets, watchdog_interval
from relayd.telemetry.throttle import BURST
from tests import wire
from tests.e2e.harness import require_tool
from tests.keys import ec_key, pem_public, rsa_key
from tests.test_cli import MODULE, WAIT_TIMEOUT_S, Daemon, RawClient, run

# -- the protocol pieces, in process ------------------------------------------------


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process() -> None:
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": pid}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None


def test_listen_sockets_ignores_another_process_and_unsets_the_variables() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert listen_sockets(env) == []
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0", "LISTEN_FDNAMES": ""}
    assert listen_sockets(env) == []
    assert env == {}


def test_notifier_without_notify_socket_is_a_no_op() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    notifier.ready("x")  # nothing to send to, nothing raised
    notifier.close()


# -- the notify sequence, from a real process -------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(WAIT_TIMEOUT_S)
    try:
        yield listener, path
    finally:
        listener.close()


def _until(listener: socket.socket, wanted: str) -> list[str]:
    """Every notification up to and including the first with a ``wanted`` line."""
    seen = []
    while True:
        lines = listener.recv(4096).decode().splitlines()
        seen.append("\n".join(lines))
        if wanted in lines:
            return seen


def test_ready_watchdog_reload_and_stopping_are_notified(
    notify_socket: tuple[socket.socket, str], tmp_path: Path
) -> None:
    listener, path = notify_socket
    config = tmp_path / "relayd.toml"
    config.write_text("[limits]\nmessages_per_second = 50.0\n")
    daemon = Daemon(
        [*MODULE, "--config", str(config), "--port", "0", "--host", "127.0.0.1"],
        NOTIFY_SOCKET=path,
        WATCHDOG_USEC="200000",  # ping every 0.1 s
    )
    try:
        admin = daemon.wait_event("server.ready")["admin"]
        assert _reloads(admin) == (0, 0, 1)  # none yet: nothing refused
        ready = _until(listener, "READY=1")[-1]
        assert "STATUS=serving: 0 connections, 0 messages/s" in ready.splitlines()
        _until(listener, "WATCHDOG=1")
        _until(listener, "WATCHDOG=1")  # and again: it keeps coming from the loop

        # A valid new config is applied and named.
        config.write_text("[limits]\nmessages_per_second = 5.0\n[server]\nport = 9999\n")
        daemon.signal(signal.SIGHUP)
        reload = _until(listener, "READY=1")
        assert any("RELOADING=1" in message for message in reload)
        event = daemon.wait_event("config.reload")
        assert event["applied"] is True
        assert "limits.messages_per_second" in event["changed"]
        assert event["restart_required"] == []  # --port 0 on the command line still wins
        assert _reloads(admin) == (1, 0, 1)

        # An invalid one is refused and the old settings stay; its problems on one line.
        config.write_text("[limits]\nmessages_per_second = -1\nmessage_burst = 0\n")
        daemon.signal(signal.SIGHUP)
        _until(listener, "READY=1")
        refused = daemon.wait_event("config.reload")
        assert refused["applied"] is False
        assert sorted(refused["reason"].split("; ")) == [
            f"limits.message_burst: Input should be greater than 0 (in {config})",
            f"limits.messages_per_second: Input should be greater than 0 (in {config})",
        ]
        assert _reloads(admin) == (1, 1, 0)  # what an alert on a failed reload reads

        daemon.signal(signal.SIGTERM)
        stopping = _until(listener, "STOPPING=1")[-1]
        assert "STATUS=draining connections" in stopping.splitlines()
        assert daemon.wait_exit() == 0
    finally:
        daemon.close()


def _reloads(admin: str) -> tuple[float, float, float]:
    """From ``/metrics`` at ``admin``: reloads applied, refused, and whether the last was ok."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=WAIT_TIMEOUT_S) as answer:
        text = answer.read().decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return (
        samples[("relayd_config_reloads_total", (("result", "applied"),))],
        samples[("relayd_config_reloads_total", (("result", "refused"),))],
        samples[("relayd_config_last_reload_successful", ())],
    )


def test_a_reload_reaches_a_connected_client(tmp_path: Path) -> None:
    config = tmp_path / "relayd.toml"
    config.write_text("[limits]\nmessages_per_second = 1.0\nmessage_burst = 1\n")
    daemon = Daemon([*MODULE, "--config", str(config), "--port", "0", "--host", "127.0.0.1"])
    try:
        port = daemon.wait_event("server.ready")["port"]
        client = RawClient(port, v1=True)
        client.send_json({"to": client.id, "message": 1, "ref": 1})
        assert json.loads(client.recv_text())["type"] == "message"
        assert json.loads(client.recv_text()) == {"type": "ack", "ref": 1}
        client.send_json({"to": client.id, "message": 2, "ref": 2})
        assert json.loads(client.recv_text())["error"] == "rate_limited"
        config.write_text("[limits]\nmessages_per_second = 1.0\nmessage_burst = 10\n")
        daemon.signal(signal.SIGHUP)
        assert daemon.wait_event("config.reload")["applied"] is True
        client.send_json({"to": client.id, "message": 3, "ref": 3})
        assert json.loads(client.recv_text())["type"] == "message"  # the same connection
        client.close()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    finally:
        daemon.close()


def test_an_admin_port_in_use_exits_1_with_one_line_not_a_traceback(tmp_path: Path) -> None:
    # systemd restarts relayd on status 1 (the port may come free); what the operator
    # reads in `systemctl status` must say which port, as for the public one.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "relayd.toml"
        config.write_text(f'[admin]\nhost = "127.0.0.1"\nport = {port}\n')
        result = run([*MODULE, "--config", str(config), "--host", "127.0.0.1", "--port", "0"])
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"relayd: cannot listen on 127.0.0.1:{port} (the admin listener): "
        "[Errno 98] Address already in use; set admin.port (--admin-port) or admin.host "
        "(--admin-host) to a free address, or admin.enabled = false"
    ]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["event"] == "error"
    assert events[-1]["summary"] == result.stderr.strip().removeprefix("relayd: ")


# -- socket activation ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_socket_activation_serves_the_socket_it_is_handed(tmp_path: Path) -> None:
    activate = str(require_tool("systemd-socket-activate"))
    config = tmp_path / "relayd.toml"
    # The public port comes from the socket. systemd-socket-activate passes relayd only
    # PATH, TERM, USER and HOME, not Daemon's RELAYD_ADMIN__PORT=0: the admin port is set
    # here, never the fixed 9031 (another relayd may hold it).
    config.write_text("[admin]\nport = 0\n")
    port = _free_port()
    daemon = Daemon(
        [activate, "-l", f"127.0.0.1:{port}", "--fdname=relayd", *MODULE, "--config", str(config)]
    )
    try:
        daemon.wait_stderr(f"Listening on 127.0.0.1:{port}")
        # systemd-socket-activate starts relayd on the first connection, as
        # systemd does; that connection is served, not refused.
        client = RawClient(port)
        assert len(client.id) == 22
        ready = daemon.wait_event("server.ready")
        assert ready["listeners"] == [f"127.0.0.1:{port}"]
        start = next(e for e in daemon.events if e["event"] == "server.start")
        assert start["sockets"] == "inherited"
        client.close()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    finally:
        daemon.close()


def test_a_datagram_socket_from_systemd_is_refused_in_one_line(tmp_path: Path) -> None:
    # ListenDatagram= instead of ListenStream= in relayd.socket: relayd serves TCP only,
    # and says so at once (exit 1, which systemd counts toward its start limit).
    activate = str(require_tool("systemd-socket-activate"))
    config = tmp_path / "relayd.toml"
    config.write_text("[admin]\nport = 0\n")
    port = _free_port()
    datagram = [activate, "-d", "-l", f"127.0.0.1:{port}", "--fdname=relayd"]
    daemon = Daemon([*datagram, *MODULE, "--config", str(config)])
    try:
        daemon.wait_stderr(f"Listening on 127.0.0.1:{port}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wake:
            wake.sendto(b"start", ("127.0.0.1", port))  # a datagram starts relayd
        line = daemon.wait_stderr("relayd: cannot use the sockets systemd passed")
        assert daemon.wait_exit() == 1
    finally:
        daemon.close()
    assert line.strip() == (
        "relayd: cannot use the sockets systemd passed: "
        "descriptor 3 is not a listening TCP socket (SOCK_DGRAM)"
    )


# -- credentials at reload ------------------------------------------------------------


def _handshake_status(port: int, token: str) -> bytes:
    """The status line relayd answers a handshake carrying ``token`` with."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_TIMEOUT_S) as sock:
        sock.sendall(wire.upgrade_request(extra=[("Authorization", f"Bearer {token}")]))
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(4096)
            assert chunk, reply
            reply += chunk
        return reply.split(b"\r\n", 1)[0]


def test_a_reload_with_a_key_of_the_wrong_kind_is_refused_and_the_old_key_kept(
    tmp_path: Path,
) -> None:
    issuer = rsa_key()
    key_file = tmp_path / "issuer.pem"
    key_file.write_text(pem_public(issuer))
    config = tmp_path / "relayd.toml"
    config.write_text(
        f'[auth]\nmode = "jwt"\njwt_algorithm = "RS256"\njwt_public_key_file = "{key_file}"\n'
    )
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, issuer, "RS256")
    daemon = Daemon([*MODULE, "--config", str(config), "--port", "0", "--host", "127.0.0.1"])
    try:
        port = daemon.wait_event("server.ready")["port"]
        assert _handshake_status(port, token) == b"HTTP/1.1 101 Switching Protocols"
        # An EC key where the RSA key was (a wrong file copied in): refused, old key kept.
        other = ec_key()
        key_file.write_text(pem_public(other))
        daemon.signal(signal.SIGHUP)
        refused = daemon.wait_event("config.reload")
        assert refused["applied"] is False
        assert "auth.jwt_public_key_file" in refused["reason"]
        assert "RS256 needs an RSA public key" in refused["reason"]
        assert _handshake_status(port, token) == b"HTTP/1.1 101 Switching Protocols"
        forged = jwt.encode({"sub": "eve", "exp": int(time.time()) + 600}, other, "ES256")
        assert _handshake_status(port, forged) == b"HTTP/1.1 401 Unauthorized"
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    finally:
        daemon.close()
    assert [e for e in daemon.events if e["event"] == "error"] == []


@pytest.mark.parametrize(
    ("broken", "key"),
    [
        ("a certificate renewed without its key", "tls.cert_file"),
        ("a key file that is not a key", "key.pem"),  # load_cert_chain names both files
        ("an API key too short", "admin.api_key_file"),
    ],
)
def test_a_reload_refuses_a_file_the_next_start_could_not_use(
    broken: str, key: str, tmp_path: Path
) -> None:
    # Files only a restart applies were not read on reload: it said "applied" (and
    # relayd_config_last_reload_successful stayed 1), then the next start failed with
    # 78, which the units do not restart (found by a tester).
    ca = trustme.CA()
    cert, key_pem, api_key = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "api.key"
    issued = ca.issue_cert("127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key_pem))
    api_key.write_text("k" * 32 + "\n")
    config = tmp_path / "relayd.toml"
    config.write_text(
        f'[tls]\ncert_file = "{cert}"\nkey_file = "{key_pem}"\n'
        f'[admin]\nport = 0\napi_key_file = "{api_key}"\n'
    )
    daemon = Daemon([*MODULE, "--config", str(config), "--port", "0", "--host", "127.0.0.1"])
    try:
        admin = daemon.wait_event("server.ready")["admin"]
        if key == "tls.cert_file":
            ca.issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(str(cert))
        elif key == "key.pem":
            key_pem.write_text("not a key\n")
        else:
            api_key.write_text("short\n")
        daemon.signal(signal.SIGHUP)
        refused = daemon.wait_event("config.reload")
        assert refused["applied"] is False, broken
        assert key in refused["reason"]
        _status, text = _get(admin, "/metrics")
        assert "relayd_config_last_reload_successful 0.0" in text.decode()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    finally:
        daemon.close()
    checked = run([*MODULE, "check-config", "--config", str(config)])
    assert checked.returncode == 78  # what the next start would do


def test_a_new_certificate_or_api_key_at_the_same_path_is_reported_as_needing_a_restart(
    tmp_path: Path,
) -> None:
    # Renewed in place and reloaded, they were checked and then not named at all: the
    # reload said nothing changed while the old key and certificate stayed in use.
    ca = trustme.CA()
    cert, key_pem, api_key = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "api.key"
    issued = ca.issue_cert("127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key_pem))
    api_key.write_text("k" * 32 + "\n")
    config = tmp_path / "relayd.toml"
    config.write_text(
        f'[tls]\ncert_file = "{cert}"\nkey_file = "{key_pem}"\n'
        f'[admin]\nport = 0\napi_key_file = "{api_key}"\n'
    )
    daemon = Daemon([*MODULE, "--config", str(config), "--port", "0", "--host", "127.0.0.1"])
    try:
        daemon.wait_event("server.ready")
        daemon.signal(signal.SIGHUP)
        unchanged = daemon.wait_event("config.reload")
        assert (unchanged["changed"], unchanged["restart_required"]) == ([], [])
        renewed = ca.issue_cert("127.0.0.1")
        renewed.cert_chain_pems[0].write_to_path(str(cert))
        renewed.private_key_pem.write_to_path(str(key_pem))
        api_key.write_text("n" * 32 + "\n")
        daemon.signal(signal.SIGHUP)
        reloaded = daemon.wait_event("config.reload")
        assert reloaded["applied"] is True
        files = ["admin.api_key_file", "tls.cert_file", "tls.key_file"]
        assert (reloaded["changed"], reloaded["restart_required"]) == (files, files)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    finally:
        daemon.close()


@pytest.mark.parametrize(("mode", "changed"), [("token", ["auth.tokens_file"]), ("off", [])])
def test_a_reload_that_applies_a_new_tokens_file_says_so(
    tmp_path: Path, mode: str, changed: list[str]
) -> None:
    # An operator rotating a token in tokens_file read `"changed": []`: nothing told the
    # reload had read the new file (the reload after it said the same). With
    # auth.mode = "off" the file is not used, yet its change was reported as one.
    tokens = tmp_path / "tokens"
    tokens.write_text("alice " + "a" * 20 + "\n")
    config = tmp_path / "relayd.toml"
    config.write_text(f'[admin]\nport = 0\n[auth]\nmode = "{mode}"\ntokens_file = "{tokens}"\n')
    daemon = Daemon([*MODULE, "--config", str(config), "--port", "0", "--host", "127.0.0.1"])
    try:
        daemon.wait_event("server.ready")
        tokens.write_text("alice " + "b" * 20 + "\n")
        daemon.signal(signal.SIGHUP)
        rotated = daemon.wait_event("config.reload")
        assert (rotated["applied"], rotated["changed"], rotated["restart_required"]) == (
            True,
            changed,
            [],
        )
        daemon.signal(signal.SIGHUP)  # the file in force now: nothing new
        again = daemon.wait_event("config.reload")
        assert (again["changed"], again["restart_required"]) == ([], [])
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    finally:
        daemon.close()


def test_a_sighup_while_relayd_starts_is_a_reload_once_it_serves(tmp_path: Path) -> None:
    # SIGHUP's default action ends a process: relayd died of one sent while it was
    # importing and reading its config, before trio took its signals (found by a
    # tester with kill -HUP 0.05-0.4 s after the start), and systemd does not restart
    # a process a SIGHUP ended. The config is a named pipe here, so that relayd is
    # surely past its first imports and not yet serving when the signal comes; the
    # reload then refuses the pipe (it would wait for a writer, every client with it).
    fifo = tmp_path / "relayd.toml"
    os.mkfifo(fifo)
    config = b"[limits]\nmax_connections_per_ip = 7\n"
    daemon = Daemon([*MODULE, "--config", str(fifo), "--port", "0", "--host", "127.0.0.1"])
    try:
        with open(fifo, "wb") as pipe:  # returns once relayd opened it to read its config
            daemon.signal(signal.SIGHUP)
            pipe.write(config)
        daemon.wait_event("server.ready")
        reloaded = daemon.wait_event("config.reload")
        assert reloaded["applied"] is False
        assert "is a pipe, which relayd reads only at its start" in reloaded["reason"]
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    finally:
        daemon.close()


# -- out of file descriptors ------------------------------------------------------------

#: relayd's open-file limit in these tests: a few dozen public sockets after its own
#: descriptors and the ones it keeps back for everything else (RESERVED_DESCRIPTORS).
NOFILE: Final = 128


def _with_open_files(limit: int) -> list[str]:
    """``python -m relayd`` under a soft and hard ``RLIMIT_NOFILE`` of ``limit``."""
    start = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); "
        "os.execv(sys.executable, [sys.executable, '-m', 'relayd', *sys.argv[1:]])"
    )
    return [sys.executable, "-c", start]


def _daemon_with_open_files(tmp_path: Path, config_text: str) -> Daemon:
    """A relayd on loopback, port 0, with ``config_text`` and an open-file limit of NOFILE."""
    config = tmp_path / "relayd.toml"
    config.write_text(config_text)
    return Daemon(
        [*_with_open_files(NOFILE), "--config", str(config), "--port", "0", "--host", "127.0.0.1"]
    )


def _get(admin: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{admin}{path}", timeout=WAIT_TIMEOUT_S) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as refused:  # an answer all the same (503 not ready)
        with refused:
            return refused.code, refused.read()


def test_out_of_descriptors_the_admin_listener_still_answers_and_the_log_stays_short(
    tmp_path: Path,
) -> None:
    daemon = _daemon_with_open_files(
        tmp_path,
        "[limits]\nmax_handshakes_per_ip = 1000\nhandshake_timeout_s = 3600.0\n[admin]\nport = 0\n",
    )
    held: list[socket.socket] = []
    try:
        short = daemon.wait_event("server.descriptors")  # the limit is below the caps
        budget = short["budget"]
        assert (short["open_files_limit"], short["needed"]) == (NOFILE, 10000 + 1024)
        assert 0 < budget < NOFILE - RESERVED_DESCRIPTORS
        ready = daemon.wait_event("server.ready")
        port, admin = ready["port"], ready["admin"]
        # Three times the budget of silent connections: the rest wait in the backlog.
        for _ in range(3 * budget):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=WAIT_TIMEOUT_S))
        paused = daemon.wait_event("listener.paused")
        assert (paused["reason"], paused["open"], paused["budget"]) == (
            "open-file budget",
            budget,
            budget,
        )
        for _ in range(20):  # an operator's scraper and health checks go on
            assert _get(admin, "/healthz") == (200, b"ok\n")
            status, metrics = _get(admin, "/metrics")
            assert status == 200
            assert b"process_open_fds" in metrics
        # Not ready: a load balancer's new clients would wait in the backlog.
        assert _get(admin, "/readyz") == (
            503,
            b"not ready: every descriptor for clients is in use (open-file budget)\n",
        )
        for sock in held:
            sock.close()
        held.clear()
        # Freed: a client is served again.
        client = RawClient(port)
        assert len(client.id) == 22
        client.close()
        assert _get(admin, "/readyz") == (200, b"ready\n")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    finally:
        for sock in held:
            sock.close()
        daemon.close()
    names = [e["event"] for e in daemon.events]
    # Once when the budget filled, and once each time it filled again after the listener
    # accepted: while the held sockets close, the loop takes the backlog's closed clients,
    # which fill the budget until their handlers close them, as often as the machine's
    # timing has it (four times beside two CPU-bound processes). Never a line per retry:
    # within the line budget's burst.
    assert names.count("listener.paused") <= BURST
    left_out = [e for e in daemon.events if e["event"] == "log.suppressed"]
    assert [e for e in left_out if e["suppressed"] == "listener.paused"] == []
    assert "library.log" not in names
    assert "error" not in names


def _descriptors(pid: int) -> list[int]:
    """The descriptors process ``pid`` has open, by number (``/proc/PID/fd``)."""
    return sorted(int(name) for name in os.listdir(f"/proc/{pid}/fd"))


def _stop(daemon: Daemon, clients: list[RawClient]) -> None:
    """Close the clients, then SIGTERM: relayd exits 0 without a drain to wait for."""
    for client in clients:
        client.close()
    clients.clear()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0


def test_silent_admin_connections_do_not_take_the_descriptors_kept_back(tmp_path: Path) -> None:
    """Twice RESERVED_DESCRIPTORS silent admin connections: the reserve is not taken.

    Clients hold all but one public socket of the budget, so what is left of the
    descriptor table is about the reserve. Silent admin connections, twice as many:
    relayd serves MAX_CONNECTIONS of them at once and leaves the rest in the listen
    backlog, so it holds at most that many descriptors more, a new public client
    still gets the last socket of the budget and is served, and no accept fails.
    The admin connections served are answered 408 and closed; once they are gone,
    ``/healthz`` answers.
    """
    daemon = _daemon_with_open_files(tmp_path, "[admin]\nport = 0\n")
    pid = daemon.proc.pid  # python -c execs python -m relayd in place: the same process
    clients: list[RawClient] = []
    admins: list[socket.socket] = []
    try:
        budget = daemon.wait_event("server.descriptors")["budget"]
        ready = daemon.wait_event("server.ready")
        port, admin = ready["port"], ready["admin"]
        admin_host, admin_port = admin.rsplit(":", 1)
        clients += [RawClient(port) for _ in range(budget - 1)]  # each one accepted and served
        # At most the admin connections served at once and the late public client more.
        most = len(_descriptors(pid)) + MAX_CONNECTIONS + 1
        assert most < NOFILE  # what the old admin listener, which took all it could, exceeded
        for _ in range(2 * RESERVED_DESCRIPTORS):  # more than relayd keeps back
            admins.append(
                socket.create_connection((admin_host, int(admin_port)), timeout=WAIT_TIMEOUT_S)
            )
        late = socket.create_connection(("127.0.0.1", port), timeout=WAIT_TIMEOUT_S)
        admins.append(late)  # closed with them
        late.sendall(wire.upgrade_request())
        assert late.recv(12) == b"HTTP/1.1 101"  # the descriptors kept back were there
        assert len(_descriptors(pid)) <= most
        # The first ones were served: 408 once REQUEST_TIMEOUT_S is over, then closed;
        # by then the admin listener had had seconds to take more than it may.
        admins[0].settimeout(REQUEST_TIMEOUT_S + ANSWER_TIMEOUT_S + WAIT_TIMEOUT_S)
        assert admins[0].recv(12) == b"HTTP/1.1 408"
        assert len(_descriptors(pid)) <= most
        for sock in admins:
            sock.close()
        admins.clear()
        assert _get(admin, "/healthz") == (200, b"ok\n")  # once they are gone
        _stop(daemon, clients)
    finally:
        for client in clients:
            client.close()
        for sock in admins:
            sock.close()
        daemon.close()
    names = [e["event"] for e in daemon.events]
    assert "library.log" not in names  # no accept failed: trio's loop logged each retry
    assert "error" not in names
    # The late client took the last socket of the budget; no accept failed for want of one.
    assert [e["reason"] for e in daemon.events if e["event"] == "listener.paused"] == [
        "open-file budget"
    ]


def test_emfile_is_retried_quietly_until_descriptors_are_back(tmp_path: Path) -> None:
    """The descriptor table really full (EMFILE) for both listeners: one line, then served.

    Clients hold all but one public socket of the budget; then the running
    relayd's open-file limit is lowered (``prlimit``) to the descriptors it has
    open, so the next accept fails with EMFILE. A new public client and an admin
    request arrive: the public listener says so in one ``listener.paused`` line
    and retries without a line, the admin listener retries without any. Once the
    limit is back, both are served.
    """
    daemon = _daemon_with_open_files(tmp_path, "[admin]\nport = 0\n")
    pid = daemon.proc.pid  # python -c execs python -m relayd in place: the same process
    clients: list[RawClient] = []
    try:
        budget = daemon.wait_event("server.descriptors")["budget"]
        ready = daemon.wait_event("server.ready")
        port, admin = ready["port"], ready["admin"]
        admin_host, admin_port = admin.rsplit(":", 1)
        clients += [RawClient(port) for _ in range(budget - 1)]  # each one accepted and served
        table = _descriptors(pid)
        # No gap a new descriptor could take under the lowered limit: the next one is EMFILE.
        assert table == list(range(len(table)))
        # The soft limit, which accept() is held to; the hard one stays (raising a hard
        # limit back would take CAP_SYS_RESOURCE).
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(table), NOFILE))
        with (
            socket.create_connection(
                (admin_host, int(admin_port)), timeout=WAIT_TIMEOUT_S
            ) as health,
            socket.create_connection(("127.0.0.1", port), timeout=WAIT_TIMEOUT_S) as late,
        ):
            health.sendall(b"GET /healthz HTTP/1.1\r\nHost: relayd\r\n\r\n")
            late.sendall(wire.upgrade_request())
            assert daemon.wait_event("listener.paused")["reason"] == "accept failed: EMFILE"
            assert _descriptors(pid) == table  # neither accepted
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
            assert late.recv(12) == b"HTTP/1.1 101"  # served once descriptors are back
            assert health.recv(15) == b"HTTP/1.1 200 OK"
        assert _get(admin, "/healthz") == (200, b"ok\n")
        _stop(daemon, clients)
    finally:
        for client in clients:
            client.close()
        daemon.close()
    names = [e["event"] for e in daemon.events]
    # Retried every 0.1 s by both listeners, and not one line for a retry.
    assert "library.log" not in names
    assert "log.suppressed" not in names
    assert "error" not in names
    # Once per reason, not per retry: EMFILE, then the budget once the late one was in.
    assert [e["reason"] for e in daemon.events if e["event"] == "listener.paused"] == [
        "accept failed: EMFILE",
        "open-file budget",
    ]


# -- a reload never weakens security by accident ----------------------------------------------

TOKENS_CONFIG: Final = """\
[server]
allowed_origins = ["https://chat.example"]
[auth]
mode = "token"
tokens = { alice = "alice-secret-token-0123" }
"""


def test_an_emptied_config_is_refused_and_an_explicit_weakening_applied_with_a_warning(
    tmp_path: Path,
) -> None:
    config = tmp_path / "relayd.toml"
    config.write_text(TOKENS_CONFIG)
    daemon = Daemon([*MODULE, "--config", str(config), "--port", "0", "--host", "127.0.0.1"])
    try:
        port = daemon.wait_event("server.ready")["port"]
        assert _handshake_status(port, "") == b"HTTP/1.1 401 Unauthorized"
        # A partial write: the file is empty when relayd reads it.
        config.write_text("")
        daemon.signal(signal.SIGHUP)
        refused = daemon.wait_event("config.reload")
        assert (refused["level"], refused["applied"]) == ("error", False)
        assert refused["reason"].startswith(
            "auth.mode: authentication turned off, but no source sets auth.mode"
        )
        assert "server.allowed_origins: every origin allowed" in refused["reason"]
        assert _handshake_status(port, "") == b"HTTP/1.1 401 Unauthorized"  # still on
        # Stated on purpose: applied, and said at warning level.
        config.write_text('[auth]\nmode = "off"\n[server]\nallowed_origins = []\n')
        daemon.signal(signal.SIGHUP)
        applied = daemon.wait_event("config.reload")
        assert (applied["level"], applied["applied"]) == ("warning", True)
        assert applied["weakened"] == [
            "auth.mode: authentication turned off",
            "server.allowed_origins: every origin allowed (the list emptied)",
        ]
        assert _handshake_status(port, "") == b"HTTP/1.1 101 Switching Protocols"
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    finally:
        daemon.close()
