"""``./dev serve`` as a person on a fresh clone runs it: what it installs, says, listens on.

The first test builds a virtualenv of its own through ``./dev serve`` (``DEV_VENV``), from
the package index pip is configured with, exactly as a fresh clone's first run does; the
second runs ``./dev serve`` with the suite's own ``.venv``, which ``./dev test`` set up, so
nothing is installed. Every process is our child, stopped by its pid, and every wait is a
blocking read with a timeout.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import signal
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import IO, Final

import pytest

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
DEV: Final = REPO_ROOT / "dev"
#: A fresh virtualenv and relayd's dependencies: about 30 s here, most of it pip.
INSTALL_TIMEOUT_S: Final = 300.0
WAIT_TIMEOUT_S: Final = 30.0
#: What the tests need and serving does not: none of it may be in a serving venv.
TEST_TOOLS: Final = ("pytest", "pytest-trio", "hypothesis", "mypy", "ruff", "coverage")
#: An interpreter a venv may say it was made from: not /usr/bin/python3, ./dev's default.
OTHER_PYTHON: Final = "/opt/another-python/bin/python3.11"


def dev_env(**extra: str) -> dict[str, str]:
    """This environment without what configures relayd, with ``.venv``'s bin first on PATH."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("RELAYD_")
        and name not in {"PORT", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "DEV_VENV", "PYTHON"}
    }
    env.update(extra)
    return env


def pip_noise(line: str) -> bool:
    """Remarks of pip about this machine's own pip configuration, not about relayd's install."""
    return line.startswith(("WARNING: Location 'file:", "WARNING: Url 'file:"))


