"""The systemd units and install scripts in ``systemd/``, checked with systemd's own tools.

* ``systemd-analyze verify`` is clean on relayd.service and relayd.socket.
* ``systemd-analyze security --offline=true`` rates relayd.service at an exposure of
  :data:`MAX_EXPOSURE` or lower.
* The units agree with relayd's contract and with ``config/relayd.toml``: Type=notify,
  SIGHUP reload, no restart on exit 78, a stop timeout above the drain, an open-files
  limit above max_connections, the socket's name and port.
* ``systemd/sysusers.d/relayd.conf`` creates the unit's user; ``install.sh`` and
  ``uninstall.sh`` pass shellcheck, and their ``--dry-run`` prints every step and changes
  nothing.

The tools come from Debian's ``systemd`` and ``shellcheck`` packages; a missing one skips
its tests, or fails them under ``CI=true`` (:func:`tests.e2e.harness.require_tool`).
Nothing here starts systemd or installs anything: that needs systemd as PID 1, in a
container (tests/e2e/test_nspawn.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

import pytest

from tests.e2e.harness import require_tool

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
SYSTEMD_DIR: Final = REPO_ROOT / "systemd"
SERVICE: Final = SYSTEMD_DIR / "relayd.service"
TEMPLATE: Final = SYSTEMD_DIR / "relayd@.service"
SOCKET: Final = SYSTEMD_DIR / "relayd.socket"
SYSUSERS: Final = SYSTEMD_DIR / "sysusers.d" / "relayd.conf"
INSTALL: Final = SYSTEMD_DIR / "install.sh"
OPERATIONS: Final = REPO_ROOT / "docs" / "operations.md"
UNINSTALL: Final = SYSTEMD_DIR / "uninstall.sh"
CONFIG: Final = REPO_ROOT / "config" / "relayd.toml"

#: The highest ``systemd-analyze security`` exposure allowed (Debian's redis-server.service,
#: the model, scores 1.2).
MAX_EXPOSURE: Final = 1.2
#: Where install.sh puts relayd; the units name these paths.
RELAYD_BIN: Final = "/opt/relayd/bin/relayd"
INSTALLED_PYTHON: Final = Path("/opt/relayd/bin/python")
ETC_CONFIG: Final = "/etc/relayd/relayd.toml"
#: Open files beyond max_connections the unit must allow for: listeners, epoll, the
#: journal stream, and handshakes being refused with 503 once the limit is reached.
MIN_SPARE_FDS: Final = 1024
#: Seconds the stop timeout must leave above shutdown_grace_s for the interpreter to exit.
MIN_STOP_SLACK_S: Final = 10.0
#: Seconds any one tool run may take; they finish in well under one.
TOOL_TIMEOUT_S: Final = 60.0


def run_tool(
    argv: Sequence[str | Path], *, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a tool with plain, uncoloured output, capturing both streams."""
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "NO_COLOR": "1"}
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
        env=env,
        cwd=cwd,
    )


# -- reading unit files ----------------------------------------------------------------


def unit_settings(path: Path) -> dict[tuple[str, str], list[str]]:
    """Every ``Key=value`` of a unit file by (section, key), repeated keys in order.

    Enough of systemd.syntax(7) for the units here: comments, sections, assignments, and
    backslash continuations.
    """
    settings: dict[tuple[str, str], list[str]] = {}
    section = ""
    logical = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = logical + raw.strip()
        if line.endswith("\\"):
            logical = line[:-1] + " "
            continue
        logical = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not an assignment: {line!r}"
        settings.setdefault((section, key.strip()), []).append(value.strip())
    return settings


def only(settings: dict[tuple[str, str], list[str]], section: str, key: str) -> str:
    """The one value of ``key`` in ``section``."""
    values = settings.get((section, key), [])
    assert len(values) == 1, f"[{section}] {key}= is set {len(values)} times: {values}"
    return values[0]


_TIMESPAN_UNITS: Final = {"ms": 0.001, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}


