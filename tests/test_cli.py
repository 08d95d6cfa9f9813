"""The ``relayd`` command as an operator uses it: flags, exit statuses, signals, stdout/stderr.

Most tests run the real command in a child process (``python -m relayd`` or the ``relayd``
console script) with an environment free of ``RELAYD_*`` and ``PORT`` and an explicit
``--config`` file, so neither the caller's environment nor ``/etc/relayd`` can leak in. The
precedence matrix runs :func:`relayd.cli.main` in-process, where it is quicker.

Nothing sleeps: a reader thread turns the daemon's stdout into a queue of lines, every wait
is a blocking read with a timeout, and only processes started here are ever signalled.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import pytest

import relayd
from relayd import cli
from relayd.cli import EX_CONFIG, EX_IOERR, main, settings_reader
from relayd.config import DEFAULT_CONFIG_PATH, Settings
from relayd.config_sources import LoadError
from tests import wire
from tests.deployments import KUBERNETES_SERVICE_LINKS
from tests.keys import ec_key, pem_private, pem_public, rsa_key

#: Bound on any one command that is expected to exit by itself.
RUN_TIMEOUT_S: Final = 30.0
#: Bound on waiting for a log event, a frame, or an exit after a signal.
WAIT_TIMEOUT_S: Final = 20.0
#: A second signal must end the process well before a drain could: the drains below are
#: held up for at least ``shutdown_grace_s`` (an hour), so this only has to beat that.
PROMPT_EXIT_S: Final = 10.0

MODULE: Final = [sys.executable, "-m", "relayd"]
SCRIPT: Final = [str(Path(sys.executable).parent / "relayd")]
COMMANDS: Final = [pytest.param(MODULE, id="python-m"), pytest.param(SCRIPT, id="script")]

DEFAULTS: Final[dict[str, Any]] = Settings().model_dump(mode="json")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that configures relayd, plus ``extra``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("RELAYD_")
        and name not in {"PORT", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID"}
    }
    env.update(extra)
    return env


def run(argv: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command to its exit, bounded by :data:`RUN_TIMEOUT_S`."""
    return subprocess.run(
        argv,
        env=clean_env() if env is None else env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """An empty config file: the built-in defaults, and /etc/relayd is never read."""
    path = tmp_path / "relayd.toml"
    path.write_text("# built-in defaults\n", encoding="utf-8")
    return path


def with_changes(changes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The defaults as JSON, with some keys of some sections changed."""
    expected: dict[str, Any] = json.loads(json.dumps(DEFAULTS))
    for section, values in changes.items():
        expected[section].update(values)
    return expected


# -- --version -------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_version_prints_name_and_version(command: list[str]) -> None:
    result = run([*command, "--version"])
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"relayd {relayd.__version__}\n"
    assert relayd.__version__[0].isdigit()  # the installed distribution's version


@pytest.mark.parametrize(
    "argv",
    [["--port", "abc"], ["check-config", "--admin-port", "x"], ["--log-level", "loud"], ["--nope"]],
)
def test_a_command_line_relayd_cannot_read_is_bad_settings(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # 78, not argparse's 2: the units' RestartPreventExitStatus=78 stops a unit with a
    # mistyped flag instead of restarting it in a loop.
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EX_CONFIG == 78
    err = capsys.readouterr().err
    assert err.startswith("usage: relayd")
    assert ": error: " in err.splitlines()[-1]


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "debug", "chat", "ws://127.0.0.1:9/"],
        ["--port", "0", "chat"],
        ["--log-format", "console", "chat", "--seed", "ws://127.0.0.1:9/"],
        ["--port", "0", "chat", "-h"],
    ],
    ids=["with-url", "alone", "with-chat-options", "with-chat-help"],
)
def test_chat_after_the_daemons_flags_is_refused_not_served(argv: list[str]) -> None:
    # Only `relayd chat ...` is the client. After daemon flags, `chat` was parsed as the
    # daemon's command: with a URL an "unrecognized arguments" error, alone a relay
    # serving on every interface (this run would then time out).
    result = run([*MODULE, "--admin-port", "0", *argv])
    assert result.returncode == cli.CHAT_NOT_FIRST == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr == (
        "relayd: error: chat comes first, and the daemon's flags do not apply to it: "
        "relayd chat [OPTIONS] URL (relayd chat --help)\n"
    )


def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"relayd {relayd.__version__}\n"


# -- check-config: the effective settings --------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_check_config_prints_the_defaults(command: list[str], config: Path) -> None:
    result = run([*command, "--config", str(config), "check-config"])
    assert (result.returncode, result.stderr) == (0, f"relayd: config file: {config}\n")
    assert json.loads(result.stdout) == DEFAULTS


def test_check_config_shows_file_env_and_port_values(config: Path) -> None:
    config.write_text(
        '[server]\nhost = "10.1.2.3"\nshutdown_grace_s = 2.5\n'
        "[limits]\nmax_connections = 7\nidle_timeout_s = 0\n"
        '[log]\nlevel = "debug"\nbodies = true\n',
        encoding="utf-8",
    )
    env = clean_env(RELAYD_LIMITS__MAX_CONNECTIONS="42", PORT="8123")
    result = run([*MODULE, "--config", str(config), "check-config"], env=env)
    assert (result.returncode, result.stderr) == (0, f"relayd: config file: {config}\n")
    assert json.loads(result.stdout) == with_changes(
        {
            "server": {"host": "10.1.2.3", "port": 8123, "shutdown_grace_s": 2.5},
            "limits": {"max_connections": 42, "idle_timeout_s": 0.0},
            "log": {"level": "debug", "bodies": True},
        }
    )


@pytest.fixture
def no_relayd_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """In-process runs read os.environ: clear what would configure relayd."""
    for name in list(os.environ):
        if name.startswith("RELAYD_") or name == "PORT":
            monkeypatch.delenv(name)
    return monkeypatch


def check_config(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """``relayd <argv>`` in-process; it must succeed, print JSON, and only the file on stderr."""
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 0, err
    assert err.startswith("relayd: config file: ")
    assert err.count("\n") == 1, err
    parsed: dict[str, Any] = json.loads(out)
    return parsed


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--port", "4444", "--host", "::1", "--log-level", "error", "check-config"]),
        pytest.param(["check-config", "--port", "4444", "--host", "::1", "--log-level", "error"]),
        pytest.param(["--port", "4444", "check-config", "--host", "::1", "--log-level", "error"]),
    ],
    ids=["flags-before", "flags-after", "flags-both-sides"],
)
def test_flags_beat_env_and_file_before_or_after_the_command(
    argv: list[str],
    config: Path,
    no_relayd_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config.write_text(
        '[server]\nport = 1111\nhost = "file.example"\n[log]\nlevel = "warning"\n'
        "[limits]\nmax_connections = 5\n",
        encoding="utf-8",
    )
    no_relayd_env.setenv("PORT", "2222")
    no_relayd_env.setenv("RELAYD_SERVER__PORT", "3333")
    no_relayd_env.setenv("RELAYD_SERVER__HOST", "env.example")
    no_relayd_env.setenv("RELAYD_LOG__LEVEL", "debug")
    effective = check_config(["--config", str(config), *argv], capsys)
    assert effective == with_changes(
        {
            "server": {"port": 4444, "host": "::1"},
            "limits": {"max_connections": 5},  # from the file: nothing overrides it
            "log": {"level": "error"},
        }
    )


def test_env_beats_file_and_relayd_port_beats_plain_port(
    config: Path, no_relayd_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config.write_text("[server]\nport = 1111\n[limits]\nmax_connections = 5\n", encoding="utf-8")
    no_relayd_env.setenv("PORT", "2222")
    no_relayd_env.setenv("RELAYD_LIMITS__MAX_CONNECTIONS", "6")
    effective = check_config(["--config", str(config), "check-config"], capsys)
    assert (effective["server"]["port"], effective["limits"]["max_connections"]) == (2222, 6)
    no_relayd_env.setenv("RELAYD_SERVER__PORT", "3333")
    effective = check_config(["--config", str(config), "check-config"], capsys)
    assert effective["server"]["port"] == 3333


def test_a_flag_after_the_command_beats_the_same_flag_before_it(
    config: Path, no_relayd_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    effective = check_config(
        ["--config", str(config), "--port", "1", "check-config", "--port", "2"], capsys
    )
    assert effective["server"]["port"] == 2


def test_admin_flags_set_the_admin_listener(
    config: Path, no_relayd_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    effective = check_config(
        ["--config", str(config), "check-config", "--admin-host", "::1", "--admin-port", "9100"],
        capsys,
    )
    assert effective["admin"] == {**DEFAULTS["admin"], "host": "::1", "port": 9100}


def test_relayd_config_names_the_file_check_config_reports(config: Path) -> None:
    config.write_text("[limits]\nmax_connections = 9\n", encoding="utf-8")
    result = run([*MODULE, "check-config"], env=clean_env(RELAYD_CONFIG=str(config)))
    assert (result.returncode, result.stderr) == (0, f"relayd: config file: {config}\n")
    assert json.loads(result.stdout)["limits"]["max_connections"] == 9


def test_unknown_variables_are_warnings_with_the_nearest_name(config: Path) -> None:
    env = clean_env(
        RELAYD_LIMITS__MAX_CONECTIONS="5",
        RELAYD_SERVICE_HOST="10.0.0.1",
        RELAYD_PORT="tcp://10.0.0.1:9030",
    )
    result = run([*MODULE, "--config", str(config), "check-config"], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"relayd: config file: {config}",
        "relayd: warning: RELAYD_LIMITS__MAX_CONECTIONS is not a setting: ignored; "
        "did you mean RELAYD_LIMITS__MAX_CONNECTIONS?",
    ]
    assert json.loads(result.stdout) == DEFAULTS


def check_config_into(stdout: int, config: Path) -> subprocess.CompletedProcess[str]:
    """``relayd check-config`` with its output into the file descriptor ``stdout``."""
    return subprocess.run(
        [*MODULE, "--config", str(config), "check-config"],
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def test_check_config_exits_quietly_when_its_reader_is_gone(config: Path) -> None:
    # As `relayd check-config | head -c0`: the reading end is closed before relayd writes.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = check_config_into(write_end, config)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (0, f"relayd: config file: {config}\n")


# -- bad configuration: exit 78, one line on stderr, nothing on stdout ---------------


def test_every_problem_is_a_line_of_its_own_after_the_file_and_the_warnings(
    config: Path,
) -> None:
    config.write_text('[limits]\nmax_conections = 5\n[log]\nbodies = "yes"\n', encoding="utf-8")
    env = clean_env(RELAYD_LIMITS__MAX_CONNECTIONS="5.0", RELAYD_PORT="9040")
    result = run(
        [*MODULE, "--config", str(config), "check-config", "--admin-port", "9030"], env=env
    )
    assert (result.returncode, result.stdout) == (EX_CONFIG, "")
    lines = result.stderr.splitlines()
    # How the settings were read comes first, as when they are good: a variable relayd
    # did not read may be why they are not.
    assert lines[:2] == [
        f"relayd: config file: {config}",
        "relayd: warning: RELAYD_PORT is not a setting: ignored; did you mean RELAYD_SERVER__PORT?",
    ]
    assert sorted(lines[2:]) == [
        "relayd: config error: limits.max_conections: unknown key; "
        f"did you mean limits.max_connections? (in {config})",
        "relayd: config error: limits.max_connections: Input should be a valid integer "
        "(from environment RELAYD_LIMITS__MAX_CONNECTIONS)",
        f"relayd: config error: log.bodies: Input should be a valid boolean (in {config})",
    ]


def test_an_admin_port_equal_to_the_public_one_is_refused(config: Path) -> None:
    result = run([*MODULE, "--config", str(config), "check-config", "--admin-port", "9030"])
    assert_config_error(result, "admin.port", "--admin-port", "(from command line)")


def assert_config_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """One config error on stderr (check-config also says which file it read); the line."""
    assert result.returncode == EX_CONFIG == 78, (result.returncode, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    if lines[0].startswith("relayd: config file: "):
        del lines[0]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("relayd: config error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "subcommand", [pytest.param(["check-config"], id="check-config"), pytest.param([], id="serve")]
)
def test_unknown_key_in_the_file_names_key_and_file(subcommand: list[str], config: Path) -> None:
    config.write_text("[limits]\nmax_conections = 5\n", encoding="utf-8")
    result = run([*MODULE, "--config", str(config), "--port", "0", *subcommand])
    assert_config_error(result, "limits.max_conections", "unknown key", str(config))


def test_bad_value_from_env_names_key_and_variable(config: Path) -> None:
    env = clean_env(RELAYD_LIMITS__MAX_CONNECTIONS="lots")
    result = run([*MODULE, "--config", str(config), "check-config"], env=env)
    assert_config_error(
        result, "limits.max_connections", "from environment RELAYD_LIMITS__MAX_CONNECTIONS"
    )


def test_bad_plain_port_names_port(config: Path) -> None:
    result = run([*MODULE, "--config", str(config), "check-config"], env=clean_env(PORT="-1"))
    assert_config_error(result, "server.port", "from environment PORT")


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_port_flag_names_key_and_command_line(command: list[str], config: Path) -> None:
    result = run([*command, "--config", str(config), "check-config", "--port", "70000"])
    assert_config_error(result, "server.port", "from command line", "65535")


def test_explicit_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "relayd.toml"
    result = run([*MODULE, "--config", str(missing), "check-config"])
    assert_config_error(result, str(missing))


def test_invalid_toml_is_a_config_error(config: Path) -> None:
    config.write_text("[server\nport = 1\n", encoding="utf-8")
    result = run([*MODULE, "--config", str(config), "check-config"])
    assert_config_error(result, str(config))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[auth]\nmode = "jwt"\n', "auth.jwt_secret"),
        ('[auth]\nmode = "token"\ntokens_file = "/nonexistent/tokens"\n', "auth.tokens_file"),
        ('[tls]\ncert_file = "/nonexistent/cert.pem"\nkey_file = "/x/key.pem"\n', "tls.cert_file"),
    ],
)
def test_unreadable_or_missing_credentials_are_config_errors_naming_the_file(
    text: str, key: str, config: Path
) -> None:
    config.write_text(text, encoding="utf-8")
    result = run([*MODULE, "--config", str(config), "check-config"])
    assert_config_error(result, key, f"(in {config})")
    assert result.stderr.startswith(f"relayd: config file: {config}\n")


def test_every_credential_problem_is_reported_at_once(config: Path) -> None:
    # check-config stopped at the first file it could not use: fixing the tokens file
    # showed the certificate's problem only at the next run.
    config.write_text(
        '[auth]\nmode = "token"\ntokens_file = "/nonexistent/tokens"\n'
        '[tls]\ncert_file = "/nonexistent/cert.pem"\nkey_file = "/nonexistent/key.pem"\n'
        '[admin]\napi_key_file = "/nonexistent/api.key"\n',
        encoding="utf-8",
    )
    result = run([*MODULE, "--config", str(config), "check-config"])
    assert result.returncode == EX_CONFIG
    keys = [line.split(":")[2].strip() for line in result.stderr.splitlines()[1:]]
    assert keys == ["auth.tokens_file", "tls.cert_file", "admin.api_key_file"], result.stderr


def test_a_credential_named_in_the_environment_is_blamed_on_its_variable(config: Path) -> None:
    env = clean_env(RELAYD_ADMIN__API_KEY_FILE="/nonexistent/api.key")
    result = run([*MODULE, "--config", str(config), "check-config"], env=env)
    assert_config_error(
        result,
        "admin.api_key_file: cannot read /nonexistent/api.key",
        "(from environment RELAYD_ADMIN__API_KEY_FILE)",
    )


def test_check_config_says_when_it_cannot_write_the_settings(config: Path) -> None:
    with open("/dev/full", "w") as full:
        result = check_config_into(full.fileno(), config)
    assert (result.returncode, result.stderr) == (
        EX_IOERR,
        f"relayd: config file: {config}\n"
        "relayd: cannot write the settings: No space left on device\n",
    )


WEAK_SECRET = "short-secret-xyz"  # 16 characters: a fine token, a weak HS256 secret


@pytest.mark.parametrize(
    ("auth", "key_file", "key", "why"),
    [
        pytest.param(
            'mode = "token"\ntokens = { alice = "hunter2" }\n',
            None,
            "auth.tokens",
            "shorter than 16 characters",
            id="short-token",
        ),
        pytest.param(
            f'mode = "jwt"\njwt_secret = "{WEAK_SECRET}"\n',
            None,
            "auth.jwt_secret",
            "shorter than 32 bytes",
            id="short-hs256-secret",
        ),
        pytest.param(
            'mode = "jwt"\njwt_algorithm = "RS256"\n',
            lambda: pem_public(ec_key()),
            "auth.jwt_public_key_file",
            "RS256 needs an RSA public key",
            id="rs256-ec-key",
        ),
        pytest.param(
            'mode = "jwt"\njwt_algorithm = "RS256"\n',
            lambda: pem_private(rsa_key()),
            "auth.jwt_public_key_file",
            "a private key",
            id="rs256-private-key",
        ),
        pytest.param(
            'mode = "jwt"\njwt_algorithm = "ES256"\n',
            lambda: WEAK_SECRET * 4,
            "auth.jwt_public_key_file",
            "not a PEM public key",
            id="es256-secret-file",
        ),
    ],
)
def test_check_config_refuses_weak_or_wrong_credentials(
    auth: str, key_file: Callable[[], str] | None, key: str, why: str, config: Path
) -> None:
    text = f"[auth]\n{auth}"
    if key_file is not None:
        path = config.parent / "key.pem"
        path.write_text(key_file(), encoding="utf-8")
        text += f'jwt_public_key_file = "{path}"\n'
    config.write_text(text, encoding="utf-8")
    # Serving refuses to start as well (on free ports, were it ever to start).
    for command in (["check-config"], ["--port", "0", "--admin-port", "0"]):
        line = assert_config_error(run([*MODULE, "--config", str(config), *command]), key, why)
        assert "hunter2" not in line
        assert WEAK_SECRET not in line


def test_check_config_masks_tokens(config: Path) -> None:
    config.write_text('[auth]\nmode = "token"\ntokens = { alice = "hunter2-xyz-hunter2-xyz" }\n')
    result = run([*MODULE, "--config", str(config), "check-config"])
    assert result.returncode == 0, result.stderr
    assert "hunter2-xyz-hunter2-xyz" not in result.stdout
    assert json.loads(result.stdout)["auth"]["tokens"] == {"alice": "**********"}


def test_config_error_in_process(
    config: Path, no_relayd_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    no_relayd_env.setenv("RELAYD_LOG__BODIES", "sometimes")
    assert main(["--config", str(config), "check-config"]) == EX_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"relayd: config file: {config}",
        "relayd: config error: log.bodies: Input should be a valid boolean"
        " (from environment RELAYD_LOG__BODIES)",
    ]


def test_a_default_file_relayd_may_not_look_at_is_a_config_error_naming_it(
    no_relayd_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # /etc/relayd is root:relayd 0750 (install.sh): an operator's `relayd check-config`
    # without sudo may neither look at nor read the file in it, which these stand for (the
    # tests may run as root). Path.exists raised, and relayd blamed systemd's sockets
    # and exited 1, which systemd restarts.
    def denied(original: Callable[..., Any]) -> Callable[..., Any]:
        def method(self: Path, *args: Any, **kwargs: Any) -> Any:
            if self == DEFAULT_CONFIG_PATH:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return original(self, *args, **kwargs)

        return method

    for name in ("stat", "lstat", "read_bytes"):
        no_relayd_env.setattr(Path, name, denied(getattr(Path, name)))
    assert main(["check-config"]) == EX_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"relayd: config file: {DEFAULT_CONFIG_PATH}",
        f"relayd: config error: cannot read {DEFAULT_CONFIG_PATH} (the default config file):"
        " Permission denied",
    ]


# -- serving -------------------------------------------------------------------------


class Daemon:
    """A relayd child process; a thread queues its stdout lines as they arrive."""

    def __init__(self, argv: list[str], **env: str) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            # Never the fixed admin port 9031: tests run side by side.
            env=clean_env(RELAYD_ADMIN__PORT="0", **env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr_lines: queue.Queue[str | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self.stdout: list[str] = []
        self._stderr = ""
        self._readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr += line
            self.stderr_lines.put(line)
        self.stderr_lines.put(None)

    def wait_stderr(self, text: str, timeout: float = WAIT_TIMEOUT_S) -> str:
        """Read stderr lines until one containing ``text``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.stderr_lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {text!r} on stderr within {timeout}s: {self._stderr}")
            if line is None:
                pytest.fail(f"stderr closed before {text!r}: {self._stderr}")
            if text in line:
                return line

    def wait_event(self, name: str, timeout: float = WAIT_TIMEOUT_S) -> dict[str, Any]:
        """Read stdout lines until the event ``name``; every line must be a JSON object."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {name} within {timeout}s; stdout so far: {self.stdout}")
            if line is None:
                pytest.fail(f"stdout closed before {name}: {self.stdout}, {self.stderr()}")
            self.stdout.append(line)
            event = json.loads(line)
            assert isinstance(event, dict), line
            self.events.append(event)
            if event.get("event") == name:
                return event

    def wait_exit(self, timeout: float = WAIT_TIMEOUT_S) -> int:
        """The exit status; then the rest of stdout is read and parsed into :attr:`events`."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(queue.Empty):
                while (line := self.lines.get_nowait()) is not None:
                    self.stdout.append(line)
            pytest.fail(f"relayd did not exit within {timeout}s; stdout: {self.stdout}")
        while (line := self.lines.get(timeout=WAIT_TIMEOUT_S)) is not None:
            self.stdout.append(line)
            self.events.append(json.loads(line))
        return code

    def stderr(self) -> str:
        """Everything written on stderr, once the process has exited."""
        if self.proc.poll() is None:
            return "(still running)"
        self._readers[1].join(timeout=WAIT_TIMEOUT_S)
        return self._stderr

    def signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` to this child, by its pid."""
        assert self.proc.poll() is None, "relayd exited early"
        os.kill(self.proc.pid, signum)

    def close(self) -> None:
        """Kill the child if a failed test left it running; release the pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT_TIMEOUT_S)
        for reader in self._readers:
            reader.join(timeout=WAIT_TIMEOUT_S)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@contextmanager
def serving(command: list[str], config: Path) -> Iterator[tuple[Daemon, int]]:
    """``relayd`` (no subcommand) on a free loopback port; yields it once ready, and its port."""
    daemon = Daemon([*command, "--config", str(config), "--port", "0", "--host", "127.0.0.1"])
    try:
        ready = daemon.wait_event("server.ready")
        port = ready["port"]
        assert isinstance(port, int)
        assert port > 0
        yield daemon, port
    finally:
        daemon.close()


class RawClient:
    """A blocking WebSocket client on a plain socket, so it can stop reading at will."""

    def __init__(self, port: int, *, v1: bool = False) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_TIMEOUT_S)
        self._buffer = b""
        try:
            extra = [("Sec-WebSocket-Protocol", "relayd.v1")] if v1 else []
            self.sock.sendall(wire.upgrade_request(extra=extra))
            head = self._read_until(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 "), head
            welcome = self.recv_text()
        except BaseException:
            # Nobody gets this client to close: a failed handshake (relayd gone,
            # a refusal) would leave the socket to the garbage collector, whose
            # ResourceWarning then fails whichever later test it lands in.
            self.sock.close()
            raise
        self.id: str = json.loads(welcome)["id"] if v1 else welcome

    def _read_until(self, marker: bytes) -> bytes:
        while (end := self._buffer.find(marker)) < 0:
            self._fill()
        head, self._buffer = self._buffer[: end + len(marker)], self._buffer[end + len(marker) :]
        return head

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the TCP connection")
        self._buffer += chunk

    def _take(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._fill()
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def recv_frame(self) -> tuple[int, bytes]:
        """The next frame from the server (unmasked, unfragmented): opcode and payload."""
        first, second = self._take(2)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(self._take(2), "big")
        elif length == 127:
            length = int.from_bytes(self._take(8), "big")
        return first & 0x0F, self._take(length)

    def recv_text(self) -> str:
        opcode, payload = self.recv_frame()
        assert opcode == wire.OP_TEXT, (opcode, payload)
        return payload.decode()

    def close_code(self) -> int:
        """Read frames until the server's close frame, answer it, and return its code."""
        while True:
            opcode, payload = self.recv_frame()
            if opcode == wire.OP_CLOSE:
                self.sock.sendall(wire.frame(wire.OP_CLOSE, payload[:2]))  # the close reply
                return int.from_bytes(payload[:2], "big")

    def send_json(self, value: object) -> None:
        self.sock.sendall(wire.frame(wire.OP_TEXT, json.dumps(value).encode()))

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize(
    ("command", "signum"),
    [
        pytest.param(SCRIPT, signal.SIGTERM, id="script-SIGTERM"),
        pytest.param(MODULE, signal.SIGINT, id="python-m-SIGINT"),
    ],
)
def test_serves_until_a_signal_then_exits_0(
    command: list[str], signum: signal.Signals, config: Path
) -> None:
    with serving(command, config) as (daemon, port):
        client = RawClient(port)  # it binds: a WebSocket client connects and gets an id
        try:
            assert len(client.id) == 22
            daemon.signal(signum)
            assert client.close_code() == 1001
        finally:
            client.close()
        assert daemon.wait_exit() == 0, daemon.stderr()
    assert daemon.stderr() == ""
    assert [e["event"] for e in daemon.events[:2]] == ["server.start", "server.ready"]
    stop = daemon.events[-1]
    assert stop["event"] == "server.stop", daemon.events
    assert stop["forced"] is False
    assert signum.name in stop["reason"]
    with pytest.raises(OSError):  # noqa: PT011 - any refusal will do: nobody listens
        socket.create_connection(("127.0.0.1", port), timeout=WAIT_TIMEOUT_S).close()


def test_a_kubernetes_pod_environment_starts_relayd(config: Path) -> None:
    # The config comes from RELAYD_CONFIG, as a ConfigMap mounted in a pod would; one
    # variable is a typo of the operator's, warned about by name; the rest is Kubernetes'.
    daemon = Daemon(
        [*MODULE],
        RELAYD_CONFIG=str(config),
        RELAYD_SERVER__HOST="127.0.0.1",
        RELAYD_SERVER__PORT="0",
        RELAYD_LIMITS__MAX_CONECTIONS="5",
        RELAYD_LOG__BODIES="",  # empty: unset
        **KUBERNETES_SERVICE_LINKS,
    )
    try:
        ready = daemon.wait_event("server.ready")
        RawClient(ready["port"]).close()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0, daemon.stderr()
    finally:
        daemon.close()
    assert daemon.stderr() == ""
    assert daemon.events[0] == {
        "ts": daemon.events[0]["ts"],
        "level": "warning",
        "event": "config.ignored",
        "variable": "RELAYD_LIMITS__MAX_CONECTIONS",
        "did_you_mean": "RELAYD_LIMITS__MAX_CONNECTIONS",
    }
    start = daemon.events[1]
    assert (start["event"], start["config"]) == ("server.start", str(config))
    assert [e for e in daemon.events if e["level"] != "info"] == daemon.events[:1]


@pytest.mark.parametrize("hang_up", [True, False], ids=["probe-closed", "probe-idle"])
def test_a_tcp_connection_without_a_handshake_does_not_hold_up_shutdown(
    hang_up: bool, config: Path
) -> None:
    # Load balancers and port checks connect and send nothing. On SIGTERM relayd answers
    # handshakes in progress with 503 and drains: such a connection must not keep it
    # waiting for handshake_timeout_s or shutdown_grace_s (an hour each here).
    config.write_text(
        "[server]\nshutdown_grace_s = 3600\n[limits]\nhandshake_timeout_s = 3600\n",
        encoding="utf-8",
    )
    with serving(MODULE, config) as (daemon, port):
        probe = socket.create_connection(("127.0.0.1", port), timeout=WAIT_TIMEOUT_S)
        try:
            if hang_up:
                probe.close()
            # A complete connection after the probe: the probe was accepted before it.
            RawClient(port).close()
            daemon.signal(signal.SIGTERM)
            code = daemon.wait_exit()
        finally:
            probe.close()
    assert code == 0, daemon.stderr()
    stop = daemon.events[-1]
    assert stop["event"] == "server.stop", daemon.events
    assert stop["forced"] is False


def test_a_second_signal_during_a_stuck_drain_exits_at_once_with_128_plus_signum(
    config: Path,
) -> None:
    # The drain cannot finish: one client never reads, its outbox is full and relayd's
    # writer is blocked on a full socket, with an hour of grace to wait for it.
    config.write_text(
        "[server]\nshutdown_grace_s = 3600\n"
        "[limits]\noutbox_messages = 4\nslow_consumer_timeout_s = 3600\n"
        "messages_per_second = 10000\nmessage_burst = 10000\nmax_message_bytes = 70000\n"
        "ping_interval_s = 0\n",
        encoding="utf-8",
    )
    clients: list[RawClient] = []
    with serving(MODULE, config) as (daemon, port):
        try:
            stuck = RawClient(port)
            watcher = RawClient(port)
            sender = RawClient(port, v1=True)
            clients += [stuck, watcher, sender]
            big = "z" * 60_000
            for n in range(2000):  # kernel buffers first, then the outbox
                sender.send_json({"to": stuck.id, "message": big, "ref": n})
                reply = json.loads(sender.recv_text())
                if reply["type"] != "ack":
                    break
            assert reply.get("error") == "recipient_busy", reply

            daemon.signal(signal.SIGTERM)
            # The drain has begun once an idle client is told the server is going away.
            assert watcher.close_code() == 1001
            began = time.monotonic()
            daemon.signal(signal.SIGINT)
            code = daemon.wait_exit(timeout=PROMPT_EXIT_S)
            assert time.monotonic() - began < PROMPT_EXIT_S
        finally:
            for client in clients:
                client.close()
    assert code == 128 + signal.SIGINT, daemon.stderr()
    stop = daemon.events[-1]
    assert stop["event"] == "server.stop", daemon.events
    assert stop["forced"] is True


def test_a_passed_descriptor_that_is_no_socket_exits_1_with_a_message(config: Path) -> None:
    # What systemd passes is checked once the settings are good; only its error names it.
    relayd = " ".join([*MODULE, "serve", "--config", str(config)])
    script = f"exec 3</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec {relayd}"
    result = run(["/bin/sh", "-c", script])
    assert result.returncode == 1
    assert result.stderr.startswith("relayd: cannot use the sockets systemd passed: "), (
        result.stderr
    )


def test_a_port_in_use_exits_1_with_a_message(config: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run([*MODULE, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)])
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("relayd: cannot listen"), lines[0]
    assert "in use" in lines[0]
    assert "set server.port (--port)" in lines[0]


def test_an_unreadable_cluster_password_file_stops_relayd_before_it_listens(
    config: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-password"
    config.write_text(
        f'[cluster]\nenabled = true\npassword_file = "{missing}"\n[admin]\nport = 0\n',
        encoding="utf-8",
    )
    result = run([*MODULE, "--config", str(config), "--port", "0"], env=clean_env())
    line = assert_config_error(result, "cluster.password_file", str(missing))
    assert "No such file" in line


# --- a reload reads what the start read --------------------------------------------------


def test_a_reload_reads_the_default_file_the_start_read_and_is_refused_once_it_has_gone(
    tmp_path: Path,
) -> None:
    # Started without --config, relayd read the default file; had a reload looked for it
    # again and found none, it would have applied the built-in defaults, every limit
    # in the file undone and logged as applied.
    default = tmp_path / "relayd.toml"
    default.write_text("[limits]\nmax_connections = 2\n")
    read = settings_reader(None, {}, default_path=default)
    assert read().settings.limits.max_connections == 2
    default.write_text("[limits]\nmax_connections = 3\n")
    assert read().settings.limits.max_connections == 3
    default.unlink()
    with pytest.raises(LoadError) as refused:
        read()
    [problem] = refused.value.problems
    assert problem.line.startswith(f"cannot read {default}")


def test_a_reload_of_a_pipe_read_at_the_start_is_refused_not_the_built_in_defaults(
    tmp_path: Path,
) -> None:
    # `relayd serve --config <(...)`: the start read the pipe; a reload read it empty
    # and applied the built-in defaults, every setting undone (auth, limits), and
    # logged applied: true (an operator tester's find).
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"[limits]\nmax_connections = 2\n")
        os.close(write_end)
        read = settings_reader(Path(f"/dev/fd/{read_end}"), {}, default_path=tmp_path / "none")
        assert read().settings.limits.max_connections == 2
        with pytest.raises(LoadError) as refused:
            read()
        [problem] = refused.value.problems
        assert "is a pipe, which relayd reads only at its start" in problem.line
    finally:
        os.close(read_end)
    # An empty regular file, or /dev/null, is still a file of no settings.
    read = settings_reader(Path(os.devnull), {})
    assert read().path == read().path == Path(os.devnull)
    empty = tmp_path / "empty.toml"
    empty.write_text("[limits]\nmax_connections = 2\n")
    read = settings_reader(empty, {})
    assert read().settings.limits.max_connections == 2
    empty.write_text("")
    assert read().settings.limits.max_connections == Settings().limits.max_connections


def test_a_reload_after_a_start_without_a_file_reads_none(tmp_path: Path) -> None:
    default = tmp_path / "relayd.toml"
    read = settings_reader(None, {}, default_path=default)
    assert read().path is None
    default.write_text("[limits]\nmax_connections = 2\n")  # not the sources it started from
    assert read().path is None


def test_a_reload_reports_the_tokens_file_it_applied_not_a_second_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reload read the tokens file to apply it, then again for the report: a file
    # replaced between the two (a rotation) was reported as the content not applied.
    # Here every read of it finds the next version of the file.
    tokens = tmp_path / "tokens"
    versions = iter([f"alice {letter * 20}\n".encode() for letter in "abcd"])
    real_read_bytes = Path.read_bytes

    def rotating(path: Path) -> bytes:
        return next(versions) if path == tokens else real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", rotating)
    monkeypatch.setattr(Path, "read_text", lambda path, *_a, **_k: rotating(path).decode())
    tokens.write_bytes(b"")
    overrides = {"auth.mode": "token", "auth.tokens_file": str(tokens)}
    loaded = settings_reader(None, overrides, default_path=tmp_path / "none.toml")()
    authenticator, _tls, _api_key, files = cli._credentials(loaded)
    assert authenticator is not None
    assert files["auth.tokens_file"] == (
        str(tokens),
        hashlib.sha256(b"alice " + b"a" * 20 + b"\n").digest(),
    )


@pytest.mark.parametrize("enabled", [True, False])
def test_a_reload_digests_the_api_key_only_with_the_admin_listener_on(
    tmp_path: Path, enabled: bool
) -> None:
    # With [admin] off the key is checked but not used: a new key there changes nothing,
    # yet the reload reported admin.api_key_file as changed (found by a reviewer).
    key = tmp_path / "api.key"
    key.write_text("k" * 32 + "\n")
    config = tmp_path / "relayd.toml"
    config.write_text(f'[admin]\nenabled = {str(enabled).lower()}\napi_key_file = "{key}"\n')
    loaded = settings_reader(config, {}, default_path=tmp_path / "none.toml")()
    _authenticator, _tls, api_key, files = cli._credentials(loaded)
    assert api_key == b"k" * 32
    digest = hashlib.sha256(key.read_bytes()).digest() if enabled else None
    assert files["admin.api_key_file"] == (str(key), digest)


def test_the_flags_the_docs_list_are_the_ones_relayd_takes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # README ("Running it") and docs/operations.md (the sources of settings) list the
    # flags that override settings, after --config.
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    taken = set(re.findall(r"(--[a-z-]+)", capsys.readouterr().out)) - {"--help", "--config"}
    root = Path(__file__).resolve().parents[1]
    for path in [root / "README.md", root / "docs" / "operations.md"]:
        listed = re.search(r"command-line flags \(((?:`--[a-z-]+`,?\s*)+)\)", path.read_text())
        assert listed is not None, path.name
        assert set(re.findall(r"`(--[a-z-]+)`", listed[1])) == taken, path.name
