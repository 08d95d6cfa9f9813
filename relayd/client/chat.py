"""``relayd chat``: a terminal client, for a person checking an install or for a script.

``relayd chat ws://HOST:9030/ [--v1] [--token TOKEN]`` connects, prints
``connected to URL as ID (DIALECT)``, then reads commands on stdin and prints
one line on stdout for each thing that happens; :data:`HELP` (``relayd chat
--help``, or ``/help`` once connected) describes both.

In v1 the Nth message sent carries the integer ``ref`` N, so its ``ack`` or
error can be matched to it. Ctrl-C closes like ``/quit``; a second Ctrl-C
stops waiting for the server's close reply (exit status 130).

``wss://`` verifies the server's certificate against the system trust store
(``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` are honoured); there is no way to turn
verification off.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import ssl
import sys
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import msgspec
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from relayd.wire.dialects import (
    V1_SUBPROTOCOL,
    Ack,
    Delivery,
    Dialect,
    Error,
    SeedError,
    ServerMessage,
    Welcome,
)

__all__ = ["EX_USAGE", "HELP", "main", "run"]

#: Exit status for a bad URL or token, as argparse uses for bad arguments.
EX_USAGE: Final = 2

#: Bound on connecting: TCP, TLS, the HTTP upgrade and the first frame. relayd
#: answers an incomplete handshake with 408 after ``handshake_timeout_s`` (10 s
#: by default); waiting a little longer lets that answer be shown.
HANDSHAKE_TIMEOUT_S: Final = 15.0
#: Bound on the closing handshake after /quit: relayd waits as long for ours.
CLOSE_TIMEOUT_S: Final = 5.0
#: Bytes asked of stdin per read.
READ_BYTES: Final = 65536
#: Longest input line kept, the most stdin can make this process buffer. It is
#: trio-websocket's largest message; relayd refuses far smaller ones by default
#: (``max_message_bytes``, 64 KiB), so a longer line is skipped with a warning.
MAX_LINE_BYTES: Final = 2**20

HELP: Final = """\
Type a line to send a message:
  ID MESSAGE   send MESSAGE to the client ID. If MESSAGE is valid JSON it is
               sent as that JSON value, exactly as typed ({"n": 1}, [1, 2], 42,
               true, null, "42"); anything else is sent as a string, so
               `ID hello there` sends "hello there". Quote text to force a
               string: `ID "42"`.
  /id          print your id
  /help        print this help
  /quit        close the connection and exit (so does end of input, Ctrl-D,
               or Ctrl-C)
Blank lines are ignored.

Each line printed is one event:
  < FROM: MESSAGE      a message (relayd.v1, --v1)
  < MESSAGE            a message (seed dialect: it does not say who sent it)
  ack REF              relayd.v1: your message number REF is in the
                       recipient's queue at the server
  ! CODE: DETAIL       a message was not relayed (relayd.v1 adds
                       "(ref REF to ID)"); in the seed dialect a message that
                       looks like {"error": ..., "detail": ...} shows as one
  closed: CODE REASON  the connection is over
MESSAGE is a string's text, or any other JSON as its sender wrote it. Control
characters from the network (line breaks, terminal escapes) are shown escaped,
as \\n or \\x1b: one line is one event, and a peer cannot drive your terminal.

Exit status: 0 after /quit, end of input, Ctrl-C, or a server close with 1000
or 1001; 1 after any other close, or if the connection cannot be made (one
line on stderr: a refused handshake's HTTP status and body, or the network or
TLS error); 2 for a bad URL or token."""

_DIALECT_NAMES: Final = {Dialect.SEED: "seed", Dialect.V1: V1_SUBPROTOCOL}
#: Close codes after which the server's close is not a failure.
_NORMAL_CLOSES: Final = frozenset({1000, 1001})

#: C0 controls, DEL and C1 controls, made visible; applied to every line
#: printed, whose only control characters can come from the network.
_ESCAPES: Final[dict[int, str]] = {
    **{code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)]},
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


_v1_decoder: Final = msgspec.json.Decoder(ServerMessage)
_seed_error_decoder: Final = msgspec.json.Decoder(SeedError)
_raw_decoder: Final = msgspec.json.Decoder(msgspec.Raw)
_encoder: Final = msgspec.json.Encoder()


@dataclass(frozen=True)
class _Target:
    """Where to connect, from a ``ws://`` or ``wss://`` URL."""

    url: str
    host: str
    port: int
    host_header: str
    resource: str
    tls: bool


