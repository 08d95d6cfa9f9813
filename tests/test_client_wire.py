"""The client's I/O-free parts as plain values: reply matching, backoff, frames, errors, URLs."""

from __future__ import annotations

import itertools
import math

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import relayd.client
from relayd.client.backoff import Backoff, Pacing
from relayd.client.endpoint import check_token, parse_url
from relayd.client.errors import (
    ConnectionClosed,
    RateLimited,
    SendError,
    closed_error,
    send_error,
)
from relayd.client.messages import (
    Message,
    check_id,
    decode_v1,
    encode_body,
    encode_envelope,
    seed_message,
    welcome_id,
)
from relayd.client.outstanding import Outstanding
from relayd.errors import CloseCode, ErrorCode
from relayd.wire.dialects import (
    Ack,
    Delivery,
    Dialect,
    Error,
    decode_envelope,
    delivery_payload,
    error_payload,
    welcome_payload,
)

# -- reply matching ----------------------------------------------------------------------


def test_a_reply_with_a_ref_answers_that_message_and_a_null_ref_the_oldest() -> None:
    outstanding: Outstanding[str] = Outstanding()
    for ref in (1, 2, 3, 4):
        outstanding.add(ref, f"message {ref}")
    assert outstanding.match(None) == "message 1"  # rate_limited: relayd read no ref
    assert outstanding.match(3) == "message 3"
    assert outstanding.match(None) == "message 2"
    assert outstanding.match(3) is None  # answered already
    assert outstanding.match("4") is None  # this client sends integer refs only
    assert outstanding.match(True) is None  # JSON true is not ref 1
    assert len(outstanding) == 1
    assert outstanding.clear() == ["message 4"]
    assert outstanding.match(None) is None


def test_a_message_never_sent_is_never_matched() -> None:
    outstanding: Outstanding[str] = Outstanding()
    outstanding.add(1, "sent")
    outstanding.add(2, "withdrawn before the writer took it")
    outstanding.add(3, "sent too")
    outstanding.forget(2)
    assert [outstanding.match(None) for _ in range(3)] == ["sent", "sent too", None]
    outstanding.add(1, "again")
    with pytest.raises(ValueError, match="ref 1 is already waiting"):
        outstanding.add(1, "twice")


@given(st.lists(st.sampled_from(["ack", "error with ref", "error without ref"]), max_size=40))
def test_replies_in_send_order_each_settle_their_own_message(replies: list[str]) -> None:
    # relayd answers in send order (docs/protocol.md, "Ordering"), whatever kind each reply is.
    outstanding: Outstanding[int] = Outstanding()
    for ref in range(1, len(replies) + 1):
        outstanding.add(ref, ref)
    for ref, kind in enumerate(replies, start=1):
        assert outstanding.match(None if kind == "error without ref" else ref) == ref
    assert len(outstanding) == 0


# -- backoff -----------------------------------------------------------------------------


def test_backoff_ceilings_double_up_to_the_maximum_and_waits_are_jittered_below_them() -> None:
    backoff = Backoff(first_s=0.5, max_s=4.0, factor=2.0, attempts=6)
    assert list(backoff.delays(lambda: 0.999)) == pytest.approx(
        [0.4995, 0.999, 1.998, 3.996, 3.996, 3.996]
    )
    assert list(backoff.delays(lambda: 0.0)) == [0.0] * 6
    assert list(itertools.islice(Backoff().delays(lambda: 0.5), 3)) == [0.25, 0.5, 1.0]


def test_backoff_without_attempts_keeps_trying() -> None:
    waits = list(itertools.islice(Backoff(max_s=1.0).delays(), 1000))
    assert len(waits) == 1000
    assert all(0 <= wait < 1.0 for wait in waits)
    assert len(set(waits)) > 900  # jittered: clients a restart dropped do not come back at once


@pytest.mark.parametrize(
    "figures",
    [
        {"first_s": 0.0},
        {"first_s": 2.0, "max_s": 1.0},
        {"factor": 0.5},
        {"attempts": 0},
        {"attempts": 1.5},
        {"first_s": "1"},
        {"factor": math.nan},
        {"max_s": math.inf},
        {"stable_s": 0.0},
        {"stable_s": -1.0},
        {"stable_s": math.inf},
        {"stable_s": True},
    ],
)
def test_backoff_refuses_figures_that_cannot_work(figures: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"need|must"):
        Backoff(**figures)  # type: ignore[arg-type]


def test_pacing_grows_across_connections_until_one_stays_up() -> None:
    backoff = Backoff(first_s=1.0, max_s=8.0, attempts=2)
    assert backoff.stable_after_s == 8.0  # stable_s defaults to max_s
    assert Backoff(max_s=8.0, stable_s=3).stable_after_s == 3
    pacing = Pacing(backoff, lambda: 0.5)
    assert list(pacing.waits()) == [0.5, 1.0]  # attempts bounds each loss's waits
    pacing.lost_after(7.9)  # a connection closed before it was stable: no reset
    assert pacing.ceiling == 4.0
    assert list(pacing.waits()) == [2.0, 4.0]
    pacing.lost_after(8.0)
    assert pacing.ceiling == 1.0
    assert next(pacing.waits()) == 0.5


