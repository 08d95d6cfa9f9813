"""Reading the secrets the settings point at: tokens, keys, certificates.

Called once at start-up, before anything listens, so that an unreadable key
or a malformed tokens file stops relayd with exit status 78 and a line naming
the setting, like any other bad setting, instead of failing the first client.
Nothing read here is ever logged.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from relayd.config import AuthSettings, TLSSettings
from relayd.errors import ConfigError
from relayd.policy.auth import Authenticator, JWTVerifier, StaticTokens, parse_tokens_file

__all__ = ["load_authenticator", "load_tls"]


def _read(key: str, path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(f"cannot read {path}: {reason}", key=key, source="in settings") from error


def load_authenticator(settings: AuthSettings) -> Authenticator | None:
    """The authenticator for ``[auth]``, or None when authentication is off.

    Raises:
        ConfigError: a file cannot be read or parsed, or the mode lacks its key.
    """
    if settings.mode == "off":
        return None
    if settings.mode == "token":
        tokens = {subject: token.get_secret_value() for subject, token in settings.tokens.items()}
        if settings.tokens_file:
            try:
                tokens |= parse_tokens_file(_read("auth.tokens_file", settings.tokens_file))
            except ValueError as error:
                raise ConfigError(
                    str(error), key="auth.tokens_file", source="in settings"
                ) from error
        if not tokens:
            raise ConfigError(
                "no tokens: set tokens or tokens_file", key="auth.mode", source="in settings"
            )
        return StaticTokens(tokens)
    if settings.jwt_algorithm == "HS256":
        secret = settings.jwt_secret.get_secret_value()
        if settings.jwt_secret_file:
            secret = _read("auth.jwt_secret_file", settings.jwt_secret_file).strip()
        if not secret:
            raise ConfigError(
                "HS256 needs jwt_secret or jwt_secret_file",
                key="auth.jwt_secret",
                source="in settings",
            )
        key = secret
    else:
        if not settings.jwt_public_key_file:
            raise ConfigError(
                f"{settings.jwt_algorithm} needs jwt_public_key_file",
                key="auth.jwt_public_key_file",
                source="in settings",
            )
        key = _read("auth.jwt_public_key_file", settings.jwt_public_key_file)
    return JWTVerifier(
        key,
        settings.jwt_algorithm,
        audience=settings.jwt_audience or None,
        issuer=settings.jwt_issuer or None,
        leeway_s=settings.jwt_leeway_s,
    )


def load_tls(settings: TLSSettings) -> ssl.SSLContext | None:
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
            source="in settings",
        ) from error
    return context
