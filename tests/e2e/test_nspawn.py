"""relayd installed and run by a real systemd, as PID 1 of a ``systemd-nspawn`` container.

The module boots one throwaway Debian container and, inside it, installs relayd with the
documented command (``systemd/install.sh``), then drives it from the host the way an
operator and their users would: clients connect over loopback (the container shares the
host's network namespace), ``systemctl`` and ``journalctl`` run inside the container
through ``nsenter``, and the checks are what a person would see: close codes, frames,
journal lines, unit states.

* install: both units enabled and active, the config ``root:relayd 0640``, ``/readyz``,
  ``relayd chat`` against the fresh install, and ``systemd-analyze security`` on the
  running unit; an upgrade (install.sh again) keeps the operator's config and the port.
* relay: two host clients exchange a message; ``connection.open``, ``message.relay`` and
  ``connection.close`` appear in ``journalctl -u relayd -o cat``; ``systemctl status``
  shows the live count.
* reload: ``systemctl reload`` with a smaller ``max_message_bytes`` reaches a connected
  client without dropping it (``config.reload``); a bad file is refused and the last good
  settings stay.
* JWTs signed with RS256 and ES256 are checked with the issuer's public key under the
  unit's hardening (``MemoryDenyWriteExecute=yes``, the system call filter): a client
  with a good token gets its subject as its id, a forged one 401, and relayd is never
  killed or restarted.
* a bad config at start exits 78 and is not restarted.
* watchdog: relayd's event-loop thread is blocked from outside with gdb; systemd's
  watchdog kills it and ``Restart=`` brings up a new process, which serves the client
  that connected while it was down (the socket kept the port).
* stop: connected clients get close code 1001 and relayd exits 0; the socket then starts
  relayd again for the next client (socket activation).

What differs from a production install, and why:

* The container's root is a cached ``debootstrap --variant=minbase`` of Debian bookworm
  (:data:`PACKAGES`), copied afresh for each run. Its mirror is read from this machine's
  apt sources at run time.
* relayd's dependencies come from wheels that the host downloads with its own pip
  configuration (:func:`relayd_wheels`), bind-mounted at ``/wheels``; install.sh runs with
  ``PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels``, so the container needs no package index.
* Drop-ins written before the install (``systemctl edit`` would write the same files)
  move the public socket to a free port on 127.0.0.1 (the default, 9030 on every
  interface, would be the host's port too) and the admin listener to another, and
  shorten ``WatchdogSec`` to :data:`WATCHDOG_SEC` so that the hang test finishes in
  seconds. Every test runs under that watchdog, so a relayd that pinged late would be
  restarted and caught by the ``NRestarts`` checks.

Needs root and ``systemd-nspawn``, ``debootstrap``, ``nsenter`` and ``gdb``; a missing one
skips, or fails under ``CI=true`` (:func:`tests.e2e.harness.require_tool`). The rootfs and
the wheels are cached in ``.cache/nspawn`` (ignored by git; delete it to rebuild). Nothing
here sleeps to wait: journal lines are read as they arrive, the container's boot is
reported on a notify socket, and the one poll (the status text, for which systemd has no
event) has a deadline. Only processes started here are ever signalled, by their PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt
import pytest
import websockets

from tests.keys import ec_key, pem_public, rsa_key

from .harness import REPO_ROOT, Event, require, require_tool
from .wsclient import client, recv_json, recv_text, run, seed_id, send_json, v1_id

pytestmark = pytest.mark.e2e

# -- the recipe ------------------------------------------------------------------------

#: The Debian release in the container: the oldest that README and install.sh support.
SUITE: Final = "bookworm"
#: Packages debootstrap adds to minbase: systemd as init with D-Bus, and what install.sh
#: would otherwise apt-get (python3-venv; procps for the unit's /bin/kill). Installing
#: them here keeps the test off the Debian mirror after the first run.
PACKAGES: Final = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "procps",
    # install.sh --nodes: the cluster's Redis (tests off the mirror after the first run).
    "redis-server",
)
#: Bump to rebuild every cached rootfs when the recipe changes in a way the key misses.
ROOTFS_RECIPE: Final = 1

CACHE_DIR: Final = REPO_ROOT / ".cache" / "nspawn"
#: Where the checkout and the wheels appear in the container (both read-only).
SRC: Final = "/src/relayd"
WHEELS: Final = "/wheels"
CONFIG: Final = "/etc/relayd/relayd.toml"
#: The container's host name (nothing registers it: --register=no); unique per test run,
#: as nspawn keeps a directory of that name under /run/systemd/nspawn while it runs.
MACHINE: Final = f"relayd-e2e-{os.getpid()}"
#: The environment of every command run in the container: nothing of the host's leaks in
#: (its pip settings least of all).
CONTAINER_ENV: Final = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "SYSTEMD_COLORS=0",
    "SYSTEMD_PAGER=",
)

#: The test's WatchdogSec (the unit's is 30 s): relayd pings every half of it.
WATCHDOG_SEC: Final = 3

#: Bounds, in seconds. First runs download: debootstrap (about 80 s here) and the wheels.
DEBOOTSTRAP_TIMEOUT_S: Final = 900.0
DOWNLOAD_TIMEOUT_S: Final = 300.0
COPY_TIMEOUT_S: Final = 300.0
#: Booting to multi-user.target takes under a second here.
BOOT_TIMEOUT_S: Final = 60.0
#: install.sh builds a venv and pip-installs relayd: about 15 s here.
INSTALL_TIMEOUT_S: Final = 300.0
#: systemctl, journalctl, stat...; a start or stop waits for READY=1 or the drain.
COMMAND_TIMEOUT_S: Final = 60.0
#: A restart of a relayd unit: its drain and its start, each bounded by the unit
#: (TimeoutStopSec=30s, TimeoutStartSec=30s), with room for a loaded machine.
RESTART_TIMEOUT_S: Final = 90.0
#: A log line that follows from something the test just did.
JOURNAL_TIMEOUT_S: Final = 30.0
#: gdb attaching and loading symbols, then WatchdogSec, then RestartSec and a start.
WATCHDOG_TIMEOUT_S: Final = 90.0
#: relayd refreshes STATUS= every 5 s (relayd.daemon.service.STATUS_INTERVAL_S).
STATUS_TIMEOUT_S: Final = 15.0
#: Poweroff of the container, relayd's drain included.
POWEROFF_TIMEOUT_S: Final = 60.0


# -- the apt mirror --------------------------------------------------------------------

_ONE_LINE: Final = re.compile(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s*(.*)$")


def _sources(apt_dir: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """Every enabled ``deb`` entry as (URI, suites, components), in apt's reading order."""
    lists = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            match = _ONE_LINE.match(line.split("#", 1)[0].strip())
            if match:
                uri, suite, components = match.groups()
                yield uri, [suite], components.split()
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            key = ""
            for line in stanza.splitlines():
                if line.startswith("#") or not line.strip():
                    continue
                if line[0] in " \t" and key:  # a continuation line
                    fields[key] += " " + line.strip()
                    continue
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() in ("no", "false", "0"):
                continue
            for uri in fields.get("uris", "").split():
                yield uri, fields.get("suites", "").split(), fields.get("components", "").split()