# -- frames ------------------------------------------------------------------------------


def test_an_envelope_is_what_relayd_decodes_with_the_message_as_written() -> None:
    frame = encode_envelope("Kc8M2vd_yvWXXSutZKBx_A", encode_body({"n": [1, 2], "s": "é"}), 7)
    envelope = decode_envelope(frame)
    assert (envelope.to, bytes(envelope.message), envelope.ref) == (
        "Kc8M2vd_yvWXXSutZKBx_A",
        '{"n":[1,2],"s":"é"}'.encode(),
        7,
    )
    raw = encode_envelope("x", encode_body(msgspec.Raw(b'{"k":\n [1,  2]}')), None)
    assert bytes(decode_envelope(raw).message) == b'{"k":\n [1,  2]}'
    with pytest.raises(TypeError):
        encode_body(object())
    with pytest.raises(ValueError, match="the message holds a string that is not valid"):
        encode_body(["half \ud83d"])
    with pytest.raises(ValueError, match="the recipient id holds a string that is not valid"):
        check_id("half \ud83d")
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match="nested too deeply"):
        encode_body(deep)
    with pytest.raises(ValueError, match="not one JSON value"):
        encode_body(msgspec.Raw(b'"x","to":"someone else"'))
    check_id("émile")  # valid Unicode, not ASCII
    check_id(5)  # type: ignore[arg-type]  # not a string: relayd answers invalid_envelope


def test_v1_frames_decode_to_the_structs_relayd_encodes() -> None:
    delivery = delivery_payload(Dialect.V1, "sender-id", msgspec.Raw(b'{"a": 1}'))
    assert decode_v1(delivery.decode()) == Delivery("sender-id", msgspec.Raw(b'{"a": 1}'))
    assert decode_v1('{"type":"ack","ref":3}') == Ack(3)
    error = error_payload(Dialect.V1, ErrorCode.RATE_LIMITED, "slow down", None)
    assert decode_v1(error.decode()) == Error("rate_limited", None, "slow down")
    assert decode_v1("not json") is None
    assert decode_v1('{"type":"news"}') is None
    assert welcome_id(Dialect.V1, welcome_payload(Dialect.V1, "the-id").decode()) == "the-id"
    assert welcome_id(Dialect.SEED, welcome_payload(Dialect.SEED, "the-id").decode()) == "the-id"
    assert welcome_id(Dialect.V1, "the-id") is None  # a seed server answering a v1 client
    assert welcome_id(Dialect.SEED, b"binary") is None
    assert welcome_id(Dialect.SEED, "") is None


@pytest.mark.parametrize(
    ("sent", "data", "text"),
    [
        ('"hello"', "hello", "hello"),
        ('"two\\nlines"', "two\nlines", "two\nlines"),
        ('{"n": [1,  2]}', {"n": [1, 2]}, '{"n": [1,  2]}'),
        ("42", 42, "42"),
        ('"42"', 42, "42"),  # the seed dialect cannot tell these apart
        ("null", None, "null"),
    ],
)
def test_a_seed_frame_is_the_message_a_v1_client_would_get(
    sent: str, data: object, text: str
) -> None:
    frame = delivery_payload(Dialect.SEED, "ignored", msgspec.Raw(sent.encode())).decode()
    message = seed_message(frame)
    assert message.sender is None
    assert message.data == data
    assert message.text == text


def test_a_v1_message_keeps_the_difference_between_a_string_and_a_number() -> None:
    assert Message("a", b'"42"').data == "42"
    assert Message("a", b"42").data == 42
    assert Message("a", b'"42"').text == "42"


def test_a_seed_error_frame_reads_as_its_error_and_a_plain_message_as_none() -> None:
    frame = error_payload(Dialect.SEED, ErrorCode.UNKNOWN_RECIPIENT, "no client", 5).decode()
    error = seed_message(frame).as_error()
    assert isinstance(error, relayd.client.UnknownRecipient)
    assert (error.code, error.detail, error.ref) == ("unknown_recipient", "no client", 5)
    assert seed_message('{"error": "x", "detail": "y", "extra": 1}').as_error() is None
    assert seed_message("hello").as_error() is None
    # In relayd.v1 relayd's errors come as error replies: a message shaped like one is a
    # peer's (or the server API's), whatever it says.
    assert Message("peer", frame.encode()).as_error() is None
    assert Message("", frame.encode()).as_error() is None


# -- errors ------------------------------------------------------------------------------


