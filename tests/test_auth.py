"""relayd.policy.auth and relayd.daemon.credentials: tokens in, identities or refusals out."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from relayd.config import AuthSettings, TLSSettings
from relayd.daemon.credentials import load_authenticator, load_tls
from relayd.errors import ConfigError
from relayd.policy.auth import (
    MIN_TOKEN_CHARS,
    Authenticator,
    Identity,
    JWTVerifier,
    StaticTokens,
    jwt_key,
    parse_tokens_file,
    token_from,
)
from relayd.wire.handshake import Refusal
from tests.keys import PrivateKey, ec_key, pem_private, pem_public, rsa_key

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
        ({}, "/", None),
        # An empty bearer token is a token, and a bad one: never ?token= instead.
        ({"authorization": "Bearer "}, "/", ""),
        ({"authorization": "Bearer"}, "/?token=xyz", ""),
        ({"authorization": "bearer \t "}, "/?token=xyz", ""),
        ({"authorization": "Bearer\tabc"}, "/?token=xyz", "abc"),  # a tab ends the scheme too
        ({"authorization": "Bearer\tabc\tdef"}, "/", "abc\tdef"),  # the first one does
        ({"authorization": "Bearer X-token-X"}, "/", "X-token-X"),
        # Only space and tab are HTTP's whitespace: "\xa0" ends a UTF-8 "à".
        ({"authorization": "Bearer " + "voilà".encode().decode("latin-1")}, "/", "voilà"),
        ({"authorization": "Bearer " + "à-la".encode().decode("latin-1")}, "/", "à-la"),
        # Another scheme is not relayd's (browsers resend HTTP basic credentials):
        # ignored, so ?token= is read, as docs/security.md says.
        ({"authorization": "Basic dXNlcjpwYXNz"}, "/", None),
        ({"authorization": "Basic dXNlcjpwYXNz"}, "/?token=xyz", "xyz"),
        # A token that is not ASCII: its UTF-8 bytes, which the header holds as
        # latin-1 text, are the same token as in the query.
        ({"authorization": "Bearer " + "jeton-é✓".encode().decode("latin-1")}, "/", "jeton-é✓"),
        ({}, "/?token=jeton-%C3%A9%E2%9C%93", "jeton-é✓"),
        ({"authorization": "Bearer caf\xe9"}, "/", "caf\ufffd"),  # not UTF-8: as the query reads it
        ({}, "/?token=caf%E9", "caf\ufffd"),
        # A "+" is itself, as RFC 3986 reads a query: a base64 token (openssl rand
        # -base64 24, as docs/security.md suggests) sent as it is; forms' "+ for a
        # space" made it another token, refused.
        ({}, "/?token=Udd5cafpoYgY+cyvdn/mwpgRNl+QTujd", "Udd5cafpoYgY+cyvdn/mwpgRNl+QTujd"),
        ({}, "/?token=a%2Bb+c", "a+b+c"),
        ({}, "/?token=&token=xyz", "xyz"),  # the first that is not empty
        ({}, "/?token=", None),
        ({}, "/?tokens=xyz&token", None),
        ({}, "/?%74oken=xyz", "xyz"),  # a name in escapes is the name
    ],
)
def test_token_from(headers: dict[str, str], target: str, token: str | None) -> None:
    assert token_from(headers, target) == token


# -- static tokens ------------------------------------------------------------------

A_TOKEN = "a-secret-token-0123456789"
B_TOKEN = "b-secret-token-0123456789"
C_TOKEN = "c-secret-token-0123456789"


def test_static_tokens_name_their_subject() -> None:
    tokens = StaticTokens({"alice": A_TOKEN, "bob": B_TOKEN})
    assert tokens.authenticate(A_TOKEN) == Identity("alice")
    assert tokens.authenticate(B_TOKEN) == Identity("bob")
    assert tokens.authenticate("c-secret-token-0123456789") == Refusal(401, "invalid token")
    assert tokens.authenticate(None) == Refusal(
        401, "no bearer token (Authorization header or ?token=)"
    )
    assert tokens.authenticate("") == Refusal(401, "empty bearer token")


def test_static_tokens_shorter_than_the_minimum_are_refused() -> None:
    assert MIN_TOKEN_CHARS == 16
    StaticTokens({"alice": "x" * 16})
    with pytest.raises(ValueError, match=r"'bob'.*16 characters") as error:
        StaticTokens({"alice": "x" * 16, "bob": "fifteen-chars-x"})
    assert "fifteen" not in str(error.value)  # the subject, never the token


def test_tokens_file_format() -> None:
    text = "# who token\nalice a-secret\n\n  bob   b-secret  # trailing comment\n\t# indented\n"
    assert parse_tokens_file(text) == [("alice", "a-secret"), ("bob", "b-secret")]
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
        (
            claims(),
            "another-secret-of-at-least-32-bytes!!",
            Refusal(401, "invalid token: bad signature"),
        ),
        ({"sub": "alice"}, SECRET, Refusal(401, "invalid token: no exp claim")),
        ({"exp": int(time.time()) + 60}, SECRET, Refusal(401, "invalid token: no sub claim")),
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
    assert JWTVerifier(SECRET, "HS256").authenticate(unsigned) == Refusal(
        401, "invalid token: the algorithm is not allowed"
    )


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_public_key_algorithms(algorithm: str) -> None:
    private: PrivateKey = rsa_key() if algorithm == "RS256" else ec_key()
    verifier = JWTVerifier(pem_public(private), algorithm)
    assert verifier.authenticate(jwt.encode(claims(), private, algorithm)) == Identity("alice")
    # An HS256 token "signed" with the public key text must not pass.
    forged = jwt.encode(claims(), SECRET, "HS256")
    assert isinstance(verifier.authenticate(forged), Refusal)


@pytest.mark.parametrize(
    ("algorithm", "material", "reason"),
    [
        pytest.param("RS256", lambda: SECRET, "no PEM block", id="RS256-secret"),
        pytest.param(
            "RS256",
            lambda: pem_public(ec_key()),
            "RSA",
            id="RS256-EC",
        ),
        pytest.param("RS256", lambda: pem_private(rsa_key()), "private key", id="RS256-private"),
        pytest.param(
            "RS256",
            lambda: pem_public(rsa_key(1024)),
            "1024 bits",
            id="RS256-1024-bits",
        ),
        pytest.param("ES256", lambda: pem_public(rsa_key()), "EC public key", id="ES256-RSA"),
        pytest.param(
            "ES256",
            lambda: pem_public(ec_key(ec.SECP384R1())),
            "P-256",
            id="ES256-P384",
        ),
        pytest.param(
            "ES256",
            lambda: pem_private(ec_key()),
            "private key",
            id="ES256-private",
        ),
        pytest.param("HS256", lambda: "too-short", "32 bytes", id="HS256-short"),
        pytest.param("HS256", lambda: pem_public(rsa_key()), "PEM", id="HS256-a-public-key"),
    ],
)
def test_a_key_that_is_not_usable_for_the_algorithm_is_refused_at_load(
    algorithm: str, material: Callable[[], str], reason: str
) -> None:
    text = material()
    with pytest.raises(ValueError, match=reason) as error:
        jwt_key(algorithm, text)
    assert text.strip().splitlines()[-1] not in str(error.value)  # never quoted
    with pytest.raises(ValueError, match=reason):
        JWTVerifier(text, algorithm)


@settings(max_examples=300)
@given(
    header=st.dictionaries(
        st.sampled_from(["alg", "typ", "kid", "crit", "jku", "x5u", "b64"]),
        st.one_of(st.text(), st.integers(), st.none(), st.lists(st.text())),
    ),
    payload=st.one_of(
        st.dictionaries(st.text(), st.one_of(st.text(), st.integers(), st.floats(), st.none())),
        st.text(),
        st.integers(),
    ),
    signature=st.binary(max_size=300),
    algorithm=st.sampled_from(["HS256", "RS256", "ES256"]),
)
def test_no_token_makes_verification_raise_or_quote_it(
    header: dict[str, object], payload: object, signature: bytes, algorithm: str
) -> None:
    """Whatever a token holds, it is refused with one of relayd's own reasons, never raised."""
    marker = "MARKER0123456789"

    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    header = {**header, "x": marker}
    token = ".".join(
        [part(header), part(payload), base64.urlsafe_b64encode(signature).decode().rstrip("=")]
    )
    result = VERIFIERS[algorithm].authenticate(token)
    assert isinstance(result, Refusal), result
    assert result.status in (401, 403)
    assert marker not in result.reason
    assert token[:20] not in result.reason


