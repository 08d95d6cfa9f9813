"""relayd.policy.auth and relayd.daemon.credentials: tokens in, identities or refusals out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr

from relayd.config import AuthSettings, TLSSettings
from relayd.daemon.credentials import load_authenticator, load_tls
from relayd.errors import ConfigError
from relayd.policy.auth import (
    Identity,
    JWTVerifier,
    StaticTokens,
    parse_tokens_file,
    token_from,
)
from relayd.wire.handshake import Refusal

SECRET = "an-hs256-secret-of-at-least-32-bytes!"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "exp": now + 60, **overrides}


# -- where the token comes from -----------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "target", "token"),
    [
        ({"authorization": "Bearer abc"}, "/", "abc"),
        ({"authorization": "bearer  abc "}, "/", "abc"),
        ({}, "/?token=xyz", "xyz"),
        ({}, "/chat?room=1&token=xyz", "xyz"),
        ({"authorization": "Bearer abc"}, "/?token=xyz", "abc"),  # the header wins
        ({"authorization": "Basic dXNlcjpwYXNz"}, "/", None),
        ({}, "/", None),
        ({"authorization": "Bearer "}, "/", None),
    ],
)
def test_token_from(headers: dict[str, str], target: str, token: str | None) -> None:
    assert token_from(headers, target) == token


# -- static tokens ------------------------------------------------------------------


def test_static_tokens_name_their_subject() -> None:
    tokens = StaticTokens({"alice": "a-secret", "bob": "b-secret"})
    assert tokens.authenticate("a-secret") == Identity("alice")
    assert tokens.authenticate("b-secret") == Identity("bob")
    assert tokens.authenticate("c-secret") == Refusal(401, "invalid token")
    assert tokens.authenticate(None).status == 401  # type: ignore[union-attr]


def test_tokens_file_format() -> None:
    text = "# who token\nalice a-secret\n\n  bob   b-secret  # trailing comment\n"
    assert parse_tokens_file(text) == {"alice": "a-secret", "bob": "b-secret"}
    with pytest.raises(ValueError, match="line 2") as error:
        parse_tokens_file("alice a\nbob\n")
    assert "bob" not in str(error.value)  # never echo the file's content


# -- JWT ----------------------------------------------------------------------------


def test_hs256_token_names_its_subject() -> None:
    verifier = JWTVerifier(SECRET, "HS256")
    assert verifier.authenticate(jwt.encode(claims(), SECRET, "HS256")) == Identity("alice")


@pytest.mark.parametrize(
    ("token_claims", "key", "refusal"),
    [
        (claims(exp=int(time.time()) - 3600), SECRET, Refusal(401, "token expired")),
        (claims(nbf=int(time.time()) + 3600), SECRET, Refusal(401, "token not yet valid")),
        (claims(), "another-secret-of-at-least-32-bytes!!", None),
        ({"sub": "alice"}, SECRET, None),  # no exp
        ({"exp": int(time.time()) + 60}, SECRET, None),  # no sub
    ],
)
def test_bad_hs256_tokens_are_refused_with_401(
    token_claims: dict[str, Any], key: str, refusal: Refusal | None
) -> None:
    result = JWTVerifier(SECRET, "HS256").authenticate(jwt.encode(token_claims, key, "HS256"))
    assert isinstance(result, Refusal)
    assert result.status == 401
    if refusal is not None:
        assert result == refusal


def test_leeway_tolerates_clock_skew() -> None:
    just_expired = jwt.encode(claims(exp=int(time.time()) - 5), SECRET, "HS256")
    assert JWTVerifier(SECRET, "HS256", leeway_s=30).authenticate(just_expired) == Identity("alice")


def test_audience_and_issuer_mismatch_is_403() -> None:
    verifier = JWTVerifier(SECRET, "HS256", audience="relayd", issuer="https://idp.example")
    good = claims(aud="relayd", iss="https://idp.example")
    assert verifier.authenticate(jwt.encode(good, SECRET, "HS256")) == Identity("alice")
    for bad in (claims(aud="other", iss="https://idp.example"), claims(aud="relayd", iss="x")):
        result = verifier.authenticate(jwt.encode(bad, SECRET, "HS256"))
        assert isinstance(result, Refusal)
        assert result.status == 403


def test_the_algorithm_is_never_taken_from_the_token() -> None:
    unsigned = jwt.encode(claims(), "", "none")
    assert JWTVerifier(SECRET, "HS256").authenticate(unsigned).status == 401  # type: ignore[union-attr]


def _pem_public(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_public_key_algorithms(algorithm: str) -> None:
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if algorithm == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private = ec.generate_private_key(ec.SECP256R1())
    verifier = JWTVerifier(_pem_public(private), algorithm)
    assert verifier.authenticate(jwt.encode(claims(), private, algorithm)) == Identity("alice")
    # An HS256 token "signed" with the public key text must not pass.
    forged = jwt.encode(claims(), SECRET, "HS256")
    assert isinstance(verifier.authenticate(forged), Refusal)


def test_subject_must_fit_an_id() -> None:
    token = jwt.encode(claims(sub="x" * 300), SECRET, "HS256")
    assert JWTVerifier(SECRET, "HS256").authenticate(token).status == 401  # type: ignore[union-attr]


# -- loading credentials from settings ----------------------------------------------


def test_auth_off_needs_nothing() -> None:
    assert load_authenticator(AuthSettings()) is None


def test_tokens_from_settings_and_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("bob b-secret\n")
    settings = AuthSettings(
        mode="token", tokens={"alice": SecretStr("a-secret")}, tokens_file=str(path)
    )
    authenticator = load_authenticator(settings)
    assert authenticator is not None
    assert authenticator.authenticate("a-secret") == Identity("alice")
    assert authenticator.authenticate("b-secret") == Identity("bob")


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        (AuthSettings(mode="token"), "auth.mode"),
        (AuthSettings(mode="token", tokens_file="/nonexistent/tokens"), "auth.tokens_file"),
        (AuthSettings(mode="jwt"), "auth.jwt_secret"),
        (AuthSettings(mode="jwt", jwt_algorithm="RS256"), "auth.jwt_public_key_file"),
        (
            AuthSettings(mode="jwt", jwt_algorithm="ES256", jwt_public_key_file="/nonexistent"),
            "auth.jwt_public_key_file",
        ),
    ],
)
def test_missing_credentials_are_config_errors(settings: AuthSettings, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_authenticator(settings)
    assert error.value.key == key


def test_jwt_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    authenticator = load_authenticator(AuthSettings(mode="jwt", jwt_secret_file=str(path)))
    assert authenticator is not None
    assert authenticator.authenticate(jwt.encode(claims(), SECRET, "HS256")) == Identity("alice")


def test_tls_needs_both_files_and_loadable_ones(tmp_path: Path) -> None:
    assert load_tls(TLSSettings()) is None
    with pytest.raises(ValueError, match="together"):
        TLSSettings(cert_file="cert.pem")
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    with pytest.raises(ConfigError) as error:
        load_tls(
            TLSSettings(cert_file=str(tmp_path / "cert.pem"), key_file=str(tmp_path / "key.pem"))
        )
    assert error.value.key == "tls.cert_file"