def apt_mirror(apt_dir: Path = Path("/etc/apt")) -> str | None:
    """The first Debian archive this machine's apt uses, to debootstrap from; None if none.

    An archive is a ``deb`` entry with the ``main`` component and a release suite
    (``bookworm``, not ``bookworm-updates`` or ``bookworm-security``), served over http,
    https or from a file: URI.
    """
    for uri, suites, components in _sources(apt_dir):
        if not uri.startswith(("http://", "https://", "file:")):
            continue
        if "main" in components and any("-" not in s and "/" not in s for s in suites):
            return uri
    return None


def test_apt_mirror_reads_deb822_and_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "other.sources").write_text(
        "Types: deb-src\nURIs: http://192.0.2.9/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\n# a comment\nURIs: http://192.0.2.1/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nEnabled: no\nURIs: http://192.0.2.2/debian\nSuites: bookworm\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://192.0.2.3/debian\nSuites: bookworm\n  bookworm-updates\n"
        "Components: main contrib\n"
    )
    assert apt_mirror(tmp_path) == "http://192.0.2.3/debian"
    (tmp_path / "sources.list").write_text(
        "# deb http://192.0.2.4/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://192.0.2.5/debian bookworm contrib\n"
        "deb [arch=amd64] http://192.0.2.6/debian bookworm main non-free-firmware\n"
    )
    assert apt_mirror(tmp_path) == "http://192.0.2.6/debian"


def test_apt_mirror_is_none_without_a_debian_archive(tmp_path: Path) -> None:
    assert apt_mirror(tmp_path) is None
    (tmp_path / "sources.list").write_text("deb cdrom:[Debian 12]/ bookworm main\n")
    assert apt_mirror(tmp_path) is None


# -- cached inputs: the Debian root and relayd's wheels --------------------------------


