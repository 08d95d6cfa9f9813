"""Origin allowlist, authentication and TLS, through real sockets on loopback."""

from __future__ import annotations

import json
import ssl
import time

import jwt
import pytest
import structlog
import trustme

from relayd.config import ServerSettings, TLSSettings
from relayd.daemon.credentials import load_tls
from relayd.daemon.server import Server
from relayd.policy.auth import JWTVerifier, StaticTokens
from tests import wire
from tests.client import connect, running, settings
from tests.test_server import _send_and_read

TOKENS = {"alice": "alice-secret-token", "bob": "bob-secret-token"}


def _with_origins(*origins: str) -> Server:
    base = settings()
    server = base.server.model_copy(update={"allowed_origins": origins})
    return Server(base.model_copy(update={"server": server}))


# -- origin allowlist -----------------------------------------------------------------


async def test_only_allowed_origins_may_connect() -> None:
    with structlog.testing.capture_logs() as events:
        async with running(_with_origins("https://chat.example")) as url:
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


async def test_by_default_every_origin_may_connect() -> None:
    assert ServerSettings().allowed_origins == ()
    async with (
        running(Server(settings())) as url,
        connect(url, headers=[("Origin", "https://anywhere.example")]) as client,
    ):
        assert len(client.id) == 22


# -- static tokens --------------------------------------------------------------------


def _bearer(subject: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {TOKENS[subject]}")]


async def test_with_tokens_the_subject_is_the_id_and_every_connection_receives() -> None:
    server = Server(settings(), authenticator=StaticTokens(TOKENS))
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


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="no-token"),
        pytest.param([("Authorization", "Bearer wrong")], id="wrong-token"),
        pytest.param([("Authorization", "Basic YWxpY2U6eA==")], id="not-bearer"),
    ],
)
async def test_without_a_good_token_the_handshake_gets_401(extra: list[tuple[str, str]]) -> None:
    server = Server(settings(), authenticator=StaticTokens(TOKENS))
    with structlog.testing.capture_logs() as events:
        async with running(server) as url:
            reply = await _send_and_read(url, wire.upgrade_request(extra=extra))
            assert reply.startswith(b"HTTP/1.1 401 ")
            async with connect(url, headers=_bearer("bob")) as bob:  # others unaffected
                assert bob.id == "bob"
    [rejected] = [e for e in events if e["event"] == "handshake.rejected"]
    assert rejected["status"] == 401
    assert "wrong" not in rejected["reason"]


# -- JWT ------------------------------------------------------------------------------

SECRET = "an-hs256-secret-of-at-least-32-bytes!"


async def test_jwt_subject_becomes_the_id_and_bad_tokens_get_401_or_403() -> None:
    verifier = JWTVerifier(SECRET, "HS256", audience="relayd")
    now = int(time.time())

    def token(**claims: object) -> str:
        return jwt.encode({"sub": "carol", "exp": now + 60, "aud": "relayd", **claims}, SECRET)

    async with running(Server(settings(), authenticator=verifier)) as url:
        async with connect(url + f"?token={token()}") as carol:
            assert carol.id == "carol"
        for bad, status in [(token(exp=now - 3600), 401), (token(aud="other"), 403)]:
            extra = [("Authorization", f"Bearer {bad}")]
            reply = await _send_and_read(url, wire.upgrade_request(extra=extra))
            assert reply.startswith(f"HTTP/1.1 {status} ".encode())


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
    server = Server(settings(), tls=load_tls(tls_files))
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
    server = Server(settings(handshake_timeout_s=2.0), tls=load_tls(tls_files))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with running(server, scheme="wss") as url:
        reply = await _send_and_read(url.replace("wss://", "ws://"), wire.upgrade_request())
        assert not reply.startswith(b"HTTP/1.1 101")
        async with connect(url, tls=client_context) as client:
            assert len(client.id) == 22
