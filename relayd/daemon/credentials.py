"""Reading the secrets the settings point at: tokens, keys, certificates.

Called once at start-up, before anything listens, so that an unreadable key
or a malformed tokens file stops relayd with exit status 78 and a line naming
the setting, like any other bad setting, instead of failing the first client.
Nothing read here is ever logged.

Each function takes ``source``, which says where a setting's value came from
(:meth:`relayd.config_sources.Loaded.source`: ``in PATH``, ``from environment
NAME``...), so that its errors name the file or variable to fix; without it
they say ``in settings``.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from relayd.config import AdminSettings, AuthSettings, TLSSettings
from relayd.errors import ConfigError
from relayd.policy.auth import (
    Authenticator,
    JWTVerifier,
    StaticTokens,
    jwt_key,
    parse_tokens_file,
)

__all__ = [
    "MIN_API_KEY_CHARS",
    "FileReader",
    "Sources",
    "load_api_key",
    "load_authenticator",
    "load_tls",
]

#: The shortest server API key accepted: 32 characters of base64 are 192 bits.
MIN_API_KEY_CHARS = 32

_T = TypeVar("_T")

#: Where a setting's value came from, by dotted key: ``in PATH``, ``from environment NAME``...
Sources = Callable[[str], str]
#: Reads a file's bytes by its path; raises OSError.
FileReader = Callable[[str], bytes]


def _in_settings(_key: str) -> str:
    """The source of every key when none is known (settings built in code)."""
    return "in settings"


def _read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def _read(key: str, path: str, source: Sources, read_file: FileReader) -> str:
    try:
        return read_file(path).decode()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(f"cannot read {path}: {reason}", key=key, source=source(key)) from error


def load_authenticator(
    settings: AuthSettings, source: Sources = _in_settings, read_file: FileReader = _read_bytes
) -> Authenticator | None:
    """The authenticator for ``[auth]``, or None when authentication is off.

    A credential that is missing is blamed on where ``auth.mode`` was set; one that
    is bad, on where it (or its file's name) was.

    Every credential is parsed and checked here, at start and at each reload, so
    that a bad one is a config error (exit status 78, or a refused reload)
    rather than a failure at the first handshake: tokens shorter than
    :data:`~relayd.policy.auth.MIN_TOKEN_CHARS`, HS256 secrets shorter than
    :data:`~relayd.policy.auth.MIN_HS256_SECRET_BYTES`, and key files that are
    not a public key of the configured algorithm (:func:`~relayd.policy.auth.jwt_key`).
    Only the files the mode uses are read, each once, with ``read_file``.

    Raises:
        ConfigError: a file cannot be read or parsed, a credential is too weak
            or of the wrong kind, or the mode lacks its key. The message never
            quotes a secret.
    """
    if settings.mode == "off":
        return None
    if settings.mode == "token":
        tokens = [(subject, token.get_secret_value()) for subject, token in settings.tokens.items()]
        static = _checked("auth.tokens", lambda: StaticTokens(tokens), source)
        if settings.tokens_file:
            text = _read("auth.tokens_file", settings.tokens_file, source, read_file)
            try:
                tokens += parse_tokens_file(text)
            except ValueError as error:
                raise ConfigError(
                    str(error), key="auth.tokens_file", source=source("auth.tokens_file")
                ) from error
            # Blamed on the file: the table alone passed.
            static = _checked("auth.tokens_file", lambda: StaticTokens(tokens), source)
        if not tokens:
            raise ConfigError(
                "no tokens: set tokens or tokens_file", key="auth.mode", source=source("auth.mode")
            )
        return static
    algorithm = settings.jwt_algorithm
    if algorithm == "HS256":
        material, key_name = settings.jwt_secret.get_secret_value(), "auth.jwt_secret"
        if settings.jwt_secret_file:
            key_name = "auth.jwt_secret_file"
            material = _read(key_name, settings.jwt_secret_file, source, read_file).strip()
        if not material:
            raise ConfigError(
                "HS256 needs jwt_secret or jwt_secret_file",
                key="auth.jwt_secret",
                source=source("auth.mode"),
            )
    else:
        key_name = "auth.jwt_public_key_file"
        if not settings.jwt_public_key_file:
            raise ConfigError(
                f"{algorithm} needs jwt_public_key_file", key=key_name, source=source("auth.mode")
            )
        material = _read(key_name, settings.jwt_public_key_file, source, read_file)
    return JWTVerifier(
        _checked(key_name, lambda: jwt_key(algorithm, material), source),
        algorithm,
        audience=settings.jwt_audience or None,
        issuer=settings.jwt_issuer or None,
        leeway_s=settings.jwt_leeway_s,
    )


def _checked(key: str, make: Callable[[], _T], source: Sources) -> _T:
    """What ``make`` makes of the credential ``key``; a config error if it raises ValueError."""
    try:
        return make()
    except ValueError as error:
        raise ConfigError(str(error), key=key, source=source(key)) from None


def load_tls(settings: TLSSettings, source: Sources = _in_settings) -> ssl.SSLContext | None:
    """A server TLS context from ``[tls]``, or None for plain ``ws://``.

    TLS 1.2 at least, the ssl module's default ciphers; no client certificates.

    Raises:
        ConfigError: the certificate or key cannot be loaded.
    """
    if not settings.cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    except (OSError, ssl.SSLError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(
            f"cannot load {settings.cert_file} with {settings.key_file}: {reason}",
            key="tls.cert_file",
            source=source("tls.cert_file"),
        ) from error
    return context


def load_api_key(
    settings: AdminSettings, source: Sources = _in_settings, read_file: FileReader = _read_bytes
) -> bytes | None:
    """The server API's key from ``api_key_file``, or None when there is none.

    The file holds the key on one line; surrounding whitespace (a final newline) is not
    part of it.

    Raises:
        ConfigError: the file cannot be read, or the key is shorter than
            :data:`MIN_API_KEY_CHARS` or spans several lines.
    """
    if not settings.api_key_file:
        return None
    key = _read("admin.api_key_file", settings.api_key_file, source, read_file).strip()
    if len(key) < MIN_API_KEY_CHARS or any(character.isspace() for character in key):
        raise ConfigError(
            f"the key in {settings.api_key_file} must be one word of at least "
            f"{MIN_API_KEY_CHARS} characters (e.g. from `openssl rand -base64 32`)",
            key="admin.api_key_file",
            source=source("admin.api_key_file"),
        )
    return key.encode()
