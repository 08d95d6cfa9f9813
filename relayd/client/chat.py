"""``relayd chat``: a terminal client on :mod:`relayd.client`, for a person or a script.

``relayd chat ws://HOST:9030/ [--seed] [--token-file PATH]`` connects, prints
``connected to URL as ID (DIALECT)``, then reads commands on stdin and prints
one line on stdout for each thing that happens; :data:`HELP` (``relayd chat
--help``, or ``/help`` once connected) describes both. At a terminal it edits
lines with readline, keeps this session's history, and shows a prompt.

The token comes from the environment (:data:`TOKEN_VARIABLE`) or a file, never
the command line, where ``ps`` shows it to every user of the machine.

In relayd.v1 the Nth message sent is numbered N in its ``ack`` or error line.
Ctrl-C, or SIGTERM once connected, closes like ``/quit``; a second Ctrl-C stops
waiting for the server's close reply (exit status 130).

``wss://`` verifies the server's certificate against the system trust store
(``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` are honoured), or against the CA
certificates of ``--ca-file PATH`` for a private CA; there is no way to turn
verification off.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import ssl
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import trio

from relayd.client.chat_session import Session
from relayd.client.client import connect
from relayd.client.endpoint import check_token, parse_url
from relayd.client.errors import (
    ConnectError,
    HandshakeRefused,
    TLSError,
)
from relayd.client.terminal import Console
from relayd.wire.dialects import Dialect

__all__ = ["EX_USAGE", "HELP", "TOKEN_VARIABLE", "main", "run"]

#: Exit status for a bad URL or token, as argparse uses for bad arguments.
EX_USAGE: Final = 2
#: The environment variable holding the token. Not ``RELAYD_...``: relayd reads
#: every one of those as a setting of its own, and warns about unknown ones.
TOKEN_VARIABLE: Final = "RELAY_TOKEN"
#: The name a person is likely to guess for :data:`TOKEN_VARIABLE`; never read,
#: but its being set is worth a warning.
_GUESSED_VARIABLE: Final = "RELAYD_TOKEN"
#: Where the token may come from, as said in every message about it.
_TOKEN_WAYS: Final = f"set {TOKEN_VARIABLE} or use --token-file PATH"

HELP: Final = f"""\
Type a line to send a message:
  ID MESSAGE   send MESSAGE to the client ID. If MESSAGE is valid JSON it is
               sent as that JSON value, exactly as typed ({{"n": 1}}, [1, 2], 42,
               true, null, "42"); anything else is sent as a string, so
               `ID hello there` sends "hello there". Quote text to force a
               string: `ID "42"`.
  /to ID       send every line after this to ID: a line is then all MESSAGE
               (the prompt shows the recipient). `/to` alone goes back to
               ID MESSAGE.
  /id          print your id
  /help        print this help
  /quit        close the connection and exit (so does end of input, Ctrl-D,
               Ctrl-C, or SIGTERM once connected)
Blank lines are ignored. A line starting with / is a command, after /to too: to send
one as a message, quote it ("/path"). A message longer than the server's limit (it says
which at connect, 64 KiB by default) is not sent: you get a warning instead.
A message whose outcome the connection's close cut off gets a warning too: it
may or may not have been delivered. A message the server refuses as over its rate
limit (a pasted burst) is sent again after a wait, so lines are not lost to it; in
the seed dialect, which cannot tell which message was refused, lines are sent no
faster than the rate the server announced.
At a terminal, lines can be edited, and the up arrow recalls this session's
earlier lines (they are not kept after it).

Each line printed is one event:
  < FROM: MESSAGE      a message (relayd.v1, the default)
  < (server): MESSAGE  a message from the application's backend, sent
                       through relayd's server API (relayd.v1); it cannot
                       be answered
  < MESSAGE            a message (--seed: the seed dialect does not say who
                       sent it)
  ack N                relayd.v1: your Nth message is in the recipient's
                       queue at the server
  ! CODE: DETAIL       a message was not relayed (relayd.v1 adds
                       "(message N to ID)"); in the seed dialect a message
                       that looks like {{"error": ..., "detail": ...}} shows as one
  closed: CODE REASON  the connection is over
