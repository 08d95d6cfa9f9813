"""Tests for relayd.wire.handshake: request bytes in, a request or a refusal out; responses out.

No sockets. Responses are read back with h11 as a client would read them, so
"a complete HTTP/1.1 response" means what h11 accepts, not what a regex finds.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.wire.handshake import (
    Refusal,
    RequestHead,
    RequestReader,
    UpgradeRequest,
    accept_response,
    refusal_response,
    validate,
)
from tests.wire import OP_BINARY, OP_TEXT, frame

#: RFC 6455 §1.3: this key must be answered with this accept value.
RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
LIMIT = 4096

DEFAULT_HEADERS: tuple[tuple[str, str], ...] = (
    ("Host", "relay.example"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", RFC_KEY),
    ("Sec-WebSocket-Version", "13"),
)


def head(
    replace: Mapping[str, str | None] | None = None,
    *,
    extra: Sequence[tuple[str, str]] = (),
    request_line: str = "GET /?token=t HTTP/1.1",
) -> bytes:
    """A request head: default headers, some replaced (None removes one), ``extra`` added."""
    replace = replace or {}
    lines = [request_line]
    for name, value in DEFAULT_HEADERS:
        new = replace.get(name, value)
        if new is not None:
            lines.append(f"{name}: {new}")
    lines += [f"{name}: {value}" for name, value in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read(data: bytes, max_head_bytes: int = LIMIT) -> tuple[RequestHead, bytes] | Refusal | None:
    return RequestReader(max_head_bytes).feed(data)


def request(data: bytes) -> RequestHead:
    result = read(data)
    assert isinstance(result, tuple), result
    return result[0]


def upgrade(data: bytes) -> UpgradeRequest:
    result = validate(request(data))
    assert isinstance(result, UpgradeRequest), result
    return result


def refusal(data: bytes) -> Refusal:
    result = validate(request(data))
    assert isinstance(result, Refusal), result
    return result


def answer(data: bytes) -> UpgradeRequest | Refusal | None:
    """What the daemon makes of ``data``: read, then validated if it is a request."""
    result = read(data)
    return validate(result[0]) if isinstance(result, tuple) else result


def read_response(data: bytes) -> tuple[h11.Response, bytes, h11.Connection]:
    """Parse ``data`` as the answer to a GET, as an HTTP/1.1 client."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "relay.example")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    response = client.next_event()
    assert isinstance(response, h11.Response), response
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.EndOfMessage):
            return response, body, client
        assert isinstance(event, h11.Data), event
        body += event.data


def header_values(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]


# --- RequestReader ------------------------------------------------------------------------------


def test_request_fed_byte_by_byte_is_returned_once_its_head_ends() -> None:
    data = head()
    reader = RequestReader(LIMIT)
    for i in range(len(data) - 1):
        assert reader.feed(data[i : i + 1]) is None, i
    result = reader.feed(data[-1:])
    assert isinstance(result, tuple)
    req, rest = result
    assert (req.method, req.target, req.http_version) == (b"GET", "/?token=t", "1.1")
    assert rest == b""


def test_bytes_after_the_head_are_returned_as_rest() -> None:
    early = frame(OP_TEXT, b'{"to": "bob"}') + frame(OP_BINARY, b"\x00" * 300)
    result = read(head() + early)
    assert isinstance(result, tuple)
    assert result[1] == early


def test_rest_holds_early_bytes_when_the_head_ends_in_a_later_feed() -> None:
    data = head()
    early = frame(OP_TEXT, b"hi")
    reader = RequestReader(LIMIT)
    assert reader.feed(data[:-3]) is None
    result = reader.feed(data[-3:] + early)
    assert isinstance(result, tuple)
    assert result[1] == early


@given(cuts=st.lists(st.integers(0, 400), max_size=6), early=st.binary(max_size=100))
def test_any_split_gives_the_same_request_and_the_early_bytes_in_order(
    cuts: list[int], early: bytes
) -> None:
    data = head() + early
    points = [0, *sorted({c for c in cuts if c <= len(data)}), len(data)]
    reader = RequestReader(LIMIT)
    after = b""
    result = None
    for a, b in itertools.pairwise(points):
        if result is None:
            result = reader.feed(data[a:b]) if b > a else None
        else:
            after += data[a:b]
    assert isinstance(result, tuple)
    assert result[0].target == "/?token=t"
    assert result[1] + after == early


def test_head_of_exactly_the_limit_is_accepted() -> None:
    data = head()
    assert isinstance(read(data, len(data)), tuple)
    reader = RequestReader(len(data))
    results = [reader.feed(data[i : i + 1]) for i in range(len(data))]
    assert isinstance(results[-1], tuple)