def _cache_dir() -> Path:
    """:data:`CACHE_DIR`, created, with a ``.gitignore`` that hides ``.cache`` from git."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    ignore = CACHE_DIR.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# test caches (tests/e2e/test_nspawn.py); safe to delete\n*\n")
    return CACHE_DIR


@contextmanager
def _cache_lock() -> Iterator[None]:
    """Serialise cache builds between test runs on one machine."""
    with (_cache_dir() / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"({path} unreadable)"
    return "\n".join(text.splitlines()[-lines:])


def _run_host(
    argv: Sequence[str | Path], *, timeout: float, what: str, log: Path | None = None
) -> str:
    """Run a host command to completion; fail the test with its output if it fails."""
    try:
        if log is None:
            result = subprocess.run(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            output = result.stdout + result.stderr
        else:
            with log.open("w") as out:
                result = subprocess.run(
                    [str(a) for a in argv],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=timeout,
                    check=False,
                )
            output = _tail(log)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} took over {timeout}s: {argv}", pytrace=False)
    if result.returncode != 0:
        pytest.fail(f"{what} exited {result.returncode}: {argv}\n{output}", pytrace=False)
    return output


def debian_rootfs(mirror: str) -> Path:
    """A pristine minbase Debian root with :data:`PACKAGES`, built once and cached.

    Keyed on the recipe, not on the mirror: any Debian mirror gives the same release. Built
    under a temporary name and renamed when complete, so an interrupted build is never
    used.
    """
    arch = _run_host(["dpkg", "--print-architecture"], timeout=30, what="dpkg").strip()
    key = _key(ROOTFS_RECIPE, SUITE, "minbase", PACKAGES, arch)
    rootfs = _cache_dir() / f"rootfs-{SUITE}-{arch}-{key}"
    with _cache_lock():
        if rootfs.is_dir():
            return rootfs
        partial = rootfs.with_name(rootfs.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        debootstrap = require_tool("debootstrap")
        _run_host(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                f"--arch={arch}",
                SUITE,
                partial,
                mirror,
            ],
            timeout=DEBOOTSTRAP_TIMEOUT_S,
            what=f"debootstrap from {mirror}",
            log=_cache_dir() / "debootstrap.log",
        )
        partial.rename(rootfs)
    return rootfs


def _requirements() -> list[str]:
    """The dependencies of relayd and its build backend, from pyproject.toml."""
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        pyproject = tomllib.load(f)
    return [
        *pyproject["project"]["dependencies"],
        *pyproject["project"]["optional-dependencies"]["cluster"],  # install.sh installs it
        *pyproject["build-system"]["requires"],
    ]


def _platforms(glibc: tuple[int, int], arch: str) -> list[str]:
    """The pip ``--platform`` tags a glibc of this version runs: every manylinux up to it.

    pip does not widen one ``--platform`` to older glibc versions by itself.
    """
    major, minor = glibc
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 4, -1)]
    return [*tags, f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]


def relayd_wheels(root: Path) -> Path:
    """Wheels of relayd's dependencies for the Python in ``root``, cached by their inputs.

    Downloaded by this interpreter's pip with the host's pip configuration (its index and
    find-links), for the container's Python version, glibc and architecture, binary only,
    so that nothing needs building or an index inside the container.
    """
    probe = _run_host(
        [
            "chroot",
            root,
            "/usr/bin/python3",
            "-I",
            "-B",
            "-c",
            "import platform, sys; "
            "print(*sys.version_info[:2], *platform.libc_ver()[1].split('.')[:2], "
            "platform.machine())",
        ],
        timeout=60,
        what="the container's python3",
    )
    py_major, py_minor, libc_major, libc_minor, arch = probe.split()
    python = f"{py_major}.{py_minor}"
    glibc = (int(libc_major), int(libc_minor))
    requirements = _requirements()
    wheels = _cache_dir() / f"wheels-{_key(requirements, python, glibc, arch)}"
    with _cache_lock():
        if wheels.is_dir():
            return wheels
        partial = wheels.with_name(wheels.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        platforms = [arg for tag in _platforms(glibc, arch) for arg in ("--platform", tag)]
        _run_host(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--dest",
                partial,
                "--only-binary=:all:",
                "--implementation",
                "cp",
                "--python-version",
                python,
                *platforms,
                *requirements,
            ],
            timeout=DOWNLOAD_TIMEOUT_S,
            what="pip download of relayd's dependencies",
        )
        partial.rename(wheels)
    return wheels


# -- the journal, followed -------------------------------------------------------------


class Journal:
    """``journalctl -u relayd -o cat -f`` in the container, each line read as it arrives.

    relayd's own lines are JSON events; systemd's lines about the unit ("Watchdog
    timeout", "Scheduled restart job") and relayd's stderr are plain text. Waits block on
    a condition the reader thread signals. A *mark* (:meth:`mark`) is a line count, so a
    wait can ignore what came before the action it is about.
    """

    def __init__(self, leader: int, unit: str = "relayd.service") -> None:
        # Every namespace, the PID one included: journalctl -f watches the journal through
        # /proc/self/fd, which in the container's /proc exists only for its own processes.
        # nsenter then forks journalctl and waits for it (see close()).
        argv = [
            str(require_tool("nsenter")),
            "-t",
            str(leader),
            "-a",
            "--",
            "/usr/bin/env",
            "-i",
            *CONTAINER_ENV,
            "journalctl",
            "-u",
            unit,
            "-o",
            "cat",
            "-f",
            "-n",
            "all",
        ]
        self._cond = threading.Condition()
        self._lines: list[str] = []
        self._closed = False
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, name="journal", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._cond:
                self._lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def mark(self) -> int:
        """How many lines have arrived so far."""
        with self._cond:
            return len(self._lines)

    def lines(self, after: int = 0) -> list[str]:
        """The lines that arrived after ``after``."""
        with self._cond:
            return self._lines[after:]

    def events(self, after: int = 0) -> list[Event]:
        """The JSON events of relayd among the lines after ``after``."""
        return [e for e in map(_event, self.lines(after)) if e is not None]

    def tail(self, lines: int = 40) -> str:
        """The last lines, for failure messages."""
        return "\n".join(self.lines()[-lines:])

    def wait_line(
        self,
        predicate: Callable[[str], bool],
        *,
        after: int,
        what: str,
        timeout: float = JOURNAL_TIMEOUT_S,
    ) -> int:
        """Block until a line after ``after`` matches; return its index."""

        def found() -> int | None:
            return next(
                (i for i in range(after, len(self._lines)) if predicate(self._lines[i])), None
            )

        with self._cond:
            self._cond.wait_for(lambda: found() is not None or self._closed, timeout)
            index = found()
        if index is None:
            pytest.fail(
                f"no journal line with {what} within {timeout}s\n--- journal ---\n{self.tail()}",
                pytrace=False,
            )
        return index

    def wait_event(
        self, name: str, *, after: int, timeout: float = JOURNAL_TIMEOUT_S, **fields: Any
    ) -> Event:
        """Block until relayd logs event ``name`` with ``fields`` after ``after``."""

        def matches(line: str) -> bool:
            event = _event(line)
            return (
                event is not None
                and event.get("event") == name
                and all(event.get(k) == v for k, v in fields.items())
            )

        index = self.wait_line(
            matches, after=after, what=f"event {name} {fields or ''}", timeout=timeout
        )
        event = _event(self.lines()[index])
        assert event is not None
        return event

    def close(self) -> None:
        """Stop journalctl and nsenter, by their PIDs, and the reader.

        nsenter does not pass signals on to the journalctl it forked, so journalctl (the
        only child of our nsenter) is stopped first; nsenter then exits with it.
        """
        if self._proc.poll() is None:
            children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
            with contextlib.suppress(OSError):
                for pid in children.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGTERM)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._reader.join(timeout=10)
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def _event(line: str) -> Event | None:
    if not line.startswith("{"):
        return None
    try:
        parsed: Any = json.loads(line)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


# -- the container ---------------------------------------------------------------------


@dataclass
class Container:
    """A booted container: its root on the host, and its PID 1 as the host sees it."""

    root: Path
    leader: int
    console: Path

    def run(
        self,
        *argv: str,
        timeout: float = COMMAND_TIMEOUT_S,
        check: bool = True,
        input: str | None = None,
        env: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside, in every namespace of the container, with a clean env."""
        nsenter = str(require_tool("nsenter"))
        command = [
            nsenter,
            "-t",
            str(self.leader),
            "-a",
            "--",
            "/usr/bin/env",
            "-i",
            *CONTAINER_ENV,
            *env,
            *argv,
        ]
        try:
            result = subprocess.run(
                command,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"{argv} took over {timeout}s\n{exc.stdout!r}\n{exc.stderr!r}")
        if check and result.returncode != 0:
            pytest.fail(
                f"{argv} exited {result.returncode}\n{result.stdout}\n{result.stderr}",
                pytrace=False,
            )
        return result

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``systemctl ARGS`` inside."""
        return self.run("systemctl", *args, check=check)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show`` of ``properties`` of ``unit``."""
        out = self.systemctl("show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def path(self, path: str) -> Path:
        """Where a path of the container is on the host."""
        return self.root / path.lstrip("/")

    def host_pid(self, pid: int) -> int:
        """The host's PID of the container's process ``pid`` (from /proc/*/status NSpid)."""
        namespace = os.readlink(f"/proc/{self.leader}/ns/pid")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns" / "pid") != namespace:
                    continue
                status = (entry / "status").read_text()
            except OSError:  # it exited meanwhile
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:") and line.split()[-1] == str(pid):
                    return int(line.split()[1])
        pytest.fail(f"no host process is the container's PID {pid}", pytrace=False)


def _wait_booted(notify: socket.socket, nspawn: subprocess.Popen[bytes], console: Path) -> int:
    """Read nspawn's notifications until READY=1; return the container's PID 1.

    nspawn reports ``X_NSPAWN_LEADER_PID`` when the container runs and, with
    ``--notify-ready=yes``, ``READY=1`` once the container's systemd has finished
    booting. A pidfd of nspawn wakes the wait if it exits first.
    """
    leader: int | None = None
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    pidfd = os.pidfd_open(nspawn.pid)
    try:
        while True:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([notify.fileno(), pidfd], [], [], max(remaining, 0))
            if not readable:
                pytest.fail(
                    f"the container did not boot within {BOOT_TIMEOUT_S}s\n{_tail(console)}",
                    pytrace=False,
                )
            if notify.fileno() not in readable:
                pytest.fail(
                    f"systemd-nspawn exited {nspawn.wait()} while booting\n{_tail(console)}",
                    pytrace=False,
                )
            lines = notify.recv(4096).decode(errors="replace").splitlines()
            for line in lines:
                if line.startswith("X_NSPAWN_LEADER_PID="):
                    leader = int(line.partition("=")[2])
            if "READY=1" in lines:
                assert leader is not None, "nspawn said READY=1 without X_NSPAWN_LEADER_PID"
                return leader
    finally:
        os.close(pidfd)


def _stop(container: Container | None, nspawn: subprocess.Popen[bytes]) -> None:
    """Power the container off; failing that, end nspawn and the container by their PIDs."""
    if container is not None and nspawn.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                ["nsenter", "-t", str(container.leader), "-a", "systemctl", "poweroff"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
            )
    with contextlib.suppress(subprocess.TimeoutExpired):
        nspawn.wait(timeout=POWEROFF_TIMEOUT_S)
        return
    nspawn.terminate()  # nspawn turns SIGTERM into a poweroff request of its own
    with contextlib.suppress(subprocess.TimeoutExpired):
        nspawn.wait(timeout=POWEROFF_TIMEOUT_S)
        return
    if container is not None:  # the container's PID 1: killing it ends the container
        with contextlib.suppress(ProcessLookupError):
            os.kill(container.leader, signal.SIGKILL)
    nspawn.kill()
    nspawn.wait(timeout=POWEROFF_TIMEOUT_S)


@contextmanager
def booted(root: Path, binds: Sequence[tuple[Path, str]], workdir: Path) -> Iterator[Container]:
    """Boot ``root`` with systemd as PID 1; power it off on exit.

    ``--register=no --keep-unit``: no machined or host systemd is involved, so this runs
    wherever nspawn can create namespaces. No ``--private-network``: the host's loopback
    is the container's, which is how host clients reach relayd.
    """
    nspawn_bin = require_tool("systemd-nspawn")
    console = workdir / "console.log"
    notify_path = workdir / "notify"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC"}
    }
    env["NOTIFY_SOCKET"] = str(notify_path)
    argv = [
        str(nspawn_bin),
        f"--directory={root}",
        f"--machine={MACHINE}",
        "--boot",
        "--register=no",
        "--keep-unit",
        "--notify-ready=yes",
        *(f"--bind-ro={host}:{inside}" for host, inside in binds),
    ]
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
        console.open("wb") as console_out,
    ):
        notify.bind(str(notify_path))
        nspawn = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=console_out, stderr=subprocess.STDOUT, env=env
        )
        container: Container | None = None
        try:
            container = Container(root, _wait_booted(notify, nspawn, console), console)
            yield container
        finally:
            _stop(container, nspawn)


