"""Run a real relayd process and find the third-party tools the e2e tests drive it with.

Nothing here knows relayd's insides: it starts the installed ``relayd`` command, reads the
JSON lines it writes on stdout, and stops it with SIGTERM, exactly as an operator would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = REPO_ROOT / "tests"
E2E_DIR = Path(__file__).resolve().parent
NODE_MODULES = TESTS_DIR / "node_modules"
BENCH_DIR = REPO_ROOT / "bench"
#: The bench's own npm packages (ws, for its node-ws peer): bench/package-lock.json.
BENCH_NODE_MODULES = BENCH_DIR / "node_modules"
CHROMIUM = Path("/usr/bin/chromium")
#: Where ./dev test puts promtool when it is not on PATH.
PROMTOOL = REPO_ROOT / ".tools" / "bin" / "promtool"

#: How long relayd may take to print ``server.ready``, and to exit after SIGTERM.
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0

Event = dict[str, Any]


class RelaydProcess:
    """A relayd child process and the log events it has printed so far.

    A reader thread parses each stdout line as it arrives; waiting for an event blocks on a
    condition variable that the reader signals, so nothing here sleeps or polls.
    """

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self._cond = threading.Condition()
        self._events: list[Event] = []
        self._stdout_lines: list[str] = []
        self._stderr_lines: list[str] = []
        self._stdout_closed = False
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        self._readers = [
            threading.Thread(target=self._read_stdout, name="relayd-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name="relayd-stderr", daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.port = 0

    # -- readers -------------------------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            text = line.rstrip("\n")
            try:
                parsed: Any = json.loads(text)
            except ValueError:
                parsed = None
            with self._cond:
                self._stdout_lines.append(text)
                if isinstance(parsed, dict):
                    self._events.append(parsed)
                self._cond.notify_all()
        with self._cond:
            self._stdout_closed = True
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self._stderr_lines.append(line.rstrip("\n"))

    # -- what was printed ----------------------------------------------------------------

    @property
    def events(self) -> list[Event]:
        """A snapshot of every JSON object printed on stdout so far, in order."""
        with self._cond:
            return list(self._events)

    @property
    def stdout_lines(self) -> list[str]:
        """A snapshot of every stdout line so far, JSON or not."""
        with self._cond:
            return list(self._stdout_lines)

    @property
    def stderr_text(self) -> str:
        """Everything printed on stderr so far."""
        with self._cond:
            return "\n".join(self._stderr_lines)

    @property
    def url(self) -> str:
        """The ``ws://`` URL of the listener."""
        return f"ws://127.0.0.1:{self.port}"

    def describe(self) -> str:
        """The tail of stdout and stderr, for assertion messages."""
        out = "\n".join(self.stdout_lines[-30:])
        err = "\n".join(self.stderr_text.splitlines()[-30:])
        return f"argv: {self.argv}\n--- stdout (tail) ---\n{out}\n--- stderr (tail) ---\n{err}"

    def wait_for(
        self, predicate: Callable[[Event], bool], *, timeout: float = 10.0, what: str = "event"
    ) -> Event:
        """Block until an event matching ``predicate`` has been printed; fail after ``timeout``."""

        def found() -> Event | None:
            return next((e for e in self._events if predicate(e)), None)

        with self._cond:
            self._cond.wait_for(lambda: found() is not None or self._stdout_closed, timeout)
            event = found()
        if event is None:
            state = "stdout closed" if self._stdout_closed else f"not within {timeout}s"
            if self._stdout_closed:  # it is exiting: let its last words reach stderr_text
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5)
                self._readers[1].join(timeout=5)
            pytest.fail(f"relayd printed no {what} ({state})\n{self.describe()}", pytrace=False)
        return event

    def wait_for_event(self, name: str, *, timeout: float = 10.0, **fields: Any) -> Event:
        """Block until an event named ``name`` whose fields include ``fields`` is printed."""
        return self.wait_for(
            lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items()),
            timeout=timeout,
            what=f"{name} event with {fields}",
        )

    # -- lifecycle -----------------------------------------------------------------------

    def wait_ready(self) -> None:
        """Wait for ``server.ready`` and learn the port it bound."""
        ready = self.wait_for_event("server.ready", timeout=READY_TIMEOUT_S)
        port = ready.get("port")
        assert isinstance(port, int), f"server.ready has no integer port: {ready}"
        assert port > 0, ready
        self.port = port

    def terminate(self) -> None:
        """Send SIGTERM to this process (by its pid), once, if it is still running."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Wait for the process to exit and its output to be read; return the exit status.

        If it has not exited within ``timeout`` it is killed (it is our own child) and the
        test fails.
        """
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)
            pytest.fail(f"relayd did not exit within {timeout}s\n{self.describe()}", pytrace=False)
        for reader in self._readers:
            reader.join(timeout=STOP_TIMEOUT_S)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return code

    def stop(self) -> int:
        """SIGTERM, then wait for the exit status."""
        self.terminate()
        return self.wait_exit()

    def assert_clean_stop(self, code: int) -> None:
        """A graceful stop: exit status 0 and ``server.stop`` as the last event."""
        assert code == 0, f"relayd exited {code} after SIGTERM\n{self.describe()}"
        events = self.events
        assert events, f"relayd printed no events\n{self.describe()}"
        assert events[-1].get("event") == "server.stop", (
            f"last event is {events[-1]!r}, not server.stop\n{self.describe()}"
        )