MESSAGE is a string's text, or any other JSON as its sender wrote it. Control
characters from the network (line breaks, terminal escapes) are shown escaped,
as \\n or \\x1b: one line is one event, and a peer cannot drive your terminal.

The token, when the server wants one, comes from the {TOKEN_VARIABLE} environment
variable or from --token-file, never from the command line (--token, or
?token= in the URL), where `ps` shows it to everyone on the machine.

For wss://, the server's certificate is verified against the system's trust
store, or against --ca-file PATH (PEM) for a private CA.

Exit status: 0 after /quit, end of input, Ctrl-C, SIGTERM, or a server close
with 1000 or 1001; 1 after any other close, or if the connection cannot be made
(one line on stderr: a refused handshake's HTTP status and body, or the network
or TLS error); 2 for a bad URL, token or --ca-file."""

#: OpenSSL's verify results for a certificate whose issuer is not trusted, which is what
#: a private CA's certificate gets without --ca-file. A name the certificate does not
#: hold, or one expired, is not helped by a CA file.
_UNTRUSTED_ISSUER: Final = frozenset(
    {
        2,  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
        18,  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
        19,  # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
        20,  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        21,  # X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
    }
)
_DIALECT_NAMES: Final = {Dialect.SEED: "seed", Dialect.V1: "relayd.v1"}
#: Close codes after which the server's close is not a failure.
_NORMAL_CLOSES: Final = frozenset({1000, 1001})


async def _chat(
    url: str,
    dialect: Dialect,
    token: str | None,
    context: ssl.SSLContext | None,
    console: Console,
) -> int:
    try:
        async with connect(url, token=token, dialect=dialect, ssl_context=context) as client:
            name = _DIALECT_NAMES[dialect]
            console.say(f"connected to {url} as {client.id} ({name})")
            quit_ = await Session(client, console, HELP).run()
    except ConnectError as exc:
        console.warn(str(exc) + _hint(exc, token, ca_file=context is not None))
        return 1
    closed = client.closed
    code, reason = (closed.code, closed.reason) if closed is not None else (1006, "")
    console.say(f"closed: {code} {reason}".rstrip())
    return 0 if quit_ or code in _NORMAL_CLOSES else 1


def _hint(error: ConnectError, token: str | None, *, ca_file: bool) -> str:
    """What to do about ``error``, to end its line; "" when there is nothing to add.

    Args:
        error: why the chat could not connect.
        token: the token sent, if any.
        ca_file: whether ``--ca-file`` was given.
    """
    if isinstance(error, HandshakeRefused) and error.status == 401 and token is None:
        return f" (the server wants a token: {_TOKEN_WAYS})"
    cause = error.__cause__
    if (
        isinstance(error, TLSError)
        and isinstance(cause, ssl.SSLCertVerificationError)
        and cause.verify_code in _UNTRUSTED_ISSUER
    ):
        return " (is it the right CA file?)" if ca_file else " (for a private CA: --ca-file PATH)"
    return ""


def _without_password(url: str) -> str:
    """``url`` as it may be printed: all up to its last ``@`` shown as ``***``.

    A password may hold ``/`` or ``@``, and the scheme may be missing or
    misspelt: everything from after the scheme (if any) to the last ``@`` goes.
    """
    if "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"


def _token_in(url: str) -> bool:
    """Whether ``url``'s query has a ``token``, as a browser would send it."""
    try:
        query = urllib.parse.urlsplit(url).query
    except ValueError:
        return False  # not a URL: parse_url says why
    return any(name == "token" for name, _ in urllib.parse.parse_qsl(query, True))


def _context(ca_file: Path | None) -> ssl.SSLContext | None:
    """A client TLS context that trusts ``ca_file``; None for the system's trust store.

    Raises:
        ValueError: the file cannot be read, or holds no CA certificate.
    """
    if ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load {ca_file}: {exc}") from exc