def serve_version(venv: Path | str, **env: str) -> list[str]:
    """What ``./dev serve --version`` with its venv at ``venv`` said on stderr, bar pip's remarks.

    Asserts that it printed relayd's version and exited 0.
    """
    result = subprocess.run(
        [str(DEV), "serve", "--version"],
        env=dev_env(DEV_VENV=str(venv), **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("relayd "), result.stdout
    return [line for line in result.stderr.splitlines() if not pip_noise(line)]


def venv_made_from(interpreter: str, venv: Path) -> Path:
    """A venv at ``venv`` (no pip) whose ``pyvenv.cfg`` says ``interpreter`` made it; that file."""
    subprocess.run(
        ["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)],
        timeout=INSTALL_TIMEOUT_S,
        check=True,
    )
    config = venv / "pyvenv.cfg"
    config.write_text(
        "".join(
            f"executable = {interpreter}\n" if line.startswith("executable = ") else f"{line}\n"
            for line in config.read_text().splitlines()
        )
    )
    return config


def test_serve_installs_only_what_serving_needs_and_quietly_on_debians_python(
    tmp_path: Path,
) -> None:
    # Made from the interpreter the installed service runs on, not the first python3 on
    # PATH (a pyenv build there runs 8% more instructions per message; the bench uses this venv).
    decoy = tmp_path / "bin" / "python3"
    decoy.parent.mkdir()
    decoy.write_text("#!/bin/sh\necho 'the first python3 on PATH ran' >&2\nexit 1\n")
    decoy.chmod(0o755)
    venv = tmp_path / "venv"
    said = serve_version(venv, PATH=f"{decoy.parent}:{os.environ['PATH']}")
    assert said == [f"==> creating {venv}", f"==> installing relayd [cluster] into {venv}"]
    assert "home = /usr/bin\n" in (venv / "pyvenv.cfg").read_text()
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        timeout=WAIT_TIMEOUT_S,
        check=True,
    )
    installed = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert {"relayd", "trio", "coredis"} <= installed
    assert installed.isdisjoint(TEST_TOOLS)


def test_serve_makes_a_venv_from_another_interpreter_again(tmp_path: Path) -> None:
    # A .venv made before ./dev named Debian's interpreter (a pyenv python3 first on PATH)
    # would keep the tests and the bench on that build. Its pyvenv.cfg names the
    # interpreter it was made from: here one that is not /usr/bin/python3.
    venv = tmp_path / "venv"
    config = venv_made_from(OTHER_PYTHON, venv)
    assert serve_version(venv) == [
        f"==> making {venv} again from /usr/bin/python3 (it was made from {OTHER_PYTHON})",
        f"==> installing relayd [cluster] into {venv}",
    ]
    made = config.read_text()
    assert f"executable = {os.path.realpath('/usr/bin/python3')}\n" in made
    # Made once: the next run finds it as it should be, and neither makes nor installs it.
    assert serve_version(venv) == []


@pytest.mark.parametrize("made_from", [OTHER_PYTHON, os.path.realpath("/usr/bin/python3")])
def test_serve_replaces_a_link_to_another_venv_and_leaves_that_venv_alone(
    tmp_path: Path, made_from: str
) -> None:
    # A .venv that links to a venv elsewhere (another checkout's, a shared one). Made from
    # another interpreter, it was made again through the link: `venv --clear` emptied the
    # folder it pointed to, then failed on the link. Made from the right one, it was used:
    # relayd was installed into the other checkout's venv, whose code ./dev serve could run.
    shared = tmp_path / "shared-venv"
    config = venv_made_from(made_from, shared)
    kept = config.read_text()
    venv = tmp_path / "venv"
    venv.symlink_to(shared)
    # As a shell completes a folder's name: with a slash, which `[ -L ]` would follow.
    assert serve_version(f"{venv}/") == [
        f"==> making {venv} a venv of its own from /usr/bin/python3"
        f" (it links to {shared}, which is left as it is)",
        f"==> installing relayd [cluster] into {venv}/",
    ]
    assert not venv.is_symlink()
    made = (venv / "pyvenv.cfg").read_text()
    assert f"executable = {os.path.realpath('/usr/bin/python3')}\n" in made
    assert config.read_text() == kept
    assert (shared / "bin" / "python").exists()


def test_a_python_given_that_cannot_make_a_venv_stops_dev_and_says_so(tmp_path: Path) -> None:
    # Named on purpose: not replaced by the system's after an apt-get install, as when
    # the default is missing; nothing is made.
    venv = tmp_path / "venv"
    result = subprocess.run(
        [str(DEV), "serve", "--version"],
        env=dev_env(DEV_VENV=str(venv), PYTHON="/nonexistent/python3"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT_TIMEOUT_S,
        check=False,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "==> PYTHON=/nonexistent/python3 is not a Python 3.11 or later with venv and ensurepip\n"
    )
    assert not venv.exists()


def _lines(stream: IO[str]) -> queue.Queue[str | None]:
    """The lines of ``stream`` as a reader thread gets them; None once it ends."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _next(lines: queue.Queue[str | None], what: str) -> str:
    line = lines.get(timeout=WAIT_TIMEOUT_S)
    assert line is not None, f"the output ended before {what}"
    return line


#: A shell's usual soft open-file limit, and the units' LimitNOFILE that ./dev serve raises it to.
SHELL_OPEN_FILES, UNIT_OPEN_FILES = 1024, 16384


def _shell_open_files() -> None:
    """In the child: the soft open-file limit a login shell usually has."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (SHELL_OPEN_FILES, hard))


def test_serve_listens_on_loopback_and_says_where_even_on_ports_the_kernel_picks() -> None:
    proc = subprocess.Popen(
        [str(DEV), "serve", "--port", "0", "--admin-port", "0"],
        env=dev_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_shell_open_files,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    out, err = _lines(proc.stdout), _lines(proc.stderr)
    try:
        ready = None
        before: list[str] = []
        while ready is None:
            event = json.loads(_next(out, "server.ready"))
            before.append(event["event"])
            if event["event"] == "server.ready":
                ready = event
        assert ready["listeners"] == [f"127.0.0.1:{ready['port']}"]
        # From a shell's 1024 to the units' limit, where the hard limit allows (here
        # 20,000): no warning that the limit is below what the default caps need.
        if resource.getrlimit(resource.RLIMIT_NOFILE)[1] >= UNIT_OPEN_FILES:
            assert "server.descriptors" not in before
            with open(f"/proc/{proc.pid}/limits") as limits:  # proc.pid: dev became relayd
                [open_files] = [row for row in limits if row.startswith("Max open files")]
            assert open_files.split()[3] == str(UNIT_OPEN_FILES)
        admin = ready["admin"]
        # The ports relayd bound, not the 0 it was given, and URLs that answer.
        banner = [_next(err, "the banner") for _ in range(4)]
        assert banner == [
            f"==> relayd on ws://127.0.0.1:{ready['port']}/: loopback, only this machine can"
            " connect",
            '    (--host "" listens on every interface, as an installed relayd does)',
            f"==> metrics on http://{admin}/metrics (health: /healthz, readiness: /readyz)",
            f"==> server API on http://{admin}/api/: no key, any process on this machine may"
            " call it (docs/api.md)",
        ]
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=WAIT_TIMEOUT_S) as answer:
            assert b"relayd_connections_open" in answer.read()
        ids = urllib.request.Request(
            f"http://{admin}/api/ids",
            data=b"{}",
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(ids, timeout=WAIT_TIMEOUT_S) as answer:
            assert json.loads(answer.read()) == {"ids": [], "next": None}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT_TIMEOUT_S) == 0
        # relayd's own lines still come through after the banner, to the last one.
        rest = []
        while (line := out.get(timeout=WAIT_TIMEOUT_S)) is not None:
            rest.append(json.loads(line)["event"])
        assert rest[-1] == "server.stop"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT_TIMEOUT_S)
        proc.stdout.close()
        proc.stderr.close()