# -- relayd in the container ------------------------------------------------------------


@dataclass
class Installed:
    """relayd installed by install.sh in a booted container."""

    box: Container
    journal: Journal
    port: int
    admin_port: int
    install: subprocess.CompletedProcess[str]
    config: str  # /etc/relayd/relayd.toml as installed
    redis_port: int  # the container's redis-server, kept off 6379 (the host's network)

    @property
    def url(self) -> str:
        """The public WebSocket listener, as host clients reach it."""
        return f"ws://127.0.0.1:{self.port}/"

    def main_pid(self) -> int:
        """relayd.service's main process, as a PID of the container."""
        return int(self.box.show("relayd.service", "MainPID")["MainPID"])

    def restarts(self) -> int:
        """How often systemd has restarted relayd by itself."""
        return int(self.box.show("relayd.service", "NRestarts")["NRestarts"])

    def ensure_serving(self) -> None:
        """Start both units (a no-op when they run); returns once relayd sent READY=1."""
        self.box.systemctl("start", "relayd.socket", "relayd.service")

    def write_config(self, text: str) -> None:
        """Replace /etc/relayd/relayd.toml's content; its owner and mode stay."""
        self.box.path(CONFIG).write_text(text, encoding="utf-8")

    def nodes_config(self, host: str = "127.0.0.1") -> str:
        """The config as the nodes test writes it: the test's Redis, and the test's port.

        The nodes bind [server] host and port themselves (relayd.socket, where the single
        daemon's port is set, is not theirs): the free port the socket had, on ``host``
        (loopback, as the socket's).
        """
        replacements = {
            'broker_url = "redis://127.0.0.1:6379/0"': (
                f'broker_url = "redis://127.0.0.1:{self.redis_port}/0"'
            ),
            '\nhost = ""\n': f'\nhost = "{host}"\n',
            "\nport = 9030\n": f"\nport = {self.port}\n",
        }
        text = self.config
        for default, value in replacements.items():
            assert text.count(default) == 1, default
            text = text.replace(default, value)
        return text

    def admin(self, path: str) -> tuple[int, str]:
        """GET a path of the admin listener: (status, body)."""
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=COMMAND_TIMEOUT_S) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def describe(self) -> str:
        """The journal's tail, for failure messages."""
        return f"--- journalctl -u relayd -o cat (tail) ---\n{self.journal.tail()}"


def _free_port() -> int:
    """A TCP port free on the host's loopback now (the container shares it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive TCP ports free on the host's loopback now."""
    for _ in range(50):
        first = _free_port()
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + count):
                    probe = held.enter_context(socket.socket())
                    probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return first
    pytest.fail(f"no {count} consecutive free ports on 127.0.0.1", pytrace=False)


def _quiet_redis(container_root: Path, port: int) -> None:
    """Keep the container's Redis off at boot and off port 6379 (the network is the host's).

    The package enables redis-server.service; install.sh --nodes enables and starts it,
    on ``port``.
    """
    wants = container_root / "etc/systemd/system/multi-user.target.wants/redis-server.service"
    wants.unlink(missing_ok=True)
    conf = container_root / "etc/redis/redis.conf"
    text = re.sub(r"^port \d+$", f"port {port}", conf.read_text(encoding="utf-8"), flags=re.M)
    conf.write_text(text, encoding="utf-8")


def _write_drop_ins(container_root: Path, port: int, admin_port: int) -> None:
    """The drop-ins ``systemctl edit`` would write (see the module docstring for why)."""
    units = container_root / "etc" / "systemd" / "system"
    socket_d = units / "relayd.socket.d"
    service_d = units / "relayd.service.d"
    for directory in (socket_d, service_d):
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    (socket_d / "test.conf").write_text(
        f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n", encoding="utf-8"
    )
    (service_d / "test.conf").write_text(
        f"[Service]\nWatchdogSec={WATCHDOG_SEC}s\nEnvironment=RELAYD_ADMIN__PORT={admin_port}\n",
        encoding="utf-8",
    )


@pytest.fixture(scope="module")
def relayd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """Boot a container, install relayd with install.sh, follow its journal; clean up after."""
    require(os.geteuid() == 0, "booting a systemd-nspawn container needs root")
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        require_tool(tool)
    mirror = apt_mirror()
    require(mirror is not None, "no Debian archive (deb ... main) in /etc/apt to debootstrap from")
    assert mirror is not None
    pristine = debian_rootfs(mirror)
    workdir = tmp_path_factory.mktemp("nspawn")
    root = workdir / "root"
    try:
        # A copy per run: install.sh changes the root, the cache must stay pristine.
        _run_host(
            ["cp", "-a", "--reflink=auto", pristine, root],
            timeout=COPY_TIMEOUT_S,
            what="copying the rootfs",
        )
        wheels = relayd_wheels(root)
        port, admin_port, redis_port = _free_port(), _free_port(), _free_port()
        _write_drop_ins(root, port, admin_port)
        _quiet_redis(root, redis_port)
        with booted(root, [(REPO_ROOT, SRC), (wheels, WHEELS)], workdir) as box:
            journal = Journal(box.leader)
            try:
                install = box.run(
                    f"{SRC}/systemd/install.sh",
                    env=("PIP_NO_INDEX=1", f"PIP_FIND_LINKS={WHEELS}"),
                    timeout=INSTALL_TIMEOUT_S,
                    check=False,
                )
                assert install.returncode == 0, (
                    f"install.sh exited {install.returncode}\n{install.stdout}\n{install.stderr}"
                    f"\n--- journal ---\n{journal.tail()}"
                )
                config = box.path(CONFIG).read_text(encoding="utf-8")
                yield Installed(box, journal, port, admin_port, install, config, redis_port)
            finally:
                journal.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- the tests ---------------------------------------------------------------------------


