"""The ``relayd`` command: ``serve`` (the default), ``check-config``, ``chat``, ``--version``.

Exit statuses: 0 after a graceful shutdown or a good ``check-config`` (also when
whoever reads its output stops early, as ``head`` does: relayd then exits quietly);
78 (``EX_CONFIG``) when the settings are bad, with one line on stderr per problem
naming the key and where its value came from, so systemd's
``RestartPreventExitStatus=78`` keeps a bad config from restart-looping; 74
(``EX_IOERR``) when ``check-config`` cannot write the settings (``> /dev/full``);
1 when a port cannot be bound; 128 + the signal number when a second SIGTERM/SIGINT
cut the drain short; 2 for ``chat`` after other arguments (``relayd --log-level debug
chat URL``: chat comes first, and takes none of the daemon's flags).

Unknown ``RELAYD_*`` variables are warnings (``config.ignored`` events when serving,
lines on stderr for ``check-config``), never errors: orchestrators set their own.
``check-config`` says which file it read, and those warnings, whether the settings
are good or not: a misnamed variable is often why they are not.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import os
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final, NoReturn, TypeVar

import trio

from relayd import __version__
from relayd.config import DEFAULT_CONFIG_PATH, Settings, settings_as_json
from relayd.config_sources import CONFIG_VARIABLE, IgnoredVariable, Loaded, LoadError, load
from relayd.daemon import heap
from relayd.daemon.credentials import load_api_key, load_authenticator, load_tls
from relayd.daemon.reload import FileRead
from relayd.daemon.server import Server
from relayd.daemon.service import run_daemon
from relayd.daemon.systemd import Notifier, listen_sockets, watchdog_interval
from relayd.errors import ConfigError
from relayd.policy.auth import Authenticator
from relayd.routing.factory import check_router_files
from relayd.telemetry.log import configure, get_logger

__all__ = ["CHAT_NOT_FIRST", "EX_CONFIG", "EX_IOERR", "main"]

_T = TypeVar("_T")

#: sysexits.h: bad settings; systemd's RestartPreventExitStatus=78 keeps it from looping.
EX_CONFIG: Final = 78
#: sysexits.h: an error writing output.
EX_IOERR: Final = 74
#: A command line with ``chat`` after other arguments: argparse's usage status, which
#: ``relayd chat`` itself exits with for arguments it cannot read.
CHAT_NOT_FIRST: Final = 2


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a command line it cannot read is bad settings: exit 78.

    A flag is a setting like any other (``--port abc`` is ``server.port = "abc"``),
    and argparse's own status, 2, is not one systemd's RestartPreventExitStatus
    knows: a unit with a mistyped flag would be restarted in a loop.
    """

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_CONFIG, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    # The flags are accepted before or after the command; SUPPRESS keeps a
    # subcommand's parser from resetting what the main parser already read.
    def add_flags(p: argparse.ArgumentParser, default: object) -> None:
        p.add_argument(
            "--config",
            type=Path,
            metavar="PATH",
            default=default,
            help=(
                f"TOML config file (default: ${CONFIG_VARIABLE}, else "
                f"{DEFAULT_CONFIG_PATH} if it exists)"
            ),
        )
        p.add_argument("--host", default=default, help="listen address; '' for all interfaces")
        p.add_argument("--port", type=int, default=default, help="listen port; 0 picks one")
        p.add_argument("--admin-host", default=default, help="the admin listener's address")
        p.add_argument(
            "--admin-port", type=int, default=default, help="the admin listener's port; 0 picks one"
        )
        p.add_argument(
            "--log-level", choices=["debug", "info", "warning", "error"], default=default
        )
        p.add_argument("--log-format", choices=["json", "console"], default=default)

    parser = _Parser(prog="relayd", description="WebSocket relay daemon. Serves by default.")
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    add_flags(parser, None)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in [
        ("serve", "serve until SIGTERM or SIGINT (the default)"),
        ("check-config", "print the effective settings as JSON and exit"),
    ]:
        add_flags(commands.add_parser(name, help=text, description=text), argparse.SUPPRESS)
    # `relayd chat` is the client side: relayd.__main__ hands it its arguments
    # before this module is imported, so serving never imports client code and
    # the client none of the daemon. Listed here for --help only.
    commands.add_parser(
        "chat",
        help="connect to a relayd as a client (relayd chat --help)",
        add_help=False,
    )
    return parser


