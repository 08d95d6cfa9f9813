"""``relayd.client`` against a real relayd through loopback: every outcome a program sees.

Each test runs relayd in-process (:class:`~relayd.daemon.server.Server` on port 0) and
drives it with the client as a program would. Nothing sleeps to wait for something:
waits are on the client's own calls under the test's trio-clock deadline; tests about
timeouts (idle, slow consumer, keepalive, connect) run on trio's autojump clock, where
waiting for a server's timer is virtual time. Reconnecting is in test_client_reconnect.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import random
import re
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
import pytest
import structlog
import trio
import trio.testing
import trustme
from pydantic import SecretStr
from trio_websocket import ConnectionClosed as WebSocketClosed
from trio_websocket import WebSocketRequest, serve_websocket

import relayd.client
from relayd.client import (
    Backoff,
    Client,
    ConnectError,
    ConnectionClosed,
    ConnectionLost,
    ConnectTimeout,
    HandshakeRefused,
    InvalidEnvelope,
    InvalidJSON,
    MessageTooBig,
    MessageTooLarge,
    NormalClosure,
    PolicyViolation,
    RateLimited,
    RecipientBusy,
    SendError,
    ServerShuttingDown,
    TLSError,
    TryAgainLater,
    UnknownRecipient,
    connect,
    messages,
)
from relayd.client import link as link_module
from relayd.client.link import CloseInfo, Link
from relayd.client.messages import Message
from relayd.client.options import LinkOptions, default_message_bound
from relayd.config import AuthSettings, TLSSettings
from relayd.daemon.credentials import load_authenticator, load_tls
from relayd.daemon.server import Server
from relayd.wire.dialects import Dialect
from relayd.wire.handshake import accept_response
from relayd.wire.server_frames import text_frame
from tests.client import running, settings
from tests.test_api import call

UNKNOWN_DETAIL: Final = "no client with that id is connected"
#: A body of this many bytes keeps its envelope under relayd's default 64 KiB limit.
BIG: Final = 60_000


@asynccontextmanager
async def relay(**limits: Any) -> AsyncIterator[str]:
    """An in-process relayd with these limits; its URL."""
    async with running(Server(settings(**limits))) as url:
        yield url


async def outcome(send: Awaitable[None]) -> str:
    """What a send came to: ``ack``, or the error code it raised."""
    try:
        await send
    except SendError as error:
        return error.code
    return "ack"


# -- connecting -----------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["relayd.v1", "seed"])
async def test_connecting_gives_the_id_relayd_assigned_and_others_reach_it(
    dialect: Literal["relayd.v1", "seed"],
) -> None:
    async with relay() as url, connect(url) as peer, connect(url, dialect=dialect) as client:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", client.id)
        assert client.id != peer.id
        assert client.dialect == dialect
        assert client.url == url
        assert client.max_message_bytes == 65536  # announced by relayd at the handshake
        assert client.messages_per_second == 50.0  # so is its rate
        assert client.message_burst == 100  # and its burst
        assert client.closed is None
        await peer.send(client.id, {"hello": [1, 2]})
        message = await client.receive()
        assert message.data == {"hello": [1, 2]}
        assert message.sender == (peer.id if dialect == "relayd.v1" else None)
    assert client.closed == relayd.client.CloseInfo(1000, "", by_client=True)


async def test_the_received_message_is_the_json_its_sender_wrote() -> None:
    async with relay() as url, connect(url) as a, connect(url) as b:
        await a.send(b.id, msgspec.Raw(b'{"k":\n [1,  2]}'))
        await a.send(b.id, "two\nlines ☃")
        await a.send(b.id, 42)
        await a.send(b.id, "42")
        received = [await b.receive() for _ in range(4)]
    assert [m.raw for m in received] == [
        b'{"k":\n [1,  2]}',
        '"two\\nlines ☃"'.encode(),
        b"42",
        b'"42"',
    ]
    assert [m.data for m in received] == [{"k": [1, 2]}, "two\nlines ☃", 42, "42"]
    assert [m.text for m in received] == ['{"k":\n [1,  2]}', "two\nlines ☃", "42", "42"]
    assert {m.sender for m in received} == {a.id}


async def test_a_message_from_the_server_api_says_so_and_cannot_be_answered() -> None:
    server = Server(settings())
    async with (
        running(server) as url,
        connect(url) as v1,
        connect(url, dialect="seed") as seed,
        connect(url) as peer,
    ):
        admin = server.admin_address
        assert admin is not None
        for client in (v1, seed):
            answer = await call(admin, "/api/publish", {"to": client.id, "message": "deploy"})
            assert answer[2] == {"outcome": "delivered"}
        from_api, from_api_seed = await v1.receive(), await seed.receive()
        assert (from_api.sender, from_api.from_server, from_api.text) == ("", True, "deploy")
        # The seed dialect does not say who sent a message, the server API included.
        assert (from_api_seed.sender, from_api_seed.from_server) == (None, False)
        await peer.send(v1.id, "hi")
        assert (await v1.receive()).from_server is False
        # The echo pattern of docs/client.md: "" is no one to answer.
        with pytest.raises(InvalidEnvelope):
            await v1.send("", "thanks")
        # Half an emoji, as a string cut by code units: UTF-8 has no spelling for it.
        # It was a bare UnicodeEncodeError from the encoder (found by a tester).
        for to, message in [(v1.id, "cut \ud83d"), ("cut \ud83d", "hi")]:
            with pytest.raises(ValueError, match="not valid Unicode") as refused:
                await v1.send(to, message)
            assert not isinstance(refused.value, UnicodeError)
        await peer.send(v1.id, "still fine")
        assert (await v1.receive()).text == "still fine"


async def test_a_token_is_sent_as_a_bearer_header_and_its_subject_is_the_id() -> None:
    auth = AuthSettings(mode="token", tokens={"alice": SecretStr("alice-token-0123456789")})
    server = Server(
        settings().model_copy(update={"auth": auth}), authenticator=load_authenticator(auth)
    )
    async with running(server) as url:
        async with connect(url, token="alice-token-0123456789") as alice:
            assert alice.id == "alice"
            await alice.send("alice", "hi me")
            assert (await alice.receive()).text == "hi me"
        for token in (None, "wrong-token"):
            with pytest.raises(HandshakeRefused) as refused:
                async with connect(url, token=token):
                    pytest.fail("connected without a good token")
            assert refused.value.status == 401
            assert not refused.value.retryable
            assert refused.value.body  # relayd's reason
            assert "wrong-token" not in str(refused.value)


async def test_a_server_at_capacity_is_a_retryable_503() -> None:
    async with relay(max_connections=1) as url, connect(url):
        with pytest.raises(HandshakeRefused) as refused:
            async with connect(url):
                pytest.fail("connected past max_connections")
    assert (refused.value.status, refused.value.body) == (503, "server at capacity")
    assert refused.value.retryable
    assert str(refused.value) == f"{url} refused the handshake: HTTP 503 server at capacity"


async def test_nothing_listening_is_a_connect_error_naming_the_reason() -> None:
    with trio.socket.socket() as bound:  # bound, never listening: connections are refused
        await bound.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{bound.getsockname()[1]}/"
        with pytest.raises(ConnectError) as failed:
            async with connect(url):
                pytest.fail("connected to nothing")
    assert type(failed.value) is ConnectError
    assert str(failed.value).startswith(f"cannot connect to {url}: ")
    assert "Connection refused" in str(failed.value)
    assert failed.value.retryable


async def test_a_server_that_never_answers_times_out(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        url = await serve_tcp(nursery, _never_answer)
        started = trio.current_time()
        with pytest.raises(ConnectTimeout) as timed_out:
            async with connect(url, connect_timeout=7):
                pytest.fail("connected to a server that never answers")
        assert trio.current_time() - started == pytest.approx(7)
        assert str(timed_out.value) == f"no WebSocket handshake with {url} within 7 s"
        nursery.cancel_scope.cancel()


async def serve_tcp(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> str:
    """Serve ``handler`` on a loopback port in ``nursery``; the ``ws://`` URL to it."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, host="127.0.0.1"), handler, 0)
    return f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/"