def test_head_over_the_limit_is_refused_with_431_as_soon_as_the_limit_is_passed() -> None:
    limit = 1024
    endless = head()[:-2] + b"X-Pad: " + b"p" * 10_000  # the head never ends
    reader = RequestReader(limit)
    for i in range(limit):
        assert reader.feed(endless[i : i + 1]) is None, i
    result = reader.feed(endless[limit : limit + 1])
    assert isinstance(result, Refusal)
    assert result.status == 431


def test_head_over_the_limit_in_large_feeds_is_refused_with_431_before_it_ends() -> None:
    reader = RequestReader(1024)
    endless = head()[:-2] + b"X-Pad: " + b"p" * 10_000
    result = reader.feed(endless[:5000])
    assert isinstance(result, Refusal)
    assert result.status == 431


@pytest.mark.parametrize("how", ["whole", "byte-by-byte"])
@pytest.mark.parametrize("over", [1, 1000], ids=lambda n: f"{n}-bytes-over")
def test_complete_head_over_the_limit_is_refused_with_431(how: str, over: int) -> None:
    base = head()
    padded = head(extra=[("X-Pad", "p" * (over + 1024 - len(base) - len("X-Pad: \r\n")))])
    limit = len(padded) - over
    assert limit >= len(base)
    reader = RequestReader(limit)
    result: tuple[RequestHead, bytes] | Refusal | None = None
    if how == "whole":
        result = reader.feed(padded)
    else:
        for i in range(len(padded)):
            result = reader.feed(padded[i : i + 1])
            if result is not None:
                break
    assert isinstance(result, Refusal), result
    assert result.status == 431


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GARBAGE\r\n\r\n", id="no-request-line"),
        pytest.param(b"GET /\r\n\r\n", id="http-0.9"),
        pytest.param(b"GET / HTTP/1.1\r\nHost relay.example\r\n\r\n", id="header-without-colon"),
        pytest.param(b"GET / HTTP/1.1\r\nHost : relay.example\r\n\r\n", id="space-before-colon"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="http-1.1-without-host"),
        pytest.param(head(extra=[("Content-Length", "abc")]), id="bad-content-length"),
        pytest.param(
            head(extra=[("Content-Length", "1"), ("Content-Length", "2")]),
            id="conflicting-content-lengths",
        ),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\r\n\r\n", id="tls"),
    ],
)
def test_malformed_http_is_refused_with_400(data: bytes) -> None:
    result = read(data)
    assert isinstance(result, Refusal), result
    assert result.status == 400


#: A secret a client might send; it must never come back in a reason.
MARKER = "SeCrEt-MaRkEr-0123456789"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(
            f"GET /?token={MARKER} x HTTP/1.1\r\nHost: h\r\n\r\n".encode(),
            "malformed HTTP request: illegal request line",
            id="space-in-query",
        ),
        pytest.param(
            head(extra=[("Authorization", f"Bearer {MARKER}\x00")]),
            "malformed HTTP request: illegal header line",
            id="nul-after-bearer",
        ),
        pytest.param(
            head().replace(b"Host:", f"Authorization : Bearer {MARKER}\r\nHost:".encode()),
            "malformed HTTP request: illegal header line",
            id="space-before-colon",
        ),
        pytest.param(
            head(extra=[("User-Agent", "x")]).replace(
                b"User-Agent: x\r\n", f"User-Agent: x\r\n Authorization: {MARKER}\r\n".encode()
            ),
            "malformed HTTP request: obsolete line folding",
            id="folded-into-user-agent",
        ),
        pytest.param(
            head(extra=[("Authorization", f"Bearer {MARKER}")]).replace(
                b"Authorization", b"Authori\x7fzation"
            ),
            "malformed HTTP request: illegal header line",
            id="bad-header-name",
        ),
    ],
)
def test_malformed_requests_are_named_by_their_fault_never_by_their_bytes(
    data: bytes, reason: str
) -> None:
    result = read(data)
    assert result == Refusal(400, reason)
    assert MARKER not in result.reason


def test_a_folded_line_is_found_across_feeds_and_only_within_the_head() -> None:
    folded = head(extra=[("X-A", "1")]).replace(b"X-A: 1\r\n", b"X-A: 1\r\n\t2\r\n")
    cut = folded.index(b"\t")  # the line break in one feed, the tab in the next
    reader = RequestReader(LIMIT)
    assert reader.feed(folded[:cut]) is None
    assert reader.feed(folded[cut:]) == Refusal(
        400, "malformed HTTP request: obsolete line folding"
    )
    # Early frames after the head may hold a line break and a space: not a fold.
    early = b"\n \n\t"
    result = read(head() + early)
    assert isinstance(result, tuple)
    assert result[1] == early


