"""``relayd.client`` as a user installs it: alone, from the built wheel, typed, as documented.

* Importing the client imports nothing of the daemon, in a fresh interpreter's
  ``sys.modules`` (tests/test_layout.py holds the other way round, and reads the imports).
* The wheel is built from this tree (``pip wheel``, no build isolation: no package index
  is needed) and installed into a new virtual environment that holds the client's own
  dependencies and nothing else: pydantic, structlog, prometheus_client and PyJWT are not
  there at all.
* Every ``python`` block in docs/client.md is a whole program: each one is type-checked
  with ``mypy --strict`` against the installed wheel (its ``py.typed``), and each one the
  page shows output for is run there against an in-process relayd, its output compared
  with the page's (ids aside).
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
import structlog
import trio
import trio.testing
from packaging.requirements import Requirement

import relayd.client
from relayd.daemon.server import Server
from tests.client import connect, running, settings

REPO: Final = Path(__file__).resolve().parents[1]
DOCS: Final = REPO / "docs" / "client.md"
#: The daemon's own dependencies and modules: a program using the client needs none.
DAEMON_ONLY: Final = (
    "pydantic",
    "pydantic_core",
    "pydantic_settings",
    "structlog",
    "prometheus_client",
    "jwt",
    "cryptography",
    "coredis",
    "relayd.daemon",
    "relayd.config",
    "relayd.telemetry",
    "relayd.policy",
    "relayd.routing",
)
#: What the client is built on: these and their own requirements go into the wheel's venv.
CLIENT_REQUIRES: Final = ("trio", "trio-websocket", "msgspec")
PIP: Final = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
#: Bound on one subprocess here (building, installing, type-checking, a program's run).
STEP_TIMEOUT_S: Final = 300.0
#: A relayd id, as the programs print them: 22 URL-safe base64 characters.
ID: Final = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{22}(?![A-Za-z0-9_-])")


def _modules_after(statement: str, python: str = sys.executable) -> set[str]:
    """The modules a fresh interpreter holds after running ``statement``."""
    code = f"{statement}\nimport sys\nprint('\\n'.join(sys.modules))"
    done = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return set(done.stdout.split())


def _daemon_only(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == d or m.startswith(f"{d}.") for d in DAEMON_ONLY))


def test_importing_the_client_imports_nothing_of_the_daemon() -> None:
    modules = _modules_after("import relayd.client, relayd.client.chat")
    assert "trio_websocket" in modules
    assert _daemon_only(modules) == []


def test_the_public_names_are_pinned() -> None:
    assert sorted(relayd.client.__all__) == [
        "Backoff",
        "Client",
        "ClientError",
        "CloseCode",
        "CloseInfo",
        "ConnectError",
        "ConnectTimeout",
        "ConnectionClosed",
        "ConnectionLost",
        "DeliveryUnconfirmed",
        "Dialect",
        "ErrorCode",
        "HandshakeRefused",
        "InternalError",
        "InvalidData",
        "InvalidEnvelope",
        "InvalidJSON",
        "Message",
        "MessageTooBig",
        "MessageTooLarge",
        "NormalClosure",
        "PolicyViolation",
        "ProtocolViolation",
        "RateLimited",
        "RecipientBusy",
        "RecipientUnreachable",
        "SendError",
        "ServerShuttingDown",
        "TLSError",
        "TryAgainLater",
        "UnknownRecipient",
        "UnsupportedData",
        "connect",
    ]
    assert all(hasattr(relayd.client, name) for name in relayd.client.__all__)


# -- the wheel, alone --------------------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    """A virtual environment with relayd's wheel and only the client's dependencies."""

    wheel: Path
    python: Path
    home: Path  # a directory outside the checkout: programs run from here


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done


def _distributions(names: tuple[str, ...]) -> set[str]:
    """``names`` and every distribution they require, as installed here (no extras)."""
    found: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in found:
            continue
        found.add(key)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def _link_distributions(names: set[str], into: Path) -> None:
    """Make each distribution's top-level files and folders appear in ``into``."""
    site = Path(sysconfig.get_paths()["purelib"])
    for name in names:
        distribution = importlib.metadata.distribution(name)
        tops = {Path(str(file)).parts[0] for file in distribution.files or []}
        for top in tops - {"..", "__pycache__"}:
            if (site / top).exists() and not (into / top).exists():
                (into / top).symlink_to(site / top)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "relayd", source / "relayd", ignore=shutil.ignore_patterns("__pycache__")
    )
    _run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(source)]
    )
    [wheel] = (work / "dist").glob("relayd-*.whl")
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    deps = work / "client-deps"
    deps.mkdir()
    _link_distributions(_distributions(CLIENT_REQUIRES), deps)
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    Path(purelib.stdout.strip(), "client-deps.pth").write_text(f"{deps}\n", encoding="utf-8")
    _run([*PIP, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)])
    home = work / "home"
    home.mkdir()
    return Installed(wheel, python, home)


