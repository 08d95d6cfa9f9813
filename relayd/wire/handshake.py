"""The WebSocket opening handshake (RFC 6455 §4.2), without I/O.

:class:`RequestReader` collects the bytes of a client's request head and has
httptools (llhttp, the parser uvicorn and Node use) parse it once it is
complete, yielding the request with the bytes that came after it (a client may
send its first frames in the same TCP segment; they are kept and parsed as
frames once the handshake is accepted, under the same limits as any other
frame). :func:`validate` checks that the request is a WebSocket upgrade relayd
can accept; :func:`accept_response` and :func:`refusal_response` are the two
ways to answer it.

Every refusal is a :class:`Refusal` carrying its HTTP status
and the reason sent as the response body and logged as ``handshake.rejected``:

* 400: not HTTP/1.1, not a GET, not a WebSocket upgrade, a bad
  ``Sec-WebSocket-Key``, a request with a body, bytes that are not HTTP, a
  folded header line (obs-fold), an HTTP/1.1 request without exactly one
  ``Host`` header;
* 426 with ``Sec-WebSocket-Version: 13``: another WebSocket version;
* 431: a request head over ``max_header_bytes``, found as soon as the limit is
  passed, before the rest is read.

llhttp parses strictly: every line of the head ends in CRLF (a bare LF is
refused, as Node refuses it), header names are tokens and values hold no
control character but a tab.
"""

from __future__ import annotations

import binascii
import dataclasses
import hashlib
import re
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Final

import httptools

__all__ = [
    "Refusal",
    "RequestHead",
    "RequestReader",
    "UpgradeRequest",
    "accept_response",
    "refusal_response",
    "validate",
]

