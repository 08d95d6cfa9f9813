"""Who a client is: a bearer token from the handshake, checked without I/O.

With authentication on (``auth.mode``), every handshake must carry a token,
either as ``Authorization: Bearer <token>`` or, for browsers (which cannot set
headers on a WebSocket), as ``?token=<token>`` in the URL. The token names a
subject, and the subject is the client's id: one id may hold several
connections (each receives every message to it), and nobody can send as
anyone else, because the sender's id is never taken from the client.

Two kinds of token:

* :class:`StaticTokens`: opaque secrets listed by the operator, each for one
  subject (``auth.tokens`` in the config, or ``auth.tokens_file``).
* :class:`JWTVerifier`: JSON Web Tokens signed with HS256 (a shared secret) or
  RS256/ES256 (the issuer's public key), with ``exp`` and ``sub`` required,
  ``nbf`` honoured, and the audience and issuer checked when configured.

A refusal is a :class:`Refusal` with the HTTP status for the handshake (401:
no or bad token; 403: a good token for another audience or issuer) and a
reason for the log. Neither ever contains the token, nor anything taken from
it: every reason is one of a fixed set, and no error raised while a token is
checked escapes (an unexpected one refuses the token with 401).

Credentials fail closed at load: :func:`jwt_key` parses and type-checks the
key for the configured algorithm (an RSA public key of at least
:data:`MIN_RSA_KEY_BITS` for RS256, a P-256 public key for ES256, a secret of
at least :data:`MIN_HS256_SECRET_BYTES` for HS256), and :class:`StaticTokens`
refuses tokens shorter than :data:`MIN_TOKEN_CHARS`. Both raise
:class:`ValueError` with a message that names what is wrong but never the
secret; :mod:`relayd.daemon.credentials` turns it into a config error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Final, Protocol
from urllib.parse import unquote, urlsplit

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from relayd.wire.dialects import MAX_ID_CHARS
from relayd.wire.handshake import Refusal

__all__ = [
    "MIN_HS256_SECRET_BYTES",
    "MIN_RSA_KEY_BITS",
    "MIN_TOKEN_CHARS",
    "Authenticator",
    "Identity",
    "JWTVerifier",
    "StaticTokens",
    "bearer",
    "jwt_key",
    "parse_tokens_file",
    "token_from",
]

#: The shortest static token accepted: 16 characters (96 bits and more when
#: drawn at random from letters and digits). Shorter ones can be guessed.
MIN_TOKEN_CHARS: Final = 16
#: The shortest HS256 secret accepted, in UTF-8 bytes: RFC 7518 §3.2 requires
#: a key at least as long as the hash (256 bits).
MIN_HS256_SECRET_BYTES: Final = 32
#: The smallest RSA key accepted for RS256 (RFC 7518 §3.3: 2048 bits or larger).
MIN_RSA_KEY_BITS: Final = 2048


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated client; ``subject`` is its id."""

    subject: str


class Authenticator(Protocol):
    """Turns the token a handshake carried into an identity, or refuses it."""

    def authenticate(self, token: str | None) -> Identity | Refusal:
        """Check ``token`` (None when the handshake carried none)."""


#: HTTP's whitespace (RFC 9110's OWS).
_HTTP_SPACE: Final = " \t"


def bearer(headers: Mapping[str, str]) -> str | None:
    """The credential of an ``Authorization: Bearer`` header; None for another scheme or none.

    ``Bearer`` in any case; the scheme ends at the first space or tab (RFC 7235
    asks for a space; a tab taken for part of the scheme would read as no token).
    An empty credential is ``""``. The header's value, read as latin-1 as HTTP
    reads header bytes, is read back from its bytes as UTF-8, as ``?token=`` is
    (:func:`token_from`), so that a credential has one spelling in either place; bytes
    that are not UTF-8 become U+FFFD and match nothing.

    Args:
        headers: request headers, names in lower case, values read as latin-1.
    """
    # str.strip() would also take "\xa0", the last byte of a UTF-8 "à" read as latin-1.
    value = headers.get("authorization", "").strip(_HTTP_SPACE)
    scheme = value.partition(" ")[0].partition("\t")[0]
    if scheme.lower() != "bearer":
        return None
    credential = value[len(scheme) :].strip(_HTTP_SPACE)
    return credential.encode("latin-1").decode("utf-8", "replace")