VERIFIERS = {
    "HS256": JWTVerifier(SECRET, "HS256", audience="relayd", issuer="idp"),
    "RS256": JWTVerifier(pem_public(rsa_key()), "RS256"),
    "ES256": JWTVerifier(pem_public(ec_key()), "ES256"),
}


def test_subject_must_fit_an_id() -> None:
    token = jwt.encode(claims(sub="x" * 300), SECRET, "HS256")
    assert JWTVerifier(SECRET, "HS256").authenticate(token).status == 401  # type: ignore[union-attr]


# -- loading credentials from settings ----------------------------------------------


def test_auth_off_needs_nothing() -> None:
    assert load_authenticator(AuthSettings()) is None


def static_tokens(tmp_path: Path, table: dict[str, str], file: str) -> Authenticator:
    """What relayd loads from ``auth.tokens`` = ``table`` and a tokens file holding ``file``."""
    path = tmp_path / "tokens"
    path.write_text(file)
    tokens = {subject: SecretStr(token) for subject, token in table.items()}
    authenticator = load_authenticator(
        AuthSettings(mode="token", tokens=tokens, tokens_file=str(path))
    )
    assert authenticator is not None
    return authenticator


def test_tokens_from_settings_and_file(tmp_path: Path) -> None:
    authenticator = static_tokens(tmp_path, {"alice": A_TOKEN}, f"bob {B_TOKEN}\n")
    assert authenticator.authenticate(A_TOKEN) == Identity("alice")
    assert authenticator.authenticate(B_TOKEN) == Identity("bob")


