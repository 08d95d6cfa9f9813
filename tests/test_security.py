"""Origin allowlist, authentication and TLS, through real sockets on loopback."""

from __future__ import annotations

import contextlib
import json
import ssl
import time

import jwt
import pytest
import structlog
import trio
import trio.testing
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.config import LimitsSettings, ServerSettings, TLSSettings
from relayd.daemon.credentials import load_tls
from relayd.daemon.gate import Gate
from relayd.daemon.server import Server
from relayd.policy.auth import Authenticator, JWTVerifier, StaticTokens
from relayd.routing.local import LocalRouter
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from tests import wire
from tests.client import connect, open_raw, read_welcome, running, send_and_read
from tests.client import settings as relayd_settings
from tests.test_server import _send_and_read

TOKENS = {"alice": "alice-secret-token", "bob": "bob-secret-token"}


def _with_origins(*origins: str) -> Server:
    base = relayd_settings()
    server = base.server.model_copy(update={"allowed_origins": origins})
    return Server(base.model_copy(update={"server": server}))


# -- origin allowlist -----------------------------------------------------------------


def _refused(server: Server, status: int, reason: str) -> float | None:
    """``relayd_handshakes_rejected_total{status, reason}`` now."""
    labels = {"status": str(status), "reason": reason}
    return server.registry.get_sample_value("relayd_handshakes_rejected_total", labels)


async def test_only_allowed_origins_may_connect() -> None:
    server = _with_origins("https://chat.example")
    with structlog.testing.capture_logs() as events:
        async with running(server) as url:
            async with connect(url, headers=[("Origin", "https://chat.example")]) as ok:
                assert len(ok.id) == 22
            async with connect(url) as no_origin:  # not a browser
                assert len(no_origin.id) == 22
            refused = await _send_and_read(
                url, wire.upgrade_request(extra=[("Origin", "https://evil.example")])
            )
            assert refused.startswith(b"HTTP/1.1 403 ")
            assert refused.endswith(b"origin not allowed")
    [rejected] = [e for e in events if e["event"] == "handshake.rejected"]
    assert (rejected["status"], rejected["reason"]) == (403, "origin not allowed")
    assert (_refused(server, 403, "origin"), _refused(server, 403, "token")) == (1, 0)


async def test_by_default_every_origin_may_connect() -> None:
    assert ServerSettings().allowed_origins == ()
    async with (
        running(Server(relayd_settings())) as url,
        connect(url, headers=[("Origin", "https://anywhere.example")]) as client,
    ):
        assert len(client.id) == 22


# -- static tokens --------------------------------------------------------------------


def _bearer(subject: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {TOKENS[subject]}")]


async def test_with_tokens_the_subject_is_the_id_and_every_connection_receives() -> None:
    server = Server(relayd_settings(), authenticator=StaticTokens(TOKENS))
    with structlog.testing.capture_logs() as events:
        async with (
            running(server) as url,
            connect(url, headers=_bearer("alice")) as alice_1,
            connect(url + f"?token={TOKENS['alice']}", v1=True) as alice_2,
            connect(url, headers=_bearer("bob"), v1=True) as bob,
        ):
            assert (alice_1.id, alice_2.id, bob.id) == ("alice", "alice", "bob")
            await bob.send("alice", "to both of you", ref=1)
            assert await bob.recv_json() == {"type": "ack", "ref": 1}
            assert await alice_1.recv() == "to both of you"
            assert await alice_2.recv_json() == {
                "type": "message",
                "from": "bob",  # the server names the sender; nobody can claim another id
                "message": "to both of you",
            }
    logged = json.dumps([{k: str(v) for k, v in e.items()} for e in events])
    assert not any(token in logged for token in TOKENS.values())


async def test_a_base64_token_is_taken_as_it_is_in_the_query() -> None:
    # docs/security.md suggests `openssl rand -base64 24` for static tokens, and
    # docs/protocol.md `?token=<token>`: a "+" in one was read as a space (HTML forms'
    # encoding), and the client got 401 "invalid token" for the token it was given.
    token = "Udd5cafpoYgY+cyvdn/mwpgRNl+QTujd"
    server = Server(relayd_settings(), authenticator=StaticTokens({"carol": token}))
    async with running(server) as url, connect(url + f"?token={token}", v1=True) as carol:
        assert carol.id == "carol"


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="no-token"),
        pytest.param([("Authorization", "Bearer wrong")], id="wrong-token"),
        pytest.param([("Authorization", "Basic YWxpY2U6eA==")], id="not-bearer"),
    ],
)
async def test_without_a_good_token_the_handshake_gets_401(extra: list[tuple[str, str]]) -> None:
    server = Server(relayd_settings(), authenticator=StaticTokens(TOKENS))
    with structlog.testing.capture_logs() as events:
        async with running(server) as url:
            reply = await _send_and_read(url, wire.upgrade_request(extra=extra))
            assert reply.startswith(b"HTTP/1.1 401 ")
            async with connect(url, headers=_bearer("bob")) as bob:  # others unaffected
                assert bob.id == "bob"
    [rejected] = [e for e in events if e["event"] == "handshake.rejected"]
    assert rejected["status"] == 401
    assert "wrong" not in rejected["reason"]


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        pytest.param("Bearer ", 401, id="empty-bearer"),
        pytest.param("Bearer", 401, id="bearer-alone"),
        pytest.param("Basic YWxpY2U6eA==", 101, id="basic-is-not-ours"),
    ],
)
async def test_an_empty_bearer_never_falls_back_to_the_query_but_basic_is_ignored(
    authorization: str, status: int
) -> None:
    server = Server(relayd_settings(), authenticator=StaticTokens(TOKENS))
    request = wire.upgrade_request(
        path=f"/?token={TOKENS['alice']}", extra=[("Authorization", authorization)]
    )
    with structlog.testing.capture_logs() as events:
        async with running(server) as url:
            if status == 401:
                reply = await send_and_read(url, request)
            else:
                async with await open_raw(url, request) as stream:
                    reply, client_id = await read_welcome(stream)
                assert client_id == "alice"  # the query's token, read past the Basic header
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply
    if status == 401:
        assert reply.endswith(b"empty bearer token")
        assert [e["reason"] for e in events if e["event"] == "handshake.rejected"] == [
            "empty bearer token"
        ]