def test_every_error_code_has_its_own_exception_under_send_error() -> None:
    classes = {type(send_error(code.value, "detail")) for code in ErrorCode}
    assert len(classes) == len(ErrorCode)
    for code in ErrorCode:
        error = send_error(code.value, "the detail", "r-1")
        assert isinstance(error, SendError)
        assert type(error).error_code is code
        assert (error.code, error.detail, error.ref) == (code.value, "the detail", "r-1")
        assert str(error) == f"{code.value}: the detail"
        assert type(error).__name__ in relayd.client.__all__
    newer = send_error("from_the_future", "a code this client does not know")
    assert type(newer) is SendError


@pytest.mark.parametrize(
    ("hint", "retry_after"),
    [
        (500, 0.5),
        (1.5, 0.0015),
        (0, 0.0),
        (-20, 0.0),
        (None, None),
        ("soon", None),
        (True, None),
        (10**400, None),  # past a float's range: it raised OverflowError, and the link died
        (msgspec.Raw(b"500"), 0.5),  # as decode_v1 gives it
        (msgspec.Raw(b"1e400"), None),
        (msgspec.Raw(b"1e308"), 1e305),
        (msgspec.Raw(b'"soon"'), None),
    ],
)
def test_a_wait_relayd_asks_for_is_read_as_seconds_and_anything_else_as_none(
    hint: object, retry_after: float | None
) -> None:
    error = send_error("rate_limited", "too many messages; slow down", 3, retry_after_ms=hint)
    assert isinstance(error, RateLimited)
    assert error.retry_after == retry_after
    assert send_error("unknown_recipient", "gone").retry_after is None


def test_an_error_frame_with_an_odd_wait_is_still_the_error_it_names() -> None:
    # A stricter type for the hint made such a frame no error at all: the send it
    # answers would have waited for a reply that had come.
    # 1e400: msgspec checks a number's range even for a field of any type.
    for hint in ('"soon"', "null", "[1]", "2.5", "1e400", "1" + "0" * 400):
        frame = '{"type":"error","error":"rate_limited","ref":4,"detail":"d","retry_after_ms":%s}'
        decoded = decode_v1(frame % hint)
        assert isinstance(decoded, Error)
        assert (decoded.error, decoded.ref) == ("rate_limited", 4)


def test_every_close_code_relayd_sends_has_its_own_exception_under_connection_closed() -> None:
    sent = [code for code in CloseCode if code != CloseCode.NO_STATUS]
    for code in sent:
        closed = closed_error(code, "why")
        assert type(closed) is not ConnectionClosed, code
        assert type(closed).close_code == code
        assert (closed.code, closed.reason, str(closed)) == (code, "why", f"closed: {code} why")
        assert type(closed).__name__ in relayd.client.__all__
    assert len({type(closed_error(code)) for code in sent}) == len(sent)
    retryable = {code for code in sent if closed_error(code).retryable}
    assert retryable == {1000, 1001, 1006, 1011, 1013}
    assert type(closed_error(4000)) is ConnectionClosed
    assert not closed_error(4000).retryable


# -- URLs and tokens ---------------------------------------------------------------------


def test_urls_parse_to_where_the_client_connects() -> None:
    plain = parse_url("ws://127.0.0.1:9030")
    assert (plain.host, plain.port, plain.host_header, plain.resource, plain.tls) == (
        "127.0.0.1",
        9030,
        "127.0.0.1:9030",
        "/",
        False,
    )
    tls = parse_url("wss://[::1]/chat?room=1")
    assert (tls.host, tls.port, tls.host_header, tls.resource, tls.tls) == (
        "::1",
        443,
        "[::1]",
        "/chat?room=1",
        True,
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1/", "must start with ws:// or wss://"),
        ("ws:///path", "has no host"),
        ("ws://127.0.0.1:99999/", "port must be a number from 1 to 65535"),
        ("ws://u:p@127.0.0.1/", "no user or password"),
        # urllib's own message quoted "pa", part of the password (found by a reviewer).
        ("ws://alice:pa/ss@127.0.0.1/", "port must be a number from 1 to 65535"),
        ("ws://127.0.0.1/a b", "printable ASCII without spaces"),
        ("ws://127.0.0.1/?q=a b", "printable ASCII without spaces"),
        ("ws://127.0.0.1/caf\u00e9", "printable ASCII without spaces"),
        ("ws://127.0.0.1/\x00", "printable ASCII without spaces"),
        ("ws://127.0.0.1/a\r\nX-Injected: 1", "printable ASCII without spaces"),
    ],
)
def test_bad_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_url(url)


@pytest.mark.parametrize("token", ["", "two words", "caf\u00e9", "tab\there"])
def test_tokens_that_cannot_be_a_header_are_refused_without_being_repeated(token: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII") as refused:
        check_token(token)
    assert token not in str(refused.value) or not token