def test_install_leaves_relayd_enabled_serving_and_hardened(relayd: Installed) -> None:
    box = relayd.box
    out = relayd.install.stdout
    assert "==> done" in out.splitlines(), out
    assert "+ systemctl restart relayd.service" in out
    enabled = box.systemctl("is-enabled", "relayd.socket", "relayd.service").stdout.split()
    assert enabled == ["enabled", "enabled"]
    active = box.systemctl("is-active", "relayd.socket", "relayd.service").stdout.split()
    assert active == ["active", "active"]
    show = box.show("relayd.service", "User", "StatusText", "WatchdogUSec", "NRestarts")
    assert show["User"] == "relayd"
    assert show["WatchdogUSec"] == f"{WATCHDOG_SEC}s"  # the test's drop-in is in force
    assert show["StatusText"].startswith("serving: "), show  # READY=1 came with a STATUS=
    # The process really runs as the unprivileged user, and the config is for it alone.
    user = box.run("ps", "-o", "user=", "-p", str(relayd.main_pid())).stdout.strip()
    assert user == "relayd"
    assert box.run("stat", "-c", "%U:%G %a", CONFIG).stdout.split() == ["root:relayd", "640"]
    assert relayd.config == (REPO_ROOT / "config" / "relayd.toml").read_text(encoding="utf-8")
    assert box.run("/opt/relayd/bin/relayd", "--version").stdout.startswith("relayd ")

    assert relayd.admin("/readyz") == (200, "ready\n")
    assert relayd.admin("/healthz") == (200, "ok\n")
    # The running unit, as systemd applies it (the unit test rates the file offline).
    security = box.run("systemd-analyze", "security", "--threshold=12", "relayd.service")
    match = re.search(r"Overall exposure level for relayd\.service:\s*(\d+\.\d+)", security.stdout)
    assert match is not None, security.stdout
    assert float(match.group(1)) <= 1.2

    # `relayd chat`, the check of a fresh install that docs/operations.md suggests.
    chat = box.run(
        "/opt/relayd/bin/relayd", "chat", f"ws://127.0.0.1:{relayd.port}/", input="/quit\n"
    )
    assert re.search(r"^connected to \S+ as \S{22} \(relayd\.v1\)$", chat.stdout, re.MULTILINE), (
        chat.stdout + chat.stderr
    )


def test_upgrade_keeps_the_operators_config_and_the_port(relayd: Installed) -> None:
    relayd.ensure_serving()
    box = relayd.box
    edited = relayd.config + "\n# an operator's edit, which an upgrade must keep\n"
    relayd.write_config(edited)
    socket_since = box.show("relayd.socket", "ActiveEnterTimestampMonotonic")
    old_pid = relayd.main_pid()
    try:

        async def scenario() -> tuple[int | None, subprocess.CompletedProcess[str]]:
            async with client(relayd.url) as before:
                await seed_id(before)
                # install.sh restarts relayd: the drain closes this client meanwhile.
                result = await asyncio.to_thread(
                    box.run,
                    f"{SRC}/systemd/install.sh",
                    env=("PIP_NO_INDEX=1", f"PIP_FIND_LINKS={WHEELS}"),
                    timeout=INSTALL_TIMEOUT_S,
                )
                await before.wait_closed()
            # The port never closed, so a client reconnects at once.
            async with client(relayd.url) as after:
                await seed_id(after)
            return before.close_code, result

        code, result = run(scenario(), timeout=INSTALL_TIMEOUT_S)
        assert code == 1001, relayd.describe()  # drained, as on any restart
        assert f"{CONFIG} exists: kept as it is" in result.stdout
        # The venv is upgraded in place, not rebuilt under the running service.
        assert "\n    reusing /opt/relayd\n" in result.stdout, result.stdout
        assert box.path(CONFIG).read_text(encoding="utf-8") == edited
        assert relayd.main_pid() != old_pid
        assert box.show("relayd.socket", "ActiveEnterTimestampMonotonic") == socket_since
    finally:
        relayd.write_config(relayd.config)


def test_two_host_clients_relay_and_the_journal_shows_it(relayd: Installed) -> None:
    relayd.ensure_serving()
    mark = relayd.journal.mark()

    def status_counts(wanted: str) -> str:
        # systemd has no event for a new STATUS=, and relayd refreshes it every few
        # seconds: poll `systemctl show` with a deadline.
        deadline = time.monotonic() + STATUS_TIMEOUT_S
        while True:
            text = relayd.box.show("relayd.service", "StatusText")["StatusText"]
            if text.startswith(wanted) or time.monotonic() > deadline:
                return text
            time.sleep(0.2)

    async def scenario() -> tuple[str, str, str]:
        async with client(relayd.url, v1=True) as a, client(relayd.url) as b:
            a_id, b_id = await v1_id(a), await seed_id(b)
            await send_json(a, {"to": b_id, "message": "hello through systemd", "ref": 1})
            assert await recv_text(b) == "hello through systemd"
            assert await recv_json(a) == {"type": "ack", "ref": 1}
            status = await asyncio.to_thread(status_counts, "serving: 2 connections")
        return a_id, b_id, status

    a_id, b_id, status = run(scenario(), timeout=STATUS_TIMEOUT_S + 20)
    assert status.startswith("serving: 2 connections"), status
    journal = relayd.journal
    for ident in (a_id, b_id):
        journal.wait_event("connection.close", after=mark, id=ident, code=1000)
    events = journal.events(mark)
    opens = {e["id"]: e for e in events if e["event"] == "connection.open"}
    assert opens[a_id]["dialect"] == "relayd.v1"
    assert opens[b_id]["dialect"] == "seed"
    relays = [e for e in events if e["event"] == "message.relay" and e["from"] in (a_id, b_id)]
    assert [(e["from"], e["to"], e["outcome"]) for e in relays] == [(a_id, b_id, "delivered")]
    assert "hello through systemd" not in "\n".join(journal.lines(mark))  # no bodies
    status_code, metrics = relayd.admin("/metrics")
    assert status_code == 200
    assert re.search(r'^relayd_messages_total\{outcome="delivered"\} [1-9]', metrics, re.MULTILINE)
    assert relayd.restarts() == 0, relayd.describe()


