"""The WebSocket opening handshake (RFC 6455 §4.2), without I/O.

:class:`RequestReader` feeds the bytes of a client's request to h11 and yields
the request once its head is complete, with the bytes that came after it (a
client may send its first frames in the same TCP segment; they are kept and
parsed as frames once the handshake is accepted, under the same limits as any
other frame). :func:`validate` checks that the request is a WebSocket upgrade
relayd can accept; :func:`accept_response` and :func:`refusal_response` are the
two ways to answer it.

Every refusal is a :class:`Refusal` carrying its HTTP status
and the reason sent as the response body and logged as ``handshake.rejected``:

* 400: not HTTP/1.1, not a GET, not a WebSocket upgrade, a bad
  ``Sec-WebSocket-Key``, a request with a body, bytes that are not HTTP, a
  folded header line (obs-fold);
* 426 with ``Sec-WebSocket-Version: 13``: another WebSocket version;
* 431: a request head over ``max_header_bytes``, found as soon as the limit is
  passed, before the rest is read.
"""

from __future__ import annotations

import binascii
import dataclasses
import hashlib
import re
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Final

import h11

__all__ = [
    "Refusal",
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
    of a fixed set (a malformed request is named by the kind of fault h11
    found, never by the line it found it in).
    """

    status: int
    reason: str


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

    Args:
        max_head_bytes: the largest request line and headers accepted.
    """

    __slots__ = ("_fed", "_fold_at", "_h11", "_last", "_max")

    def __init__(self, max_head_bytes: int) -> None:
        self._max = max_head_bytes
        self._fed = 0
        self._last = b""  # the last byte fed, for a line break split across feeds
        self._fold_at: int | None = None  # where the first folded line begins
        # h11 refuses a head that grows past the limit while incomplete; one
        # that completes within the read that passes it is measured below.
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)

    def feed(self, data: bytes | bytearray) -> tuple[h11.Request, bytes] | Refusal | None:
        """Add bytes from the client (never ``b""``: the caller handles its end).

        Returns:
            ``(request, rest)`` once the head is complete, ``rest`` being what
            the client sent after it; a :class:`Refusal` if the bytes cannot be
            a request relayd answers; None while more bytes are needed.
        """
        chunk = bytes(data)
        if self._fold_at is None:
            # A line break, then a space or tab: where the head ends is known
            # only once it has, so the place is kept and judged then.
            found = _FOLD.search(self._last + chunk)
            if found is not None:
                self._fold_at = self._fed - len(self._last) + found.end() - 1
            self._last = chunk[-1:]
        self._fed += len(chunk)
        self._h11.receive_data(chunk)
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE:
                return self._too_large()
            # Everything else h11 refuses (including a transfer coding it does
            # not know, its 501) is a request relayd cannot take: 400.
            return Refusal(400, _malformed(exc))
        if not isinstance(event, h11.Request):
            return None
        rest = self._h11.trailing_data[0]
        head = self._fed - len(rest)
        if head > self._max:
            return self._too_large()
        if self._fold_at is not None and self._fold_at < head:
            # h11 joins a folded line to the one before: a header could then
            # carry another's value (a token into User-Agent, which is logged).
            return Refusal(400, "malformed HTTP request: obsolete line folding")
        return event, rest

    def _too_large(self) -> Refusal:
        return Refusal(431, f"request head over {self._max} bytes")


#: A folded header line (RFC 9112 §5.2, obs-fold): a line break, then a space or tab.
_FOLD: Final = re.compile(rb"\n[ \t]")

#: What h11 says of a request it cannot parse, as far as relayd repeats it: each
#: of these begins h11's message, and what follows in the message (the line or
#: the value, quoted) is the client's own bytes, which may hold a token.
_H11_REASONS: Final = (
    "illegal request line",
    "illegal header line",
    "Illegal header name",
    "Illegal header value",
    "bad Content-Length",
    "conflicting Content-Length headers",
    "Missing mandatory Host: header",
    "Found multiple Host: headers",
    "continuation line at start of headers",
    "no request line received",
    "Only Transfer-Encoding: chunked is supported",
)


def _malformed(error: h11.RemoteProtocolError) -> str:
    """The reason for a request h11 refused: its kind, never the client's bytes."""
    message = str(error)
    kind = next((reason for reason in _H11_REASONS if message.startswith(reason)), None)
    return "malformed HTTP request" if kind is None else f"malformed HTTP request: {kind}"


def _has_token(value: str, token: str) -> bool:
    """Whether the comma-separated ``value`` lists ``token`` (lower case), in any case."""
    value = value.lower()
    # The usual value is the token alone: no list to make.
    return value == token or token in [item.strip() for item in value.split(",")]


def validate(request: h11.Request) -> UpgradeRequest | Refusal:
    """Check that ``request`` asks for a WebSocket connection (RFC 6455 §4.2.1)."""
    headers: dict[str, str] = {}
    # raw_items() is one list, made in a comprehension; iterating h11's Headers
    # itself goes through the Sequence ABC's iterator and a __getitem__ call
    # per header. Names are tokens (h11 checks), so ASCII: lower() here is h11's.
    for raw_name, raw_value in request.headers.raw_items():
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    # h11 leaves at most one Content-Length, its digits only, and refuses every
    # Transfer-Encoding but chunked.
    if "transfer-encoding" in headers or headers.get("content-length", "0") != "0":
        return Refusal(400, "a WebSocket handshake has no body")
    if request.http_version != b"1.1":
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
        target=request.target.decode("latin-1"), headers=headers, key=key, subprotocols=subprotocols
    )


def accept_response(
    key: str, subprotocol: str | None, *, max_message_bytes: int | None = None
) -> bytes:
    """The ``101 Switching Protocols`` response that opens the WebSocket.

    ``max_message_bytes``, the connection's message limit, is announced in a
    ``Relayd-Max-Message-Bytes`` header, so that a client can refuse a larger
    message itself rather than lose the connection to a 1009.
    """
    digest = hashlib.sha1(key.encode() + _GUID).digest()
    accept = binascii.b2a_base64(digest, newline=False).decode()  # base64.b64encode's own call
    protocol = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else ""
    if max_message_bytes is not None:
        protocol += f"Relayd-Max-Message-Bytes: {max_message_bytes}\r\n"
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