def test_the_wheel_ships_the_client_and_its_type_information(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    assert "relayd/py.typed" in names
    assert {f"relayd/client/{m}.py" for m in ("__init__", "client", "link", "chat")} <= names


def test_the_wheel_runs_the_client_without_the_daemons_dependencies(
    installed: Installed,
) -> None:
    python = str(installed.python)
    for missing in ("pydantic", "structlog", "prometheus_client", "jwt"):
        absent = subprocess.run(
            [python, "-c", f"import {missing}"], capture_output=True, timeout=60, check=False
        )
        assert absent.returncode == 1, f"{missing} is installed beside the wheel"
    modules = _modules_after("import relayd.client, relayd.client.chat", python)
    assert _daemon_only(modules) == []
    help_text = _run([str(installed.python.parent / "relayd"), "chat", "--help"])
    assert help_text.stdout.startswith("usage: relayd chat ")


# -- docs/client.md ----------------------------------------------------------------------


@dataclass(frozen=True)
class Program:
    """One whole program of docs/client.md and the output the page shows for it, if any."""

    name: str
    code: str
    output: str | None


def _programs() -> list[Program]:
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.finditer(r"```python\n(.*?)```\n(?:\n```text\n(.*?)```\n)?", text, re.DOTALL)
    programs = []
    for block in blocks:
        code, output = block[1], block[2]
        name = re.match(r"# (\w+\.py):", code)
        assert name is not None, f"a program in {DOCS.name} starts with '# NAME.py:'\n{code}"
        programs.append(Program(name[1], code, output))
    return programs


PROGRAMS: Final = _programs()


def test_the_page_has_programs_to_run() -> None:
    assert len(PROGRAMS) >= 6
    assert len([p for p in PROGRAMS if p.output is not None]) >= 5
    assert len({p.name for p in PROGRAMS}) == len(PROGRAMS)


def test_every_program_type_checks_under_mypy_strict(installed: Installed) -> None:
    for program in PROGRAMS:
        (installed.home / program.name).write_text(program.code, encoding="utf-8")
    _run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--config-file", "/dev/null"]
        + ["--python-executable", str(installed.python)]
        + [program.name for program in PROGRAMS],
        cwd=installed.home,
    )


#: Programs that run until Ctrl-C, each run by a test of its own.
UNTIL_INTERRUPTED: Final = frozenset({"reconnect.py"})


