"""The ``relayd`` command: ``serve`` (the default), ``check-config``, ``--version``.

Exit statuses: 0 after a graceful shutdown or a good ``check-config``; 78
(``EX_CONFIG``) when the settings are bad, with one line on stderr naming the
key and where its value came from, so systemd's ``RestartPreventExitStatus=78``
keeps a bad config from restart-looping; 1 when the port cannot be bound;
128 + the signal number when a second SIGTERM/SIGINT cut the drain short.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import trio

from relayd import __version__
from relayd.config import ConfigError, load_settings, settings_as_json
from relayd.credentials import load_authenticator, load_tls
from relayd.log import configure, get_logger
from relayd.server import Server

__all__ = ["EX_CONFIG", "main"]

EX_CONFIG: Final = 78
_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


def _parser() -> argparse.ArgumentParser:
    # The flags are accepted before or after the command; SUPPRESS keeps a
    # subcommand's parser from resetting what the main parser already read.
    def add_flags(p: argparse.ArgumentParser, default: object) -> None:
        p.add_argument(
            "--config",
            type=Path,
            metavar="PATH",
            default=default,
            help="TOML config file (default: /etc/relayd/relayd.toml if it exists)",
        )
        p.add_argument("--host", default=default, help="listen address; '' for all interfaces")
        p.add_argument("--port", type=int, default=default, help="listen port; 0 picks one")
        p.add_argument(
            "--log-level", choices=["debug", "info", "warning", "error"], default=default
        )
        p.add_argument("--log-format", choices=["json", "console"], default=default)

    parser = argparse.ArgumentParser(
        prog="relayd", description="WebSocket relay daemon. Serves by default."
    )
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    add_flags(parser, None)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in [
        ("serve", "serve until SIGTERM or SIGINT (the default)"),
        ("check-config", "print the effective settings as JSON and exit"),
    ]:
        add_flags(commands.add_parser(name, help=text, description=text), argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    args = _parser().parse_args(argv)
    overrides = {
        "server.host": args.host,
        "server.port": args.port,
        "log.level": args.log_level,
        "log.format": args.log_format,
    }
    try:
        settings = load_settings(config_path=args.config, overrides=overrides)
        authenticator = load_authenticator(settings.auth)
        tls = load_tls(settings.tls)
    except ConfigError as exc:
        print(f"relayd: config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.command == "check-config":
        print(settings_as_json(settings))
        return 0
    configure(settings.log)
    return trio.run(_serve, Server(settings, authenticator=authenticator, tls=tls))


async def _serve(server: Server) -> int:
    settings = server.settings
    try:
        listeners = await server.listen()
    except OSError as exc:
        where = f"{settings.server.host or '*'}:{settings.server.port}"
        get_logger().error("error", summary=f"cannot listen on {where}: {exc}")
        print(f"relayd: cannot listen on {where}: {exc}", file=sys.stderr)
        return 1
    status = 0
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(*_SIGNALS, signal.SIGHUP) as signals:

            async def watch() -> None:
                nonlocal status
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        # Until live reload exists, say so rather than die
                        # (SIGHUP's default action) or ignore it silently.
                        get_logger().warning(
                            "config.reload",
                            applied=False,
                            reason="reload is not supported yet; restart relayd to apply changes",
                        )
                    elif status == 0 and not server.stopping:
                        server.shutdown(f"signal {signal.Signals(signum).name}")
                    else:
                        status = 128 + signum
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await server.run(listeners)
            nursery.cancel_scope.cancel()
    return status