def token_from(headers: Mapping[str, str], target: str) -> str | None:
    """The bearer token of a handshake: the Authorization header, else ``?token=``.

    ``Authorization: Bearer <token>`` (:func:`bearer`) wins; an empty bearer
    token is ``""``, which no authenticator accepts: relayd never falls back to
    ``?token=`` from a bearer header. Any other scheme (``Basic``, which
    browsers resend on every request to a site behind HTTP basic
    authentication, WebSocket handshakes included) is not a relayd credential
    and is ignored, so ``?token=`` is read then.

    ``?token=`` is the first non-empty one, its ``%XX`` escapes read as UTF-8
    (bytes that are not become U+FFFD). A ``+`` in it is a ``+``, as RFC 3986
    reads a query: HTML forms' encoding, where it stands for a space, would
    turn the ``+`` of a base64 token (``openssl rand -base64 24``, as
    docs/security.md suggests) into a space and refuse it, and no token holds
    a space.

    Args:
        headers: request headers, names in lower case, values read as latin-1.
        target: the request target (path and query).
    """
    token = bearer(headers)
    if token is not None:
        return token
    for pair in urlsplit(target).query.split("&"):
        name, _, value = pair.partition("=")
        if value and unquote(name) == "token":
            return unquote(value)
    return None


_MISSING: Final = Refusal(401, "no bearer token (Authorization header or ?token=)")
_EMPTY: Final = Refusal(401, "empty bearer token")
_INVALID: Final = Refusal(401, "invalid token")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class StaticTokens:
    """Opaque bearer tokens, each naming one subject.

    A subject may have several tokens (``auth.tokens_file`` may list it on
    several lines, and beside ``auth.tokens``), so that a token can be
    rotated without an outage: add the new one, move the clients over,
    remove the old one, reloading after each step.

    Tokens are kept as SHA-256 digests and compared in constant time, so
    neither memory dumps nor response timing give a token away.

    Args:
        tokens: subject -> token, or (subject, token) pairs.

    Raises:
        ValueError: a token is shorter than :data:`MIN_TOKEN_CHARS`, or one token
            is given to two subjects, which would make its holder's id depend on
            the order of the lines (the message names the subjects, never the token).
    """

    def __init__(self, tokens: Mapping[str, str] | Iterable[tuple[str, str]]) -> None:
        pairs = list(tokens.items() if isinstance(tokens, Mapping) else tokens)
        owners: dict[bytes, str] = {}
        for subject, token in pairs:
            if not 0 < len(subject) <= MAX_ID_CHARS:
                # An id a JWT could not give: the server API could not name it, and
                # /api/ids could not page past it.
                raise ValueError(
                    f"the subject {subject[:40]!r}{'...' if len(subject) > 40 else ''}"
                    f" is not 1 to {MAX_ID_CHARS} characters"
                )
            if len(token) < MIN_TOKEN_CHARS:
                raise ValueError(
                    f"the token for {subject!r} is shorter than {MIN_TOKEN_CHARS} characters"
                )
            owner = owners.setdefault(_digest(token), subject)
            if owner != subject:
                raise ValueError(f"one token is given to both {owner!r} and {subject!r}")
        self._subjects = list(owners.items())

    def authenticate(self, token: str | None) -> Identity | Refusal:  # noqa: D102
        if token is None:
            return _MISSING
        if not token:
            return _EMPTY
        presented = _digest(token)
        found = None
        for digest, subject in self._subjects:  # no early exit: constant time
            if hmac.compare_digest(digest, presented):
                found = subject
        return _INVALID if found is None else Identity(found)


def parse_tokens_file(text: str) -> list[tuple[str, str]]:
    """Parse a tokens file: one ``subject token`` pair per line.

    A ``#`` that begins a line or follows a space or tab begins a comment, as in
    a shell; one inside a token is part of it, so that a token holding ``#`` is
    never silently cut short. A subject may appear on several lines, each a
    token of its own.

    Raises:
        ValueError: a line is not exactly two fields (the message gives its number
            but never its content, which holds a secret).
    """
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        for i, field in enumerate(fields):
            if field.startswith("#"):
                del fields[i:]
                break
        if not fields:
            continue
        if len(fields) != 2:
            raise ValueError(f"line {number}: expected 'subject token'")
        subject, token = fields
        pairs.append((subject, token))
    return pairs


