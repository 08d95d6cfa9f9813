"""How the kernel splits new clients over relayd processes serving one port.

Two ways to share a port, as ``install.sh --nodes`` did before and does now:

* ``shared`` (the default): one listening socket, made here and handed to every relayd
  as systemd's relayd.socket hands it (``LISTEN_FDS``). A connection goes to whichever
  process accepts it first.
* ``--reuse-port``: each relayd binds the port itself with ``server.reuse_port``
  (``SO_REUSEPORT``): the kernel picks a process by a hash of the client's address and
  port.

Clients connect one after another, as chat users arrive: each is counted by the process
that took it (``relayd_connections_open`` on that process's admin port) before the next
connects, and stays open until the run ends. Prints one line per run (the clients each
process took, and the order) and exits; every relayd it started is stopped.

Usage::

    .venv/bin/python bench/accept_split.py --processes 2 --clients 100 --runs 4
    .venv/bin/python bench/accept_split.py --processes 2 --clients 100 --runs 4 --reuse-port

relayd's default configuration, message lines off, loopback only; a run of 100 clients
takes about a second.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Final

from upgrade import upgrade_request

#: Seconds a relayd may take to answer its admin port after it starts, and a client to
#: be welcomed: past them the run fails rather than waits.
START_TIMEOUT_S: Final = 20.0
ANSWER_TIMEOUT_S: Final = 5.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _relayd_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RELAYD_")}
    env.pop("LISTEN_FDS", None)
    env["RELAYD_LOG__MESSAGES"] = "off"
    return env


@contextmanager
def _relayd(
    config: Path, port: int, admin: int, shared: socket.socket | None
) -> Iterator[subprocess.Popen[bytes]]:
    """A relayd on ``port`` (``shared``'s socket, else its own with reuse_port); stopped after."""
    argv = [sys.executable, "-m", "relayd", "--config", str(config), "--log-level", "warning"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin), "serve"]
    env = _relayd_env()
    pass_fds: tuple[int, ...] = ()
    if shared is None:
        env["RELAYD_SERVER__REUSE_PORT"] = "true"
    else:
        # sd_listen_fds(3): descriptor 3, and LISTEN_PID set to the child's own pid by a
        # shell that execs relayd (its pid is the shell's).
        os.set_inheritable(shared.fileno(), True)
        pass_fds = (shared.fileno(),)
        env |= {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "relayd", "SHARED_FD": str(shared.fileno())}
        argv = ["/bin/sh", "-c", 'exec 3<&"$SHARED_FD"; LISTEN_PID=$$ exec "$@"', "sh", *argv]
    process = subprocess.Popen(argv, env=env, pass_fds=pass_fds, stdin=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(timeout=START_TIMEOUT_S)


def _open(admin: int, *, timeout: float) -> float:
    """``relayd_connections_open`` on the admin port ``admin``."""
    url = f"http://127.0.0.1:{admin}/metrics"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("relayd_connections_open "):
                return float(line.split()[1])
    raise RuntimeError(f"no relayd_connections_open at {url}")


def _ready(admin: int) -> None:
    """Wait until relayd answers on its admin port, within START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            _open(admin, timeout=ANSWER_TIMEOUT_S)
        except OSError:  # refused until its admin listener is up
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        else:
            return


def _welcomed(port: int) -> socket.socket:
    """A client whose handshake relayd answered with 101; left open."""
    client = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT_S)
    client.sendall(upgrade_request("127.0.0.1", port))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = client.recv(4096)
        if not chunk:
            raise RuntimeError("relayd closed the connection before its 101")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101 "):
        raise RuntimeError(f"not a 101: {head.splitlines()[0]!r}")
    return client


def one_run(processes: int, clients: int, *, reuse_port: bool) -> list[int]:
    """Which process took each client, in order."""
    port = _free_port()
    admins = [_free_port() for _ in range(processes)]
    order: list[int] = []
    with tempfile.TemporaryDirectory() as directory, ExitStack() as stack:
        config = Path(directory) / "relayd.toml"
        config.write_text("# built-in defaults\n", encoding="utf-8")
        shared = None
        if not reuse_port:
            shared = stack.enter_context(socket.socket())
            shared.bind(("127.0.0.1", port))
            shared.listen(4096)
        for admin in admins:
            stack.enter_context(_relayd(config, port, admin, shared))
        for admin in admins:
            _ready(admin)
        held = [_open(admin, timeout=ANSWER_TIMEOUT_S) for admin in admins]
        for _ in range(clients):
            stack.enter_context(_welcomed(port))
            now = [_open(admin, timeout=ANSWER_TIMEOUT_S) for admin in admins]
            [took] = [i for i in range(processes) if now[i] == held[i] + 1]
            order.append(took)
            held = now
    return order


def main(argv: Sequence[str] | None = None) -> None:
    """Run the runs; print each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--reuse-port", action="store_true")
    args = parser.parse_args(argv)
    way = "reuse_port" if args.reuse_port else "one shared socket"
    print(f"{args.processes} relayd processes, {way}, {args.clients} clients one at a time")
    for run in range(1, args.runs + 1):
        order = one_run(args.processes, args.clients, reuse_port=args.reuse_port)
        split = "/".join(str(order.count(i)) for i in range(args.processes))
        print(f"run {run}: {split}  order {''.join(map(str, order))}")


if __name__ == "__main__":
    main()
