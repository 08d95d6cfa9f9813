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
reason for the log. Neither ever contains the token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Mapping
from typing import Final, Protocol
from urllib.parse import parse_qs, urlsplit

import jwt

from relayd.wire.dialects import MAX_ID_CHARS
from relayd.wire.handshake import Refusal

__all__ = [
    "Authenticator",
    "Identity",
    "JWTVerifier",
    "StaticTokens",
    "parse_tokens_file",
    "token_from",
]

_BEARER: Final = "bearer "


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated client; ``subject`` is its id."""

    subject: str


class Authenticator(Protocol):
    """Turns the token a handshake carried into an identity, or refuses it."""

    def authenticate(self, token: str | None) -> Identity | Refusal:
        """Check ``token`` (None when the handshake carried none)."""


def token_from(headers: Mapping[str, str], target: str) -> str | None:
    """The bearer token of a handshake: the Authorization header, else ``?token=``.

    Args:
        headers: request headers, names in lower case.
        target: the request target (path and query).
    """
    authorization = headers.get("authorization", "")
    if authorization[: len(_BEARER)].lower() == _BEARER:
        return authorization[len(_BEARER) :].strip() or None
    values = parse_qs(urlsplit(target).query).get("token")
    return values[0] if values else None


_MISSING: Final = Refusal(401, "no bearer token (Authorization header or ?token=)")
_INVALID: Final = Refusal(401, "invalid token")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class StaticTokens:
    """Opaque bearer tokens, each naming one subject.

    Tokens are kept as SHA-256 digests and compared in constant time, so
    neither memory dumps nor response timing give a token away.

    Args:
        tokens: subject -> token.
    """

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._subjects = [(_digest(token), subject) for subject, token in tokens.items()]

    def authenticate(self, token: str | None) -> Identity | Refusal:  # noqa: D102
        if token is None:
            return _MISSING
        presented = _digest(token)
        found = None
        for digest, subject in self._subjects:  # no early exit: constant time
            if hmac.compare_digest(digest, presented):
                found = subject
        return _INVALID if found is None else Identity(found)


def parse_tokens_file(text: str) -> dict[str, str]:
    """Parse a tokens file: one ``subject token`` pair per line; ``#`` starts a comment.

    Raises:
        ValueError: a line is not exactly two fields (the message gives its number
            but never its content, which holds a secret).
    """
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ValueError(f"line {number}: expected 'subject token'")
        subject, token = fields
        tokens[subject] = token
    return tokens


class JWTVerifier:
    """JSON Web Tokens: signature, ``exp`` and ``sub`` required, ``nbf`` honoured.

    Args:
        key: the HS256 secret, or the PEM public key for RS256/ES256.
        algorithm: the one algorithm accepted (never taken from the token).
        audience: required ``aud``, if set.
        issuer: required ``iss``, if set.
        leeway_s: clock skew allowed on ``exp`` and ``nbf``.
    """

    def __init__(
        self,
        key: str,
        algorithm: str,
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: float = 0.0,
    ) -> None:
        self._key = key
        self._algorithms = [algorithm]
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway_s

    def authenticate(self, token: str | None) -> Identity | Refusal:  # noqa: D102
        if token is None:
            return _MISSING
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
        except jwt.ExpiredSignatureError:
            return Refusal(401, "token expired")
        except jwt.ImmatureSignatureError:
            return Refusal(401, "token not yet valid")
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as exc:
            return Refusal(403, f"token not for this server: {exc}")
        except jwt.InvalidTokenError as exc:
            return Refusal(401, f"invalid token: {exc}")
        subject = claims["sub"]
        if not isinstance(subject, str) or not 0 < len(subject) <= MAX_ID_CHARS:
            return Refusal(401, "invalid token: sub must be a string of 1 to 256 characters")
        return Identity(subject)
