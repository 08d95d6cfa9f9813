"""relayd's settings: one frozen, validated object built once at start-up (DESIGN §3).

What owns what:

- The models (:class:`Settings` and its sections) own the keys, their types, defaults and
  bounds. Nothing else in relayd repeats a default; ``config/relayd.toml`` shows every key at
  its default and a test keeps the two equal.
- :mod:`relayd.config_sources` owns where values come from (file, environment, flags), their
  precedence, and the operator's messages about them.

:class:`Settings` reads nothing by itself: ``Settings()`` is the built-in defaults,
everywhere, tests included.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Annotated, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DRAIN_SLACK_S",
    "AdminSettings",
    "AuthSettings",
    "ClusterSettings",
    "DiagnosticsSettings",
    "LimitsSettings",
    "LogSettings",
    "ServerSettings",
    "Settings",
    "TLSSettings",
    "grace_too_short",
    "settings_as_json",
]

DEFAULT_CONFIG_PATH = Path("/etc/relayd/relayd.toml")

# Infinity and NaN are refused: every "off" switch is spelled 0, and NaN passes no bound.
_SECTION_CONFIG = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


#: The longest ``cluster.reply_timeout_s``: a server API call in a cluster holds one of
#: the admin listener's 48 connections for up to 5 s (its request) + this + 2 s (the
#: router's margin, the answer), and a relayed message its sender's reply slot for this
#: long. Another node's answer normally comes within milliseconds.
MAX_REPLY_TIMEOUT_S: Final = 30.0
#: In a cluster ``server.shutdown_grace_s`` must exceed ``cluster.reply_timeout_s`` by more
#: than this: a server API call in progress at a drain waits for the router up to
#: ``reply_timeout_s`` + 1 s and has 1 s to be written.
DRAIN_SLACK_S: Final = 2.0
#: A host name: labels of letters (any script's: the resolver encodes them), digits,
#: hyphens and underscores (which /etc/hosts may hold), none empty nor starting with a
#: hyphen, joined by dots; a trailing dot allowed.
_HOST_NAME: Final = re.compile(r"(?!-)[\w-]+(?:\.(?!-)[\w-]+)*\.?")


def _listen_host(value: str) -> str:
    """An address to listen on: ``""`` (every interface), an IP address, or a host name.

    Checked here, not first when relayd binds: a typo (``999.1.1.1``, `` 127.0.0.1``,
    ``[::1]``) is then a config error (exit 78, which stops systemd's restarts),
    not a failure to listen that looks like a port in use. Digits and dots alone are
    an IPv4 address in any form the resolver takes (``0``, ``127.1``), or a typo.
    """
    if value == "":
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        mistyped = not _HOST_NAME.fullmatch(value)
        if not mistyped and not value.strip("0123456789."):
            try:
                socket.inet_aton(value)
            except OSError:
                mistyped = True
        if mistyped:
            raise ValueError(
                "not an IP address or a host name (an IPv6 address goes without brackets)"
            ) from None
    return value


#: The host of a listener: see :func:`_listen_host`.
ListenHost = Annotated[str, AfterValidator(_listen_host)]


class ServerSettings(BaseModel):
    """The public listener.

    Attributes:
        host: address to listen on; ``""`` means all interfaces, IPv4 and IPv6.
        port: TCP port; 0 picks a free port (for tests).
        shutdown_grace_s: seconds given to open connections to flush on shutdown.
        allowed_origins: browser origins allowed to connect, matched exactly against
            the ``Origin`` header (e.g. ``https://chat.example.com``); others get 403.
            Empty allows every origin. Clients that send no ``Origin`` (not browsers)
            are not affected.
        reuse_port: bind host/port with ``SO_REUSEPORT``, so that several relayd
            processes of one user serve one port and the kernel spreads new connections
            evenly over them (:mod:`relayd.daemon.listeners`). No effect on sockets
            systemd hands over.
    """

    model_config = _SECTION_CONFIG

    host: ListenHost = ""
    port: int = Field(default=9030, ge=0, le=65535)
    shutdown_grace_s: float = Field(default=10.0, gt=0)
    allowed_origins: tuple[str, ...] = ()
    reuse_port: bool = False


class LimitsSettings(BaseModel):
    """Security limits for a public port; units are in the names.

    Attributes:
        max_connections: established connections in total (handshakes in progress are
            counted apart, in max_handshakes).
        max_connections_per_ip: established connections per client IP address.
        max_handshakes: TCP connections accepted whose WebSocket handshake is not decided
            yet (an accepted one counts as a connection from then on), in total; over it,
            a new connection is closed at once, unread.
        max_handshakes_per_ip: the same per client IP address.
        max_message_bytes: largest client message accepted.
        outbox_messages: messages queued per connection before it counts as slow.
        slow_consumer_timeout_s: how long an outbox may stay full before its connection is
            closed with 1013.
        messages_per_second: sustained messages a connection may send.
        message_burst: messages a connection may send at once (the token bucket's size).
        frames_per_second: sustained frames a connection may send, every kind counted
            (fragments, pings, empty frames); over it the connection is closed with 1008.
        frame_burst: frames a connection may send at once.
        max_auth_failures_per_ip: with authentication on, failed authentications (401) one
            client address may make at once before its handshakes get 429; 0 turns it off.
        auth_failure_window_s: seconds over which an address's failure budget refills
            (one more try every auth_failure_window_s / max_auth_failures_per_ip).
        handshake_timeout_s: time allowed for the opening handshake.
        max_header_bytes: largest HTTP request head (request line and headers) of a
            handshake; larger ones are answered 431.
        idle_timeout_s: close a connection silent this long; 0 turns it off.
        ping_interval_s: seconds of silence from a client before the server pings it, and
            between its pings while the silence lasts; 0 turns pings off.
        pong_timeout_s: time allowed for the pong to a ping.
    """

    model_config = _SECTION_CONFIG

    max_connections: int = Field(default=10000, gt=0)
    max_connections_per_ip: int = Field(default=256, gt=0)
    max_handshakes: int = Field(default=1024, gt=0)
    max_handshakes_per_ip: int = Field(default=16, gt=0)
    max_message_bytes: int = Field(default=65536, gt=0)
    outbox_messages: int = Field(default=16, gt=0)
    slow_consumer_timeout_s: float = Field(default=10.0, gt=0)
    messages_per_second: float = Field(default=50.0, gt=0)
    message_burst: int = Field(default=100, gt=0)
    frames_per_second: float = Field(default=1000.0, gt=0)
    frame_burst: int = Field(default=2000, gt=0)
    max_auth_failures_per_ip: int = Field(default=10, ge=0)
    auth_failure_window_s: float = Field(default=60.0, gt=0)
    handshake_timeout_s: float = Field(default=10.0, gt=0)
    max_header_bytes: int = Field(default=16384, ge=1024)
    idle_timeout_s: float = Field(default=3600.0, ge=0)
    ping_interval_s: float = Field(default=30.0, ge=0)
    pong_timeout_s: float = Field(default=15.0, gt=0)


class LogSettings(BaseModel):
    """Logging (DESIGN §4).

    Attributes:
        level: lowest level written.
        format: ``json`` lines for journald, or ``console`` for a person at a terminal.
        messages: which messages get a ``message.relay`` event: ``all``; ``refusals``,
            every message not delivered; ``sampled``, every refusal and a random
            ``messages_sample`` of the delivered ones; ``off``, none. Every message is
            counted in ``relayd_messages_total`` whatever this says. ``true`` and
            ``false``, the spellings of when this was a switch, mean ``all`` and ``off``.
        messages_sample: with ``messages = "sampled"``, the fraction of delivered
            messages logged, from 0 (none) to 1 (all).
        bodies: include message bodies in ``message.relay``; off, bodies are never logged.
    """

    model_config = _SECTION_CONFIG

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    messages: Literal["all", "refusals", "sampled", "off"] = "all"
    messages_sample: float = Field(default=0.01, ge=0, le=1)
    bodies: bool = False

    @field_validator("messages", mode="before")
    @classmethod
    def _switch(cls, value: object) -> object:
        # Configs written when this was a bool (config/relayd.toml had messages = true)
        # keep working; an environment variable carries the word.
        legacy = {True: "all", False: "off", "true": "all", "false": "off"}
        return legacy.get(value, value) if isinstance(value, bool | str) else value


class AdminSettings(BaseModel):
    """The admin listener: ``/metrics`` (Prometheus), ``/healthz``, ``/readyz``, the server API.

    Attributes:
        enabled: serve it at all.
        host: its address; loopback by default, never the public interface unless
            the operator says so.
        port: its TCP port; 0 picks a free one (for tests).
        api_key_file: a file holding the server API's key (docs/api.md), which every
            API call must then present; empty: no key, allowed only while ``host`` is
            loopback.
    """

    model_config = _SECTION_CONFIG

    enabled: bool = True
    host: ListenHost = "127.0.0.1"
    port: int = Field(default=9031, ge=0, le=65535)
    api_key_file: str = ""


class DiagnosticsSettings(BaseModel):
    """Routes for testing relayd itself; none of them is for production traffic.

    Attributes:
        echo: serve ``/echo``, where every message a client sends comes back to it
            unchanged (text or binary), through the same reader, writer and limits as
            relayed messages. The Autobahn conformance suite needs it.
    """

    model_config = _SECTION_CONFIG

    echo: bool = False


class TLSSettings(BaseModel):
    """Serving ``wss://``: both files, or neither for plain ``ws://``.

    Attributes:
        cert_file: PEM certificate chain, the server's certificate first.
        key_file: PEM private key of that certificate.
    """

    model_config = _SECTION_CONFIG

    cert_file: str = ""
    key_file: str = ""

    @model_validator(mode="after")
    def _both_or_neither(self) -> TLSSettings:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together: set both or neither")
        return self


class AuthSettings(BaseModel):
    """Authentication of clients at the handshake (docs/security.md).

    Attributes:
        mode: ``off``; ``token``, static bearer tokens; ``jwt``, JSON Web Tokens.
        tokens: for ``token``: subject -> token.
        tokens_file: for ``token``: a file of ``subject token`` lines, added to ``tokens``
            (a subject may have several tokens; see :func:`relayd.policy.auth.parse_tokens_file`).
        jwt_algorithm: for ``jwt``: HS256 (shared secret), RS256 or ES256 (public key).
        jwt_secret: for HS256: the shared secret.
        jwt_secret_file: for HS256: a file holding the shared secret instead.
        jwt_public_key_file: for RS256/ES256: the issuer's PEM public key.
        jwt_audience: the ``aud`` tokens must carry; empty: not checked.
        jwt_issuer: the ``iss`` tokens must carry; empty: not checked.
        jwt_leeway_s: clock skew allowed when checking ``exp`` and ``nbf``.
    """

    model_config = _SECTION_CONFIG

    mode: Literal["off", "token", "jwt"] = "off"
    tokens: dict[str, SecretStr] = Field(default_factory=dict)
    tokens_file: str = ""
    jwt_algorithm: Literal["HS256", "RS256", "ES256"] = "HS256"
    jwt_secret: SecretStr = SecretStr("")
    jwt_secret_file: str = ""
    jwt_public_key_file: str = ""
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_leeway_s: float = Field(default=30.0, ge=0)


class ClusterSettings(BaseModel):
    """Several relayd nodes sharing one Redis (docs/scaling.md); off by default.

    Attributes:
        enabled: be a node of a cluster; off, nothing of the cluster is imported.
        broker_url: the Redis server: ``redis://[user@]host[:port][/db]``,
            ``rediss://`` for TLS, or ``unix:///path/to/redis.sock[?db=N]``. A
            password never goes in the URL (settings are printed and logged):
            it goes in ``password_file``.
        password_file: a file holding the Redis password (``AUTH``); empty: none.
        tls_ca_file: for ``rediss://``: PEM CA certificates to verify Redis by;
            empty: the system's.
        node_name: this node's name in the cluster, unique among its nodes;
            empty: ``<hostname>-<pid>-<random>``, new at every start.
        channel_prefix: prefix of every Redis channel and key relayd uses, so
            that several clusters can share one Redis.
        connect_timeout_s: time allowed to connect to Redis and complete its
            handshake.
        reply_timeout_s: how long a message sent to another node waits for that
            node's answer before its sender is told ``delivery_unconfirmed``; at
            most :data:`MAX_REPLY_TIMEOUT_S`.
        probe_interval_s: seconds between probes: each node publishes to itself
            through Redis and expects the probe back on its subscription.
        probe_timeout_s: a probe not back within this many seconds means the
            link is broken, even if its TCP connections look open: relayd
            reconnects.
        node_timeout_s: a node that has not refreshed its heartbeat for this
            long counts as gone: its ids answer ``unknown_recipient``.
        reconnect_max_s: the longest wait between two attempts to reconnect
            (the waits double from 0.1 s up to this, with jitter).
        publish_buffer_bytes: bytes of messages for other nodes that may wait
            for Redis at once; beyond it senders are told ``recipient_unreachable``.
    """

    model_config = _SECTION_CONFIG

    enabled: bool = False
    broker_url: str = "redis://127.0.0.1:6379/0"
    password_file: str = ""
    tls_ca_file: str = ""
    # Up to 128: the relayd@PORT units name theirs <hostname>-<port>, and a host name
    # may have 64 characters (HOST_NAME_MAX).
    node_name: str = Field(default="", pattern=r"^[A-Za-z0-9._-]{0,128}$")
    channel_prefix: str = Field(default="relayd:", pattern=r"^[A-Za-z0-9._:{}-]{1,64}$")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    reply_timeout_s: float = Field(default=2.0, gt=0, le=MAX_REPLY_TIMEOUT_S)
    probe_interval_s: float = Field(default=1.0, gt=0)
    probe_timeout_s: float = Field(default=3.0, gt=0)
    node_timeout_s: float = Field(default=5.0, gt=0)
    reconnect_max_s: float = Field(default=5.0, ge=0.1)
    publish_buffer_bytes: int = Field(default=4194304, ge=65536)

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        url = urlsplit(value)
        if url.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"scheme must be redis://, rediss:// or unix://, not {url.scheme!r}")
        if url.password is not None:
            raise ValueError("no password in the URL: put it in password_file")
        if url.scheme == "unix":
            if not url.path:
                raise ValueError("unix:// needs a socket path, e.g. unix:///run/redis/redis.sock")
            db = dict(pair.partition("=")[::2] for pair in url.query.split("&") if pair).get("db")
        else:
            if not url.hostname:
                raise ValueError("no host")
            url.port  # noqa: B018 - reading it checks it
            db = url.path.strip("/") or None
        if db is not None and not (db.isdigit() and len(db) <= 5):
            raise ValueError(f"the database must be a number, not {db!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ClusterSettings:
        url = urlsplit(self.broker_url)
        if self.tls_ca_file and url.scheme != "rediss":
            raise ValueError("tls_ca_file is for rediss:// only")
        if self.probe_timeout_s <= self.probe_interval_s:
            raise ValueError("probe_timeout_s must be longer than probe_interval_s")
        if self.node_timeout_s <= self.probe_interval_s:
            raise ValueError("node_timeout_s must be longer than probe_interval_s")
        return self


class Settings(BaseSettings):
    """Every setting relayd has, one section per table of ``config/relayd.toml``.

    Build it with :func:`relayd.config_sources.load`; ``Settings()`` alone gives the built-in
    defaults and reads no file and no environment.
    """

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    server: ServerSettings = Field(default_factory=ServerSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    tls: TLSSettings = Field(default_factory=TLSSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    diagnostics: DiagnosticsSettings = Field(default_factory=DiagnosticsSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Read only the values passed in; :mod:`relayd.config_sources` gathers the sources."""
        return (init_settings,)


def settings_as_json(settings: Settings) -> str:
    """Return the effective settings as indented JSON, as ``relayd check-config`` prints them."""
    return settings.model_dump_json(indent=2)


def grace_too_short(grace_s: float, reply_timeout_s: float, reply_source: str) -> str | None:
    """Why a cluster node's ``server.shutdown_grace_s`` is too short, or None.

    A drain waits up to ``cluster.reply_timeout_s`` for the other nodes' answers to the
    messages in flight, and a server API call already waiting for them is answered
    within :data:`DRAIN_SLACK_S` more; the grace must hold that. It does not promise
    more: a call whose request is still arriving may take 6 s (docs/api.md), which the
    default grace holds and a shorter one cuts, cluster or not. ``reply_source``: where
    the ``reply_timeout_s`` compared against comes from, as an error names it.
    """
    if grace_s > reply_timeout_s + DRAIN_SLACK_S:
        return None
    return (
        f"is {grace_s:g} s, must be more than cluster.reply_timeout_s + {DRAIN_SLACK_S:g} s"
        f" ({reply_timeout_s:g} s, {reply_source}) in a cluster: a drain waits that long for"
        " other nodes' answers to the server API calls and messages in flight"
    )