async def test_an_address_that_keeps_failing_authentication_gets_429_and_others_do_not() -> None:
    limits = {"max_auth_failures_per_ip": 3, "auth_failure_window_s": 3600.0}
    server = Server(relayd_settings(**limits), authenticator=StaticTokens(TOKENS))
    guesses = [("Authorization", f"Bearer guess-{n:016d}") for n in range(5)]
    with structlog.testing.capture_logs() as events:
        async with running(server) as url:
            replies = [
                await send_and_read(url, wire.upgrade_request(extra=[guess]), local_address=GUESSER)
                for guess in guesses
            ]
            # The right token from the same address is refused too: no more tries for now.
            right = wire.upgrade_request(extra=_bearer("alice"))
            replies.append(await send_and_read(url, right, local_address=GUESSER))
            async with connect(url, headers=_bearer("bob"), local_address=OTHER) as bob:
                assert bob.id == "bob"
            metrics = server.registry.get_sample_value("relayd_auth_failures_total")
    assert [reply[:12] for reply in replies] == [b"HTTP/1.1 401"] * 3 + [b"HTTP/1.1 429"] * 3
    assert replies[-1].endswith(b"too many failed authentications from this address")
    assert metrics == 3
    assert _refused(server, 401, "token") == 3
    assert _refused(server, 429, "max_auth_failures_per_ip") == 3
    rejected = [
        (e["status"], e["peer"].rpartition(":")[0])
        for e in events
        if e["event"] == "handshake.rejected"
    ]
    assert rejected == [(401, GUESSER)] * 3 + [(429, GUESSER)] * 3


GUESSER = "127.0.0.4"
OTHER = "127.0.0.5"


# -- JWT ------------------------------------------------------------------------------

SECRET = "an-hs256-secret-of-at-least-32-bytes!"


async def test_jwt_subject_becomes_the_id_and_bad_tokens_get_401_or_403() -> None:
    verifier = JWTVerifier(SECRET, "HS256", audience="relayd")
    now = int(time.time())

    def token(**claims: object) -> str:
        return jwt.encode({"sub": "carol", "exp": now + 60, "aud": "relayd", **claims}, SECRET)

    server = Server(relayd_settings(), authenticator=verifier)
    async with running(server) as url:
        async with connect(url + f"?token={token()}") as carol:
            assert carol.id == "carol"
        for bad, status in [(token(exp=now - 3600), 401), (token(aud="other"), 403)]:
            extra = [("Authorization", f"Bearer {bad}")]
            reply = await _send_and_read(url, wire.upgrade_request(extra=extra))
            assert reply.startswith(f"HTTP/1.1 {status} ".encode())
    # Both counted as the token's, the 403 apart from an origin's.
    assert (_refused(server, 401, "token"), _refused(server, 403, "token")) == (1, 1)
    assert _refused(server, 403, "origin") == 0