@given(
    junk=st.lists(
        st.tuples(
            st.integers(0, 400),
            st.sampled_from([" ", "\x00", "\r", "\n", "\t", ":", "\x7f", "\r\n ", "\r\n", "\xff"]),
        ),
        max_size=4,
    ),
    where=st.sampled_from(["query", "bearer", "both"]),
)
def test_no_malformation_brings_a_token_into_a_reason(
    junk: list[tuple[int, str]], where: str
) -> None:
    target = f"/?token={MARKER}" if where != "bearer" else "/"
    extra = [("Authorization", f"Bearer {MARKER}")] if where != "query" else []
    text = head(extra=[*extra, ("User-Agent", "ua")], request_line=f"GET {target} HTTP/1.1")
    data = bytearray(text)
    for at, piece in sorted(junk, reverse=True):
        data[min(at, len(data) - 4) : min(at, len(data) - 4)] = piece.encode("latin-1")
    result = read(bytes(data))
    if isinstance(result, Refusal):
        assert MARKER not in result.reason
    elif isinstance(result, tuple):
        checked = validate(result[0])
        if isinstance(checked, Refusal):
            assert MARKER not in checked.reason
        else:  # accepted: only Origin and User-Agent are ever logged
            assert MARKER not in checked.headers.get("user-agent", "")
            assert MARKER not in checked.headers.get("origin", "")


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([("Content-Length", "5")], id="content-length"),
        pytest.param([("Transfer-Encoding", "chunked")], id="chunked"),
        pytest.param([("Transfer-Encoding", "gzip")], id="transfer-encoding-gzip"),
        pytest.param([("Transfer-Encoding", "gzip, chunked")], id="transfer-encoding-gzip-chunked"),
    ],
)
def test_request_with_a_body_is_refused_with_400(extra: list[tuple[str, str]]) -> None:
    result = answer(head(extra=extra) + b"hello")
    assert isinstance(result, Refusal), result
    assert result.status == 400


def test_request_with_content_length_zero_is_read() -> None:
    assert upgrade(head(extra=[("Content-Length", "0")])).key == RFC_KEY


# --- validate -----------------------------------------------------------------------------------


def test_valid_request_is_accepted_with_its_target_key_and_headers() -> None:
    valid = upgrade(head(extra=[("X-Forwarded-For", "192.0.2.1")]))
    assert valid.target == "/?token=t"
    assert valid.key == RFC_KEY
    assert valid.subprotocols == ()
    assert valid.headers["x-forwarded-for"] == "192.0.2.1"
    assert valid.headers["host"] == "relay.example"
    assert all(name == name.lower() for name in valid.headers)


def test_repeated_headers_are_joined_with_commas() -> None:
    valid = upgrade(head(extra=[("X-Forwarded-For", "192.0.2.1"), ("x-forwarded-for", "10.0.0.1")]))
    assert valid.headers["x-forwarded-for"] == "192.0.2.1, 10.0.0.1"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(head(request_line="GET / HTTP/1.0"), id="http-1.0"),
        pytest.param(head(request_line="POST / HTTP/1.1"), id="post"),
        pytest.param(head(request_line="HEAD / HTTP/1.1"), id="head"),
        pytest.param(head({"Upgrade": None}), id="no-upgrade"),
        pytest.param(head({"Upgrade": "h2c"}), id="upgrade-h2c"),
        pytest.param(head({"Upgrade": "websockets"}), id="upgrade-websockets-typo"),
        pytest.param(head({"Upgrade": ""}), id="upgrade-empty"),
        pytest.param(head({"Connection": None}), id="no-connection"),
        pytest.param(head({"Connection": "keep-alive"}), id="connection-keep-alive"),
        pytest.param(head({"Connection": "close"}), id="connection-close"),
        pytest.param(head({"Connection": "upgrade-insecure"}), id="connection-garbled"),
        pytest.param(head({"Sec-WebSocket-Key": None}), id="no-key"),
        pytest.param(head({"Sec-WebSocket-Key": ""}), id="empty-key"),
        pytest.param(head({"Sec-WebSocket-Key": "not base64 at all!"}), id="key-not-base64"),
        pytest.param(head({"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ"}), id="key-unpadded"),
        pytest.param(head({"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25j"}), id="key-15-bytes"),
        pytest.param(head({"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZT8/"}), id="key-17-bytes"),
        pytest.param(head(extra=[("Sec-WebSocket-Key", RFC_KEY)]), id="two-keys"),
    ],
)
def test_request_that_is_not_a_websocket_upgrade_is_refused_with_400(data: bytes) -> None:
    assert refusal(data).status == 400


@pytest.mark.parametrize(
    "replace",
    [
        pytest.param({"Connection": "keep-alive, Upgrade"}, id="connection-keep-alive-upgrade"),
        pytest.param({"Connection": "Upgrade,keep-alive"}, id="connection-no-space"),
        pytest.param({"Connection": "UPGRADE"}, id="connection-upper-case"),
        pytest.param({"Connection": "upgrade"}, id="connection-lower-case"),
        pytest.param({"Upgrade": "WebSocket"}, id="upgrade-mixed-case"),
        pytest.param({"Upgrade": "WEBSOCKET"}, id="upgrade-upper-case"),
        pytest.param({"Host": "[::1]:8080"}, id="ipv6-host"),
    ],
)
def test_upgrade_and_connection_tokens_are_read_case_insensitively(
    replace: dict[str, str | None],
) -> None:
    assert upgrade(head(replace)).key == RFC_KEY