def _target(url: str) -> _Target:
    """Parse the URL given on the command line.

    Raises:
        ValueError: the URL is not one this client can connect to.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError("the URL must start with ws:// or wss://")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    if parts.username is not None:
        raise ValueError("no user or password in the URL: give a token with --token")
    tls = parts.scheme == "wss"
    port = parts.port or (443 if tls else 80)  # ValueError for a bad port
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(url, parts.hostname, port, parts.netloc, resource, tls)


def _check_token(token: str) -> None:
    """Refuse a token that cannot be one HTTP header value.

    Raises:
        ValueError: the token is empty, or has spaces or non-ASCII characters.
    """
    if not (token.isascii() and token.isprintable() and token) or " " in token:
        raise ValueError("the token must be printable ASCII without spaces")


def _say(line: str) -> None:
    print(line.translate(_ESCAPES), flush=True)


def _warn(line: str) -> None:
    print(f"relayd chat: {line}".translate(_ESCAPES), file=sys.stderr, flush=True)


def _fail(line: str) -> int:
    _warn(line)
    return 1


def _client_id(first: str | bytes, dialect: Dialect) -> str | None:
    """The id in the first frame (a bare string, or a v1 welcome); None if there is none."""
    if isinstance(first, bytes):
        return None
    if dialect is Dialect.SEED:
        return first
    try:
        return msgspec.json.decode(first, type=Welcome).id
    except msgspec.DecodeError:
        return None


def _outgoing(text: str) -> msgspec.Raw | str:
    """The ``message`` for typed text: its JSON value if it is JSON, else the text."""
    try:
        return _raw_decoder.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return text


def _shown(message: msgspec.Raw) -> str:
    """A relayed message as printed: a string's text, other JSON as it was sent."""
    raw = bytes(message)
    if raw[:1] == b'"':
        return msgspec.json.decode(raw, type=str)
    return raw.decode()


class _LineReader:
    """Lines from a file descriptor, read in a worker thread.

    A thread works for every kind of stdin (terminal, pipe, regular file, which
    trio's own streams cannot wait on) and reads with ``os.read``, which holds
    no lock of ``sys.stdin``'s: the thread, abandoned blocking in it at exit,
    stops nothing.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._eof = False
        self._skipping = False  # the rest of an over-long line

    async def readline(self) -> str | None:
        """The next line without its line break; None at end of input."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if not self._skipping:
                    return line.decode(errors="replace")
                self._skipping = False
            elif self._eof:
                line, skipped = bytes(self._buffer), self._skipping
                self._buffer.clear()
                return line.decode(errors="replace") if line and not skipped else None
            elif len(self._buffer) > MAX_LINE_BYTES:
                if not self._skipping:
                    _warn(f"a line over {MAX_LINE_BYTES} bytes was skipped")
                self._skipping = True
                self._buffer.clear()
            else:
                await self._fill()

    async def _fill(self) -> None:
        try:
            chunk = await trio.to_thread.run_sync(
                os.read, self._fd, READ_BYTES, abandon_on_cancel=True
            )
        except OSError as exc:  # e.g. stdin closed by the caller: no more input
            _warn(f"cannot read stdin: {exc}")
            chunk = b""
        self._eof = not chunk
        self._buffer += chunk