def timespan_s(text: str) -> float:
    """Seconds in a systemd time span such as ``30s``, ``1min 30s`` or ``90``."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert parts, f"not a time span: {text!r}"
    assert re.fullmatch(r"(\s*\d+(?:\.\d+)?\s*[a-z]*)+\s*", text), f"not a time span: {text!r}"
    return sum(float(n) * _TIMESPAN_UNITS[unit or "s"] for n, unit in parts)


def relayd_defaults() -> dict[str, dict[str, object]]:
    """config/relayd.toml, which holds every setting at its default."""
    with CONFIG.open("rb") as f:
        return tomllib.load(f)


# -- systemd-analyze security ----------------------------------------------------------

_ANSI: Final = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_OVERALL: Final = re.compile(r"Overall exposure level for (\S+):\s*(\d+(?:\.\d+)?)\b")


def parse_exposure(output: str, unit: str) -> float:
    """The overall exposure ``systemd-analyze security`` printed for ``unit``.

    Tolerates colour codes and either arrow (the UTF-8 one or ``->`` in the C locale).

    Raises:
        ValueError: no overall exposure line for ``unit``.
    """
    for name, value in _OVERALL.findall(_ANSI.sub("", output)):
        if name == unit:
            return float(value)
    raise ValueError(f"no overall exposure for {unit} in:\n{output}")


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("→ Overall exposure level for relayd.service: 1.1 OK 🙂\n", 1.1),
        ("-> Overall exposure level for relayd.service: 9.6 UNSAFE :-{\n", 9.6),
        ("\x1b[1m→ Overall exposure level for relayd.service: \x1b[0;32m1.2 OK\x1b[0m", 1.2),
        ("table...\n→ Overall exposure level for relayd.service: 10.0 UNSAFE 😨\n", 10.0),
    ],
)
def test_parse_exposure_reads_the_overall_line(output: str, expected: float) -> None:
    assert parse_exposure(output, "relayd.service") == expected


@pytest.mark.parametrize(
    "output",
    [
        "",
        "→ Overall exposure level for other.service: 1.1 OK\n",
        "Overall exposure level for relayd.service: OK\n",
    ],
)
def test_parse_exposure_refuses_output_without_a_score(output: str) -> None:
    with pytest.raises(ValueError, match="no overall exposure"):
        parse_exposure(output, "relayd.service")


@pytest.mark.parametrize("instance", ["relayd.service", "relayd@9031.service"])
def test_service_exposure_is_at_most_1_2(tmp_path: Path, instance: str) -> None:
    analyze = require_tool("systemd-analyze")
    # --threshold is in tenths: the command itself fails above 1.2, whatever the text says.
    threshold = round(MAX_EXPOSURE * 10)
    # A template is rated as one of its instances.
    unit = tmp_path / instance
    unit.write_text((TEMPLATE if "@" in instance else SERVICE).read_text(encoding="utf-8"))
    result = run_tool([analyze, "security", "--offline=true", f"--threshold={threshold}", unit])
    exposure = parse_exposure(result.stdout, instance)
    summary = "\n".join(
        line for line in result.stdout.splitlines() if line.lstrip().startswith(("✗", "→", "->"))
    )
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{summary}"
    assert result.returncode == 0, (
        f"systemd-analyze security exited {result.returncode} (--threshold={threshold})\n"
        f"{result.stdout}\n{result.stderr}"
    )


# -- systemd-analyze verify ------------------------------------------------------------


def verifiable_copies(directory: Path, units: Sequence[Path] = (SERVICE, SOCKET)) -> list[Path]:
    """Copies of ``units`` that verify can check on a machine where relayd is not installed.

    verify insists that every Exec*= binary exists. /opt/relayd/bin/relayd exists only
    after install.sh, and /bin/kill only with procps (which install.sh installs), so any
    Exec*= binary missing here is pointed at a stub; everything else is unchanged.
    """
    stub = directory / "relayd-stub"
    stub.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stub.chmod(0o755)
    exec_line = re.compile(r"^(Exec[A-Za-z]*=[-@:+!]*)(/\S+)", re.MULTILINE)

    def point_at_stub(match: re.Match[str]) -> str:
        binary = Path(match.group(2))
        return match.group(1) + (str(binary) if os.access(binary, os.X_OK) else str(stub))

    copies = []
    for unit in units:
        copy = directory / unit.name
        copy.write_text(exec_line.sub(point_at_stub, unit.read_text(encoding="utf-8")))
        copies.append(copy)
    return copies


def verify(units: Sequence[Path]) -> tuple[int, list[str]]:
    """Run ``systemd-analyze verify``; return its status and its complaints about relayd.

    verify also loads the host's own units (sysinit.target and the like) and may grumble
    about those; only lines naming a relayd unit count.
    """
    analyze = require_tool("systemd-analyze")
    result = run_tool([analyze, "verify", *units])
    lines = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in lines if "relayd" in line]


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    status, complaints = verify(verifiable_copies(tmp_path))
    assert complaints == [], "\n".join(complaints)
    assert status == 0


def test_node_template_passes_verify_as_an_instance(tmp_path: Path) -> None:
    [template, socket, service] = verifiable_copies(tmp_path, (TEMPLATE, SOCKET, SERVICE))
    instance = template.with_name("relayd@9031.service")
    template.rename(instance)
    status, complaints = verify([instance, socket, service])
    assert complaints == [], "\n".join(complaints)
    assert status == 0


def test_node_template_is_a_cluster_node_binding_the_port_with_reuse_port() -> None:
    unit = unit_settings(TEMPLATE)
    # Each node binds the port itself, with SO_REUSEPORT: relayd.socket's one socket,
    # shared, went to whichever node accepted first (dozens of clients in a row to one).
    assert ("Service", "Sockets") not in unit
    assert "relayd.socket" not in " ".join(unit.get(("Unit", "After"), []))
    assert only(unit, "Service", "ExecStart").endswith("--admin-port %i")
    environment = " ".join(unit[("Service", "Environment")]).split()
    assert "RELAYD_CLUSTER__ENABLED=true" in environment
    assert "RELAYD_CLUSTER__NODE_NAME=%H-%i" in environment
    assert "RELAYD_SERVER__REUSE_PORT=true" in environment
    # Redis is wanted, never required: a node serves its own clients without it; and
    # nothing else is required either (a node needs no other unit to serve).
    assert "redis-server.service" in only(unit, "Unit", "Wants")
    assert ("Unit", "Requires") not in unit
    # Everything else as the single daemon's unit.
    single = unit_settings(SERVICE)
    for key in ("Type", "User", "WatchdogSec", "TimeoutStopSec", "RestartPreventExitStatus"):
        assert unit[("Service", key)] == single[("Service", key)], key


@pytest.mark.parametrize(
    ("mistake", "complaint"),
    [
        ("Restart=on-failure", "Restart=sometimes"),
        ("WatchdogSec=30s", "WatchdogSecs=30s"),
        ("Requires=relayd.socket", "Requires=relayd-typo.socket"),
    ],
)
def test_verify_catches_a_broken_unit(tmp_path: Path, mistake: str, complaint: str) -> None:
    # The check above would pass vacuously if verify stopped reporting problems.
    service, socket = verifiable_copies(tmp_path)
    text = service.read_text(encoding="utf-8")
    assert f"\n{mistake}\n" in text
    service.write_text(text.replace(f"\n{mistake}\n", f"\n{complaint}\n"), encoding="utf-8")
    status, complaints = verify([service, socket])
    assert complaints, f"verify accepted {complaint!r} (status {status})"


# -- what the units promise ------------------------------------------------------------


def test_service_runs_relayd_as_a_notify_service_with_a_sighup_reload() -> None:
    unit = unit_settings(SERVICE)
    assert only(unit, "Service", "Type") == "notify"
    assert only(unit, "Service", "NotifyAccess") == "main"
    assert only(unit, "Service", "ExecStart") == f"{RELAYD_BIN} serve --config {ETC_CONFIG}"
    assert only(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert timespan_s(only(unit, "Service", "WatchdogSec")) > 0


def test_a_bad_config_is_not_restarted_in_a_loop() -> None:
    unit = unit_settings(SERVICE)
    assert only(unit, "Service", "Restart") == "on-failure"
    assert "78" in only(unit, "Service", "RestartPreventExitStatus").split()
    # Restarts of a process that keeps dying soon after start stop at the start limit.
    assert int(only(unit, "Unit", "StartLimitBurst")) > 0
    interval = timespan_s(only(unit, "Unit", "StartLimitIntervalSec"))
    restart_sec = timespan_s(only(unit, "Service", "RestartSec"))
    assert interval > restart_sec * int(only(unit, "Unit", "StartLimitBurst"))


@pytest.mark.parametrize("unit_file", [SERVICE, TEMPLATE], ids=lambda path: path.name)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_second_stop_signal_is_a_stop_not_a_crash(unit_file: Path, signum: int) -> None:
    # A second SIGTERM (SIGINT) cuts the drain short and relayd exits 128 + its number.
    # Restart=on-failure restarted relayd after that (`kill` twice, `systemctl kill`
    # twice) unless the status counts as a clean exit.
    unit = unit_settings(unit_file)
    assert only(unit, "Service", "Restart") == "on-failure"
    clean = {
        status for line in unit.get(("Service", "SuccessExitStatus"), []) for status in line.split()
    }
    assert str(128 + signum) in clean


def test_stop_timeout_leaves_room_for_the_drain() -> None:
    grace_s = relayd_defaults()["server"]["shutdown_grace_s"]
    assert isinstance(grace_s, float)
    stop_s = timespan_s(only(unit_settings(SERVICE), "Service", "TimeoutStopSec"))
    assert stop_s >= grace_s + MIN_STOP_SLACK_S


def test_open_files_limit_covers_max_connections() -> None:
    max_connections = relayd_defaults()["limits"]["max_connections"]
    assert isinstance(max_connections, int)
    limit = only(unit_settings(SERVICE), "Service", "LimitNOFILE")
    assert int(limit) >= max_connections + MIN_SPARE_FDS


def test_journald_keeps_every_line() -> None:
    # One message.relay line per message outruns journald's default 10000 lines per 30 s.
    assert timespan_s(only(unit_settings(SERVICE), "Service", "LogRateLimitIntervalSec")) == 0


def test_service_needs_its_socket() -> None:
    unit = unit_settings(SERVICE)
    assert "relayd.socket" in only(unit, "Unit", "Requires").split()
    assert "relayd.socket" in only(unit, "Unit", "After").split()
    assert only(unit, "Install", "Also") == "relayd.socket"


def test_socket_hands_relayd_its_named_public_port() -> None:
    socket = unit_settings(SOCKET)
    port = relayd_defaults()["server"]["port"]
    assert only(socket, "Socket", "ListenStream") == str(port)
    assert only(socket, "Socket", "FileDescriptorName") == "relayd"
    assert only(socket, "Socket", "Accept") == "no"
    assert only(socket, "Socket", "Service") == "relayd.service"
    assert only(socket, "Install", "WantedBy") == "sockets.target"


# -- the service user ------------------------------------------------------------------


def test_sysusers_file_creates_the_units_user(tmp_path: Path) -> None:
    sysusers = require_tool("systemd-sysusers")
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("passwd", "group", "shadow", "gshadow"):
        (etc / name).touch()
    result = run_tool([sysusers, f"--root={tmp_path}", SYSUSERS])
    assert result.returncode == 0, result.stderr
    unit = unit_settings(SERVICE)
    user, group = only(unit, "Service", "User"), only(unit, "Service", "Group")
    passwd = [line.split(":") for line in (etc / "passwd").read_text().splitlines()]
    groups = [line.split(":")[0] for line in (etc / "group").read_text().splitlines()]
    [entry] = [fields for fields in passwd if fields[0] == user]
    assert entry[5:] == ["/nonexistent", "/usr/sbin/nologin"]
    assert int(entry[2]) < 1000, "not a system user"
    assert group in groups


# -- install.sh and uninstall.sh -------------------------------------------------------

SCRIPTS: Final = [INSTALL, UNINSTALL]
#: Paths the scripts create or remove, which a dry run must leave as they were.
INSTALLED_PATHS: Final = [
    Path("/opt/relayd"),
    Path("/etc/relayd"),
    Path("/etc/sysusers.d/relayd.conf"),
    Path("/etc/systemd/system/relayd.service"),
    Path("/etc/systemd/system/relayd.socket"),
]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script: Path) -> None:
    shellcheck = require_tool("shellcheck")
    result = run_tool([shellcheck, "--severity=style", "--external-sources", script])
    assert result.returncode == 0, result.stdout + result.stderr


def run_script(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a script with bash from a directory elsewhere, as an operator might."""
    bash = shutil.which("bash")
    assert bash is not None
    return run_tool([bash, script, *args], cwd=Path("/"))