#: What a verifier holds for each algorithm: the secret, or the parsed public key.
JWTKey = str | rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def jwt_key(algorithm: str, material: str) -> JWTKey:
    """The verification key for ``algorithm`` from the text of a setting or file.

    Raises:
        ValueError: the text is not a usable key of that algorithm: an HS256
            secret shorter than :data:`MIN_HS256_SECRET_BYTES` or holding a PEM
            key; for RS256/ES256, not a PEM public key (a private key, a
            certificate, a secret), a key of another type, an RSA key under
            :data:`MIN_RSA_KEY_BITS`, an EC key not on P-256. The message
            never quotes the material.
    """
    if algorithm == "HS256":
        if len(material.encode()) < MIN_HS256_SECRET_BYTES:
            raise ValueError(f"the HS256 secret is shorter than {MIN_HS256_SECRET_BYTES} bytes")
        if "-----BEGIN" in material:
            raise ValueError("the HS256 secret is a PEM key; RS256 or ES256 take a public key")
        return material
    try:
        key = serialization.load_pem_public_key(material.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"not a PEM public key ({_what_pem(material)})") from None
    if algorithm == "RS256":
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("RS256 needs an RSA public key; this is another kind of key")
        if key.key_size < MIN_RSA_KEY_BITS:
            raise ValueError(f"the RSA key has {key.key_size} bits; RS256 needs {MIN_RSA_KEY_BITS}")
        return key
    if algorithm == "ES256":
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("ES256 needs an EC public key; this is another kind of key")
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"ES256 needs a key on P-256 (secp256r1), not {key.curve.name}")
        return key
    raise ValueError(f"unsupported algorithm {algorithm}")


def _what_pem(material: str) -> str:
    """Say what a PEM text that is not a public key is, without quoting it."""
    if "PRIVATE KEY-----" in material:
        return "a private key: give the issuer's public key"
    if "CERTIFICATE-----" in material:
        return "a certificate: give the public key it holds"
    if "-----BEGIN" in material:
        return "a PEM block of another kind"
    return "no PEM block: a secret or another file?"


class JWTVerifier:
    """JSON Web Tokens: signature, ``exp`` and ``sub`` required, ``nbf`` honoured.

    Args:
        key: the HS256 secret, or the public key for RS256/ES256, as
            :func:`jwt_key` makes them (a PEM text is parsed here the same way).
        algorithm: the one algorithm accepted (never taken from the token).
        audience: required ``aud``, if set.
        issuer: required ``iss``, if set.
        leeway_s: clock skew allowed on ``exp`` and ``nbf``.

    Raises:
        ValueError: ``key`` is not a usable key of ``algorithm`` (see :func:`jwt_key`).
    """

    def __init__(
        self,
        key: JWTKey,
        algorithm: str,
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: float = 0.0,
    ) -> None:
        self._key = jwt_key(algorithm, key) if isinstance(key, str) else key
        self._algorithms = [algorithm]
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway_s

    def authenticate(self, token: str | None) -> Identity | Refusal:  # noqa: D102
        if token is None:
            return _MISSING
        if not token:
            return _EMPTY
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.MissingRequiredClaimError as exc:  # claim: one of ours (exp, sub, aud, iss)
            return Refusal(401, f"invalid token: no {exc.claim} claim")
        except jwt.PyJWTError as exc:
            return _jwt_refusal(exc)
        except Exception:
            # Whatever a token makes the library raise: fail closed, and never
            # as a 500, for a token is only ever refused.
            return _INVALID
        subject = claims["sub"]
        if (
            not isinstance(subject, str)
            or not 0 < len(subject) <= MAX_ID_CHARS
            # JSON's \ud800 escapes decode to lone surrogates, which no frame can carry.
            or not _utf8_encodable(subject)
        ):
            return Refusal(401, "invalid token: sub must be a string of 1 to 256 characters")
        return Identity(subject)


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


#: PyJWT's errors, most specific first, and the refusal for each. The reasons
#: are relayd's own: PyJWT's messages can quote the token (an unknown critical
#: extension, a header value that does not decode).
_JWT_REFUSALS: Final[tuple[tuple[type[jwt.PyJWTError], Refusal], ...]] = (
    (jwt.ExpiredSignatureError, Refusal(401, "token expired")),
    (jwt.ImmatureSignatureError, Refusal(401, "token not yet valid")),
    (jwt.InvalidAudienceError, Refusal(403, "token not for this server: wrong audience")),
    (jwt.InvalidIssuerError, Refusal(403, "token not for this server: wrong issuer")),
    (jwt.InvalidAlgorithmError, Refusal(401, "invalid token: the algorithm is not allowed")),
    (jwt.InvalidSignatureError, Refusal(401, "invalid token: bad signature")),
    (jwt.DecodeError, Refusal(401, "invalid token: malformed")),
    (jwt.InvalidIssuedAtError, Refusal(401, "invalid token: iat is not a number")),
)


def _jwt_refusal(error: jwt.PyJWTError) -> Refusal:
    for kind, refusal in _JWT_REFUSALS:
        if isinstance(error, kind):
            return refusal
    return _INVALID