@pytest.mark.parametrize("where", ["tokens", "tokens_file"])
def test_a_short_token_is_a_config_error_naming_its_subject(where: str, tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("bob short-secret\n")
    settings = (
        AuthSettings(mode="token", tokens={"bob": SecretStr("short-secret")})
        if where == "tokens"
        else AuthSettings(mode="token", tokens_file=str(path))
    )
    with pytest.raises(ConfigError) as error:
        load_authenticator(settings)
    assert error.value.key == f"auth.{where}"
    assert "'bob'" in str(error.value)
    assert "short-secret" not in str(error.value)


@pytest.mark.parametrize("where", ["tokens", "tokens_file"])
def test_a_subject_longer_than_an_id_may_be_is_a_config_error(where: str, tmp_path: Path) -> None:
    # A JWT's sub is held to 256 characters; a static token's subject was not, and its
    # client's id could then not be named by the server API nor paged past in /api/ids.
    subject = "u" * 257
    path = tmp_path / "tokens"
    path.write_text(f"{subject} {A_TOKEN}\n")
    settings = (
        AuthSettings(mode="token", tokens={subject: SecretStr(A_TOKEN)})
        if where == "tokens"
        else AuthSettings(mode="token", tokens_file=str(path))
    )
    with pytest.raises(ConfigError) as error:
        load_authenticator(settings)
    assert error.value.key == f"auth.{where}"
    assert "is not 1 to 256 characters" in str(error.value)
    assert A_TOKEN not in str(error.value)
    assert static_tokens(tmp_path, {"u" * 256: A_TOKEN}, "").authenticate(A_TOKEN) == Identity(
        "u" * 256
    )


@pytest.mark.parametrize(
    ("algorithm", "write", "key"),
    [
        ("RS256", lambda: SECRET, "auth.jwt_public_key_file"),
        ("RS256", lambda: pem_private(rsa_key()), "auth.jwt_public_key_file"),
        ("ES256", lambda: pem_public(rsa_key()), "auth.jwt_public_key_file"),
        ("HS256", lambda: "a-short-secret", "auth.jwt_secret_file"),
    ],
)
def test_a_key_file_of_the_wrong_kind_is_a_config_error(
    algorithm: str, write: Callable[[], str], key: str, tmp_path: Path
) -> None:
    path = tmp_path / "key"
    path.write_text(write())
    field = "jwt_secret_file" if algorithm == "HS256" else "jwt_public_key_file"
    settings = AuthSettings.model_validate(
        {"mode": "jwt", "jwt_algorithm": algorithm, field: str(path)}
    )
    with pytest.raises(ConfigError) as error:
        load_authenticator(settings)
    assert error.value.key == key


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


# -- what the client is told --------------------------------------------------------


@pytest.mark.parametrize(
    "authenticator",
    [StaticTokens({"alice": "a-secret-of-16-chars"}), JWTVerifier(SECRET, "HS256")],
    ids=["static", "jwt"],
)
def test_a_handshake_without_a_token_is_told_where_to_put_one(authenticator: Any) -> None:
    assert authenticator.authenticate(None) == Refusal(
        401, "no bearer token (Authorization header or ?token=)"
    )


def test_a_token_for_another_audience_is_told_so() -> None:
    verifier = JWTVerifier(SECRET, "HS256", audience="relayd")
    result = verifier.authenticate(jwt.encode(claims(aud="other"), SECRET, "HS256"))
    assert isinstance(result, Refusal)
    assert result.status == 403
    assert result.reason.startswith("token not for this server: ")


def test_a_token_with_a_bad_signature_is_told_it_is_invalid() -> None:
    forged = jwt.encode(claims(), "another-secret-of-at-least-32-bytes!!", "HS256")
    result = JWTVerifier(SECRET, "HS256").authenticate(forged)
    assert isinstance(result, Refusal)
    assert result.status == 401
    assert result.reason.startswith("invalid token")


@pytest.mark.parametrize("length", [1, 22, 256])
def test_a_subject_of_1_to_256_characters_is_the_id(length: int) -> None:
    token = jwt.encode(claims(sub="s" * length), SECRET, "HS256")
    assert JWTVerifier(SECRET, "HS256").authenticate(token) == Identity("s" * length)


@pytest.mark.parametrize(
    "sub", ["", "s" * 257, "\ud800x"], ids=["empty", "257-characters", "lone-surrogate"]
)
def test_a_subject_that_cannot_be_an_id_is_refused(sub: str) -> None:
    token = jwt.encode(claims(sub=sub), SECRET, "HS256")
    assert JWTVerifier(SECRET, "HS256").authenticate(token) == Refusal(
        401, "invalid token: sub must be a string of 1 to 256 characters"
    )


def test_without_leeway_a_token_is_expired_from_its_exp_second_on() -> None:
    token = jwt.encode(claims(exp=int(time.time())), SECRET, "HS256")
    assert JWTVerifier(SECRET, "HS256").authenticate(token) == Refusal(401, "token expired")


def test_a_comment_may_hold_a_hash_sign() -> None:
    text = "alice a-secret  # rotated 2024-05 # see ticket #12\nbob b-secret\t#tabbed\n"
    assert parse_tokens_file(text) == [("alice", "a-secret"), ("bob", "b-secret")]


def test_a_hash_sign_inside_a_token_is_part_of_it(tmp_path: Path) -> None:
    # Cut at the "#", this token was 16 characters: long enough to load, and never
    # the one the client sends.
    token = "0123456789abcdef#ghij"
    authenticator = static_tokens(tmp_path, {}, f"alice {token}\n")
    assert authenticator.authenticate(token) == Identity("alice")
    assert authenticator.authenticate(token.split("#")[0]) == Refusal(401, "invalid token")


def test_a_subject_may_have_several_tokens_to_rotate_one(tmp_path: Path) -> None:
    file = f"alice {A_TOKEN}  # the old one\nalice {B_TOKEN}\n"
    authenticator = static_tokens(tmp_path, {"alice": C_TOKEN}, file)
    for token in (A_TOKEN, B_TOKEN, C_TOKEN):
        assert authenticator.authenticate(token) == Identity("alice")


@pytest.mark.parametrize("table", [False, True])
def test_one_token_for_two_subjects_is_a_config_error_naming_both(
    table: bool, tmp_path: Path
) -> None:
    file = f"bob {A_TOKEN}\n" if table else f"alice {A_TOKEN}\nbob {A_TOKEN}\n"
    with pytest.raises(ConfigError) as error:
        static_tokens(tmp_path, {"alice": A_TOKEN} if table else {}, file)
    assert error.value.key == "auth.tokens_file"
    assert "'alice'" in str(error.value)
    assert "'bob'" in str(error.value)
    assert A_TOKEN not in str(error.value)


# -- what the operator is told about a key ------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "material", "message"),
    [
        pytest.param(
            "HS256", lambda: "s" * 31, "the HS256 secret is shorter than 32 bytes", id="hs256-31"
        ),
        pytest.param(
            "HS256",
            lambda: pem_public(rsa_key()),
            "the HS256 secret is a PEM key; RS256 or ES256 take a public key",
            id="hs256-pem",
        ),
        pytest.param(
            "RS256",
            lambda: pem_private(rsa_key()),
            "not a PEM public key (a private key: give the issuer's public key)",
            id="private",
        ),
        pytest.param(
            "RS256",
            lambda: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            "not a PEM public key (a certificate: give the public key it holds)",
            id="certificate",
        ),
        pytest.param(
            "ES256",
            lambda: "-----BEGIN FOO-----\nabcd\n-----END FOO-----\n",
            "not a PEM public key (a PEM block of another kind)",
            id="other-pem",
        ),
        pytest.param(
            "ES256",
            lambda: SECRET,
            "not a PEM public key (no PEM block: a secret or another file?)",
            id="secret",
        ),
        pytest.param(
            "RS256",
            lambda: pem_public(ec_key()),
            "RS256 needs an RSA public key; this is another kind of key",
            id="rs256-ec",
        ),
        pytest.param(
            "ES256",
            lambda: pem_public(rsa_key()),
            "ES256 needs an EC public key; this is another kind of key",
            id="es256-rsa",
        ),
        pytest.param(
            "PS256", lambda: pem_public(rsa_key()), "unsupported algorithm PS256", id="ps256"
        ),
    ],
)
def test_each_unusable_key_is_told_exactly_what_is_wrong(
    algorithm: str, material: Callable[[], str], message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        jwt_key(algorithm, material())


def test_an_hs256_secret_of_32_bytes_is_enough() -> None:
    assert jwt_key("HS256", "s" * 32) == "s" * 32


def test_a_verifier_takes_a_public_key_already_parsed() -> None:
    private = rsa_key()
    verifier = JWTVerifier(private.public_key(), "RS256")
    token = jwt.encode(claims(), private, "RS256")
    assert verifier.authenticate(token) == Identity("alice")


@pytest.mark.parametrize(
    ("token", "refusal"),
    [
        pytest.param(
            lambda: jwt.encode(claims(iss="https://other.example"), SECRET, "HS256"),
            Refusal(403, "token not for this server: wrong issuer"),
            id="issuer",
        ),
        pytest.param(lambda: "not.a.token", Refusal(401, "invalid token: malformed"), id="junk"),
        pytest.param(
            lambda: jwt.encode(claims(iat="yesterday"), SECRET, "HS256"),
            Refusal(401, "invalid token: iat is not a number"),
            id="iat",
        ),
    ],
)
def test_each_kind_of_bad_jwt_is_told_its_reason(
    token: Callable[[], str], refusal: Refusal
) -> None:
    verifier = JWTVerifier(SECRET, "HS256", issuer="https://idp.example")
    assert verifier.authenticate(token()) == refusal