async def _never_answer(stream: trio.SocketStream) -> None:
    async with stream:
        await trio.sleep_forever()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        # Bytes, then the close: it was a ConnectTimeout after the whole connect_timeout.
        (b"SSH-2.0-OpenSSH_9.0\r\n", "closed the connection in the middle of the WebSocket"),
        (b"HTTP/1.1 5", "closed the connection in the middle of the WebSocket"),
        # A 101 with a wrong key: it was an exception group from trio-websocket's task.
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: nope\r\n\r\n",
            "answered the WebSocket upgrade as relayd never does",
        ),
    ],
    ids=["not-http", "half-a-status-line", "bad-accept-key"],
)
async def test_a_server_that_is_not_relayd_is_a_connect_error_at_once(
    answer: bytes, message: str
) -> None:
    # Found by a tester (a misbehaving proxy in front of relayd, say).
    async def server(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(answer)

    async with trio.open_nursery() as nursery:
        url = await serve_tcp(nursery, server)
        with pytest.raises(ConnectError, match=message) as refused:
            # Without the fix the first two waited this out, past the test's deadline.
            async with connect(url, connect_timeout=3600):
                pytest.fail("connected to a server that is not relayd")
        nursery.cancel_scope.cancel()
    assert type(refused.value) is ConnectError
    assert not refused.value.retryable


async def test_an_http_answer_ended_by_the_close_is_a_refusal_with_its_status() -> None:
    # HTTP/1.0 without a length, as older proxies send their 503 while relayd restarts:
    # a refusal, retryable as its status says (found by a reviewer: it had become a
    # final ConnectError, and a reconnecting client behind such a proxy gave up).
    async def proxy(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.0 503 Service Unavailable\r\n\r\nbackend down")

    async with trio.open_nursery() as nursery:
        url = await serve_tcp(nursery, proxy)
        with pytest.raises(HandshakeRefused) as refused:
            async with connect(url, connect_timeout=3600):
                pytest.fail("connected through a proxy that answers 503")
        nursery.cancel_scope.cancel()
    assert refused.value.status == 503
    assert refused.value.retryable


async def test_a_server_without_relayd_v1_is_refused_for_v1_and_fine_for_seed() -> None:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()  # selects no subprotocol, as the seed post's server
        with contextlib.suppress(WebSocketClosed):  # one client's end must not stop the server
            await ws.send_message("an-id")
            await ws.get_message()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        url = f"ws://127.0.0.1:{server.port}/"
        with pytest.raises(ConnectError, match=r"does not speak relayd\.v1; try the seed dialect"):
            async with connect(url):
                pytest.fail("v1 without the subprotocol")
        async with connect(url, dialect="seed") as client:
            assert client.id == "an-id"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("url", "kwargs", "message"),
    [
        ("http://127.0.0.1/", {}, "must start with ws://"),
        ("ws://127.0.0.1/", {"token": "two words"}, "printable ASCII"),
        ("ws://127.0.0.1/", {"ssl_context": "context"}, "needs a wss:// URL"),
        ("ws://127.0.0.1/", {"connect_timeout": 0}, "connect_timeout must be a positive number"),
        ("ws://127.0.0.1/", {"keepalive_s": math.inf}, "keepalive_s must be a positive number"),
        ("ws://127.0.0.1/", {"max_in_flight": 0}, "max_in_flight >= 1"),
        # Found by a tester: raised from trio's internals, or an unbounded receive buffer.
        ("ws://127.0.0.1/", {"max_in_flight": 1.5}, "max_in_flight >= 1"),
        ("ws://127.0.0.1/", {"receive_queue": math.inf}, "receive_queue >= 0"),
        ("ws://127.0.0.1/", {"max_in_flight": "16"}, "max_in_flight >= 1"),
        ("ws://127.0.0.1/", {"connect_timeout": "5"}, "connect_timeout must be a positive number"),
        ("ws://127.0.0.1/", {"token": b"token-bytes"}, "the token must be a str"),
        (
            "ws://127.0.0.1/",
            {"dialect": "v2"},
            r"^dialect must be one of relayd\.v1, seed, not 'v2'$",
        ),
    ],
)
async def test_bad_arguments_are_refused_before_connecting(
    url: str, kwargs: dict[str, Any], message: str
) -> None:
    if kwargs.get("ssl_context") == "context":
        kwargs["ssl_context"] = ssl.create_default_context()
    with pytest.raises(ValueError, match=message):
        async with connect(url, **kwargs):
            pytest.fail("connected with bad arguments")


# -- TLS -----------------------------------------------------------------------------------


@asynccontextmanager
async def tls_relay(tmp_path: Path) -> AsyncIterator[tuple[str, trustme.CA]]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "both.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    tls = TLSSettings(cert_file=str(tmp_path / "both.pem"), key_file=str(tmp_path / "key.pem"))
    async with running(Server(settings(), tls=load_tls(tls)), scheme="wss") as url:
        yield url, ca


async def test_wss_verifies_the_server_with_the_context_given(tmp_path: Path) -> None:
    async with tls_relay(tmp_path) as (url, ca):
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        async with connect(url, ssl_context=trusting) as client:
            await client.send(client.id, "over TLS")
            assert (await client.receive()).text == "over TLS"
        with pytest.raises(TLSError) as refused:
            async with connect(url, ssl_context=ssl.create_default_context()):
                pytest.fail("connected to a server it cannot verify")
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    assert not refused.value.retryable


async def test_wss_to_a_plain_server_hints_at_ws() -> None:
    async with relay() as url:
        tls_url = url.replace("ws://", "wss://")
        with pytest.raises(TLSError) as refused:
            async with connect(tls_url):
                pytest.fail("a TLS session with a plain server")
    assert str(refused.value).startswith(f"TLS handshake with {tls_url} failed: ")
    assert str(refused.value).endswith(
        f"(the server answered in plain text: it may speak {url}, not wss://)"
    )


async def test_ws_to_a_tls_server_says_at_once_it_may_speak_wss(tmp_path: Path) -> None:
    async with tls_relay(tmp_path) as (url, _):
        plain = url.replace("wss://", "ws://")
        with pytest.raises(ConnectError) as refused:
            # Without the hint the client would wait out connect_timeout, past this
            # test's deadline: relayd closes a plain request on its TLS port at once.
            async with connect(plain, connect_timeout=3600):
                pytest.fail("a WebSocket over plain TCP with a TLS server")
    assert str(refused.value) == (
        f"{plain} closed the connection without answering the WebSocket handshake"
        f" (relayd at its handshake limit, or restarting; or it speaks {url}, not ws://)"
    )


# -- sending: every outcome ----------------------------------------------------------------


async def test_send_returns_once_relayd_acked_and_raises_each_error_with_its_detail() -> None:
    async with relay() as url, connect(url) as client, connect(url) as peer:
        await client.send(peer.id, "delivered")
        assert (await peer.receive()).text == "delivered"

        with pytest.raises(UnknownRecipient) as unknown:
            await client.send("nobody", "x")
        assert (unknown.value.code, unknown.value.detail) == ("unknown_recipient", UNKNOWN_DETAIL)
        assert isinstance(unknown.value.ref, int)  # relayd echoed this client's ref

        with pytest.raises(InvalidEnvelope) as bad_to:
            await client.send("", "x")
        assert bad_to.value.detail.startswith("Expected `str` of length >= 1")

        # A Raw is pasted into the envelope as it is: one that is not one JSON value is
        # refused before sending, or it could make another envelope (found by a tester:
        # this one was acked and delivered to the client itself, not to the peer).
        spliced = msgspec.Raw(b'"for the peer?","to":"%s"' % client.id.encode())
        escaping = msgspec.Raw(b'1},"to":"%s","z":{"y":1' % client.id.encode())
        bad: list[object] = [msgspec.Raw(b"{bad"), spliced, msgspec.Raw(b"1}"), msgspec.Raw(b"")]
        # Inside a value too (found by a reviewer of the first fix: this dict's Raw closed
        # it and made the envelope's "to" the client's own).
        bad += [{"x": escaping}, [spliced], {"x": msgspec.Raw(b"")}]
        # And a Raw inside that makes one JSON value with what is around it, but brings
        # keys or elements of its own (found by a tester: the peer got "admin": true).
        bad += [{"x": msgspec.Raw(b'"y","admin":true')}, [msgspec.Raw(b"1,2")]]
        bad += [Wrapped(msgspec.Raw(b'"y","admin":true'))]
        for message in bad:
            with pytest.raises(ValueError, match="not one JSON value"):
                await client.send(peer.id, message)

        await client.send(client.id, "the connection is still open")
        assert (await client.receive()).text == "the connection is still open"
        await client.send(peer.id, "the peer got nothing before this")
        assert (await peer.receive()).text == "the peer got nothing before this"


@dataclasses.dataclass
class Wrapped:
    """A message of the program's own type, as msgspec encodes dataclasses."""

    x: object


async def test_invalid_json_from_relayd_is_raised_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    # What only a client without the check above sends (an older one, or another
    # program on the connection's behalf); relayd's answer must still reach the send.
    monkeypatch.setattr(messages, "_raw_decoder", _Lenient())
    async with relay() as url, connect(url) as client, connect(url) as peer:
        with pytest.raises(InvalidJSON) as bad_json:
            await client.send(peer.id, msgspec.Raw(b"{bad"))
    assert bad_json.value.detail.startswith("JSON is malformed")
    assert bad_json.value.ref is None  # relayd reads no ref from what is not JSON


class _Lenient:
    """A stand-in for the client's check of a Raw: takes anything."""

    def decode(self, _: object) -> None:
        return None


async def test_a_rate_limited_send_raises_and_sustained_abuse_closes_with_1008() -> None:
    async with (
        relay(messages_per_second=0.001, message_burst=2) as url,
        connect(url) as client,
        connect(url) as peer,
    ):
        assert [await outcome(client.send(peer.id, n)) for n in range(4)] == [
            "ack",
            "ack",
            "rate_limited",
            "rate_limited",
        ]
        with pytest.raises((RateLimited, PolicyViolation)):
            await client.send(peer.id, "and one more")
        with pytest.raises(PolicyViolation) as closed:
            await client.receive()
        with pytest.raises(PolicyViolation):
            await client.send(peer.id, "after the close")
    assert (closed.value.code, closed.value.reason) == (1008, "rate limit exceeded")
    assert not closed.value.retryable


async def test_a_rate_limited_send_says_how_long_until_it_may_be_sent_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    # At 2 a second with a burst of 1, the second message is refused: relayd has room
    # again half a second after the first (its token refills), and says so.
    async with (
        relay(messages_per_second=2.0, message_burst=1) as url,
        connect(url) as client,
        connect(url) as peer,
    ):
        await client.send(peer.id, "first")
        with pytest.raises(RateLimited) as refused:
            await client.send(peer.id, "second")
        assert refused.value.retry_after is not None
        assert 0.0 < refused.value.retry_after <= 0.502
        await trio.sleep(refused.value.retry_after)
        await client.send(peer.id, "second, again")  # accepted: no RateLimited
        assert [(await peer.receive()).text for _ in range(2)] == ["first", "second, again"]


async def send_six_at_their_turns(
    client: Client, to: str, on_refusal: Callable[[int], None] = lambda refusals: None
) -> int:
    """Send 0 to 5 at once, each again after every refusal's ``retry_after``; the refusals.

    ``on_refusal`` is called with the count so far at each refusal, before its wait.
    """
    refusals = 0

    async def send_at_turns(n: int) -> None:
        nonlocal refusals
        while True:
            try:
                await client.send(to, n)
            except RateLimited as refused:
                refusals += 1
                on_refusal(refusals)
                if refused.retry_after is None:
                    pytest.fail("relayd did not say how long to wait")
                await trio.sleep(refused.retry_after)
            else:
                return

    async with trio.open_nursery() as nursery:
        for n in range(6):
            nursery.start_soon(send_at_turns, n)
    return refusals


async def test_sends_refused_together_each_sent_again_after_its_wait_all_go_through(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Six sends at once at 2 a second with a burst of 3: three are refused. When each
    # refusal gave the wait for one token, the three came back together, one went
    # through and two were refused again, and the connection closed with 1008.
    async with (
        relay(messages_per_second=2.0, message_burst=3) as url,
        connect(url) as client,
        connect(url) as peer,
    ):
        assert await send_six_at_their_turns(client, peer.id) == 3
        assert client.closed is None
        assert sorted([(await peer.receive()).data for _ in range(6)]) == list(range(6))


async def test_sends_waiting_their_turns_when_a_reload_lowers_the_rate_all_go_through(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Six sends at once at 2 a second with a burst of 3: three refused, each told its
    # turn. While they wait, a reload lowers the rate to one message in 2 s with a burst
    # of 1. Sent again at those turns, the first went through, the second was refused
    # (with a new wait) and the third closed the connection with 1008: the new rate's
    # abuse bucket holds one refusal. Now the third is refused and told a turn too.
    server = Server(settings(messages_per_second=2.0, message_burst=3))

    def reload_at_the_third(refusals: int) -> None:
        if refusals == 3:
            server.reload(settings(messages_per_second=0.5, message_burst=1), None)

    async with running(server) as url, connect(url) as client, connect(url) as peer:
        # Three at first; two of them again, at the new rate.
        assert await send_six_at_their_turns(client, peer.id, reload_at_the_third) == 5
        assert client.closed is None
        assert sorted([(await peer.receive()).data for _ in range(6)]) == list(range(6))


async def test_a_message_over_the_announced_limit_is_refused_without_sending() -> None:
    async with relay(max_message_bytes=300) as url, connect(url) as client, connect(url) as peer:
        overhead = len(b'{"to":"","message":"","ref":1}') + len(peer.id)
        await client.send(peer.id, "x" * (300 - overhead))  # exactly at the limit
        with pytest.raises(MessageTooLarge) as refused:
            await client.send(peer.id, "y" * (301 - overhead))
        assert refused.value.detail == (
            "the message is 301 bytes with its envelope, over the server's limit of 300 bytes;"
            " not sent"
        )
        await client.send(peer.id, "z")
        assert [(await peer.receive()).text[0] for _ in range(2)] == ["x", "z"]  # no "y"


async def test_a_limit_lowered_by_a_reload_is_relayds_message_too_large() -> None:
    server = Server(settings())
    async with running(server) as url, connect(url) as client:
        server.reload(settings(max_message_bytes=100), None)
        with pytest.raises(MessageTooLarge) as refused:
            await client.send(client.id, "x" * 200)  # within the limit announced at connect
        assert refused.value.detail == "message is larger than 100 bytes"
        await client.send(client.id, "small")
        assert (await client.receive()).text == "small"


async def test_unsupported_data_cannot_come_from_this_client() -> None:
    # relayd answers unsupported_data to binary messages; the client sends text only, so
    # the exception exists for completeness and maps from the code like every other.
    assert relayd.client.UnsupportedData.error_code == "unsupported_data"
    assert not hasattr(Client, "send_bytes")


# -- many sends in flight ------------------------------------------------------------------


async def test_every_send_gets_its_own_outcome_when_many_are_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Three kinds interleaved at random: acked, unknown_recipient (relayd echoes the ref)
    # and invalid_json (relayd answers with "ref": null, so the client must give it to the
    # oldest message still waiting; sent here past the client's own check of a Raw). If a
    # reply were matched to the wrong send, a task would see another kind's outcome, or
    # the peer would get a message whose send failed.
    monkeypatch.setattr(messages, "_raw_decoder", _Lenient())
    kinds = ["ack", "unknown_recipient", "invalid_json"] * 30
    random.Random(12).shuffle(kinds)
    results: dict[int, str] = {}
    async with relay() as url, connect(url) as client, connect(url) as peer:

        async def send(n: int, kind: str) -> None:
            if kind == "ack":
                sent = client.send(peer.id, n)
            elif kind == "unknown_recipient":
                sent = client.send(f"nobody-{n}", n)
            else:
                sent = client.send(peer.id, msgspec.Raw(b"{not json %d" % n))
            results[n] = await outcome(sent)

        async with trio.open_nursery() as nursery:
            for n, kind in enumerate(kinds):
                nursery.start_soon(send, n, kind)
        received = [(await peer.receive()).data for _ in range(kinds.count("ack"))]
        await client.send(peer.id, "last")
        assert (await peer.receive()).data == "last"  # nothing else arrived before it
    assert results == dict(enumerate(kinds))
    assert sorted(received) == [n for n, kind in enumerate(kinds) if kind == "ack"]


async def cancelled_once_blocked(call: Callable[[], Awaitable[object]]) -> bool:
    """Run ``call`` until every task waits, then cancel it; True if it was still waiting."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def cancel_when_blocked() -> None:
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()

            nursery.start_soon(cancel_when_blocked)
            await call()
    return scope.cancelled_caught


@asynccontextmanager
async def acks_held(url: str, **options: Any) -> AsyncIterator[tuple[Client, Client]]:
    """A client whose replies wait unread behind a message it has not read, and its peer.

    The client reads nothing from its socket while the peer's message waits for the
    program (``receive_queue=0``), so acks to what it sends stay unread: its sends stay
    in flight until :meth:`Client.receive` takes that message.
    """
    async with connect(url, receive_queue=0, **options) as client, connect(url) as peer:
        await peer.send(client.id, "read me to let the acks through")
        yield client, peer


async def test_sends_in_flight_are_bounded_and_a_cancelled_waiting_send_is_never_sent() -> None:
    async with relay() as url, acks_held(url, max_in_flight=2) as (client, peer):
        outcomes: list[str] = []

        async def send(n: int) -> None:
            outcomes.append(await outcome(client.send(peer.id, n)))

        async with trio.open_nursery() as nursery:
            for n in (1, 2):
                nursery.start_soon(send, n)
                await trio.testing.wait_all_tasks_blocked()  # written, waiting for its ack
            # The third finds no free slot; cancelled there, it is never sent.
            assert await cancelled_once_blocked(lambda: client.send(peer.id, 3))
            assert (await client.receive()).text == "read me to let the acks through"
        await client.send(peer.id, 4)
        assert [(await peer.receive()).data for _ in range(3)] == [1, 2, 4]  # 3 never sent
        assert outcomes == ["ack", "ack"]


class _StuckSocket:
    """A trio-websocket connection whose sends wait until ``through`` is set, and are kept."""

    handshake_headers: tuple[tuple[bytes, bytes], ...] = ()
    closed = None

    def __init__(self) -> None:
        self.through = trio.Event()
        self.written: list[str] = []

    async def send_message(self, frame: str) -> None:
        await self.through.wait()
        self.written.append(frame)


async def test_sends_withdrawn_while_queued_keep_their_slot_until_passed_over() -> None:
    # The writer is stuck on the first message; two queued behind it are withdrawn by
    # their senders (a timeout), and two new ones are sent. Freed at once, the slots
    # of the withdrawn would let the new ones find the queue full (trio.WouldBlock),
    # each leaving an entry waiting for a reply that never comes.
    options = LinkOptions(Dialect.V1, None, None, 1.0, None, max_in_flight=3, max_message_chars=1)
    slots = trio.Semaphore(options.max_in_flight)
    ws = _StuckSocket()
    deliveries, _ = trio.open_memory_channel[Message](0)
    link = Link(ws, None, client_id="me", options=options, deliveries=deliveries)  # type: ignore[arg-type]

    async def send(to: str, scope: trio.CancelScope | None = None) -> None:
        await slots.acquire()
        sending = link.submit(to, b"1", slots.release)
        try:
            with scope or trio.CancelScope():
                await sending.done.wait()
        finally:
            if sending.state is not link_module._State.SETTLED:
                link.abandon(sending)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.write)
        scopes = [trio.CancelScope(), trio.CancelScope()]
        nursery.start_soon(send, "first")
        await trio.testing.wait_all_tasks_blocked()  # the writer is stuck on it
        for to, scope in zip(("withdrawn-1", "withdrawn-2"), scopes, strict=True):
            nursery.start_soon(send, to, scope)
            await trio.testing.wait_all_tasks_blocked()
        for scope in scopes:
            scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        late = [trio.CancelScope(), trio.CancelScope()]
        for to, scope in zip(("late-1", "late-2"), late, strict=True):
            nursery.start_soon(send, to, scope)
            await trio.testing.wait_all_tasks_blocked()  # in this order for the slots
        ws.through.set()
        await trio.testing.wait_all_tasks_blocked()
        written = [json.loads(frame)["to"] for frame in ws.written]
        assert written == ["first", "late-1", "late-2"]  # the withdrawn never written
        for scope in late:
            scope.cancel()  # their acks will not come: nobody answers here
        await trio.testing.wait_all_tasks_blocked()
        link.fail_all(CloseInfo(1000, "", by_client=True))
        await trio.testing.wait_all_tasks_blocked()
        assert slots.value == options.max_in_flight  # every slot back
        nursery.cancel_scope.cancel()


async def test_a_send_cancelled_after_writing_leaves_the_others_matched() -> None:
    async with relay() as url, acks_held(url) as (client, peer):
        assert await cancelled_once_blocked(
            lambda: client.send("nobody", "its error comes after the cancel")
        )
        async with trio.open_nursery() as nursery:
            results: list[str] = []

            async def send(to: str) -> None:
                results.append(await outcome(client.send(to, to)))

            nursery.start_soon(send, peer.id)
            await trio.testing.wait_all_tasks_blocked()
            assert (await client.receive()).data == "read me to let the acks through"
        with pytest.raises(UnknownRecipient):
            await client.send("nobody", "matched to its own error")
        assert results == ["ack"]
        assert (await peer.receive()).data == peer.id


# -- receiving: backpressure ---------------------------------------------------------------


def _kernel_buffer_bytes() -> int:
    """The most loopback TCP can hold for one connection, both ways: buffers at their maximum."""
    rmem = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return rmem + wmem


async def fill(sender: Client, to: str, *, most: int = 2000) -> list[int]:
    """Send big messages to ``to`` until relayd answers ``recipient_busy``; the acked ones.

    The messages are numbered from 0.
    """
    acked: list[int] = []
    for n in range(most):
        try:
            await sender.send(to, {"n": n, "pad": "x" * BIG})
        except RecipientBusy:
            return acked
        acked.append(n)
    pytest.fail(f"{most} messages of {BIG} bytes went to a client that reads nothing")


async def test_a_client_that_does_not_read_slows_relayd_and_loses_nothing() -> None:
    fast = {"messages_per_second": 100_000.0, "message_burst": 100_000}
    async with (
        relay(**fast) as url,
        connect(url, receive_queue=4) as slow,
        connect(url) as sender,
    ):
        acked = await fill(sender, slow.id)
        # What can hold them: relayd's outbox (16), the client's queue (4) and the message
        # it is handing over, and TCP's buffers. A client that buffered without bound
        # would have taken all of them.
        bound = 16 + 4 + 2 + math.ceil(_kernel_buffer_bytes() / BIG)
        # The slow client, and loopback TCP under it, may still be taking in what relayd
        # wrote when its outbox first filled (a busy machine runs them late, the kernel's
        # part even after every task here waits): top the outbox up, one message at a
        # time once everything here waits, until one is refused at once.
        while True:
            await trio.testing.wait_all_tasks_blocked()
            try:
                await sender.send(slow.id, {"n": len(acked), "pad": "x" * BIG})
            except RecipientBusy as refused:
                busy = refused
                break
            acked.append(len(acked))
            assert len(acked) <= bound, "relayd's outbox never stayed full"
        assert 16 + 4 <= len(acked) <= bound
        assert busy.detail == "the recipient is not reading fast enough; try again later"
        received = [(await slow.receive()).data["n"] for _ in acked]
        assert received == acked  # every one acked arrives, once, in order
        await sender.send(slow.id, {"n": "after"})
        assert (await slow.receive()).data == {"n": "after"}


async def test_a_number_beyond_a_floats_range_is_infinite_not_an_error() -> None:
    # relayd relays any JSON; msgspec alone refuses 1e999, and Message.data raised
    # msgspec.ValidationError out of the program's receive loop: one message from any
    # peer ended a bot. json.loads has inf.
    async with relay() as url, connect(url) as bot, connect(url) as peer:
        await peer.send(bot.id, msgspec.Raw(b'{"n": 1e999, "m": [-1e400, 1.5]}'))
        assert (await bot.receive()).data == {"n": math.inf, "m": [-math.inf, 1.5]}
        digits = "9" * 5000  # over Python's 4300: json.loads refuses it too
        await peer.send(bot.id, msgspec.Raw(digits.encode()))
        message = await bot.receive()
        with pytest.raises(ValueError, match="read it from raw"):
            message.data  # noqa: B018 - the property raises
        assert message.text == digits


async def test_a_message_over_max_message_chars_closes_with_1009() -> None:
    async with relay() as url, connect(url, max_message_chars=1000) as small, connect(url) as peer:
        await peer.send(small.id, "x" * 2000)
        with pytest.raises(MessageTooBig) as closed:
            await small.receive()
    assert closed.value.code == 1009
    assert closed.value.reason == "Exceeded maximum message size: 1000 bytes"


async def test_a_message_within_the_limit_relayd_announced_is_received_however_big() -> None:
    # An operator may allow messages over the client's default bound (1 MiB): any client
    # could then close another's connection with 1009, for good (not retryable), by
    # sending it one.
    four_mib = 4 * 2**20
    async with (
        relay(max_message_bytes=four_mib) as url,
        connect(url) as peer,
        connect(url, reconnect=relayd.client.Backoff()) as client,
        connect(url, max_message_chars=1000) as bounded,
    ):
        assert client.max_message_bytes == four_mib
        big = "x" * (four_mib - 100)  # with its envelope, at relayd's limit
        await peer.send(client.id, big)
        assert (await client.receive()).text == big
        await peer.send(bounded.id, "x" * 2000)  # a bound the program set still holds
        with pytest.raises(MessageTooBig):
            await bounded.receive()


async def test_a_message_over_a_limit_a_reload_raised_is_received_after_a_reconnect() -> None:
    # The default bound follows the limit relayd announced at the handshake; a sender
    # that connected after a reload raised it may send more. The client closed with
    # 1009, which it did not retry: a reconnecting client was gone for good. Connecting
    # again, it is told the new limit, and its bound follows.
    server = Server(settings())
    four_mib = 4 * 2**20
    async with (
        running(server) as url,
        connect(url, reconnect=relayd.client.Backoff(first_s=0.01)) as client,
    ):
        ids = client.ids()
        first = await anext(ids)
        server.reload(settings(max_message_bytes=four_mib), None)
        async with connect(url) as peer:
            big = "x" * (2 * 2**20)  # over the client's bound of 1 MiB
            await peer.send(client.id, big)
            second = await anext(ids)  # a new connection, not MessageTooBig
            assert second != first
            assert client.max_message_bytes == four_mib
            await peer.send(second, big)
            assert (await client.receive()).text == big


async def test_a_message_over_the_capped_default_bound_is_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The default bound stops at MAX_ANNOUNCED_CHARS (64 MiB; 2 MiB here): relayd's limit
    # over it is not followed, so a message over it was CloseInfo.over_bound all the same,
    # and each such message cost a reconnect (a new id, the messages being written lost).
    monkeypatch.setattr(relayd.client.options, "MAX_ANNOUNCED_CHARS", 2 * 2**20)
    server = Server(settings(max_message_bytes=4 * 2**20))
    async with (
        running(server) as url,
        connect(url, reconnect=relayd.client.Backoff(first_s=0.01)) as client,
        connect(url) as peer,
    ):
        ids = client.ids()
        await anext(ids)
        await peer.send(client.id, "x" * (3 * 2**20))
        with pytest.raises(MessageTooBig), trio.fail_after(10):  # reconnected: waits on
            await client.receive()
        assert client.closed is not None
        assert not client.closed.over_bound
        assert [new async for new in ids] == []  # no reconnect


# -- closes relayd makes, surfaced as exceptions --------------------------------------------


async def test_a_shutdown_is_1001_after_the_messages_already_sent() -> None:
    server = Server(settings())
    async with running(server) as url, connect(url) as client, connect(url) as peer:
        await peer.send(client.id, "before the shutdown")
        server.shutdown("test")
        assert (await client.receive()).text == "before the shutdown"
        with pytest.raises(ServerShuttingDown) as closed:
            await client.receive()
        with pytest.raises(ServerShuttingDown):
            await client.send(peer.id, "too late")
        assert client.closed == relayd.client.CloseInfo(1001, "server shutting down")
    assert (closed.value.code, closed.value.reason) == (1001, "server shutting down")
    assert closed.value.retryable


async def test_iteration_yields_every_message_then_raises_the_close() -> None:
    server = Server(settings())
    received: list[Any] = []
    async with running(server) as url, connect(url) as client, connect(url) as peer:
        for n in range(5):
            await peer.send(client.id, n)
        server.shutdown("test")
        with pytest.raises(ServerShuttingDown):
            await read_all(client, received)
    assert received == [0, 1, 2, 3, 4]


async def read_all(client: Client, into: list[Any]) -> None:
    """Iterate over ``client``, keeping each message's data, until the iteration stops."""
    async for message in client:
        into.append(message.data)


async def test_an_idle_connection_is_closed_with_1000(autojump_clock: trio.abc.Clock) -> None:
    async with relay(idle_timeout_s=60) as url, connect(url, keepalive_s=None) as client:
        with pytest.raises(NormalClosure) as closed:
            await client.receive()
    assert (closed.value.code, closed.value.reason) == (1000, "idle timeout")
    assert closed.value.retryable


async def test_a_slow_consumer_is_dropped_and_told_when_it_reads_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    fast = {"messages_per_second": 100_000.0, "message_burst": 100_000}
    async with (
        relay(slow_consumer_timeout_s=2, **fast) as url,
        connect(url, receive_queue=0, keepalive_s=None) as slow,
        connect(url) as sender,
    ):
        acked = await fill(sender, slow.id)
        await trio.sleep(10)  # virtual: relayd's slow-consumer clock runs out meanwhile
        with pytest.raises(UnknownRecipient):
            await sender.send(slow.id, "gone")
        received: list[Any] = []
        with pytest.raises((ConnectionLost, TryAgainLater)) as closed:
            await read_all(slow, received)
        assert [data["n"] for data in received] == acked[: len(received)]  # in order
        assert closed.value.retryable


async def test_a_missing_pong_drops_the_connection(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        url = await serve_tcp(nursery, _deaf_server)
        async with connect(url, keepalive_s=20) as client:
            assert client.id == "deaf"
            started = trio.current_time()
            with pytest.raises(ConnectionLost) as lost:
                await client.receive()
            assert trio.current_time() - started == pytest.approx(40)
        nursery.cancel_scope.cancel()
    assert (lost.value.code, lost.value.reason) == (1006, "no pong within 20 s")


@pytest.mark.parametrize("reconnect", [None, Backoff(first_s=0.05)], ids=["alone", "reconnecting"])
async def test_a_send_stuck_behind_unread_messages_is_lost_when_the_keepalive_drops(
    reconnect: Backoff | None, autojump_clock: trio.abc.Clock
) -> None:
    # Found by a tester: the keepalive closed the socket under a dispatcher waiting to
    # hand a message to a program that does not read, and a trio-websocket reader waiting
    # behind it; neither saw the socket closed. The send waited for good, closed stayed
    # None, and nothing reconnected. relayd here neither pings nor drops slow consumers.
    limits = {"messages_per_second": 100_000.0, "message_burst": 100_000}
    async with (
        relay(ping_interval_s=0, slow_consumer_timeout_s=3600, **limits) as url,
        connect(url, receive_queue=4, keepalive_s=20, reconnect=reconnect) as stuck,
        connect(url) as sender,
    ):
        ids = aiter(stuck.ids())
        first_id = await anext(ids)
        acked = await fill(sender, stuck.id)
        started = trio.current_time()
        with trio.fail_after(600), pytest.raises(ConnectionLost) as lost:
            await stuck.send(sender.id, "relayed, its ack unread")
        assert trio.current_time() - started <= 40  # within 2 x keepalive_s
        assert (lost.value.code, lost.value.reason) == (1006, "no pong within 20 s")
        received: list[Any] = []
        if reconnect is None:
            assert stuck.closed == CloseInfo(1006, "no pong within 20 s")
            with pytest.raises(ConnectionLost):
                await read_all(stuck, received)
        else:
            assert await anext(ids) != first_id
            await stuck.send(sender.id, "on the new connection")
            texts = [(await sender.receive()).text for _ in range(2)]
            assert texts == ["relayed, its ack unread", "on the new connection"]
            received = [(await stuck.receive()).data for _ in range(4)]
        # What reached the client's queue is read, in order; the rest is lost with the
        # connection, as over any connection lost.
        assert [data["n"] for data in received] == acked[: len(received)]
        assert len(received) >= 4


@pytest.mark.parametrize("reconnect", [None, Backoff(first_s=0.05)], ids=["alone", "reconnecting"])
@pytest.mark.parametrize("write", ["ping", "send"])
async def test_a_send_stuck_behind_unread_messages_is_lost_when_a_write_finds_the_reset(
    write: str, reconnect: Backoff | None, autojump_clock: trio.abc.Clock
) -> None:
    # Found by a reviewer: relayd drops a slow consumer (10 s by default) before the
    # client's keepalive gives up (2 x 30 s). A write after that (the keepalive's ping,
    # or another send) failed on the reset connection, and trio-websocket marked it
    # closed (1006), but the dispatcher still waited to hand a message to a program
    # that does not read: the sends waited for good and nothing reconnected.
    reset = trio.Event()

    async def stuck_send_read(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)  # the stuck send's frame

    # For the client's queue (1), its dispatcher, trio-websocket's reader, and more; then
    # a reset, as relayd drops a slow consumer.
    server = resets_the_first(deliveries(*range(6)), stuck_send_read, reset)

    async with trio.open_nursery() as nursery:
        url = await serve_tcp(nursery, server)
        keepalive_s = 20 if write == "ping" else None
        async with connect(
            url, receive_queue=1, keepalive_s=keepalive_s, reconnect=reconnect
        ) as stuck:
            ids = aiter(stuck.ids())
            assert await anext(ids) == "c1"
            started = trio.current_time()
            lost: list[ConnectionLost] = []

            async def send(text: str) -> None:
                with pytest.raises(ConnectionLost) as raised:
                    await stuck.send("p", text)
                lost.append(raised.value)

            with trio.fail_after(600):
                async with trio.open_nursery() as sends:
                    sends.start_soon(send, "written before the reset")
                    await reset.wait()
                    await trio.testing.wait_all_tasks_blocked()
                    if write == "send":  # else the keepalive's ping, at 20 s
                        sends.start_soon(send, "written after the reset")
            assert trio.current_time() - started <= 20  # not 2 x keepalive_s
            assert [(error.code, error.reason) for error in lost] == [(1006, "")] * len(lost)
            assert len(lost) == (1 if write == "ping" else 2)
            if reconnect is None:
                assert stuck.closed == CloseInfo(1006, "")
                received: list[Any] = []
                with pytest.raises(ConnectionLost):
                    await read_all(stuck, received)
                assert received == [0]  # the queue's; the dispatcher's went with the reset
            else:
                assert await anext(ids) == "c2"
                assert (await stuck.receive()).data == 0
        nursery.cancel_scope.cancel()


async def test_a_write_that_finds_a_close_frame_still_hands_over_the_message_before_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    # A close frame is not a lost connection: the dispatcher keeps handing over the
    # last message before it, even after the keepalive's ping finds the connection
    # closed (ending the dispatcher on any write that found it closed dropped it).
    async def server(stream: trio.SocketStream) -> None:
        await accept_v1(stream, "closing")
        close = b"\x88\x16\x03\xe9server shutting down"  # 1001, as relayd's shutdown
        await stream.send_all(deliveries(1, 2) + close)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        url = await serve_tcp(nursery, server)
        async with connect(url, receive_queue=1, keepalive_s=20) as client:
            await trio.sleep(30)  # virtual: the keepalive's ping, at 20 s, found it closed
            received: list[Any] = []
            with pytest.raises(ServerShuttingDown):
                await read_all(client, received)
            assert received == [1, 2]  # 1 in the client's queue, 2 in the dispatcher's hand
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("keepalive_s", "close_timeout", "ends_at"),
    [(20, 100, 40), (None, 5, 30)],
    ids=["keepalive-gives-up", "close_timeout-runs-out"],
)
async def test_a_close_that_relayd_never_answers_is_a_plain_1000(
    keepalive_s: float | None, close_timeout: float, ends_at: float, autojump_clock: trio.abc.Clock
) -> None:
    # Found by a reviewer: when the keepalive gave up while the program was closing,
    # closed said 1000 with the keepalive's reason, "no pong within 20 s".
    async with trio.open_nursery() as nursery:
        url = await serve_tcp(nursery, _deaf_server)
        started = trio.current_time()
        async with connect(url, keepalive_s=keepalive_s, close_timeout=close_timeout) as client:
            await trio.sleep(25)  # virtual: the keepalive's first ping is unanswered
        assert trio.current_time() - started == pytest.approx(ends_at)
        assert client.closed == CloseInfo(1000, "", by_client=True)
        nursery.cancel_scope.cancel()


async def accept_v1(stream: trio.abc.Stream, client_id: str) -> None:
    """Play relayd's part of a v1 handshake on ``stream``, up to its welcome."""
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(4096)
    match = re.search(rb"Sec-WebSocket-Key: *(\S+)", head, re.IGNORECASE)
    assert match is not None
    await stream.send_all(accept_response(match[1].decode(), "relayd.v1"))
    await stream.send_all(text_frame(b'{"type":"welcome","id":"%s"}' % client_id.encode()))


def deliveries(*numbers: int) -> bytes:
    """The v1 frames with which relayd delivers ``numbers`` from ``p``, one a message."""
    return b"".join(text_frame(b'{"type":"message","from":"p","message":%d}' % n) for n in numbers)


def resets_the_first(
    frames: bytes, then: Callable[[trio.SocketStream], Awaitable[None]], reset: trio.Event
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A server that welcomes ``c1``, writes ``frames``, awaits ``then``, and resets it.

    ``reset`` is set once it is reset (SO_LINGER 0). The next connections are welcomed
    (``c2``, ...) and left open.
    """
    accepted = 0

    async def server(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        await accept_v1(stream, f"c{accepted}")
        if accepted > 1:
            await trio.sleep_forever()
        await stream.send_all(frames)
        await then(stream)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()
        reset.set()

    return server


async def _deaf_server(stream: trio.SocketStream) -> None:
    """Accepts a v1 handshake, sends a welcome, then never reads again (no pongs)."""
    await accept_v1(stream, "deaf")
    await trio.sleep_forever()


async def _pings_across_the_close(stream: trio.SocketStream) -> None:
    """Welcomes, then answers the client's close frame with a ping first, as relayd may.

    relayd's keepalive ping can cross the client's close frame on the wire: the
    client then reads a ping after it sent its close.
    """
    await accept_v1(stream, "pinged")
    received = b""
    while b"\x88" not in received:  # a masked close frame's first byte
        received += await stream.receive_some(4096)
    await stream.send_all(b"\x89\x06relayd" + b"\x88\x02\x03\xe8")  # ping, close 1000
    with trio.move_on_after(5):
        while await stream.receive_some(4096):
            pass
    await stream.aclose()


async def test_a_ping_crossing_the_clients_close_frame_is_left_unanswered(
    autojump_clock: trio.abc.Clock,
) -> None:
    # trio-websocket 0.12 answers it with a pong that wsproto refuses once the client
    # has sent its close (trio-websocket#184); RFC 6455 lets it go unanswered. Leaving
    # the block must still be a plain 1000 close, not an ExceptionGroup, and must not
    # wait out close_timeout for a close frame that the failed reader cannot read.
    async with trio.open_nursery() as nursery:
        url = await serve_tcp(nursery, _pings_across_the_close)
        async with connect(url, close_timeout=5) as client:
            assert client.id == "pinged"
            left = trio.current_time()
        assert trio.current_time() - left < 1
        assert client.closed is not None
        assert (client.closed.code, client.closed.by_client) == (1000, True)
        nursery.cancel_scope.cancel()


async def test_a_ping_refused_after_a_failed_write_is_a_lost_connection_not_a_close() -> None:
    # A write that fails (the connection reset) makes trio-websocket start closing
    # too; a ping read after that is refused the same way as after a close. It is
    # then the connection lost (1006), so the client reconnects, not a 1000 of the
    # client's own, which would end it for good.
    sent, reset = trio.Event(), trio.Event()

    async def told_to_reset(_: trio.SocketStream) -> None:
        sent.set()
        await reset.wait()

    ping = b"\x89\x06relayd"  # a ping behind the messages
    server = resets_the_first(deliveries(1, 2) + ping, told_to_reset, trio.Event())

    async with trio.open_nursery() as nursery:
        url = await serve_tcp(nursery, server)
        backoff = relayd.client.Backoff(first_s=0.01, attempts=3)
        options: dict[str, Any] = {"receive_queue": 0, "keepalive_s": None, "close_timeout": 0.5}
        async with connect(url, reconnect=backoff, **options) as client:
            ids = client.ids()
            assert await ids.__anext__() == "c1"
            await sent.wait()
            await trio.testing.wait_all_tasks_blocked()  # its reader holds message 1
            reset.set()
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(ConnectionLost):
                await client.send("x", 1)  # the write fails on the reset connection
            assert await ids.__anext__() == "c2"  # reconnected: not closed for good
        nursery.cancel_scope.cancel()


# -- structured concurrency -----------------------------------------------------------------


async def test_an_exception_in_the_block_comes_out_as_itself_after_a_1000_close() -> None:
    with structlog.testing.capture_logs() as events:
        async with relay() as url:
            with pytest.raises(KeyError, match="the program's own"):
                async with connect(url) as client:
                    raise KeyError("the program's own")
    closes = [e for e in events if e["event"] == "connection.close" and e["id"] == client.id]
    assert [(e["code"], e["closed_by"]) for e in closes] == [(1000, "client")]


async def test_a_group_raised_in_the_block_comes_out_unwrapped() -> None:
    async with relay() as url:
        with pytest.raises(ExceptionGroup) as raised:
            async with connect(url), trio.open_nursery() as nursery:
                nursery.start_soon(_raise, KeyError("from a task of the program's"))
    assert raised.group_contains(KeyError, depth=1)  # the program's group, not one around it


async def _raise(error: Exception) -> None:
    raise error


async def test_a_cancelled_block_closes_with_1000_and_leaves_nothing_running() -> None:
    with structlog.testing.capture_logs() as events:
        async with relay() as url:
            clients: list[Client] = []

            async def block() -> None:
                async with connect(url) as client:
                    clients.append(client)
                    await client.receive()  # nothing comes

            assert await cancelled_once_blocked(block)
            [client] = clients
            with pytest.raises(trio.ClosedResourceError):
                await client.send(client.id, "after the block")
    closes = [e for e in events if e["event"] == "connection.close" and e["id"] == client.id]
    assert [(e["code"], e["closed_by"]) for e in closes] == [(1000, "client")]


async def test_aclose_from_another_task_ends_the_iteration_quietly() -> None:
    async with relay() as url, connect(url) as client:
        received = []
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                async for message in client:
                    received.append(message.text)

            nursery.start_soon(read)
            await client.send(client.id, "one")
            await trio.testing.wait_all_tasks_blocked()
            await client.aclose()
        await client.aclose()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await client.send(client.id, "closed")
    assert received == ["one"]


async def test_connection_closed_is_one_base_for_every_close() -> None:
    assert issubclass(ServerShuttingDown, ConnectionClosed)
    assert issubclass(ConnectionClosed, relayd.client.ClientError)
    assert issubclass(SendError, relayd.client.ClientError)
    assert issubclass(ConnectError, relayd.client.ClientError)


# -- seed dialect --------------------------------------------------------------------------


async def test_seed_sends_are_not_acked_and_errors_arrive_as_messages() -> None:
    async with relay() as url, connect(url, dialect="seed") as seed, connect(url) as v1:
        await seed.send("nobody", "x")  # returns once written: no ack, no error raised
        error = (await seed.receive()).as_error()
        assert isinstance(error, UnknownRecipient)
        assert error.detail == UNKNOWN_DETAIL
        await seed.send(v1.id, {"k": "seed obj"})
        message = await v1.receive()
        assert (message.sender, message.data) == (seed.id, {"k": "seed obj"})
        await v1.send(seed.id, "v1 to seed")
        message = await seed.receive()
        assert (message.sender, message.text, message.as_error()) == (None, "v1 to seed", None)


def test_the_default_bound_follows_relayds_announced_limit_up_to_64_mib() -> None:
    # A server announcing any number must not make a client ready to hold that much.
    assert default_message_bound(None) == 2**20
    assert default_message_bound(65536) == 2**20
    assert default_message_bound(4 * 2**20) == 4 * 2**20 + 2048
    assert default_message_bound(10**15) == 64 * 2**20
