"""Review of dfe7c06..12f7238: a request head split anywhere gets the answer it gets whole.

Found in review: a head that begins with a blank line (CRLF) is told "no request line
received" when its first read holds the CRLF, but "illegal request line" when the first
read ends after the CR. Same status (400); the reason, which is logged and is the
response's body, depends on how TCP split the bytes. h11 answered the same way before
the change (its first-byte check saw the lone CR too); the module and the docs do not
say the reason may depend on the split.
"""

from __future__ import annotations

from relayd.wire.handshake import Refusal, RequestReader

LIMIT = 4096
HEAD = (
    b"GET / HTTP/1.1\r\nHost: relay.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def answer(*reads: bytes) -> tuple[int, str] | None:
    reader = RequestReader(LIMIT)
    for data in reads:
        result = reader.feed(data)
        if isinstance(result, Refusal):
            return result.status, result.reason
        if result is not None:
            return None
    return None


def test_a_leading_crlf_split_after_its_cr_gets_the_answer_it_gets_whole() -> None:
    data = b"\r\n" + HEAD
    whole = answer(data)
    assert whole == (400, "malformed HTTP request: no request line received")
    assert answer(data[:1], data[1:]) == whole