def test_reload_applies_new_limits_to_a_connected_client(relayd: Installed) -> None:
    relayd.ensure_serving()
    journal = relayd.journal
    default_line = "max_message_bytes = 65536"
    assert relayd.config.count(f"\n{default_line}\n") == 1
    smaller = relayd.config.replace(default_line, "max_message_bytes = 1024")
    invalid = relayd.config.replace(default_line, "max_message_bytes = -1")
    big = "x" * 2000  # over 1024 bytes, well under 65536
    pid = relayd.main_pid()

    def reload(text: str) -> Event:
        mark = journal.mark()
        relayd.write_config(text)
        relayd.box.systemctl("reload", "relayd.service")
        return journal.wait_event("config.reload", after=mark)

    async def scenario() -> tuple[Event, Event, int | None]:
        async with client(relayd.url, v1=True) as a, client(relayd.url) as b:
            await v1_id(a)
            b_id = await seed_id(b)
            await send_json(a, {"to": b_id, "message": big, "ref": 1})
            assert await recv_text(b) == big
            assert await recv_json(a) == {"type": "ack", "ref": 1}

            applied = await asyncio.to_thread(reload, smaller)
            await send_json(a, {"to": b_id, "message": big, "ref": 2})
            refusal = await recv_json(a)
            # With its ref, as docs/protocol.md says, so the client can match it.
            assert (refusal["type"], refusal["error"], refusal["ref"]) == (
                "error",
                "message_too_large",
                2,
            ), refusal
            await send_json(a, {"to": b_id, "message": "small", "ref": 3})
            assert await recv_text(b) == "small"  # the same connection, still relaying
            assert await recv_json(a) == {"type": "ack", "ref": 3}

            refused = await asyncio.to_thread(reload, invalid)
            await send_json(a, {"to": b_id, "message": big, "ref": 4})
            assert (await recv_json(a))["error"] == "message_too_large"  # 1024 still holds
            return applied, refused, a.close_code

    try:
        applied, refused, close_code = run(scenario(), timeout=3 * JOURNAL_TIMEOUT_S)
    finally:
        reload(relayd.config)
    assert applied["applied"] is True, applied
    assert applied["changed"] == ["limits.max_message_bytes"], applied
    assert applied["restart_required"] == [], applied
    assert refused["applied"] is False, refused
    assert "limits.max_message_bytes" in refused["reason"], refused
    assert close_code is None  # open until the scenario closed it
    assert relayd.main_pid() == pid  # reloaded, never restarted
    assert relayd.restarts() == 0, relayd.describe()


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_a_jwt_checked_with_the_issuers_public_key_under_the_units_hardening(
    relayd: Installed, algorithm: str
) -> None:
    # The unit forbids memory both writable and executable (MemoryDenyWriteExecute=yes)
    # and filters system calls: a signature check that needed either would kill relayd or
    # refuse every client, only where operators run it. Checked as they run it.
    relayd.ensure_serving()
    journal = relayd.journal
    key = rsa_key() if algorithm == "RS256" else ec_key()
    pem = "/etc/relayd/issuer.pem"
    relayd.box.path(pem).write_text(pem_public(key), encoding="utf-8")
    relayd.box.run("chown", "root:relayd", pem)
    relayd.box.run("chmod", "0640", pem)
    config = relayd.config
    for line, wanted in [
        ('mode = "off"', 'mode = "jwt"'),
        ('jwt_algorithm = "HS256"', f'jwt_algorithm = "{algorithm}"'),
        ('jwt_public_key_file = ""', f'jwt_public_key_file = "{pem}"'),
    ]:
        assert config.count(f"\n{line}\n") == 1, line
        config = config.replace(f"\n{line}\n", f"\n{wanted}\n")
    pid = relayd.main_pid()

    def reload(text: str) -> Event:
        mark = journal.mark()
        relayd.write_config(text)
        relayd.box.systemctl("reload", "relayd.service")
        return journal.wait_event("config.reload", after=mark)

    def token(signer: object) -> str:
        claims = {"sub": "alice", "exp": int(time.time()) + 600}
        return jwt.encode(claims, signer, algorithm=algorithm)  # type: ignore[arg-type]

    async def scenario() -> tuple[str, str]:
        async with client(f"{relayd.url}?token={token(key)}") as alice:
            welcome = await recv_text(alice)  # the seed dialect's welcome: the id
        forger = rsa_key() if algorithm == "RS256" else ec_key()
        try:
            async with client(f"{relayd.url}?token={token(forger)}") as forged:
                return welcome, f"accepted: {await recv_text(forged)}"
        except websockets.InvalidStatus as refused:
            return welcome, f"refused: {refused.response.status_code}"

    try:
        applied = reload(config)
        assert applied["applied"] is True, applied
        welcome, forged = run(scenario(), timeout=JOURNAL_TIMEOUT_S)
    finally:
        reload(relayd.config)
    assert welcome == "alice"  # the token's subject is the client's id
    assert forged == "refused: 401"
    assert relayd.main_pid() == pid, relayd.describe()  # nothing killed it
    assert relayd.restarts() == 0, relayd.describe()


def test_a_bad_config_stops_relayd_with_78_and_no_restart_loop(relayd: Installed) -> None:
    relayd.ensure_serving()
    box = relayd.box
    mark = relayd.journal.mark()
    typo = relayd.config.replace("\nmax_connections = 10000\n", "\nmax_conections = 10000\n")
    assert typo != relayd.config
    relayd.write_config(typo)
    try:
        assert box.systemctl("restart", "relayd.service", check=False).returncode != 0
        show = box.show("relayd.service", "ActiveState", "Result", "ExecMainStatus", "NRestarts")
        # "failed", not "activating (auto-restart)": RestartPreventExitStatus=78 held.
        assert show == {
            "ActiveState": "failed",
            "Result": "exit-code",
            "ExecMainStatus": "78",
            "NRestarts": "0",
        }, relayd.describe()
        relayd.journal.wait_line(
            lambda line: line.startswith("relayd: config error:") and "max_conections" in line,
            after=mark,
            what="relayd's config error on stderr",
        )
    finally:
        relayd.write_config(relayd.config)
        box.systemctl("reset-failed", "relayd.service")
        relayd.ensure_serving()