def _token(token_file: Path | None) -> str | None:
    """The token from ``--token-file``, else from the environment; None if neither.

    Raises:
        ValueError: the file cannot be read, or the token cannot be a header.
    """
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read {token_file}: {exc}") from exc
    else:
        token = os.environ.get(TOKEN_VARIABLE, "").strip()
        if not token:
            return None
    check_token(token)
    return token


def main(
    url: str,
    *,
    dialect: Dialect = Dialect.V1,
    token_file: Path | None = None,
    ca_file: Path | None = None,
) -> int:
    """Run ``relayd chat``: connect to ``url`` and chat on stdin and stdout.

    Args:
        url: ``ws://HOST:PORT/PATH`` or ``wss://...``, without a ``token`` in its
            query (refused: it would be printed, and ``ps`` shows it).
        dialect: relayd.v1 (acks, sender ids), or the seed dialect.
        token_file: a file holding the token; without it, :data:`TOKEN_VARIABLE`.
        ca_file: PEM certificates of the CAs to trust for ``wss://``; None for
            the system's trust store.

    Returns:
        The exit status: 0, 1 or :data:`EX_USAGE` (see :data:`HELP`); 130
        when a second Ctrl-C cut the closing handshake short.
    """
    console = Console("relayd chat")
    if _token_in(url):
        # Refused rather than taken out: by now `ps` and the shell's history hold it, and
        # the way that keeps it out of both is the one to learn. The URL is not repeated.
        console.warn(
            f"?token= in the URL is not accepted: `ps` shows it to every user; {_TOKEN_WAYS}"
        )
        return EX_USAGE
    try:
        endpoint = parse_url(url)
    except ValueError as exc:
        console.warn(f"bad URL {_without_password(url)!r}: {exc}")
        return EX_USAGE
    try:
        token = _token(token_file)
    except ValueError as exc:
        console.warn(f"bad token: {exc}")  # never the token itself: it may be nearly right
        return EX_USAGE
    if token is None and os.environ.get(_GUESSED_VARIABLE):
        console.warn(f"{_GUESSED_VARIABLE} is not read: the token comes from {TOKEN_VARIABLE}")
    if ca_file is not None and not endpoint.tls:
        console.warn("--ca-file is for a wss:// URL")
        return EX_USAGE
    try:
        context = _context(ca_file)
    except ValueError as exc:
        console.warn(f"bad --ca-file: {exc}")
        return EX_USAGE
    status = 128 + signal.SIGINT
    try:
        status = trio.run(functools.partial(_chat, url, dialect, token, context, console))
    except* KeyboardInterrupt:  # Ctrl-C while connecting, or a second one while closing
        pass
    except* BrokenPipeError:  # whoever read stdout stopped, e.g. `relayd chat URL | head -1`
        # Python's own flush at exit would fail again, with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 1
    finally:
        console.close()
    return status


def run(argv: Sequence[str]) -> int:
    """``relayd chat [ARGS]``: parse the command line and run :func:`main`."""
    text = "connect to a relayd as a client: see your id, send and receive messages"
    parser = argparse.ArgumentParser(
        prog="relayd chat",
        description=f"{text}. Reads no config: it only needs the URL.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("url", metavar="URL", help="ws://HOST:PORT/ or wss://HOST:PORT/")
    dialects = parser.add_mutually_exclusive_group()
    dialects.add_argument(
        "--seed", action="store_true", help="speak the seed dialect (no acks, no sender ids)"
    )
    dialects.add_argument(
        "--v1", action="store_true", help="speak relayd.v1 (the default; kept for scripts)"
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help=f"read the token from PATH (default: the {TOKEN_VARIABLE} environment variable)",
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        metavar="PATH",
        help="for wss://: trust the CA certificates in PATH (PEM) instead of the system's",
    )
    # Refused, with the reason: a token on the command line is readable by every
    # user of the machine (ps, /proc/PID/cmdline).
    parser.add_argument("--token", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.token is not None:
        parser.error(f"--token is not accepted: `ps` shows it to every user; {_TOKEN_WAYS}")
    return main(
        args.url,
        dialect=Dialect.SEED if args.seed else Dialect.V1,
        token_file=args.token_file,
        ca_file=args.ca_file,
    )