@pytest.mark.parametrize(
    "program",
    [p for p in PROGRAMS if p.output is not None and p.name not in UNTIL_INTERRUPTED],
    ids=lambda p: p.name,
)
async def test_every_program_prints_what_the_page_shows(
    program: Program, installed: Installed
) -> None:
    path = installed.home / program.name
    path.write_text(program.code, encoding="utf-8")
    async with running(Server(settings())) as url:
        with trio.fail_after(60):
            done = await trio.run_process(
                [str(installed.python), str(path), url],
                cwd=installed.home,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stderr
    assert program.output is not None
    assert ID.sub("<id>", stdout) == ID.sub("<id>", program.output), stdout


async def test_the_reconnecting_program_ends_on_ctrl_c_with_a_line_not_a_traceback(
    installed: Installed,
) -> None:
    [program] = [p for p in PROGRAMS if p.name == "reconnect.py"]
    path = installed.home / program.name
    path.write_text(program.code, encoding="utf-8")
    with structlog.testing.capture_logs() as events:
        async with running(Server(settings())) as url, connect(url) as peer:
            proc = await trio.lowlevel.open_process(
                [str(installed.python), str(path), url],
                cwd=installed.home,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                # Ctrl-C as at a terminal: a child of a shell without job control would
                # inherit SIGINT ignored, and Python would leave it so.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
            assert proc.stdout is not None
            assert proc.stderr is not None
            try:
                with trio.fail_after(60):
                    out = bytearray()
                    while b"\n" not in out:
                        out += await proc.stdout.receive_some()
                    announced = ID.search(out.decode())
                    assert announced is not None, out
                    await peer.send(announced[0], "hello")
                    while out.count(b"\n") < 2:
                        out += await proc.stdout.receive_some()
                    proc.send_signal(signal.SIGINT)
                    while chunk := await proc.stdout.receive_some():
                        out += chunk
                    err = bytearray()
                    while chunk := await proc.stderr.receive_some():
                        err += chunk
                    status = await proc.wait()
            finally:
                with trio.CancelScope(shield=True):
                    if proc.poll() is None:
                        proc.kill()
                    await proc.wait()
                    await proc.stdout.aclose()
                    await proc.stderr.aclose()
            await trio.testing.wait_all_tasks_blocked()
    assert (status, err.decode()) == (0, "")
    assert program.output is not None
    assert ID.sub("<id>", out.decode()) == ID.sub("<id>", program.output)
    closes = [e for e in events if e["event"] == "connection.close" and e["id"] == announced[0]]
    assert [(e["code"], e["closed_by"]) for e in closes] == [(1000, "client")]


def _definitions(program: Program) -> dict[str, Any]:
    """What ``program`` defines before its ``main``, run as a module would be (no trio.run)."""
    namespace: dict[str, Any] = {"__name__": program.name.removesuffix(".py")}
    exec(program.code.split("\nasync def main(")[0], namespace)  # the page's own code
    return namespace


async def test_the_echo_bot_goes_on_answering_when_many_write_to_it_at_once() -> None:
    # The page's bot awaited each answer in the loop that reads: with more users writing at
    # once than the client's queue holds, the acks of its answers came behind messages that
    # nothing read any more, and it stopped answering for good.
    [program] = [p for p in PROGRAMS if p.name == "echo.py"]
    echo = _definitions(program)["echo"]
    users, rounds = 40, 5
    unlimited = {
        "messages_per_second": 1e6,
        "message_burst": 1_000_000,
        "frames_per_second": 1e6,
        "frame_burst": 1_000_000,
    }

    async def talk(user: relayd.client.Client, to: str, n: int) -> None:
        for word in range(rounds):
            for wait in relayd.client.Backoff(first_s=0.01, max_s=0.1).delays():
                try:
                    await user.send(to, [n, word])
                    break
                except relayd.client.RecipientBusy:  # more at once than the bot's queue
                    await trio.sleep(wait)
            reply = await user.receive()
            assert reply.data == {"echo": [n, word]}

    async with running(Server(settings(**unlimited))) as url, AsyncExitStack() as stack:
        bot = await stack.enter_async_context(relayd.client.connect(url))
        clients = [
            await stack.enter_async_context(relayd.client.connect(url)) for _ in range(users)
        ]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo, bot)
            with trio.fail_after(20):
                async with trio.open_nursery() as talking:
                    for n, user in enumerate(clients):
                        talking.start_soon(talk, user, bot.id, n)
            nursery.cancel_scope.cancel()