# -- TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> TLSSettings:
    directory = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(directory / "both.pem"))
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    return TLSSettings(cert_file=str(directory / "both.pem"), key_file=str(directory / "key.pem"))


async def test_wss_with_a_trusted_certificate(ca: trustme.CA, tls_files: TLSSettings) -> None:
    server = Server(relayd_settings(), tls=load_tls(tls_files))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with (
        running(server, scheme="wss") as url,
        connect(url, tls=client_context) as a,
        connect(url, tls=client_context, v1=True) as b,
    ):
        await a.send(b.id, "over TLS")
        assert (await b.recv_json())["message"] == "over TLS"


async def test_plain_ws_to_a_tls_port_is_refused_without_harm(
    ca: trustme.CA, tls_files: TLSSettings
) -> None:
    server = Server(relayd_settings(handshake_timeout_s=2.0), tls=load_tls(tls_files))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with running(server, scheme="wss") as url:
        reply = await _send_and_read(url.replace("wss://", "ws://"), wire.upgrade_request())
        assert not reply.startswith(b"HTTP/1.1 101")
        async with connect(url, tls=client_context) as client:
            assert len(client.id) == 22


# -- secrets never leave -----------------------------------------------------------------

MARKER = "SeCrEt-MaRkEr-0123456789"
#: Bytes a malformed request may carry anywhere: the faults of issue 8 (a space after
#: ?token=, a NUL after a bearer token, a space before a colon) and their neighbours.
JUNK = [" ", "\x00", "\r", "\n", "\t", ":", "\x7f", "\r\n ", "\r\n", "\r\n\r\n", "\xff", "%"]


async def _one_handshake(request: bytes, authenticator: Authenticator | None) -> bytes:
    """Serve ``request`` through a Gate over an in-memory stream; all relayd sent back."""
    log = structlog.get_logger("test")
    stats = Stats()
    events = MessageEvents(log, stats)
    router = LocalRouter(events, stats)
    limits = LimitsSettings(handshake_timeout_s=1.0)
    gate = Gate(router, limits, log, events=events, stats=stats, authenticator=authenticator)
    client, server = trio.testing.memory_stream_pair()
    received = bytearray()
    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        nursery.start_soon(gate, server)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await client.send_all(request)
        with trio.move_on_after(2.0):  # virtual time: a refusal, or the id frame
            while chunk := await client.receive_some():
                received += chunk
                if b"\r\n\r\n" in received and not received.startswith(b"HTTP/1.1 101"):
                    continue
        await client.aclose()
        await trio.testing.wait_all_tasks_blocked()
        gate.drain()
        router.close()
    return bytes(received)


def _authenticators() -> dict[str, Authenticator | None]:
    return {
        "off": None,
        "token": StaticTokens({"alice": "alice-secret-token"}),
        "jwt": JWTVerifier(SECRET, "HS256"),
    }


AUTHENTICATORS = _authenticators()


@settings(max_examples=150, deadline=None)
@given(
    junk=st.lists(st.tuples(st.integers(0, 500), st.sampled_from(JUNK)), max_size=4),
    where=st.sampled_from(["query", "bearer", "both", "jwt-header"]),
    mode=st.sampled_from(sorted(AUTHENTICATORS)),
)
def test_no_request_brings_a_token_into_a_log_line_or_a_response(
    junk: list[tuple[int, str]], where: str, mode: str
) -> None:
    """A marker in ?token= or Authorization, the request malformed at random: never echoed."""
    token = MARKER
    if where == "jwt-header":  # a JWT whose header quotes the marker (a made-up crit)
        token = jwt.encode(claims_for("x"), SECRET, headers={"crit": [MARKER]})
    target = f"/?token={token}" if where in ("query", "both") else "/"
    extra = [("User-Agent", "ua"), ("Origin", "https://o.example")]
    if where != "query":
        extra.append(("Authorization", f"Bearer {token}"))
    data = bytearray(wire.upgrade_request(path=target, extra=extra))
    for at, piece in sorted(junk, reverse=True):
        at = min(at, len(data) - 4)
        data[at:at] = piece.encode("latin-1")
    with structlog.testing.capture_logs() as events:
        reply = trio.run(
            _one_handshake,
            bytes(data),
            AUTHENTICATORS[mode],
            clock=trio.testing.MockClock(autojump_threshold=0),
        )
    logged = json.dumps([{k: str(v) for k, v in e.items()} for e in events])
    secret = MARKER.encode()
    assert secret not in reply
    assert MARKER not in logged, logged
    assert [e for e in events if e["event"] == "error"] == []


def claims_for(subject: str) -> dict[str, object]:
    return {"sub": subject, "exp": int(time.time()) + 60}