def settings_reader(
    config: Path | None,
    overrides: Mapping[str, object],
    default_path: Path = DEFAULT_CONFIG_PATH,
) -> Callable[[], Loaded]:
    """What reads relayd's settings: at start, then again at every reload (SIGHUP).

    A reload reads the sources the start read: the file it read, the default one
    included, which must still be there, or none if it read none. A reload that
    cannot is refused (:class:`~relayd.config_sources.LoadError`) and the running
    settings stay; built-in defaults in place of a file that went away would undo
    every setting in it.
    """
    started: Loaded | None = None

    def read() -> Loaded:
        nonlocal started
        if started is None:
            started = load(config_path=config, overrides=overrides, default_path=default_path)
            return started
        return load(
            config_path=config, overrides=overrides, default_path=started.path, reloading=True
        )

    return read


def main(argv: Sequence[str] | None = None, *, hangups: Sequence[int] = ()) -> int:
    """Run the daemon's commands (``relayd chat`` never reaches here); the exit status.

    Args:
        argv: the arguments, without the program's name; ``sys.argv``'s by default.
        hangups: the SIGHUPs received before this process took its own signals
            (:mod:`relayd.__main__` keeps them): relayd reloads once it does, if any came.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    # Known first: what follows `chat` (a URL, --seed, -h) is chat's, not the daemon's.
    args, unknown = parser.parse_known_args(argv)
    if args.command == "chat":
        # `relayd --log-level debug chat URL`: relayd.__main__ hands chat to the client
        # only when it comes first. The daemon's flags mean nothing to a client, and
        # serving instead (as `relayd --port 0 chat` did) would open a relay on every
        # interface for someone who asked for a chat.
        sys.stderr.write(
            "relayd: error: chat comes first, and the daemon's flags do not apply to it: "
            "relayd chat [OPTIONS] URL (relayd chat --help)\n"
        )
        return CHAT_NOT_FIRST
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = {
        "server.host": args.host,
        "server.port": args.port,
        "admin.host": args.admin_host,
        "admin.port": args.admin_port,
        "log.level": args.log_level,
        "log.format": args.log_format,
    }

    read = settings_reader(args.config, overrides)

    def read_settings() -> tuple[Loaded, Authenticator | None, dict[str, FileRead]]:
        # Every file a start reads is read and checked, those that only a restart
        # applies too (TLS, the API key, the cluster's files and its Redis client): a
        # reload that says "applied" means the next start will come up. What each file
        # holds goes with the settings: the server reports those whose content is new
        # though their path is not (a tokens file, applied; a certificate, for a restart).
        again = read()
        authenticator, _tls, _api_key, files = _credentials(again)
        return again, authenticator, files

    loaded: Loaded | None = None
    try:
        loaded = read()
        settings = loaded.settings
        authenticator, tls, api_key, files = _credentials(loaded)
        if args.command != "check-config":
            configure(settings.log)
            # Building the server builds its router, which reads the cluster's password.
            server = Server(
                settings,
                authenticator=authenticator,
                tls=tls,
                config_file=loaded.path,
                api_key=api_key,
                files=files,
            )
    except ConfigError as exc:
        if args.command == "check-config":
            if isinstance(exc, LoadError):
                _how_read(exc.path, exc.ignored)
            elif loaded is not None:  # the settings were good; a credential they name is not
                _how_read(loaded.path, loaded.ignored)
        for problem in exc.problems:
            print(f"relayd: config error: {problem.line}", file=sys.stderr)
        return EX_CONFIG
    if args.command == "check-config":
        return _check_config(loaded)
    try:
        activated = listen_sockets()
    except OSError as exc:
        print(f"relayd: cannot use the sockets systemd passed: {exc}", file=sys.stderr)
        return 1
    for variable in loaded.ignored:
        get_logger().warning(
            "config.ignored", variable=variable.name, did_you_mean=variable.suggestion
        )
    heap.settle()  # start-up is done: what it made is frozen out of the collector
    return trio.run(
        functools.partial(
            run_daemon,
            server,
            reload_settings=read_settings,
            notifier=Notifier.from_environment(),
            watchdog_s=watchdog_interval(),
            reload_first=lambda: bool(hangups),
            listeners=[trio.socket.from_stdlib_socket(s) for s in activated],
        )
    )


def _credentials(
    loaded: Loaded,
) -> tuple[Authenticator | None, ssl.SSLContext | None, bytes | None, dict[str, FileRead]]:
    """Read and check every file the settings name: the authenticator, TLS and the API key.

    Also what each file held (:func:`_files`): for the tokens, JWT and API key files,
    what was read to check them, not a second read, which a file replaced meanwhile
    (a rotation) would make tell of another content than the one applied.

    With ``[cluster]`` on, its password and CA files too, and whether its Redis client
    is installed (:func:`~relayd.routing.factory.check_router_files`; the cluster's
    router reads the files again when the server is built). Each is checked, whatever
    the others hold, so that ``check-config`` shows every problem at once.

    Raises:
        ConfigError: every file that cannot be read, or whose content cannot be used.
    """
    settings, source = loaded.settings, loaded.source
    problems: list[ConfigError] = []
    held: dict[str, bytes] = {}

    def read_file(path: str) -> bytes:
        held[path] = Path(path).read_bytes()
        return held[path]

    def checked(read: Callable[[], _T]) -> _T | None:
        try:
            return read()
        except ConfigError as error:
            problems.extend(error.problems)
            return None

    authenticator = checked(lambda: load_authenticator(settings.auth, source, read_file))
    tls = checked(lambda: load_tls(settings.tls, source))
    api_key = checked(lambda: load_api_key(settings.admin, source, read_file))
    checked(lambda: check_router_files(settings))
    if problems:
        raise ConfigError.of(problems)
    return authenticator, tls, api_key, _files(settings, held)


#: The settings naming a file: a reload reads the tokens and JWT key files again and
#: applies them, and checks the others, which only a start reads (a new certificate or
#: API key at the same path needs a restart).
_FILES: Final = (
    ("auth", "tokens_file"),
    ("auth", "jwt_secret_file"),
    ("auth", "jwt_public_key_file"),
    ("tls", "cert_file"),
    ("tls", "key_file"),
    ("admin", "api_key_file"),
    ("cluster", "password_file"),
    ("cluster", "tls_ca_file"),
)


def _files(settings: Settings, held: Mapping[str, bytes]) -> dict[str, FileRead]:
    """Each file's path and a digest of what it holds (None: unreadable, none, or unused).

    ``held``: what the credentials' checks read, by path. A file the settings name but
    do not use (a tokens file with ``auth.mode = "off"``, the API key with ``[admin]``
    off, the cluster's files with ``[cluster]`` off) has no digest: a new content there
    changes nothing. The auth files ``held`` holds are those the mode uses. TLS and the
    cluster's files are read by ssl and the cluster's check, so they are read here
    (a second read: a file replaced in between is reported as the new content).
    """
    in_use = {
        "auth": True,
        "tls": bool(settings.tls.cert_file),
        "admin": settings.admin.enabled,
        "cluster": settings.cluster.enabled,
    }
    files = {}
    for section, name in _FILES:
        path = getattr(getattr(settings, section), name)
        digest = None
        if in_use[section] and path in held:
            digest = hashlib.sha256(held[path]).digest()
        elif in_use[section] and path and section != "auth":
            with contextlib.suppress(OSError):
                digest = hashlib.sha256(Path(path).read_bytes()).digest()
        files[f"{section}.{name}"] = (path, digest)
    return files


def _how_read(path: Path | None, ignored: tuple[IgnoredVariable, ...]) -> None:
    """Say on stderr which file was read, and which ``RELAYD_*`` variables were not."""
    read = "none" if path is None else str(path)
    print(f"relayd: config file: {read}", file=sys.stderr)
    for variable in ignored:
        hint = "" if variable.suggestion is None else f"; did you mean {variable.suggestion}?"
        print(f"relayd: warning: {variable.name} is not a setting: ignored{hint}", file=sys.stderr)


def _check_config(loaded: Loaded) -> int:
    """Print the effective settings on stdout, and how they were read on stderr.

    A reader that closes the pipe early (``relayd check-config | head``) ends the
    output quietly: the check itself passed. Any other failure to write (a full
    disk, ``> /dev/full``) is one line on stderr and :data:`EX_IOERR`.
    """
    _how_read(loaded.path, loaded.ignored)
    status = 0
    try:
        print(settings_as_json(loaded.settings), flush=True)
    except BrokenPipeError:
        pass
    except OSError as exc:
        print(f"relayd: cannot write the settings: {exc.strerror or exc}", file=sys.stderr)
        status = EX_IOERR
    else:
        return status
    # Python would flush what is left again at exit and report it with a traceback:
    # point stdout at /dev/null first (the recipe in the signal module's documentation).
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return status