def test_watchdog_restarts_a_relayd_whose_event_loop_hangs(
    relayd: Installed, tmp_path: Path
) -> None:
    gdb = require_tool("gdb")
    relayd.ensure_serving()
    journal = relayd.journal
    old_pid = relayd.main_pid()
    restarts = relayd.restarts()
    mark = journal.mark()
    gdb_log = tmp_path / "gdb.log"
    # Block the main thread, where trio's loop (and so the watchdog ping) runs, in a
    # 600 s sleep(3) called from outside, as a hung event loop would.
    with gdb_log.open("w") as out:
        hang = subprocess.Popen(
            [
                str(gdb),
                "-p",
                str(relayd.box.host_pid(old_pid)),
                "-batch",
                "-ex",
                "call (unsigned int)sleep(600)",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    fired = False
    try:
        try:
            journal.wait_line(
                lambda line: line.startswith("relayd.service: Watchdog timeout"),
                after=mark,
                what="systemd's watchdog timeout",
                timeout=WATCHDOG_TIMEOUT_S,
            )
        except pytest.fail.Exception as exc:
            pytest.fail(f"{exc}\n--- gdb ---\n{_tail(gdb_log)}", pytrace=False)
        fired = True

        # Connect while relayd is down: the socket, held by systemd, queues the
        # connection and the restarted relayd serves it.
        async def scenario() -> None:
            async with client(relayd.url) as early, client(relayd.url, v1=True) as later:
                early_id = await seed_id(early)
                await v1_id(later)
                await send_json(later, {"to": early_id, "message": "after the restart"})
                assert await recv_text(early) == "after the restart"

        run(scenario(), timeout=WATCHDOG_TIMEOUT_S)
        journal.wait_event("server.ready", after=mark)
    finally:
        if hang.poll() is None:  # gdb normally ends by itself once relayd is killed
            hang.kill()
            hang.wait(timeout=COMMAND_TIMEOUT_S)
        if not fired:  # relayd is still inside the 600 s sleep: end it for the next tests
            relayd.box.systemctl("kill", "--signal=SIGKILL", "relayd.service", check=False)
            relayd.box.systemctl("reset-failed", "relayd.service", check=False)
    lines = journal.lines(mark)
    assert "relayd.service: Failed with result 'watchdog'." in lines, relayd.describe()
    # PYTHONFAULTHANDLER=1 in the unit: the SIGABRT left a traceback of the hung loop.
    assert "Fatal Python error: Aborted" in lines, relayd.describe()
    assert relayd.main_pid() != old_pid
    assert relayd.restarts() == restarts + 1
    assert relayd.box.systemctl("is-active", "relayd.service").stdout.strip() == "active"


def test_stop_closes_connected_clients_with_1001_and_exits_0(relayd: Installed) -> None:
    relayd.ensure_serving()
    box = relayd.box
    mark = relayd.journal.mark()

    async def scenario() -> tuple[str, str, int | None, int | None]:
        async with client(relayd.url) as a, client(relayd.url, v1=True) as b:
            a_id, b_id = await seed_id(a), await v1_id(b)
            # systemctl returns once relayd has exited, so it runs beside the clients.
            stop = asyncio.create_task(asyncio.to_thread(box.systemctl, "stop", "relayd.service"))
            await a.wait_closed()
            await b.wait_closed()
            await stop
            return a_id, b_id, a.close_code, b.close_code

    a_id, b_id, *codes = run(scenario())
    assert codes == [1001, 1001], relayd.describe()
    stop = relayd.journal.wait_event("server.stop", after=mark)
    assert (stop["reason"], stop["forced"]) == ("signal SIGTERM", False), stop
    closes = [
        e
        for e in relayd.journal.events(mark)
        if e["event"] == "connection.close" and e["id"] in (a_id, b_id)
    ]
    assert [(e["code"], e["closed_by"]) for e in closes] == [(1001, "server")] * 2, closes
    show = box.show("relayd.service", "ActiveState", "Result", "ExecMainStatus")
    assert show == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    # The socket stays: the port is still systemd's.
    assert box.systemctl("is-active", "relayd.socket").stdout.strip() == "active"


def test_the_socket_starts_relayd_for_the_first_client(relayd: Installed) -> None:
    box = relayd.box
    box.systemctl("start", "relayd.socket")
    box.systemctl("stop", "relayd.service")
    assert box.systemctl("is-active", "relayd.service", check=False).stdout.strip() == "inactive"
    mark = relayd.journal.mark()

    async def scenario() -> None:
        async with client(relayd.url) as first:
            await seed_id(first)

    run(scenario())
    start = relayd.journal.wait_event("server.start", after=mark)
    assert start["sockets"] == "inherited", start
    assert box.systemctl("is-active", "relayd.service").stdout.strip() == "active"


#: Written by install.sh --nodes: a stopping node's waiting clients go to the others.
SYSCTL_FILE: Final = "/etc/sysctl.d/60-relayd.conf"
#: Clients the nodes test opens against two nodes, and the fewest either must take.
SPREAD_CLIENTS: Final = 40
SPREAD_FEWEST: Final = 5


def test_two_nodes_under_systemd_share_the_port_relay_and_restart_alone(
    relayd: Installed,
) -> None:
    """install.sh --nodes 2: Redis and two relayd@ instances binding one port with reuse_port.

    Each node binds the port with SO_REUSEPORT and the kernel spreads clients evenly
    over them; a message crosses between nodes through Redis; restarting one node leaves
    the other's clients connected and relaying; while one node is stopped the other
    serves every new client. Runs after every test of the single daemon, which it turns
    into nodes as an older install.sh made them (sharing relayd.socket), then upgrades;
    only the uninstall test comes after it.
    """
    box = relayd.box
    first = _free_ports(2)
    nodes = [f"relayd@{first}.service", f"relayd@{first + 1}.service"]

    def install_nodes() -> subprocess.CompletedProcess[str]:
        return box.run(
            f"{SRC}/systemd/install.sh",
            "--nodes",
            "2",
            "--first-admin-port",
            str(first),
            env=("PIP_NO_INDEX=1", f"PIP_FIND_LINKS={WHEELS}"),
            timeout=INSTALL_TIMEOUT_S,
            check=False,
        )

    async def served() -> str:
        async with client(relayd.url, v1=True) as ws:
            return await v1_id(ws)

    # First the nodes an older install.sh made: relayd@ instances sharing relayd.socket's
    # socket (its template had Sockets=relayd.socket; its drop-in pointed the socket at
    # the first node), the single daemon stopped. Their config's Redis is not running
    # yet, so none of them logs a broker.connected the checks below could take for the
    # new nodes'.
    old_template = box.path("/etc/systemd/system/relayd@.service.d/old-layout.conf")
    old_template.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    old_template.write_text(
        "[Unit]\nRequires=relayd.socket\nAfter=relayd.socket\n[Service]\nSockets=relayd.socket\n",
        encoding="utf-8",
    )
    box.path("/etc/systemd/system/relayd.socket.d/nodes.conf").write_text(
        f"[Socket]\nService={nodes[0]}\n", encoding="utf-8"
    )
    # The clients reach them where relayd.socket listens (the test's drop-in: loopback,
    # a free port); nodes binding [server] (all interfaces) would move them and open the
    # port everywhere: refused, and the old nodes left serving.
    relayd.write_config(relayd.nodes_config(host=""))
    box.systemctl("daemon-reload")
    box.systemctl("disable", "--now", "relayd.service")
    box.systemctl("start", *nodes)
    refused = install_nodes()
    assert refused.returncode == 78, f"{refused.stdout}\n{refused.stderr}"
    # (then [::] too, where the kernel has IPv6)
    assert (
        f"relayd.socket listens on 127.0.0.1:{relayd.port}, but the nodes would "
        f"bind 0.0.0.0:{relayd.port}"
    ) in refused.stderr
    assert box.systemctl("is-active", "relayd.socket", *nodes).stdout.split() == ["active"] * 3
    assert len(run(served(), timeout=COMMAND_TIMEOUT_S)) == 22
    # The upgrade: the old nodes still hold relayd.socket's socket when the new template
    # is in place; install.sh stops them all before a new node binds the port (it failed
    # with EADDRINUSE before).
    old_template.unlink()
    relayd.write_config(relayd.nodes_config())
    install = install_nodes()
    assert install.returncode == 0, f"{install.stdout}\n{install.stderr}"
    sysctl = box.path(SYSCTL_FILE).read_text(encoding="utf-8")
    assert "\nnet.ipv4.tcp_migrate_req = 1\n" in sysctl
    # Followed from here (journalctl refuses a pattern no unit matches yet), from the
    # first line on (-n all), so nothing the nodes logged while starting is missed.
    journal = Journal(box.leader, "relayd@*")
    try:
        assert box.systemctl("is-active", *nodes, "redis-server").stdout.split() == ["active"] * 3
        # relayd.socket held the port without SO_REUSEPORT: it has let go of it.
        for unit in ("relayd.service", "relayd.socket"):
            assert box.systemctl("is-active", unit, check=False).stdout.strip() != "active", unit
            assert box.systemctl("is-enabled", unit, check=False).stdout.strip() != "enabled", unit
        host = box.run("hostname").stdout.strip()
        connected = [
            journal.wait_event("broker.connected", after=0, node=f"{host}-{port}")
            for port in (first, first + 1)
        ]
        assert all(event["resubscribed"] == 0 for event in connected)

        def admin(port: int, path: str) -> tuple[int, str]:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            url = f"http://127.0.0.1:{port}{path}"
            try:
                with opener.open(url, timeout=COMMAND_TIMEOUT_S) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        assert admin(first, "/readyz") == (200, "ready\n")
        assert admin(first + 1, "/readyz") == (200, "ready\n")

        def open_on(port: int) -> float:
            text = admin(port, "/metrics")[1]
            match = re.search(r"^relayd_connections_open (\S+)$", text, re.MULTILINE)
            return float(match.group(1)) if match else -1.0

        def node_reconnected(mark: int) -> Event:
            return journal.wait_event(
                "broker.connected",
                after=mark,
                node=f"{host}-{first + 1}",
                timeout=RESTART_TIMEOUT_S,
            )

        def counts() -> list[float]:
            return [open_on(first), open_on(first + 1)]

        async def scenario(clients: contextlib.AsyncExitStack) -> list[Any]:
            # 40 clients one after another, each noted with the node that took it. The
            # kernel picks by a hash of the client's port: each node's count is
            # binomial(40, 1/2): either under 5 about once in 5 million runs (one socket
            # shared by both, relayd.socket's, once gave one node 100 clients in a row). Each
            # client is closed by the stack however the scenario ends: one left open
            # would be closed by the garbage collector in some later test, whose
            # filterwarnings = error turns the ResourceWarning into a failure.
            held: list[list[tuple[Any, str]]] = [[], []]
            now = await asyncio.to_thread(counts)
            for _ in range(SPREAD_CLIENTS):
                ws = await clients.enter_async_context(client(relayd.url, v1=True))
                ident = await v1_id(ws)
                before, now = now, await asyncio.to_thread(counts)
                [node] = [i for i in (0, 1) if now[i] == before[i] + 1]
                held[node].append((ws, ident))
            assert [len(on_node) >= SPREAD_FEWEST for on_node in held] == [True, True], [
                len(on_node) for on_node in held
            ]
            (a, _), (b, b_id) = held[0][0], held[1][0]
            await send_json(a, {"to": b_id, "message": "across nodes", "ref": 1})
            # The sender's answer first: a refusal fails here, with its frame, instead of
            # leaving the test waiting for the recipient until the scenario's deadline.
            assert await recv_json(a) == {"type": "ack", "ref": 1}
            got = [await recv_json(b)]
            # Node 2 restarts; node 1's client stays and still reaches a new client.
            mark = journal.mark()
            await asyncio.to_thread(
                box.run, "systemctl", "restart", nodes[1], timeout=RESTART_TIMEOUT_S
            )
            await b.wait_closed()
            # READY=1 (which the restart waits for) comes once node 2 serves, not once it
            # has reached Redis: until then it serves its own clients only, and a client
            # it took would be unknown to node 1 (docs/scaling.md, "When things fail").
            # Its broker.connected says every id it holds is reachable from here on.
            await asyncio.to_thread(node_reconnected, mark)
            c = await clients.enter_async_context(client(relayd.url, v1=True))
            c_id = await v1_id(c)
            await send_json(a, {"to": c_id, "message": "after the restart", "ref": 2})
            assert await recv_json(a) == {"type": "ack", "ref": 2}
            got.append(await recv_json(c))
            # Node 2 stopped: its socket has left the port's group, and node 1 takes every
            # new client (none waits in a backlog nobody accepts from).
            await asyncio.to_thread(box.systemctl, "stop", nodes[1])
            held_by_first = await asyncio.to_thread(open_on, first)
            for _ in range(10):
                d = await clients.enter_async_context(client(relayd.url, v1=True))
                await v1_id(d)
            assert await asyncio.to_thread(open_on, first) == held_by_first + 10
            await asyncio.to_thread(box.systemctl, "start", nodes[1])
            await a.close()
            return [*got, a.close_code, b.close_code]

        async def bounded() -> list[Any]:
            async with contextlib.AsyncExitStack() as clients:
                return await scenario(clients)

        # The restart waits for node 2's drain and its start, each bounded by the unit;
        # then node 2's stop and start, each a command.
        *got, a_code, b_code = run(bounded(), timeout=2 * RESTART_TIMEOUT_S + 3 * COMMAND_TIMEOUT_S)
        assert [frame["message"] for frame in got] == ["across nodes", "after the restart"], got
        assert admin(first + 1, "/readyz") == (200, "ready\n")  # the restarted node
        assert [a_code, b_code] == [1000, 1001]  # node 1's client closed by us, node 2's drained
    finally:
        journal.close()


def test_uninstall_stops_the_nodes_removes_relayd_and_purge_removes_the_rest(
    relayd: Installed,
) -> None:
    """uninstall.sh for real, on the nodes the test before left running; then --purge, twice.

    Runs last: it removes what the fixture installed. On Debian 12 (systemd 252) a
    template unit given to ``systemctl disable --now`` fails the whole call ("missing the
    instance name"), which stopped the script before it removed anything.
    """
    box = relayd.box
    units = ("relayd.socket", "relayd.service", "relayd@.service")
    running = box.run("systemctl", "list-units", "--plain", "--no-legend", "relayd@*.service")
    assert running.stdout.strip(), "the nodes test left no relayd@ instance to stop"

    first = box.run(f"{SRC}/systemd/uninstall.sh", timeout=RESTART_TIMEOUT_S, check=False)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out
    assert "==> done" in first.stdout.splitlines(), out
    active = box.run(
        "systemctl", "list-units", "--state=active,activating", "--plain", "--no-legend", "relayd*"
    )
    assert active.stdout.strip() == "", active.stdout  # every node and the socket stopped
    for unit in units:
        assert not box.path(f"/etc/systemd/system/{unit}").exists(), unit
    wants = box.path("/etc/systemd/system/multi-user.target.wants")
    assert not [link.name for link in wants.iterdir() if link.name.startswith("relayd")]
    assert not box.path("/opt/relayd").exists()
    with pytest.raises(ConnectionRefusedError):  # nothing listens on the socket's port
        socket.create_connection(("127.0.0.1", relayd.port), timeout=STATUS_TIMEOUT_S).close()
    # Kept without --purge: the config, the drop-ins, the user.
    assert box.path(CONFIG).read_text(encoding="utf-8") == relayd.nodes_config()
    assert not box.path(SYSCTL_FILE).exists()  # install.sh --nodes's
    assert box.path("/etc/systemd/system/relayd.service.d/test.conf").exists()
    assert box.run("getent", "passwd", "relayd", check=False).returncode == 0

    for attempt in (1, 2):  # safe to run twice
        purge = box.run(
            f"{SRC}/systemd/uninstall.sh", "--purge", timeout=RESTART_TIMEOUT_S, check=False
        )
        assert purge.returncode == 0, f"run {attempt}\n{purge.stdout}{purge.stderr}"
        assert not box.path("/etc/relayd").exists()
        assert not box.path("/etc/systemd/system/relayd.service.d").exists()
        assert not box.path("/etc/systemd/system/relayd.socket.d").exists()
        assert not box.path("/etc/sysusers.d/relayd.conf").exists()
        assert box.run("getent", "passwd", "relayd", check=False).returncode != 0