def test_connection_tokens_across_repeated_headers_are_accepted() -> None:
    data = head({"Connection": "keep-alive"}, extra=[("Connection", "Upgrade")])
    assert upgrade(data).key == RFC_KEY


@pytest.mark.parametrize("version", ["8", "7", "12", "14", "13, 8"])
def test_other_websocket_version_is_refused_with_426(version: str) -> None:
    assert refusal(head({"Sec-WebSocket-Version": version})).status == 426


def test_426_response_carries_the_version_this_server_speaks() -> None:
    reject = refusal(head({"Sec-WebSocket-Version": "8"}))
    response, _, _ = read_response(refusal_response(reject.status, reject.reason))
    assert response.status_code == 426
    assert header_values(response.headers, b"sec-websocket-version") == [b"13"]


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        pytest.param([], (), id="none"),
        pytest.param(["relay.v1"], ("relay.v1",), id="one"),
        pytest.param(["a, b,c"], ("a", "b", "c"), id="commas-and-spaces"),
        pytest.param([" a ,, b ,"], ("a", "b"), id="empty-items"),
        pytest.param(["a, b", "c"], ("a", "b", "c"), id="several-headers"),
        pytest.param(["relay.v1", "chat, relay.v1"], ("relay.v1", "chat", "relay.v1"), id="dup"),
    ],
)
def test_subprotocols_are_listed_in_the_order_offered(
    offered: list[str], expected: tuple[str, ...]
) -> None:
    data = head(extra=[("Sec-WebSocket-Protocol", value) for value in offered])
    assert upgrade(data).subprotocols == expected


# --- responses ----------------------------------------------------------------------------------


def websocket_client_reads(response: bytes) -> tuple[h11.InformationalResponse, h11.Connection]:
    client = h11.Connection(h11.CLIENT)
    client.send(
        h11.Request(
            method="GET",
            target="/",
            headers=[
                ("Host", "relay.example"),
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
            ],
        )
    )
    client.send(h11.EndOfMessage())
    client.receive_data(response)
    event = client.next_event()
    assert isinstance(event, h11.InformationalResponse), event
    return event, client


def test_accept_response_answers_the_rfc_6455_example_key() -> None:
    event, client = websocket_client_reads(accept_response(RFC_KEY, None))
    assert event.status_code == 101
    assert client.their_state is h11.SWITCHED_PROTOCOL
    assert client.trailing_data == (b"", False)
    assert header_values(event.headers, b"sec-websocket-accept") == [RFC_ACCEPT.encode()]
    assert header_values(event.headers, b"upgrade") == [b"websocket"]
    assert header_values(event.headers, b"connection") == [b"Upgrade"]
    assert header_values(event.headers, b"sec-websocket-protocol") == []


def test_accept_response_selects_the_subprotocol_when_given() -> None:
    event, _ = websocket_client_reads(accept_response(RFC_KEY, "relay.v1"))
    assert header_values(event.headers, b"sec-websocket-protocol") == [b"relay.v1"]
    assert header_values(event.headers, b"sec-websocket-accept") == [RFC_ACCEPT.encode()]


def test_accept_response_for_a_validated_request_uses_its_key() -> None:
    key = "AQIDBAUGBwgJCgsMDQ4PEA=="
    valid = upgrade(head({"Sec-WebSocket-Key": f"  {key}  "}))
    assert valid.key == key
    event, _ = websocket_client_reads(accept_response(valid.key, None))
    # The value for this key, computed with another tool (``printf '%s' "$key$GUID"
    # | openssl sha1 -binary | base64``).
    assert header_values(event.headers, b"sec-websocket-accept") == [
        b"C/0nmHhBztSRGR1CwL6Tf4ZjwpY="
    ]


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (400, "not a WebSocket upgrade request"),
        (403, "origin not allowed"),
        (404, ""),
        (426, "unsupported WebSocket version; this server speaks 13"),
        (429, "too many connections from your address"),
        (431, "request head over 16384 bytes"),
        (500, "internal error"),
        (503, "shutting down — ünïcode reason"),
    ],
)
def test_refusal_response_is_a_complete_http_response(status: int, reason: str) -> None:
    response, body, client = read_response(refusal_response(status, reason))
    assert response.status_code == status
    assert response.http_version == b"1.1"
    assert body == reason.encode()
    assert header_values(response.headers, b"content-length") == [str(len(body)).encode()]
    assert header_values(response.headers, b"connection") == [b"close"]
    assert header_values(response.headers, b"content-type") == [b"text/plain; charset=utf-8"]
    assert client.their_state is h11.MUST_CLOSE
    assert client.trailing_data == (b"", False)