#: RFC 6455 §1.3: appended to the client's key to prove the server read it.
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_VERSION: Final = "13"
#: RFC 6455 §4.1: the key is a random 16-byte nonce, base64-encoded.
_NONCE_BYTES: Final = 16


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """A handshake refused: answer with HTTP ``status``; ``reason`` says why.

    The reason is the response's body and the ``handshake.rejected`` event's
    ``reason``; it never holds anything the client sent: every reason is one
    of a fixed set (a malformed request is named by the kind of fault the
    parser found, never by the line it found it in).

    ``kind`` is the ``reason`` label the refusal is counted under in
    ``relayd_handshakes_rejected_total``, where a status has several causes an
    operator must tell apart (503: ``max_connections``, ``max_connections_per_ip``
    or ``shutting_down``; 403: ``origin``; 400: ``unsupported_subprotocol``).
    Empty, the status's own label stands (:data:`relayd.telemetry.metrics.REFUSAL_REASONS`).
    """

    status: int
    reason: str
    kind: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class RequestHead:
    """A request head as HTTP/1.1 allows it, not yet checked as a WebSocket upgrade.

    Attributes:
        method: the method, as sent (``b"GET"``).
        target: the request target, path and query (``/?token=…``), latin-1.
        http_version: ``"1.1"``, ``"1.0"``…
        headers: header names in lower case; values without the white space
            around them; repeated headers joined by ``", "``.
    """

    method: bytes
    target: str
    http_version: str
    headers: Mapping[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """A valid WebSocket upgrade request.

    Attributes:
        target: the request target, path and query (``/?token=…``).
        headers: header names in lower case; repeated headers joined by ``", "``.
        key: ``Sec-WebSocket-Key``, to answer with ``Sec-WebSocket-Accept``.
        subprotocols: the ``Sec-WebSocket-Protocol`` values offered, in order.
    """

    target: str
    headers: Mapping[str, str]
    key: str
    subprotocols: tuple[str, ...]


class RequestReader:
    """Collects one HTTP request head from a client's bytes.

    The head is parsed once, when its blank line has come: a request sent in
    one segment, as clients send it, is one call into llhttp.

    Args:
        max_head_bytes: the largest request line and headers accepted.
    """

    __slots__ = ("_buffer", "_max")

    def __init__(self, max_head_bytes: int) -> None:
        self._max = max_head_bytes
        self._buffer = bytearray()  # what came before the head's end, when it came in pieces

    def feed(self, data: bytes | bytearray) -> tuple[RequestHead, bytes] | Refusal | None:
        """Add bytes from the client (never ``b""``: the caller handles its end).

        Returns:
            ``(request, rest)`` once the head is complete, ``rest`` being what
            the client sent after it; a :class:`Refusal` if the bytes cannot be
            a request relayd answers; None while more bytes are needed.
        """
        buffer = self._buffer
        opening = len(buffer) < 2  # the first two bytes are judged once both have come
        if buffer:
            # The blank line may begin in the bytes before: look from two back.
            start = max(len(buffer) - 2, 0)
            buffer += data
            data = buffer
        else:
            start = 0
        if opening:
            # What h11, relayd's parser before httptools, refused at the first
            # byte: llhttp would skip blank lines before the request line. A lone
            # CR waits for the next byte, so that a blank line split after its CR
            # gets the answer it gets whole.
            if data[0] == _LF or data[:2] == b"\r\n":
                return Refusal(400, "malformed HTTP request: no request line received")
            if data[0] < _FIRST_PRINTABLE and data != b"\r":  # a TLS client on a plain port
                return Refusal(400, _BAD_LINE)
        end = _HEAD_END.search(data, start)
        if end is None:
            if len(data) > self._max:
                return self._too_large()
            if data is not buffer:
                buffer += data
            return None
        size = end.end()
        if size > self._max:
            return self._too_large()
        head = bytes(data[:size])
        result = _parse(head)
        return result if isinstance(result, Refusal) else (result, bytes(data[size:]))

    def _too_large(self) -> Refusal:
        return Refusal(431, f"request head over {self._max} bytes")


#: Where a request head ends: a line break, then an empty line (as h11 finds it;
#: llhttp then refuses a head whose lines do not all end in CRLF).
_HEAD_END: Final = re.compile(rb"\n\r?\n")
_LF: Final = ord("\n")
#: A request line begins with a method, a token: never a control byte or a space.
_FIRST_PRINTABLE: Final = 0x21
#: A folded header line (RFC 9112 §5.2, obs-fold): a line break, then a space or tab.
_FOLD: Final = re.compile(rb"\n[ \t]")


class _Collector:
    """Receives what llhttp finds in a head (httptools' callback protocol)."""

    __slots__ = ("complete", "headers", "repeated", "repeated_host", "target")

    def __init__(self) -> None:
        self.target = b""
        self.headers: dict[str, str] = {}
        # The values of a repeated header, joined once the head is parsed: joined
        # as they come, a head of one header repeated would take quadratic time.
        self.repeated: dict[str, list[str]] | None = None
        self.repeated_host = False
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.target = url  # in one piece: llhttp is given the whole head at once

    def on_header(self, name: bytes, value: bytes) -> None:
        # Names are tokens (llhttp checks), so ASCII; llhttp leaves out the
        # white space before a value, not the white space after it.
        key, text = name.decode("latin-1").lower(), value.rstrip(b" \t").decode("latin-1")
        headers = self.headers
        if key in headers:
            if self.repeated is None:
                self.repeated = {}
            self.repeated.setdefault(key, [headers[key]]).append(text)
            if key == "host":
                self.repeated_host = True
        else:
            headers[key] = text

    def joined(self) -> dict[str, str]:
        """The headers, a repeated one's values joined by ``", "`` in the order they came."""
        headers = self.headers
        for key, values in (self.repeated or {}).items():
            headers[key] = ", ".join(values)
        return headers

    def on_headers_complete(self) -> None:
        self.complete = True


def _parse(head: bytes) -> RequestHead | Refusal:
    """The request in ``head``, a whole request head, if HTTP/1.x allows it."""
    fold = _FOLD.search(head)
    if fold is not None:
        # h11 joined a folded line to the one before, llhttp refuses it: either
        # way a header could carry another's value, so it is refused first.
        if fold.start() == head.index(b"\n"):
            return Refusal(400, "malformed HTTP request: continuation line at start of headers")
        return Refusal(400, "malformed HTTP request: obsolete line folding")
    collector = _Collector()
    parser = httptools.HttpRequestParser(collector)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # an upgrade: llhttp stops where the head ends, as it does here anyway
    except httptools.HttpParserError as exc:
        return _malformed(exc, head)
    if not collector.complete:  # HTTP/2's preface, whose head is not a request's
        return _MALFORMED
    line_end = head.index(b"\r\n")  # llhttp has checked that lines end so
    if (
        not head.startswith(b"HTTP/", line_end - 8)  # llhttp reads RTSP/ and ICE/ too
        or b"  " in head[:line_end]  # and more than one space between parts
    ):
        return Refusal(400, _BAD_LINE)
    version = parser.get_http_version()
    headers = collector.joined()
    if collector.repeated_host:
        return Refusal(400, "malformed HTTP request: Found multiple Host: headers")
    if "host" not in headers and version == "1.1":  # RFC 9112 §3.2
        return Refusal(400, "malformed HTTP request: Missing mandatory Host: header")
    return RequestHead(
        method=parser.get_method(),
        target=collector.target.decode("latin-1"),
        http_version=version,
        headers=headers,
    )


_MALFORMED: Final = Refusal(400, "malformed HTTP request")
_BAD_LINE: Final = "malformed HTTP request: illegal request line"
_BAD_HEADER: Final = "malformed HTTP request: illegal header line"
_BAD_LENGTH: Final = "malformed HTTP request: bad Content-Length"
_HAS_BODY: Final = "a WebSocket handshake has no body"

#: What relayd answers a head llhttp refused, by the reason llhttp gives (a fixed
#: string of its own, never the client's bytes): the kind of fault, named as h11
#: named it before; a reason of its own where the head is well-formed HTTP that a
#: handshake cannot be. Any other reason is told only that the request is malformed.
_REFUSALS: Final = {
    message: Refusal(400, reason)
    for message, reason in (
        ("Expected HTTP/, RTSP/ or ICE/", _BAD_LINE),
        ("Expected CRLF after version", _BAD_LINE),
        ("Expected dot", _BAD_LINE),
        ("Invalid major version", _BAD_LINE),
        ("Invalid minor version", _BAD_LINE),
        ("Invalid method for RTSP/x.x request", _BAD_LINE),
        ("Expected SOURCE method for ICE/x.x request", _BAD_LINE),
        ("Invalid HTTP version", "a WebSocket handshake needs HTTP/1.1"),  # HTTP/1.2, say
        ("Invalid header token", _BAD_HEADER),
        ("Invalid header field char", _BAD_HEADER),
        ("Invalid header value char", _BAD_HEADER),
        ("Missing expected CR after header value", _BAD_HEADER),
        ("Missing expected LF after header value", _BAD_HEADER),
        ("Expected LF after CR", _BAD_HEADER),  # a CR before a value
        ("Expected LF after headers", _BAD_HEADER),
        ("Invalid character in Content-Length", _BAD_LENGTH),
        ("Empty Content-Length", _BAD_LENGTH),
        ("Content-Length overflow", _BAD_LENGTH),
        ("Duplicate Content-Length", "malformed HTTP request: conflicting Content-Length headers"),
        ("Request has invalid `Transfer-Encoding`", _HAS_BODY),
        ("Invalid `Transfer-Encoding` header value", _HAS_BODY),
        ("Empty Transfer-Encoding", _HAS_BODY),
        ("Content-Length can't be present with Transfer-Encoding", _HAS_BODY),
        ("Transfer-Encoding can't be present with Content-Length", _HAS_BODY),
    )
}
#: What llhttp says of a method it knows, but not in an HTTP/1.x request line
#: (RTSP's, and PRI, HTTP/2's preface), besides its "Invalid method".
_METHOD_FAULTS: Final = frozenset(
    {"Invalid method for HTTP/x.x request", "Expected HTTP/2 Connection Preface"}
)
#: A request line as HTTP has it (RFC 9112 §3): a method llhttp does not know
#: there is still a method, and relayd says which one it wants.
_REQUEST_LINE: Final = re.compile(
    rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+ [\x21-\x7e]+ HTTP/[0-9]\.[0-9]\r?\n"
)


def _malformed(error: httptools.HttpParserError, head: bytes) -> Refusal:
    """The refusal of a head llhttp refused: the kind of fault, never the client's bytes."""
    message = str(error)
    if (
        isinstance(error, httptools.HttpParserInvalidMethodError) or message in _METHOD_FAULTS
    ) and _REQUEST_LINE.match(head):
        return Refusal(400, "a WebSocket handshake is a GET request")
    if isinstance(
        error, httptools.HttpParserInvalidMethodError | httptools.HttpParserInvalidURLError
    ):
        return Refusal(400, _BAD_LINE)
    return _REFUSALS.get(message, _MALFORMED)


def _has_token(value: str, token: str) -> bool:
    """Whether the comma-separated ``value`` lists ``token`` (lower case), in any case."""
    value = value.lower()
    # The usual value is the token alone: no list to make.
    return value == token or token in [item.strip() for item in value.split(",")]


def validate(request: RequestHead) -> UpgradeRequest | Refusal:
    """Check that ``request`` asks for a WebSocket connection (RFC 6455 §4.2.1)."""
    headers = request.headers
    # llhttp leaves at most one Content-Length, its digits only, and refuses a
    # Transfer-Encoding whose last coding is not chunked.
    if "transfer-encoding" in headers or headers.get("content-length", "0") != "0":
        return Refusal(400, _HAS_BODY)
    if request.http_version != "1.1":
        return Refusal(400, "a WebSocket handshake needs HTTP/1.1")
    if request.method != b"GET":
        return Refusal(400, "a WebSocket handshake is a GET request")
    if not _has_token(headers.get("upgrade", ""), "websocket") or not _has_token(
        headers.get("connection", ""), "upgrade"
    ):
        return Refusal(400, "not a WebSocket upgrade request")
    if headers.get("sec-websocket-version", "").strip() != _VERSION:
        return Refusal(426, "unsupported WebSocket version; this server speaks 13")
    key = headers.get("sec-websocket-key", "").strip()
    try:
        # What base64.b64decode(key, validate=True) does, without its Python layers.
        nonce = binascii.a2b_base64(key.encode("ascii"), strict_mode=True)
    except ValueError:  # binascii.Error, or a key that is not ASCII at all
        nonce = b""
    if len(nonce) != _NONCE_BYTES:
        return Refusal(400, "Sec-WebSocket-Key is not 16 bytes in base64")
    offered = headers.get("sec-websocket-protocol", "")
    subprotocols = tuple(p.strip() for p in offered.split(",") if p.strip())
    return UpgradeRequest(
        target=request.target, headers=headers, key=key, subprotocols=subprotocols
    )


def accept_response(
    key: str,
    subprotocol: str | None,
    *,
    max_message_bytes: int | None = None,
    messages_per_second: float | None = None,
    message_burst: int | None = None,
) -> bytes:
    """The ``101 Switching Protocols`` response that opens the WebSocket.

    ``max_message_bytes``, the connection's message limit, is announced in a
    ``Relayd-Max-Message-Bytes`` header, so that a client can refuse a larger
    message itself rather than lose the connection to a 1009; and
    ``messages_per_second``, its message rate, in ``Relayd-Messages-Per-Second``,
    so that a client refused as over it knows how long to wait before sending
    again rather than guess, and lose the connection to a 1008 for a wrong guess;
    and ``message_burst``, the messages it may send at once, in
    ``Relayd-Message-Burst``, so that a client pacing itself need not space out
    what relayd takes at once.
    """
    digest = hashlib.sha1(key.encode() + _GUID).digest()
    accept = binascii.b2a_base64(digest, newline=False).decode()  # base64.b64encode's own call
    protocol = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else ""
    if max_message_bytes is not None:
        protocol += f"Relayd-Max-Message-Bytes: {max_message_bytes}\r\n"
    if messages_per_second is not None:  # repr: exact, as 50.0 or 0.001
        protocol += f"Relayd-Messages-Per-Second: {float(messages_per_second)!r}\r\n"
    if message_burst is not None:
        protocol += f"Relayd-Message-Burst: {message_burst}\r\n"
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n{protocol}\r\n"
    ).encode()


def refusal_response(status: int, reason: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A complete ``Connection: close`` response refusing a handshake; ``reason`` is its body."""
    body = reason.encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    if status == HTTPStatus.UPGRADE_REQUIRED:
        extra += f"Sec-WebSocket-Version: {_VERSION}\r\nUpgrade: websocket\r\n"
    elif status == HTTPStatus.UNAUTHORIZED:  # RFC 9110 §11.6.1: say which scheme
        extra += "WWW-Authenticate: Bearer\r\n"
    return (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nConnection: close\r\n{extra}"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