def existing(paths: Sequence[Path]) -> list[Path]:
    """Those of ``paths`` that exist."""
    return [p for p in paths if p.exists()]


def assert_only_step_lines(output: str) -> None:
    """Every line is a step (``==>``), a command (``+``) or a note (indented)."""
    for line in output.splitlines():
        assert line.startswith(("==> ", "+ ", "    ")), f"unexpected line: {line!r}"


def test_install_dry_run_prints_each_step_and_changes_nothing() -> None:
    before = existing(INSTALLED_PATHS)
    result = run_script(INSTALL, "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert existing(INSTALLED_PATHS) == before
    out = result.stdout
    assert_only_step_lines(out)
    assert f"+ install -D -m 0644 {SYSUSERS} /etc/sysusers.d/relayd.conf" in out
    # relayd is pip-installed from this checkout, by absolute path, never by name.
    assert re.search(r"^\+ /opt/relayd/bin/python -m pip install .* /\S+$", out, re.MULTILINE)
    if Path(ETC_CONFIG).exists():
        assert f"{ETC_CONFIG} exists: kept as it is" in out
    else:
        assert f"+ install -m 0640 -o root -g relayd {CONFIG} {ETC_CONFIG}" in out
    assert f"check-config --config {ETC_CONFIG}" in out
    assert f"+ install -m 0644 {SERVICE} {TEMPLATE} {SOCKET} /etc/systemd/system/" in out
    commands = [line for line in out.splitlines() if line.startswith("+ systemctl")]
    assert commands[0] == "+ systemctl daemon-reload"
    assert "+ systemctl enable relayd.socket relayd.service" in commands
    assert commands[-1] == "+ systemctl restart relayd.service"


def test_the_install_transcript_in_operations_md_shows_every_command_the_script_runs() -> None:
    # docs/operations.md's transcript was captured with the checkout at /home/admin/relayd;
    # the dry run prints the same commands, bar the build directory's random name.
    result = run_script(INSTALL, "--dry-run")
    assert result.returncode == 0, result.stderr

    def commands(text: str) -> list[str]:
        lines = [line for line in text.splitlines() if line.startswith("+ ")]
        return [re.sub(r"relayd-build\.\w+", "relayd-build.X", line) for line in lines]

    install = OPERATIONS.read_text().split("\n## Install\n", 1)[1].split("```text\n", 1)[1]
    documented = commands(install.split("```", 1)[0])
    ran = commands(result.stdout.replace(str(REPO_ROOT), "/home/admin/relayd"))
    assert documented == ran


def test_install_dry_run_of_a_cluster_on_this_machine() -> None:
    before = existing(INSTALLED_PATHS)
    result = run_script(INSTALL, "--dry-run", "--nodes", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert existing(INSTALLED_PATHS) == before
    out = result.stdout
    assert_only_step_lines(out)
    # The config is checked as the nodes run it: a [cluster] password file relayd cannot
    # read passed the check of a single daemon's config, then stopped every node with 78.
    check = (
        f"env -i RELAYD_CLUSTER__ENABLED=true RELAYD_CLUSTER__NODE_NAME={os.uname().nodename}-9031"
        f" RELAYD_SERVER__REUSE_PORT=true /opt/relayd/bin/relayd check-config"
        f" --config {ETC_CONFIG} --admin-port 9031"
    )
    assert check in out
    # The port is the nodes' own: relayd.socket lets go of it, and a node's stop hands the
    # clients waiting for it to the others.
    assert "+ write /etc/sysctl.d/60-relayd.conf: net.ipv4.tcp_migrate_req = 1" in out
    assert "+ sysctl -q -w net.ipv4.tcp_migrate_req=1" in out
    commands = [line for line in out.splitlines() if line.startswith("+ systemctl")]
    assert "+ systemctl disable --now relayd.service relayd.socket" in commands
    assert "+ systemctl enable --now redis-server.service" in commands
    nodes = ["relayd@9031.service", "relayd@9032.service", "relayd@9033.service"]
    assert f"+ systemctl enable {' '.join(nodes)}" in commands
    assert not [line for line in commands if "relayd.socket" in line and "disable" not in line]
    # One node at a time, in order, and last: the others serve the port meanwhile.
    assert commands[-3:] == [f"+ systemctl restart {node}" for node in nodes]


def test_install_builds_the_service_on_debians_python_not_the_first_on_path(
    tmp_path: Path,
) -> None:
    # A pyenv or conda python3 first on root's PATH lives under /root (0700): a venv made
    # from it is one the relayd user cannot run, and apt never updates it.
    decoy = tmp_path / "bin" / "python3"
    decoy.parent.mkdir()
    ran = tmp_path / "decoy-ran"
    decoy.write_text(f"#!/bin/sh\ntouch {ran}\nexit 0\n")
    decoy.chmod(0o755)
    bash = shutil.which("bash")
    assert bash is not None
    result = subprocess.run(
        [bash, str(INSTALL), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
        env={**os.environ, "PATH": f"{decoy.parent}:{os.environ['PATH']}"},
        cwd="/",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not ran.exists(), "install.sh ran the first python3 on PATH"
    venv = [line for line in result.stdout.splitlines() if " -m venv " in line]
    if INSTALLED_PYTHON.exists():  # an installed relayd: reused only if made the same way
        reused = INSTALLED_PYTHON.resolve() == Path("/usr/bin/python3").resolve()
        assert ("reusing /opt/relayd" in result.stdout) == reused, result.stdout
        assert venv == ([] if reused else ["+ /usr/bin/python3 -m venv --clear /opt/relayd"])
    else:
        assert venv == ["+ /usr/bin/python3 -m venv --clear /opt/relayd"], result.stdout


@pytest.mark.parametrize("nodes", ["x", "-1", "65"])
def test_install_refuses_a_bad_node_count(nodes: str) -> None:
    result = run_script(INSTALL, "--dry-run", "--nodes", nodes)
    assert result.returncode == 2
    assert "--nodes" in result.stderr


def test_install_keeps_the_operators_config() -> None:
    # The one line that writes /etc/relayd/relayd.toml runs only when there is none.
    text = INSTALL.read_text(encoding="utf-8")
    writes = [line for line in text.splitlines() if '"$CONFIG"' in line and "install " in line]
    assert len(writes) == 1, writes
    guard = text[: text.index(writes[0])].rsplit("if ", 1)[1]
    assert guard.startswith('[ -e "$CONFIG" ]'), guard


@pytest.mark.parametrize("args", [(), ("--purge",)], ids=["keep-config", "purge"])
def test_uninstall_dry_run_changes_nothing(args: tuple[str, ...]) -> None:
    before = existing(INSTALLED_PATHS)
    result = run_script(UNINSTALL, "--dry-run", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert existing(INSTALLED_PATHS) == before
    assert_only_step_lines(result.stdout)
    kept = "==> keeping /etc/relayd" in result.stdout
    assert kept == (args == ())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_refuses_an_unknown_argument(script: Path) -> None:
    result = run_script(script, "--bogus")
    assert result.returncode == 2
    assert "unknown argument --bogus" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_help_is_its_header(script: Path) -> None:
    result = run_script(script, "--help")
    assert result.returncode == 0
    assert "--dry-run" in result.stdout
    assert not any(line.startswith("#") for line in result.stdout.splitlines())


# -- install.sh --nodes: relayd.socket's addresses against [server]'s -----------------


def _socket_addresses() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "socket_addresses", SYSTEMD_DIR / "socket_addresses.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMPARE: Final = _socket_addresses()
#: relayd.socket as shipped (ListenStream=9030, BindIPv6Only=both), as systemctl shows it.
SHIPPED: Final = ("[::]:9030 (Stream)", "both")


@pytest.mark.parametrize(
    ("listen", "host", "port", "same"),
    [
        # The shipped socket is dual-stack: relayd's host "" binds 0.0.0.0 and :: apart.
        (SHIPPED, "", 9030, True),
        # "::" binds IPv6 alone (IPV6_V6ONLY): IPv4 clients would be refused.
        (SHIPPED, "::", 9030, False),
        (SHIPPED, "0.0.0.0", 9030, False),
        (SHIPPED, "", 8080, False),
        (("[::]:9030 (Stream)", "ipv6-only"), "::", 9030, True),
        (("[::]:9030 (Stream)", "ipv6-only"), "", 9030, False),
        # A kernel without IPv6: systemd binds 0.0.0.0 for ListenStream=9030.
        (("0.0.0.0:9030 (Stream)", "both"), "0.0.0.0", 9030, True),
        # A drop-in moving the port to loopback, behind a proxy.
        (("127.0.0.1:8080 (Stream)", "both"), "127.0.0.1", 8080, True),
        (("127.0.0.1:8080 (Stream)", "both"), "", 8080, False),
        (("[::1]:8080 (Stream)", "both"), "::1", 8080, True),
        (("[::1]:8080 (Stream)", "both"), "0:0:0:0:0:0:0:1", 8080, True),  # one address
        # Two ListenStream= lines, one per line in systemctl show.
        (("127.0.0.1:8080 (Stream)\n[::1]:8080 (Stream)", "both"), "127.0.0.1", 8080, False),
    ],
)
def test_socket_addresses_compares_addresses_not_spellings(
    listen: tuple[str, str], host: str, port: int, same: bool
) -> None:
    theirs = COMPARE.socket_side(*listen)
    ours = COMPARE.relayd_side(host, port, ipv6=True)
    assert (theirs == ours) is same, (theirs, ours)


def test_socket_addresses_without_ipv6_drops_it_as_relayd_does() -> None:
    # On a kernel without IPv6 relayd skips the family, so host "" binds 0.0.0.0 alone.
    assert COMPARE.relayd_side("", 9030, ipv6=False) == {("0.0.0.0", 9030)}
    assert COMPARE.socket_side("0.0.0.0:9030 (Stream)", "both") == {("0.0.0.0", 9030)}


def test_socket_addresses_resolves_a_host_name_as_relayd_binds_it() -> None:
    loopback = COMPARE.relayd_side("localhost", 8080, ipv6=True)
    assert ("127.0.0.1", 8080) in loopback
    assert loopback == COMPARE.relayd_side("localhost", 8080, ipv6=True)
    listen = "\n".join(
        f"[{host}]:8080 (Stream)" if ":" in host else f"{host}:8080 (Stream)"
        for host, _ in sorted(loopback)
    )
    assert COMPARE.socket_side(listen, "both") == loopback


@pytest.mark.parametrize(
    ("listen", "server", "status", "said"),
    [
        ("[::]:9030 (Stream)", {"host": "", "port": 9030}, 0, ""),
        (
            "127.0.0.1:8080 (Stream)",
            {"host": "", "port": 9030},
            1,
            "relayd.socket listens on 127.0.0.1:8080, but the nodes would bind",
        ),
        ("/run/relayd.sock (Stream)", {"host": "", "port": 9030}, 2, "cannot compare"),
        ("[::]:9030 (Datagram)", {"host": "", "port": 9030}, 2, "not a stream socket"),
    ],
)
def test_socket_addresses_as_install_sh_runs_it(
    listen: str, server: dict[str, object], status: int, said: str
) -> None:
    result = subprocess.run(
        [sys.executable, str(SYSTEMD_DIR / "socket_addresses.py"), listen, "both"],
        input=json.dumps({"server": server}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == status, result.stderr
    assert said in result.stderr
    if status == 0:
        assert result.stderr == ""