def test_401_refusal_names_the_bearer_scheme() -> None:
    response, body, _ = read_response(refusal_response(401, "missing token"))
    assert response.status_code == 401
    assert header_values(response.headers, b"www-authenticate") == [b"Bearer"]
    assert body == b"missing token"


def test_refusal_response_carries_extra_headers() -> None:
    data = refusal_response(503, "draining", [("Retry-After", "5"), ("X-Relayd", "1")])
    response, body, _ = read_response(data)
    assert header_values(response.headers, b"retry-after") == [b"5"]
    assert header_values(response.headers, b"x-relayd") == [b"1"]
    assert header_values(response.headers, b"www-authenticate") == []
    assert body == b"draining"


# --- what the client is told --------------------------------------------------------------------


def test_request_without_a_websocket_version_is_refused_with_426() -> None:
    reject = refusal(head({"Sec-WebSocket-Version": None}))
    assert reject == Refusal(426, "unsupported WebSocket version; this server speaks 13")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(
            head(request_line="GET / HTTP/1.0"), "a WebSocket handshake needs HTTP/1.1", id="1.0"
        ),
        pytest.param(
            head(request_line="POST / HTTP/1.1"),
            "a WebSocket handshake is a GET request",
            id="post",
        ),
        pytest.param(head({"Upgrade": None}), "not a WebSocket upgrade request", id="no-upgrade"),
        pytest.param(
            head({"Connection": "keep-alive"}), "not a WebSocket upgrade request", id="no-conn"
        ),
        pytest.param(
            head({"Sec-WebSocket-Key": None}),
            "Sec-WebSocket-Key is not 16 bytes in base64",
            id="no-key",
        ),
        pytest.param(
            head({"Sec-WebSocket-Key": "not base64 at all!"}),
            "Sec-WebSocket-Key is not 16 bytes in base64",
            id="key-not-base64",
        ),
    ],
)
def test_each_refusal_of_validate_gives_its_documented_reason(data: bytes, reason: str) -> None:
    assert refusal(data) == Refusal(400, reason)


def test_a_request_with_a_body_is_told_so() -> None:
    result = answer(head(extra=[("Content-Length", "5")]) + b"hello")
    assert result == Refusal(400, "a WebSocket handshake has no body")


def test_malformed_http_is_told_it_is_malformed() -> None:
    result = read(b"GARBAGE\r\n\r\n")
    assert isinstance(result, Refusal)
    assert result.reason.startswith("malformed HTTP request: ")


@pytest.mark.parametrize("how", ["whole", "byte-by-byte"])
def test_a_head_over_the_limit_is_told_the_limit_in_bytes(how: str) -> None:
    endless = head()[:-2] + b"X-Pad: " + b"p" * 2000
    reader = RequestReader(1024)
    chunks = [endless] if how == "whole" else [endless[i : i + 1] for i in range(len(endless))]
    result = None
    for chunk in chunks:
        result = reader.feed(chunk)
        if result is not None:
            break
    assert result == Refusal(431, "request head over 1024 bytes")


def test_a_head_at_the_limit_with_early_frames_in_the_same_read_is_accepted() -> None:
    # Only the head counts against max_header_bytes; frames a client sends in the
    # same segment are bounded as frames, later.
    data = head()
    early = frame(OP_TEXT, b'{"to": "bob", "message": "hi"}') * 20
    result = read(data + early, len(data))
    assert isinstance(result, tuple), result
    assert result[1] == early