class _Chat:
    """One connected session: stdin lines out as messages, frames in as lines."""

    def __init__(self, ws: WebSocketConnection, dialect: Dialect, client_id: str) -> None:
        self._ws = ws
        self._dialect = dialect
        self._id = client_id
        self._next_ref = 1
        self._pending: dict[int, str] = {}  # v1 ref -> recipient, until its ack or error
        self._settled = trio.Event()  # set whenever nothing is pending
        self._settled.set()
        self._quitting = False

    async def run(self, lines: _LineReader) -> int:
        """Chat until the user quits or the server closes; returns the exit status."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive, nursery.cancel_scope)
            async with trio.open_nursery() as inputs:
                inputs.start_soon(self._read_commands, lines, inputs.cancel_scope)
                inputs.start_soon(self._quit_on_interrupt, inputs.cancel_scope)
            self._quitting = True
            # Piped input ends right after its last message: report what became
            # of each one (ack or error) before closing, as a person would see.
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await self._settled.wait()
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await self._ws.aclose(1000)
        closed = self._ws.closed
        code = closed.code if closed is not None else 1006
        reason = closed.reason if closed is not None and closed.reason else ""
        _say(f"closed: {code} {reason}".rstrip())
        return 0 if self._quitting or code in _NORMAL_CLOSES else 1

    async def _receive(self, session: trio.CancelScope) -> None:
        while True:
            try:
                frame = await self._ws.get_message()
            except ConnectionClosed:
                break
            self._show(frame)
        self._settled.set()  # no answer can come any more
        if not self._quitting:  # the server closed first: stop reading stdin
            session.cancel()

    async def _quit_on_interrupt(self, inputs: trio.CancelScope) -> None:
        # Ctrl-C closes like /quit; a second one, once this receiver is gone,
        # interrupts the closing handshake (exit status 130).
        with trio.open_signal_receiver(signal.SIGINT) as interrupts:
            async for _ in interrupts:
                inputs.cancel()
                return

    async def _read_commands(self, lines: _LineReader, inputs: trio.CancelScope) -> None:
        while (line := await lines.readline()) is not None:
            if not await self._command(line.strip()):
                break
        inputs.cancel()

    async def _command(self, line: str) -> bool:
        """Carry out one input line; False for /quit."""
        if not line:
            return True
        if line.startswith("/"):
            name = line.split()[0]
            if name == "/quit":
                return False
            if name == "/id":
                _say(f"id: {self._id}")
            elif name == "/help":
                print(HELP, flush=True)
            else:
                _warn(f"unknown command {name}; /help lists them")
            return True
        words = line.split(maxsplit=1)
        if len(words) < 2:
            _warn("nothing to send: type ID MESSAGE (/help for more)")
            return True
        await self._send(words[0], _outgoing(words[1]))
        return True

    async def _send(self, to: str, message: msgspec.Raw | str) -> None:
        envelope: dict[str, object] = {"to": to, "message": message}
        if self._dialect is Dialect.V1:
            envelope["ref"] = ref = self._next_ref
            self._next_ref += 1
            self._pending[ref] = to
            self._settled = trio.Event()
        with contextlib.suppress(ConnectionClosed):  # _receive reports the close
            await self._ws.send_message(_encoder.encode(envelope).decode())

    def _show(self, frame: str | bytes) -> None:
        if isinstance(frame, bytes):
            _say(f"? a binary frame of {len(frame)} bytes")
        elif self._dialect is Dialect.V1:
            self._show_v1(frame)
        else:
            try:
                error = _seed_error_decoder.decode(frame)
            except (msgspec.DecodeError, RecursionError):
                _say(f"< {frame}")
            else:
                self._show_error(error.error, error.detail, error.ref)

    def _show_v1(self, frame: str) -> None:
        try:
            event = _v1_decoder.decode(frame)
        except (msgspec.DecodeError, RecursionError):
            _say(f"? {frame}")
            return
        match event:
            case Delivery(sender=sender, message=message):
                _say(f"< {sender}: {_shown(message)}")
            case Ack(ref=ref):
                self._answered(ref)
                _say(f"ack {ref}")
            case Error(error=code, detail=detail, ref=ref):
                self._show_error(code, detail, ref)
            case Welcome():
                _say(f"? {frame}")

    def _answered(self, ref: str | int | None) -> str | None:
        """Forget a pending ref once answered; returns its recipient."""
        to = self._pending.pop(ref, None) if isinstance(ref, int) else None
        if not self._pending:
            self._settled.set()
        return to

    def _show_error(self, code: str, detail: str, ref: str | int | None) -> None:
        to = self._answered(ref)
        where = f" (ref {ref} to {to})" if to is not None else ""
        _say(f"! {code}: {detail}{where}")


async def _open_stream(target: _Target) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
    """TCP, and for ``wss://`` a verified TLS session, before any WebSocket byte.

    The TLS handshake is done here so that a bad certificate is reported as
    such: inside trio-websocket it would only be a silent stall.

    Raises:
        OSError: no TCP connection.
        trio.BrokenResourceError: the TLS handshake failed; its ``__cause__``
            says why.
    """
    tcp = await trio.open_tcp_stream(target.host, target.port)
    if not target.tls:
        return tcp
    tls = trio.SSLStream(
        tcp, ssl.create_default_context(), server_hostname=target.host, https_compatible=True
    )
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return tls


async def _connected(
    nursery: trio.Nursery,
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
    target: _Target,
    *,
    v1: bool,
    token: str | None,
    deadline: float,
) -> int:
    """Upgrade ``stream``, read the welcome, and chat; returns the exit status."""
    headers = [] if token is None else [(b"Authorization", f"Bearer {token}".encode())]
    try:
        with trio.fail_at(deadline):
            ws = await wrap_client_stream(
                nursery,
                stream,
                target.host_header,
                target.resource,
                subprotocols=[V1_SUBPROTOCOL] if v1 else [],
                extra_headers=headers,
            )
            first = await ws.get_message()
    except trio.TooSlowError:
        return _fail(f"no WebSocket handshake with {target.url} within {HANDSHAKE_TIMEOUT_S:g} s")
    except ConnectionClosed as exc:
        return _fail(f"{target.url} closed the connection before sending an id: {exc.reason}")
    dialect = Dialect.V1 if v1 else Dialect.SEED
    if v1 and ws.subprotocol != V1_SUBPROTOCOL:
        return _fail(f"{target.url} does not speak {V1_SUBPROTOCOL}; try without --v1")
    client_id = _client_id(first, dialect)
    if not client_id:
        return _fail(f"{target.url} sent {first!r} where relayd sends the id")
    _say(f"connected to {target.url} as {client_id} ({_DIALECT_NAMES[dialect]})")
    return await _Chat(ws, dialect, client_id).run(_LineReader(sys.stdin.fileno()))


async def _chat(target: _Target, *, v1: bool, token: str | None) -> int:
    deadline = trio.current_time() + HANDSHAKE_TIMEOUT_S
    try:
        with trio.fail_at(deadline):
            stream = await _open_stream(target)
    except trio.TooSlowError:
        return _fail(f"no connection to {target.url} within {HANDSHAKE_TIMEOUT_S:g} s")
    except OSError as exc:
        # trio's "all attempts to connect failed" holds each address's reason.
        causes = exc.__cause__.exceptions if isinstance(exc.__cause__, ExceptionGroup) else [exc]
        return _fail(f"cannot connect to {target.url}: {'; '.join(map(str, causes))}")
    except trio.BrokenResourceError as exc:
        return _fail(f"TLS handshake with {target.url} failed: {exc.__cause__ or exc}")
    status = 1
    rejected: list[ConnectionRejected] = []
    try:
        async with stream, trio.open_nursery() as nursery:
            status = await _connected(
                nursery, stream, target, v1=v1, token=token, deadline=deadline
            )
            nursery.cancel_scope.cancel()  # trio-websocket's reader
    except* ConnectionRejected as group:  # raised by the reader task, hence the group
        rejected = [exc for exc in group.exceptions if isinstance(exc, ConnectionRejected)]
    if rejected:
        body = (rejected[0].body or b"").decode(errors="replace").strip()
        return _fail(f"{target.url} refused the handshake: HTTP {rejected[0].status_code} {body}")
    return status


def main(url: str, *, v1: bool = False, token: str | None = None) -> int:
    """Run ``relayd chat``: connect to ``url`` and chat on stdin and stdout.

    Args:
        url: ``ws://HOST:PORT/PATH`` or ``wss://...``.
        v1: speak relayd.v1 (acks, sender ids) instead of the seed dialect.
        token: sent as ``Authorization: Bearer TOKEN``.

    Returns:
        The exit status: 0, 1 or :data:`EX_USAGE` (see the module docstring);
        130 when a second Ctrl-C cut the closing handshake short.
    """
    try:
        target = _target(url)
    except ValueError as exc:
        _warn(f"bad URL {url!r}: {exc}")
        return EX_USAGE
    try:
        if token is not None:
            _check_token(token)
    except ValueError as exc:
        _warn(f"bad token: {exc}")  # never the token itself: it may be nearly right
        return EX_USAGE
    status = 128 + signal.SIGINT
    try:
        status = trio.run(functools.partial(_chat, target, v1=v1, token=token))
    except* KeyboardInterrupt:  # Ctrl-C while connecting, or a second one while closing
        pass
    except* BrokenPipeError:  # whoever read stdout stopped, e.g. `relayd chat URL | head -1`
        # Python's own flush at exit would fail again, with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 1
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
    parser.add_argument(
        "--v1", action="store_true", help="speak relayd.v1 (acks, sender ids), not the seed dialect"
    )
    parser.add_argument("--token", help="sent as 'Authorization: Bearer TOKEN'")
    args = parser.parse_args(argv)
    return main(args.url, v1=args.v1, token=args.token)
