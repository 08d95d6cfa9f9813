"""``python -m relayd`` and the ``relayd`` command.

``relayd chat`` is the client side (:mod:`relayd.client.chat`): it is handed its
arguments here, before anything of the daemon, its settings or their
dependencies (pydantic, structlog, prometheus_client, PyJWT) is imported, so
the client starts quickly and runs where only its own dependencies are
installed. Every other command is :func:`relayd.cli.main`'s, which imports no
client code.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``relayd`` command line; returns the process exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["chat"]:
        from relayd.client.chat import run  # imported only for chat

        return run(args[1:])
    # SIGHUP's default action ends the process, and relayd takes its own signals only
    # once it is about to serve, after a few hundred milliseconds of imports and
    # set-up: a reload asked for meanwhile is kept here and made then.
    hangups: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, _frame: hangups.append(signum))
    from relayd.cli import main as serve  # imports the daemon

    return serve(args, hangups=hangups)


if __name__ == "__main__":
    raise SystemExit(main())