@pytest.mark.parametrize(
    ("status", "own_header"),
    [(426, b"sec-websocket-version"), (401, b"www-authenticate")],
)
def test_extra_headers_go_out_beside_a_refusals_own(status: int, own_header: bytes) -> None:
    data = refusal_response(status, "refused", [("Retry-After", "5")])
    response, _, _ = read_response(data)
    assert response.status_code == status
    assert header_values(response.headers, b"retry-after") == [b"5"]
    assert len(header_values(response.headers, own_header)) == 1


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        pytest.param(b"hello there\r\n\r\n", "illegal request line", id="request-line"),
        pytest.param(
            head(extra=[("X-Pad", "v")])[:-4] + b"\r\nno colon\r\n\r\n",
            "illegal header line",
            id="header-line",
        ),
        pytest.param(head(extra=[("Content-Length", "abc")]), "bad Content-Length", id="cl"),
        pytest.param(
            head(extra=[("Content-Length", "1"), ("Content-Length", "2")]),
            "conflicting Content-Length headers",
            id="cl-twice",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "Missing mandatory Host: header",
            id="no-host",
        ),
        pytest.param(
            head(extra=[("Host", "b.example")]), "Found multiple Host: headers", id="two-hosts"
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\n X: y\r\n\r\n",
            "continuation line at start of headers",
            id="leading-continuation",
        ),
        pytest.param(b"\r\n\r\n", "no request line received", id="no-request-line"),
        pytest.param(b"\nGET / HTTP/1.1", "no request line received", id="leading-lf"),
        pytest.param(b" GET", "illegal request line", id="leading-space-before-the-head-ends"),
        pytest.param(head(request_line="GET / RTSP/1.1"), "illegal request line", id="rtsp"),
        pytest.param(head(request_line="GET  / HTTP/1.1"), "illegal request line", id="two-spaces"),
        pytest.param(
            head(request_line="GET ?token=t HTTP/1.1"), "illegal request line", id="no-path"
        ),
        pytest.param(
            head(request_line="GET /a b HTTP/1.1"), "illegal request line", id="space-in-target"
        ),
        pytest.param(head(extra=[("X-A", "a\x7fb")]), "illegal header line", id="del-in-value"),
        pytest.param(head(extra=[("X-A", "a\x01b")]), "illegal header line", id="ctl-in-value"),
        pytest.param(head(extra=[("X-\xe9", "b")]), "illegal header line", id="non-token-name"),
        pytest.param(head().replace(b"\r\n", b"\n"), "illegal request line", id="bare-lf"),
        pytest.param(
            head().replace(b"relay.example\r\n", b"relay.example\n"),
            "illegal header line",
            id="bare-lf-after-a-header",
        ),
        pytest.param(
            head(extra=[("Content-Length", "0"), ("Content-Length", "0")]),
            "conflicting Content-Length headers",
            id="cl-twice-the-same",
        ),
        # The faults llhttp names, each once.
        pytest.param(head(request_line="GET / XTTP/1.1"), "illegal request line", id="protocol"),
        pytest.param(head(request_line="GET / HTTP/1.1 "), "illegal request line", id="after-1.1"),
        pytest.param(head(request_line="GET / HTTP/11.1"), "illegal request line", id="no-dot"),
        pytest.param(head(request_line="GET / HTTP/.1"), "illegal request line", id="no-major"),
        pytest.param(head(request_line="GET / HTTP/1.a"), "illegal request line", id="no-minor"),
        pytest.param(head(request_line="HEAD / RTSP/1.1"), "illegal request line", id="rtsp-head"),
        pytest.param(head(request_line="GET / ICE/1.0"), "illegal request line", id="ice"),
        pytest.param(head(request_line="GET /\xff HTTP/1.1"), "illegal request line", id="url"),
        pytest.param(
            head().replace(b"Upgrade: websocket", b"Upgrade websocket"),
            "illegal header line",
            id="upgrade-without-colon",
        ),
        pytest.param(head(extra=[("X-A", "b\rc")]), "illegal header line", id="cr-in-value"),
        pytest.param(head(extra=[("X-A", "\rb")]), "illegal header line", id="cr-before-value"),
        pytest.param(
            head()[:-2] + b"\rX\r\n\r\n", "illegal header line", id="cr-in-the-blank-line"
        ),
        pytest.param(head(extra=[("Content-Length", "")]), "bad Content-Length", id="cl-empty"),
        pytest.param(
            head(extra=[("Content-Length", "9" * 30)]), "bad Content-Length", id="cl-overflow"
        ),
    ],
)
def test_a_malformed_request_is_told_the_kind_of_fault_and_never_its_bytes(
    data: bytes, kind: str
) -> None:
    assert read(data) == Refusal(400, f"malformed HTTP request: {kind}")


#: Every reason a request can be refused with by RequestReader and validate.
REASONS = {
    "a WebSocket handshake has no body",
    "a WebSocket handshake needs HTTP/1.1",
    "a WebSocket handshake is a GET request",
    "not a WebSocket upgrade request",
    "unsupported WebSocket version; this server speaks 13",
    "Sec-WebSocket-Key is not 16 bytes in base64",
    f"request head over {LIMIT} bytes",
    "malformed HTTP request",
    *(
        f"malformed HTTP request: {kind}"
        for kind in (
            "illegal request line",
            "illegal header line",
            "bad Content-Length",
            "conflicting Content-Length headers",
            "Missing mandatory Host: header",
            "Found multiple Host: headers",
            "continuation line at start of headers",
            "no request line received",
            "obsolete line folding",
        )
    ),
}