def relayd_env() -> dict[str, str]:
    """This process's environment without anything that configures relayd."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RELAYD_") and k not in {"PORT", "NOTIFY_SOCKET", "LISTEN_FDS"}
    }


def relayd_command() -> list[str]:
    """The installed ``relayd`` console script beside this interpreter, else ``-m relayd``."""
    script = Path(sys.executable).parent / "relayd"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "relayd"]


@contextmanager
def running_relayd(config_dir: Path, *extra_args: str) -> Iterator[RelaydProcess]:
    """Start relayd on a random loopback port with an empty config; stop it cleanly after.

    The block's exit asserts that SIGTERM made it exit 0 with ``server.stop`` last.
    """
    config = config_dir / "relayd.toml"
    config.write_text(
        "# e2e: built-in defaults, but the admin listener on a free port\n[admin]\nport = 0\n",
        encoding="utf-8",
    )
    argv = [
        *relayd_command(),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--log-format",
        "json",
        "--config",
        str(config),
        *extra_args,
    ]
    relayd = RelaydProcess(argv, relayd_env())
    try:
        relayd.wait_ready()
        yield relayd
    finally:
        code = relayd.stop()
    relayd.assert_clean_stop(code)


# -- third-party tools -------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """Something on the machine a test needs, and how a person gets it."""

    what: str
    install: str
    locate: Callable[[], Path | None]


def _node_module(name: str) -> Callable[[], Path | None]:
    def locate() -> Path | None:
        _ensure_node_modules()
        path = NODE_MODULES / name
        return path if (path / "package.json").is_file() else None

    return locate


def _executable(path: Path) -> Callable[[], Path | None]:
    def locate() -> Path | None:
        return path if path.is_file() and os.access(path, os.X_OK) else None

    return locate


def _on_path(name: str) -> Callable[[], Path | None]:
    def locate() -> Path | None:
        found = shutil.which(name)
        return Path(found) if found else None

    return locate


def _on_path_or(path: Path, name: str) -> Callable[[], Path | None]:
    def locate() -> Path | None:
        return _on_path(name)() or _executable(path)()

    return locate


def _bench_node_module(name: str) -> Callable[[], Path | None]:
    def locate() -> Path | None:
        _ensure_bench_node_modules()
        path = BENCH_NODE_MODULES / name
        return path if (path / "package.json").is_file() else None

    return locate


NPM_CI = "npm ci --prefix tests"
NPM_CI_BENCH = "npm ci --prefix bench"

TOOLS: dict[str, Tool] = {
    "node": Tool("Node.js 18+ (`node` on PATH)", "apt-get install nodejs npm", _on_path("node")),
    "npm": Tool("npm (`npm` on PATH)", "apt-get install npm", _on_path("npm")),
    "ws": Tool("the npm package ws in tests/node_modules", NPM_CI, _node_module("ws")),
    "playwright-core": Tool(
        "the npm package playwright-core in tests/node_modules",
        NPM_CI,
        _node_module("playwright-core"),
    ),
    "chromium": Tool(
        f"Debian's Chromium at {CHROMIUM}", "apt-get install chromium", _executable(CHROMIUM)
    ),
    "bench-ws": Tool(
        "the npm package ws in bench/node_modules (the bench's node-ws peer)",
        NPM_CI_BENCH,
        _bench_node_module("ws"),
    ),
    "promtool": Tool(
        f"promtool on PATH or at {PROMTOOL}",
        "./dev test (it unpacks promtool from Debian's prometheus package)",
        _on_path_or(PROMTOOL, "promtool"),
    ),
    **{
        name: Tool(f"`{name}` on PATH", f"apt-get install {package}", _on_path(name))
        for name, package in [
            ("systemd-socket-activate", "systemd"),
            ("systemd-analyze", "systemd"),
            ("systemd-sysusers", "systemd"),
            ("systemd-nspawn", "systemd-container"),
            ("debootstrap", "debootstrap"),
            ("shellcheck", "shellcheck"),
            ("gdb", "gdb"),
            ("nsenter", "util-linux"),
            ("unshare", "util-linux"),
            ("ip", "iproute2"),
            ("taskset", "util-linux"),
            ("redis-server", "redis-server"),
            ("strace", "strace"),
        ]
    },
}

_npm_lock = threading.Lock()
_npm_attempted = False


def _ensure_node_modules() -> None:
    """Run ``npm ci --prefix tests`` once per session when tests/node_modules is missing.

    A failure is not raised here: the module is then simply not found, and
    :func:`require_tool` reports it with npm's output left in the log.
    """
    global _npm_attempted
    with _npm_lock:
        if _npm_attempted or NODE_MODULES.is_dir():
            return
        _npm_attempted = True
        npm = shutil.which("npm")
        if npm is None:
            return
        env = {**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"}
        try:
            result = subprocess.run(
                [npm, "ci", "--prefix", str(TESTS_DIR), "--no-audit", "--no-fund"],
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except subprocess.TimeoutExpired:
            print("npm ci timed out after 300s", file=sys.stderr)
            return
        if result.returncode != 0:
            print(f"npm ci failed ({result.returncode}):\n{result.stderr}", file=sys.stderr)


_bench_npm_lock = threading.Lock()
_bench_npm_attempted = False


def _ensure_bench_node_modules() -> None:
    """Run ``npm ci --prefix bench`` once per session when bench/node_modules is missing.

    As :func:`_ensure_node_modules` does for tests/: a failure is not raised here; the
    module is then not found and :func:`require_tool` reports it, npm's output in the log.
    """
    global _bench_npm_attempted
    with _bench_npm_lock:
        if _bench_npm_attempted or BENCH_NODE_MODULES.is_dir():
            return
        _bench_npm_attempted = True
        npm = shutil.which("npm")
        if npm is None:
            return
        try:
            result = subprocess.run(
                [npm, "ci", "--prefix", str(BENCH_DIR), "--no-audit", "--no-fund"],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except subprocess.TimeoutExpired:
            print("npm ci --prefix bench timed out after 300s", file=sys.stderr)
            return
        if result.returncode != 0:
            print(
                f"npm ci --prefix bench failed ({result.returncode}):\n{result.stderr}",
                file=sys.stderr,
            )


def require_tool(name: str) -> Path:
    """Return where tool ``name`` is; fail under ``CI=true``, else skip, when it is missing."""
    tool = TOOLS[name]
    path = tool.locate()
    require(
        path is not None, f"{name} is missing: need {tool.what}; install it with `{tool.install}`"
    )
    assert path is not None  # require() returned: it is there
    return path


def require(ok: bool, message: str) -> None:
    """Go on if ``ok``; else fail under ``CI=true``, or skip, with ``message``.

    For what a test needs besides a tool (root, an apt mirror), with the same rule as
    :func:`require_tool`: under CI nothing a test needs may be silently missing.
    """
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: nothing a test needs may be missing)", pytrace=False)
    pytest.skip(message)


def run_node(script: str, *args: str, timeout: float = 60.0) -> Any:
    """Run a node script from tests/e2e; return the JSON object it printed last on stdout."""
    node = require_tool("node")
    try:
        result = subprocess.run(
            [str(node), str(E2E_DIR / script), *args],
            cwd=E2E_DIR,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{script} did not finish within {timeout}s: {exc.stderr!r}", pytrace=False)
    assert result.returncode == 0, (
        f"{script} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    lines = result.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing\nstderr:\n{result.stderr}"
    return json.loads(lines[-1])