@given(
    junk=st.lists(
        st.tuples(st.integers(0, 300), st.binary(min_size=1, max_size=3)), min_size=1, max_size=4
    ),
    cut=st.integers(0, 300),
)
def test_every_refusal_gives_one_of_the_documented_reasons(
    junk: list[tuple[int, bytes]], cut: int
) -> None:
    data = bytearray(head(extra=[("User-Agent", "ua"), ("Content-Length", "0")]))
    for at, piece in sorted(junk, reverse=True):
        data[at:at] = piece
    reader = RequestReader(LIMIT)
    result = reader.feed(bytes(data[:cut])) if cut else None
    if result is None and cut < len(data):
        result = reader.feed(bytes(data[cut:]))
    answered = validate(result[0]) if isinstance(result, tuple) else result
    if isinstance(answered, Refusal):
        assert answered.reason in REASONS


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([("Transfer-Encoding", "gzip")], id="gzip"),
        pytest.param([("Transfer-Encoding", "chunked")] * 2, id="chunked-twice"),
        pytest.param([("Transfer-Encoding", "chunked"), ("Content-Length", "0")], id="and-cl"),
        pytest.param([("Content-Length", "0"), ("Transfer-Encoding", "chunked")], id="after-cl"),
        pytest.param([("Transfer-Encoding", "")], id="empty"),
    ],
)
@pytest.mark.parametrize("upgrade", [True, False], ids=["upgrade", "plain-get"])
def test_any_transfer_encoding_is_told_the_handshake_has_no_body(
    extra: list[tuple[str, str]], upgrade: bool
) -> None:
    # llhttp checks a request's Transfer-Encoding only when it is no upgrade.
    data = head(None if upgrade else {"Connection": "close"}, extra=extra)
    assert answer(data) == Refusal(400, "a WebSocket handshake has no body")


@pytest.mark.parametrize(
    ("request_line", "reason"),
    [
        pytest.param("get / HTTP/1.1", "a WebSocket handshake is a GET request", id="lower-case"),
        pytest.param("FOO / HTTP/1.1", "a WebSocket handshake is a GET request", id="unknown"),
        pytest.param("PRI / HTTP/1.1", "a WebSocket handshake is a GET request", id="pri"),
        pytest.param(
            "SETUP / HTTP/1.1", "a WebSocket handshake is a GET request", id="rtsp-method"
        ),
        pytest.param("GET / HTTP/1.2", "a WebSocket handshake needs HTTP/1.1", id="http-1.2"),
        pytest.param("GET / HTTP/2.0", "a WebSocket handshake needs HTTP/1.1", id="http-2.0"),
    ],
)
def test_a_well_formed_request_line_is_told_what_the_handshake_needs(
    request_line: str, reason: str
) -> None:
    assert answer(head(request_line=request_line)) == Refusal(400, reason)


def test_a_request_line_may_begin_with_any_token_character() -> None:
    # h11 refused a head at once when its first byte could not begin a method.
    assert RequestReader(LIMIT).feed(b"!") is None
    assert answer(head(request_line="! / HTTP/1.1")) == Refusal(
        400, "a WebSocket handshake is a GET request"
    )


def test_an_http_1_0_request_needs_no_host_to_be_told_it_needs_http_1_1() -> None:
    data = head({"Host": None}, request_line="GET / HTTP/1.0")
    assert answer(data) == Refusal(400, "a WebSocket handshake needs HTTP/1.1")


def test_a_complete_head_over_the_limit_is_431_before_it_is_parsed() -> None:
    data = b"GET / HTTP/1.1\r\nno colon\r\n\r\n"  # malformed: 400 within the limit
    assert read(data, len(data)) == Refusal(400, "malformed HTTP request: illegal header line")
    assert read(data, len(data) - 1) == Refusal(431, f"request head over {len(data) - 1} bytes")


def test_values_are_read_without_the_white_space_around_them() -> None:
    data = head(extra=[("X-A", " \t a  b \t "), ("X-B", ""), ("X-C", "a\tb"), ("X-D", "aXX")])
    valid = upgrade(data)
    assert [valid.headers[name] for name in ("x-a", "x-b", "x-c", "x-d")] == [
        "a  b",
        "",
        "a\tb",
        "aXX",
    ]


def test_request_fed_two_bytes_at_a_time_is_returned_with_the_feed_that_ends_its_head() -> None:
    early = frame(OP_TEXT, b"hi")
    data = head() + early
    pieces = [data[i : i + 2] for i in range(0, len(data), 2)]
    reader = RequestReader(LIMIT)
    ends_in = (len(head()) - 1) // 2  # the piece holding the head's last byte
    results = [reader.feed(piece) for piece in pieces[: ends_in + 1]]
    assert results[:ends_in] == [None] * ends_in
    result = results[ends_in]
    assert isinstance(result, tuple), result
    assert result[0].target == "/?token=t"
    assert result[1] + b"".join(pieces[ends_in + 1 :]) == early


def test_a_pipelined_request_after_the_head_is_kept_as_early_bytes() -> None:
    # Not parsed as HTTP: after an accepted handshake these are frame bytes
    # (and here not valid ones, which the frame parser refuses).
    second = b"GET /other HTTP/1.1\r\nHost: relay.example\r\n\r\n"
    result = read(head() + second)
    assert isinstance(result, tuple), result
    assert result[1] == second


@pytest.mark.parametrize("how", ["whole", "split-after-the-head"])
def test_a_space_right_after_the_head_is_a_frame_byte_not_a_folded_line(how: str) -> None:
    data, early = head(), b" not a header"
    reader = RequestReader(LIMIT)
    if how == "whole":
        result = reader.feed(data + early)
    else:
        assert reader.feed(data[:-1]) is None
        result = reader.feed(data[-1:] + early)
    assert isinstance(result, tuple), result
    assert result[1] == early


@pytest.mark.parametrize("subprotocol", [None, "relayd.v1"])
def test_the_accept_announces_the_message_limit_beside_the_subprotocol(
    subprotocol: str | None,
) -> None:
    # docs/protocol.md: `Relayd-Max-Message-Bytes: 65536` at the defaults.
    event, _ = websocket_client_reads(
        accept_response(RFC_KEY, subprotocol, max_message_bytes=65536)
    )
    assert header_values(event.headers, b"relayd-max-message-bytes") == [b"65536"]
    expected = [] if subprotocol is None else [subprotocol.encode()]
    assert header_values(event.headers, b"sec-websocket-protocol") == expected
    event, _ = websocket_client_reads(accept_response(RFC_KEY, subprotocol))
    assert header_values(event.headers, b"relayd-max-message-bytes") == []


def test_the_accept_announces_the_message_rate_exactly() -> None:
    # docs/protocol.md: `Relayd-Messages-Per-Second: 50.0` at the defaults; a rate
    # below 1 is written whole, so that a client waits no less than its interval.
    for rate, text in [(50.0, b"50.0"), (0.001, b"0.001"), (1 / 3, b"0.3333333333333333")]:
        event, _ = websocket_client_reads(
            accept_response(RFC_KEY, "relayd.v1", messages_per_second=rate)
        )
        assert header_values(event.headers, b"relayd-messages-per-second") == [text]
        assert float(text) == rate


def test_the_accept_announces_the_message_burst() -> None:
    # docs/protocol.md: `Relayd-Message-Burst: 100` at the defaults.
    event, _ = websocket_client_reads(accept_response(RFC_KEY, "relayd.v1", message_burst=100))
    assert header_values(event.headers, b"relayd-message-burst") == [b"100"]


def test_http_2s_preface_is_told_only_that_the_request_is_malformed() -> None:
    # No fault of a kind relayd names: llhttp reads the preface's head whole,
    # and it is not a request's.
    assert read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") == Refusal(400, "malformed HTTP request")


def test_a_fault_of_no_kind_relayd_names_is_told_only_that_the_request_is_malformed() -> None:
    # PRI is a method llhttp knows, for HTTP/2's preface only; with two spaces
    # after it the line is no request line relayd can name the method of.
    data = head(request_line="PRI  / HTTP/1.1")
    assert read(data) == Refusal(400, "malformed HTTP request")


# -- a head split anywhere -----------------------------------------------------------------
# TCP may cut a request at any byte; the answer (its status, and its reason, logged and
# sent as the body) must not depend on where. Found in review: a head beginning with a
# blank line was told "no request line received" whole, "illegal request line" when its
# first read ended after the CR.

SPLIT_HEADS = (
    head(),
    b"\r\n" + head(),
    b"\n" + head(),
    b"\r\r\n" + head(),
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on a plain port
    b" GET / HTTP/1.1\r\n\r\n",
    head({"Host": None}),
    head().replace(b"\r\nUpgrade", b"\r\n Upgrade"),  # a folded line
    head() + frame(OP_TEXT, b"early"),  # a frame in the same segment
    b"G" * (LIMIT + 1),
)


def answer_in_reads(*reads: bytes) -> tuple[int, str] | tuple[str, bytes] | None:
    """The refusal, or the target and every byte after the head (later reads too)."""
    reader = RequestReader(LIMIT)
    for n, data in enumerate(reads):
        result = reader.feed(data)
        if isinstance(result, Refusal):
            return result.status, result.reason
        if result is not None:
            request, rest = result
            return request.target, rest + b"".join(reads[n + 1 :])
    return None


def test_a_leading_crlf_split_after_its_cr_gets_the_answer_it_gets_whole() -> None:
    data = b"\r\n" + head()
    whole = answer_in_reads(data)
    assert whole == (400, "malformed HTTP request: no request line received")
    assert answer_in_reads(data[:1], data[1:]) == whole


@given(
    st.sampled_from(SPLIT_HEADS),
    # Cuts among the first bytes, judged apart from the parser, as often as anywhere else.
    st.lists(st.integers(1, 3) | st.integers(1, len(head())), max_size=6),
)
def test_any_split_gets_the_answer_the_whole_head_gets(data: bytes, cuts: list[int]) -> None:
    points = sorted({c for c in cuts if c < len(data)})
    reads = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert answer_in_reads(*reads) == answer_in_reads(data)
